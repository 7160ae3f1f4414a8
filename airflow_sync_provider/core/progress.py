"""Progress lines for long work: rows so far and rows/s, at most every ``interval`` seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

LOG = logging.getLogger("airflow_sync_provider")


class Logger(Protocol):
    """What the engine needs of a logger: ``logging.Logger`` and Airflow's task logger both fit."""

    def info(self, msg: str, /, *args: Any) -> Any: ...

    def warning(self, msg: str, /, *args: Any) -> Any: ...


#: Called at the phases of a load ("staged", "merged", "committed") with a small dict of facts.
#: Useful for metrics; the crash tests use it to kill the process between merge and commit.
PhaseObserver = Callable[[str, dict[str, Any]], None]


class Progress:
    def __init__(self, what: str, logger: Logger | None = None, interval: float = 10.0) -> None:
        self.what = what
        self.log: Logger = logger or LOG
        self.interval = interval
        self.rows = 0
        self.started = time.monotonic()
        self._last_report = self.started

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self._last_report >= self.interval:
            self._last_report = now
            self.log.info("%s: %s rows so far (%s rows/s)", self.what, f"{self.rows:,}", f"{self.rate:,.0f}")

    def done(self, extra: str = "") -> None:
        self.log.info(
            "%s: %s rows in %.2f s (%s rows/s)%s",
            self.what,
            f"{self.rows:,}",
            self.elapsed,
            f"{self.rate:,.0f}",
            f"; {extra}" if extra else "",
        )
