"""Errors that name what went wrong: the sync, the table, the column, the row key and the rule.

Every failure a user can cause (bad config, missing objects, bad rows) raises a subclass of
:class:`SyncError`, so operators can fail the task with a message a person can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def first_line(error: BaseException) -> str:
    """The first line of a (driver) error message, for messages that quote it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class SyncError(Exception):
    """Base class; the message is prefixed with the context it was raised in."""

    def __init__(
        self,
        message: str,
        *,
        sync_id: str | None = None,
        table: str | None = None,
        column: str | Sequence[str] | None = None,
        key: Mapping[str, Any] | None = None,
        rule: str | None = None,
    ) -> None:
        self.reason = message
        self.sync_id = sync_id
        self.table = table
        self.column = column
        self.key = dict(key) if key is not None else None
        self.rule = rule
        super().__init__(self._render())

    def _render(self) -> str:
        context = []
        if self.sync_id:
            context.append(f"sync={self.sync_id!r}")
        if self.table:
            context.append(f"table={self.table!r}")
        if self.column:
            column = self.column if isinstance(self.column, str) else ", ".join(self.column)
            context.append(f"column={column!r}")
        if self.key:
            context.append("key=(" + ", ".join(f"{k}={v!r}" for k, v in self.key.items()) + ")")
        if self.rule:
            context.append(f"rule={self.rule}")
        prefix = f"[{' '.join(context)}] " if context else ""
        return prefix + self.reason

    def with_context(self, **context: Any) -> SyncError:
        """Fill in context the raiser did not know (e.g. the sync id), keeping what it did know."""
        for name, value in context.items():
            if getattr(self, name, None) is None:
                setattr(self, name, value)
        self.args = (self._render(),)
        return self

    def __str__(self) -> str:
        return self._render()


def database_error(
    error: BaseException,
    doing: str,
    *,
    sync_id: str | None,
    table: str | None,
    unavailable: type[UnavailableError] | None = None,
) -> SyncError:
    """A driver error raised while ``doing`` something, as the :class:`SyncError` a person acts on.

    A lost, refused or shut-down connection is an :class:`UnavailableError` (a retry can succeed,
    so operators let Airflow retry it): ``unavailable``, by default :class:`SourceUnavailableError`
    (pass :class:`TargetUnavailableError` for an error of the target's connection).  Any other
    failed statement is a plain :class:`SyncError` (it would fail the same way again).
    """
    import psycopg
    from sqlalchemy import exc as sa_exc

    cause = getattr(error, "orig", None) or error
    lost = (
        getattr(error, "connection_invalidated", False)
        or isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError))
        or isinstance(cause, (psycopg.OperationalError, psycopg.InterfaceError))
    )
    kind: type[SyncError] = (unavailable or SourceUnavailableError) if lost else SyncError
    return kind(f"{doing} failed: {first_line(cause)}", sync_id=sync_id, table=table)


class ConfigurationError(SyncError):
    """The sync is declared wrongly (bad option, missing cursor column for incremental mode...)."""


class UnavailableError(SyncError):
    """A database could not be reached or its connection was lost: a retry can succeed.

    Operators let Airflow retry these (every other :class:`SyncError` fails the task at once).
    Catch this base class for both sides; the subclasses say which side failed.
    """


class SourceUnavailableError(UnavailableError):
    """The source could not be reached (missing connection, refused, auth failed) or was lost mid-read."""


class TargetUnavailableError(UnavailableError):
    """The target could not be reached (missing connection, refused, auth failed) or was lost mid-load."""


class SchemaError(SyncError):
    """A table, column or primary key the sync needs does not exist or does not fit."""


class DataError(SyncError):
    """A row cannot be synced as it is: NULL or duplicate key, value the target cannot hold."""


class UnsafeOperationError(SyncError):
    """The load would do something a guard forbids (e.g. delete more than allowed)."""
