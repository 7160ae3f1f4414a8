"""The streaming mode of an operator: ``stream_for``, ``poll_interval`` and ``log_every``, the stop
flag ``on_kill`` and SIGTERM set, and the loop (:func:`~airflow_sync_provider.core.streaming.run_stream`)
over a stream's probe and step."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from airflow.sdk import BaseOperator

from airflow_sync_provider.core import ConfigurationError
from airflow_sync_provider.core.streaming import (
    LOG_EVERY,
    BatchOutcome,
    StopFlag,
    StreamStats,
    run_stream,
    stop_on_signals,
)

#: ``:param`` lines of :class:`StreamingOperator`'s arguments (what a probe costs is the subclass's to say).
STREAM_PARAMS_DOC = """
    :param stream_for: stream: run micro-batches (each one exactly-once batch) for this long, then
        end so the next run takes over (``schedule="@continuous"``, ``max_active_runs=1``); a
        ``timedelta`` or seconds.  ``None`` (default): one batch.  The task holds a worker slot
        while it streams. (templated)
    :param poll_interval: streaming: seconds to wait when the probe finds nothing to do. (templated)
    :param log_every: streaming: seconds between two throughput and lag log lines.
"""

#: Template fields of the streaming arguments.
STREAM_TEMPLATE_FIELDS: tuple[str, ...] = ("stream_for", "poll_interval")


def seconds_of(value: dt.timedelta | float | str | None, name: str) -> float | None:
    """Seconds from a ``timedelta``, a number or a rendered template (``""``/``"None"``: not given)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return None
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    else:
        try:
            seconds = float(value)
        except ValueError as error:
            raise ConfigurationError(f"{name} must be a number of seconds or a timedelta, not {value!r}") from error
    if seconds < 0:
        raise ConfigurationError(f"{name} must not be negative, not {value!r}")
    return seconds


class Stream(Protocol):
    """What a stream gives the loop: a cheap probe and one exactly-once batch."""

    def probe(self) -> bool: ...

    def step(self) -> BatchOutcome: ...


class StreamingOperator(BaseOperator):
    __doc__ = (
        """An operator that can stream: with ``stream_for`` its ``execute`` runs micro-batches until
    then (or until ``on_kill``); without, one batch.
"""
        + STREAM_PARAMS_DOC
    )

    _stop: StopFlag | None = None  # made per run: an Event cannot be deep-copied with the task

    def __init__(
        self,
        *,
        stream_for: dt.timedelta | float | str | None = None,
        poll_interval: float | str = 1.0,
        log_every: float = LOG_EVERY,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stream_for = stream_for
        self.poll_interval = poll_interval
        self.log_every = log_every

    def stream_seconds(self) -> float | None:
        """The rendered ``stream_for`` in seconds; None: run one batch."""
        return seconds_of(self.stream_for, "stream_for")

    def on_kill(self) -> None:
        """Cancelled or marked failed: a stream stops after the batch in flight (one transaction)."""
        if self._stop is not None:
            self._stop.request("task killed")

    @contextmanager
    def stopping(self) -> Iterator[StopFlag]:
        """This run's stop flag, set by ``on_kill``, SIGTERM and SIGINT while the block runs."""
        stop = self._stop = StopFlag()
        with stop_on_signals(stop):
            yield stop

    def run_stream(
        self, stream: Stream, stop: StopFlag, *, stream_for: float, what: str, probe_first: bool = False
    ) -> StreamStats:
        """Loop over ``stream``'s probe and step for ``stream_for`` seconds (see :func:`run_stream`)."""
        return run_stream(
            stream.step,
            probe=stream.probe,
            stream_for=stream_for,
            poll_interval=seconds_of(self.poll_interval, "poll_interval") or 0.0,
            stop=stop,
            logger=self.log,
            log_every=float(self.log_every),
            what=what,
            probe_first=probe_first,
        )


__all__: Sequence[str] = (
    "STREAM_PARAMS_DOC",
    "STREAM_TEMPLATE_FIELDS",
    "Stream",
    "StreamingOperator",
    "seconds_of",
)
