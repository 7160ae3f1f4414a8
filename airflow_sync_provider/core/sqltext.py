"""SQL text safety: composed queries that run with parameters, whatever the names they hold.

Identifiers and literals are always composed with psycopg's own tools (``sql.Identifier``,
``sql.Literal``) and values are always bound.  One trap remains: psycopg looks for ``%``
placeholders in the whole text of a query run *with parameters*, the quoted identifiers included,
and does not escape ``%`` in them.  Every parameterised statement of the engine therefore runs
through :func:`execute` (or :func:`bindable`, for ``executemany`` and server-side cursors), so a
plain ``sql.Identifier`` is safe in any query, for any name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import AdaptContext


def bindable(query: sql.Composable, context: AdaptContext | None = None) -> sql.Composed:
    """``query`` made safe to run *with parameters*, whatever its identifiers and literals contain.

    psycopg looks for ``%`` placeholders in the whole text of a query run with parameters, the
    quoted identifiers included, and does not escape ``%`` in them: a column ``a%c`` fails with
    "only '%s', '%b', '%t' are allowed as placeholders", ``id %s`` with "positional and named
    placeholders cannot be mixed", ``n %(x)s`` with a missing parameter.  Here every
    :class:`~psycopg.sql.Identifier` and :class:`~psycopg.sql.Literal` of the composed query is
    rendered with ``%`` doubled (the parser turns ``%%`` back into ``%``); the ``sql.SQL`` text
    and the placeholders are left as written.  Running every parameterised statement through
    :func:`execute` (or this, for ``executemany`` and server-side cursors) makes the bug
    impossible for any name, instead of relying on each identifier being wrapped by hand.
    """
    return sql.Composed([_escaped(query, context)])


def _escaped(part: sql.Composable, context: AdaptContext | None) -> sql.Composable:
    if isinstance(part, sql.Composed):
        return sql.Composed([_escaped(inner, context) for inner in part])
    if isinstance(part, sql.Identifier | sql.Literal):
        return sql.SQL(part.as_string(context).replace("%", "%%"))
    return part


def execute(
    conn: psycopg.Connection[Any] | psycopg.Cursor[Any], query: sql.Composable, params: Any = ()
) -> psycopg.Cursor[Any]:
    """``conn.execute(query, params)`` with the query made :func:`bindable` first.

    ``params`` defaults to an empty tuple (never None): the query is always parsed for
    placeholders, so the doubled ``%`` always reads as one.
    """
    return conn.execute(bindable(query, conn), () if params is None else params)


def insert_row(conn: psycopg.Connection[Any], table: sql.Identifier, values: Mapping[str, Any]) -> None:
    """``INSERT INTO table (columns) VALUES (...)`` of one row, every value bound by its column name.

    The column names are the engine's own (they name the placeholders too).
    """
    execute(
        conn,
        sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            table,
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(sql.Placeholder(c) for c in values),
        ),
        dict(values),
    )


__all__ = ["bindable", "execute", "insert_row"]
