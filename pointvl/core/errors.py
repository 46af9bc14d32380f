"""The error users fix themselves: bad input, a bad config, a run folder of another build.

The CLI reports these as one line without a traceback; anything else is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """Input or configuration the build cannot use; the message says what to fix."""


# What one model's or view's data can raise in numpy, trimesh, Open3D, Pillow or a stage's own checks:
# such an error drops that item with a reason, never the shard. OSError (storage) and MemoryError are
# faults of the run and are not among them.
ITEM_ERRORS: tuple[type[Exception], ...] = (ValueError, ArithmeticError, IndexError, RuntimeError)


def check_range(key: str, value: float, lo: float, hi: float, default: object, why: str = "") -> None:
    """Raise ``ValueError`` naming ``key``, its bounds and its default unless ``lo <= value <= hi``."""
    if not lo <= value <= hi:
        reason = f"; {why}" if why else ""
        raise ValueError(f"{key} must be in [{lo:g}, {hi:g}] (default {default}{reason}), got {value!r}")
