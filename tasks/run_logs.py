"""pointvl's log lines in the flow run's logs (the Prefect UI), in every process that runs a flow.

Prefect sends a logger's records to the API when the logger has its ``APILogHandler``. With
``PREFECT_LOGGING_EXTRA_LOGGERS=pointvl`` it adds that handler but not a level
(prefect/logging/configuration.py:130-134 at 3.8.8 copies only the handlers of ``prefect.extra``), so the
``pointvl`` logger keeps the root's: WARNING under Prefect's logging.yml (``root: level: WARNING``), which is what a
worker-started flow process has. INFO lines (stage progress, SFT ``i/n loss``) then never reach the UI, while a
local ``pointvl build`` (whose ``logging.basicConfig`` sets the root to INFO) sends them. Each flow calls
:func:`send_library_logs` first, so the level and the handler are right however the process was started (a
worker, a Docker image without the variable, ``pointvl build``).

A flow that refuses its input (an :class:`~pointvl.core.errors.InputError`, e.g. a training hand-off that could not
start) returns a Failed state whose message is the one line; Prefect logs it once ("Finished in state
Failed(...)"). The engine of a worker-started flow run then raises the failed state's error and logs it again with
its traceback ("Engine execution exited with unexpected exception", prefect/flow_engine.py:2271-2275 at 3.8.8, on
the run's logger ``prefect.flow_runs``; prefect/engine.py:119-127 on ``prefect.engine``): :func:`send_library_logs`
also drops those records when their error is a refusal, so a refusal reads as one line, once, without traceback.
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import APILogHandler

from pointvl.core.errors import InputError


class _DropRefusalTraceback(logging.Filter):
    """Drop a Prefect engine record that repeats a refusal (an InputError, reported as the run's state) with
    its traceback; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        while err is not None:
            if isinstance(err, InputError):
                return False
            err = err.__cause__ or err.__context__
        return True


_REFUSAL_FILTER = _DropRefusalTraceback()


def send_library_logs(level: int = logging.INFO) -> None:
    """Send ``pointvl.*`` records of ``level`` and above to the run's logs, and keep a refusal's traceback out of
    them (idempotent; a lower level set by the user, e.g. DEBUG, is kept)."""
    logger = logging.getLogger("pointvl")
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        logger.addHandler(APILogHandler())
    for name in ("prefect.flow_runs", "prefect.engine"):
        logging.getLogger(name).addFilter(_REFUSAL_FILTER)  # a set: adding it again changes nothing
