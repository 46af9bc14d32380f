"""The tasks' retry conditions: a permanent error is not retried, any other failure is (Prefect's own states)."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from pointvl.core.chat_client import FatalAPIError
from pointvl.core.errors import InputError
from pointvl.core.fence import LockLost
from pointvl.tasks.stage_tasks import _retry_unless_fatal, retry_unless_input_error


def _failed(err: Exception) -> Failed:
    return Failed(data=err)


@pytest.mark.parametrize("condition, permanent, transient", [
    (retry_unless_input_error, [InputError("no weights"), LockLost("taken")], [RuntimeError("CUDA error"), OSError()]),
    (_retry_unless_fatal, [FatalAPIError("bad key"), ValueError("bad config"), FileNotFoundError(), LockLost("x")],
     [ConnectionError("reset"), RuntimeError("batch still running")]),
])
def test_permanent_errors_are_not_retried(condition, permanent, transient):
    assert [condition(None, None, _failed(e)) for e in permanent] == [False] * len(permanent)
    assert [condition(None, None, _failed(e)) for e in transient] == [True] * len(transient)
    assert condition(None, None, Completed()) is True
