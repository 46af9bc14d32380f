"""``i/n`` progress with rate and ETA for long loops (cleaning 52k models, hundreds of shards).

The library logs the line; whoever runs it may also pass ``publish`` (the flow turns it into a
Prefect progress artifact). Both happen at most every ``every_s`` seconds, and at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Progress:
    def __init__(
        self, what: str, total: int, unit: str, publish: Callable[[Progress], None] | None = None,
        every_s: float = 5.0,
    ) -> None:
        self.what, self.total, self.unit, self.publish, self.every_s = what, total, unit, publish, every_s
        self.done = 0
        self.start = self._last = time.monotonic()
        self._report()

    @property
    def rate(self) -> float:
        """Units per second so far."""
        return self.done / max(time.monotonic() - self.start, 1e-9)

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.done else None

    def line(self) -> str:
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f} s"
        return f"{self.what} {self.done}/{self.total} {self.unit} ({self.rate:.2f}/s, ETA {eta})"

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self.total or time.monotonic() - self._last >= self.every_s:
            self._report()

    def _report(self) -> None:
        self._last = time.monotonic()
        logger.info(self.line())
        if self.publish is not None:
            self.publish(self)
