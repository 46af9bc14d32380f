"""The error users fix themselves: bad input, a bad config, a run folder of another build.

The CLI reports these as one line without a traceback; anything else is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """Input or configuration the build cannot use; the message says what to fix."""
