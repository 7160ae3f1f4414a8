"""A log line at least every ``interval`` seconds while a long phase runs, even inside one statement.

Row counters (:class:`~airflow_sync_provider.core.progress.Progress`) speak only when rows arrive; a
slot read waits for the server to decode the whole range before its first row, and a load spends
most of its time in a handful of set-based statements.  ``Watch`` runs a small daemon thread that
logs the current phase and the time spent so far whenever nothing else was said for ``interval``
seconds, so a long CDC run is never silent for longer than that.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from airflow_sync_provider.core.progress import Logger

#: Seconds without a log line before the watch says what is running.
INTERVAL = 10.0


class Watch:
    """``with Watch(log, "sync x: load") as watch: ... watch.phase("merging") ...``."""

    def __init__(self, log: Logger, what: str, interval: float = INTERVAL) -> None:
        self.log = log
        self.what = what
        self.interval = interval
        self.started = time.monotonic()
        self._phase = "starting"
        self._phase_started = self.started
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch: {what}", daemon=True)

    def phase(self, name: str) -> None:
        """Name what runs now (logged by the watch if it runs long)."""
        self._phase, self._phase_started = name, time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            now = time.monotonic()
            self.log.info(
                "%s: still %s (%.0f s in this step, %.0f s in all)",
                self.what,
                self._phase,
                now - self._phase_started,
                now - self.started,
            )

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()
