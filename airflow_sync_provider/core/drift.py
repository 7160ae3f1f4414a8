"""Schema drift: what a load does when the source's columns changed since the last committed load.

Every committed load records the columns (name and PostgreSQL type) it synced into the state row
(``source_schema``, keyed by target table, written in the load's transaction; see
:func:`.state.write_source_schema`).  The next load compares the manifest's columns with that record
and with the target table, and follows the sync's ``schema_drift`` policy:

==================  ==================================  ===============================  ==========================
source change       ``evolve``                          ``freeze`` (default)             ``discard``
==================  ==================================  ===============================  ==========================
column added        ``ADD COLUMN`` (nullable; rows      fail                             ignored: the column is not
                    synced before keep NULL there                                        loaded
                    until they change at the source)
column dropped      kept in the target, NOT NULL        fail                             as ``evolve`` (no DDL: a
                    dropped; rows inserted from now on                                   NOT NULL target column
                    hold NULL, older rows keep their                                     fails)
                    last synced value
column renamed      = dropped + added (the message      fail                             = dropped + ignored
                    names the likely rename)
type widened        ``ALTER COLUMN TYPE`` the new       fail                             fail, unless the target
(int -> bigint,     type (unless the target column                                       column already holds
varchar(10) ->      already holds every value of it)                                     every value of the new
varchar(50), ...)                                                                        type
type narrowed       fail (the target keeps old rows     fail                             kept: the (wider) target
                    the narrower type may not hold)                                      holds every new value
type changed        fail                                fail                             fail
(int -> text, ...)
==================  ==================================  ===============================  ==========================

Why ``freeze`` is the default: a sync must never change the schema downstream users (views, models,
dashboards) depend on, nor silently stop carrying data, unless it was told to.  ``freeze`` fails
*before* anything is written, so target and state stay exactly as they were, and the message names
the table, the column, the old and new type, and the ways out; switching a sync to ``evolve`` or
``discard`` is one argument.  It is also what the provider did before the policy existed (a new
column failed the load).  A manifest written before this field existed loads as ``freeze``.

How a human acknowledges a change under ``freeze``: make the target match (add the column, alter
its type to the new one, drop the column), or run the sync once with ``evolve`` / ``discard``;
either way the next committed load records the new columns.

Not drift: a target created or altered by hand with types different from the source's (a wider
``text`` for a ``varchar(10)``, say) is left alone.  Type drift is judged against the recorded source
columns, never against the target, so a target that cannot hold a value still fails at COPY, naming
the row.  Without a record (the first load after upgrading), only columns the target lacks count
as added.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg
from psycopg import sql

from airflow_sync_provider.core.errors import SchemaError
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.schema import validate_pg_type

SchemaDrift = Literal["evolve", "freeze", "discard"]

#: Each policy is described in the module docstring.
SCHEMA_DRIFT_POLICIES: tuple[str, ...] = ("evolve", "freeze", "discard")
#: The fail-safe default (see the module docstring for why).
DEFAULT_SCHEMA_DRIFT: SchemaDrift = "freeze"

Comparison = Literal["same", "widened", "narrowed", "changed"]
ChangeKind = Literal["added", "dropped", "widened", "narrowed", "changed"]

# --------------------------------------------------------------------------- types

_ALIASES = {
    "int2": "smallint",
    "smallint": "smallint",
    "int": "integer",
    "int4": "integer",
    "integer": "integer",
    "int8": "bigint",
    "bigint": "bigint",
    "decimal": "numeric",
    "numeric": "numeric",
    "float4": "real",
    "real": "real",
    "float8": "double precision",
    "float": "double precision",
    "double precision": "double precision",
    "varchar": "varchar",
    "character varying": "varchar",
    "text": "text",
    "char": "char",
    "character": "char",
    "bpchar": "char",
    "bool": "boolean",
    "boolean": "boolean",
    "timestamp": "timestamp",
    "timestamp without time zone": "timestamp",
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "time": "time",
    "time without time zone": "time",
    "timetz": "timetz",
    "time with time zone": "timetz",
}
_INTEGER_DIGITS = {"smallint": 5, "integer": 10, "bigint": 19}
_INTEGER_RANK = {"smallint": 1, "integer": 2, "bigint": 3}
_FRACTIONAL_SECONDS = {"timestamp", "timestamptz", "time", "timetz", "interval"}
_TYPE = re.compile(
    r"^(?P<head>[a-z_][a-z0-9_ ]*?)\s*(?:\((?P<args>[0-9 ,]*)\))?(?P<tail>[a-z ]*?)\s*(?P<arrays>(\[\])*)$"
)


@dataclass(frozen=True)
class PgType:
    """A PostgreSQL type expression in canonical form (``varchar(10)`` == ``CHARACTER VARYING(10)``)."""

    base: str
    args: tuple[int, ...] = ()
    dims: int = 0

    def __str__(self) -> str:
        args = f"({', '.join(map(str, self.args))})" if self.args else ""
        return f"{self.base}{args}{'[]' * self.dims}"


def parse_pg_type(text: str) -> PgType:
    """Canonical form of a type as SQLAlchemy compiles it or ``format_type`` prints it."""
    raw = " ".join(text.strip().lower().split())
    match = _TYPE.match(raw)
    if match is None:
        return PgType(raw)
    head = " ".join(f"{match['head']}{match['tail'] or ''}".split())
    args = tuple(int(a) for a in (match["args"] or "").replace(" ", "").split(",") if a)
    base = _ALIASES.get(head, head)
    if base == "varchar" and not args:
        base = "text"  # varchar without a length holds what text holds
    return PgType(base, args, len(match["arrays"] or "") // 2)


def _widens(old: PgType, new: PgType) -> bool:
    """Whether every value of ``old`` is a value of ``new``, unchanged (new is strictly wider)."""
    if old == new or old.dims != new.dims:
        return False
    a, b = old.base, new.base
    if a in _INTEGER_RANK and b in _INTEGER_RANK:
        return _INTEGER_RANK[a] < _INTEGER_RANK[b]
    if a in _INTEGER_DIGITS and b == "numeric":
        return not new.args or (new.args[0] - (new.args[1] if len(new.args) > 1 else 0)) >= _INTEGER_DIGITS[a]
    if a in ("smallint", "integer") and b == "double precision":
        return True
    if a == "smallint" and b == "real":
        return True
    if (a, b) == ("real", "double precision"):
        return True
    if a == b == "numeric":
        if not new.args:
            return bool(old.args)
        if not old.args:
            return False
        old_scale = old.args[1] if len(old.args) > 1 else 0
        new_scale = new.args[1] if len(new.args) > 1 else 0
        return new_scale >= old_scale and new.args[0] - new_scale >= old.args[0] - old_scale
    if a in ("varchar", "text") and b in ("varchar", "text"):
        if b == "text":
            return a == "varchar"
        return a == "varchar" and new.args[0] > old.args[0]
    if a == b == "char" or a == b == "bit varying":
        return bool(old.args and new.args and new.args[0] > old.args[0])
    if a == b and a in _FRACTIONAL_SECONDS:
        return (old.args[0] if old.args else 6) < (new.args[0] if new.args else 6)
    return False


def compare_types(old: str, new: str) -> Comparison:
    """How a column's type moved from ``old`` to ``new``."""
    before, after = parse_pg_type(old), parse_pg_type(new)
    if before == after:
        return "same"
    if _widens(before, after):
        return "widened"
    if _widens(after, before):
        return "narrowed"
    return "changed"


def holds(target_type: str, source_type: str) -> bool:
    """Whether a target column of ``target_type`` holds every value of ``source_type`` unchanged."""
    return compare_types(source_type, target_type) in ("same", "widened")


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class ColumnChange:
    kind: ChangeKind
    column: str
    old_type: str | None = None
    new_type: str | None = None
    #: For an added column: a dropped column of the same type it probably is (a rename).
    renamed_from: str | None = None

    def describe(self) -> str:
        if self.kind == "added":
            rename = f" (looks like {self.renamed_from!r} renamed)" if self.renamed_from else ""
            return f"column {self.column!r} {self.new_type} was added at the source{rename}"
        if self.kind == "dropped":
            return f"the source table no longer has column {self.column!r} {self.old_type} (dropped or renamed)"
        return (
            f"column {self.column!r} changed type at the source from {self.old_type} to {self.new_type} ({self.kind})"
        )


def detect_drift(
    known: Sequence[tuple[str, str]] | None,
    current: Sequence[ManifestColumn],
    target: Mapping[str, str],
    check_types: bool = True,
) -> list[ColumnChange]:
    """Changes of the source's columns (``current``) since the recorded ones (``known``).

    A column the target lacks counts as added even without a record; dropped columns and type
    changes need the record (a target column the source never had may be the user's own).
    ``check_types=False``: the record names types differently (see :class:`.state.SourceSchema`).
    """
    changes: list[ColumnChange] = []
    before = dict(known or ())
    now = {c.name: c.pg_type for c in current}
    dropped = [name for name in before if name not in now and name in target]
    for column in current:
        if column.name not in target:
            same_type = [d for d in dropped if compare_types(before[d], column.pg_type) == "same"]
            renamed = same_type[0] if len(same_type) == 1 and len(dropped) == 1 else None
            changes.append(ColumnChange("added", column.name, None, column.pg_type, renamed))
        elif column.name in before and check_types:
            moved = compare_types(before[column.name], column.pg_type)
            if moved != "same":
                changes.append(ColumnChange(moved, column.name, before[column.name], column.pg_type))
    changes += [ColumnChange("dropped", name, before[name], None) for name in dropped]
    return changes


# --------------------------------------------------------------------------- policy


@dataclass
class DriftPlan:
    """What a load does about the drift: DDL to run on the target, and columns it leaves out."""

    policy: str
    changes: list[ColumnChange]
    statements: list[sql.Composed] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)


def _acknowledged(change: ColumnChange, target: Mapping[str, str]) -> bool:
    """Under ``freeze``: a human already gave the target column the source's new type."""
    retyped = change.kind in ("widened", "narrowed", "changed")
    return retyped and compare_types(target[change.column], change.new_type or "-") == "same"


def _fail(manifest: Manifest, display: str, policy: str, changes: Sequence[ColumnChange], why: str) -> SchemaError:
    details = "; ".join(c.describe() for c in changes)
    return SchemaError(
        f"schema drift: {details}. {why}",
        sync_id=manifest.sync_id,
        table=display,
        column=[c.column for c in changes],
        rule=f"schema drift: {policy}",
    )


def plan_drift(
    manifest: Manifest,
    known: Sequence[tuple[str, str]] | None,
    target: Mapping[str, str],
    not_null: Sequence[str] = (),
    policy: str | None = None,
    check_types: bool = True,
) -> DriftPlan:
    """Decide what to do under the manifest's policy, or raise a :class:`SchemaError` naming the rule."""
    policy = policy or getattr(manifest, "schema_drift", None) or DEFAULT_SCHEMA_DRIFT
    display = f"{manifest.target_schema}.{manifest.target_table}"
    if policy not in SCHEMA_DRIFT_POLICIES:
        raise SchemaError(
            f"unknown schema_drift policy {policy!r} (expected one of {', '.join(SCHEMA_DRIFT_POLICIES)})",
            sync_id=manifest.sync_id,
            table=display,
            rule="schema drift",
        )
    changes = detect_drift(known, manifest.columns, target, check_types)
    plan = DriftPlan(policy, changes)
    if not changes:
        return plan
    ident = sql.Identifier(manifest.target_schema, manifest.target_table)
    if policy == "freeze":
        # A human may already have made the target match (that is how a change is acknowledged).
        pending = [c for c in changes if not _acknowledged(c, target)]
        if pending:
            raise _fail(
                manifest,
                display,
                policy,
                pending,
                "schema_drift='freeze' keeps the target's columns as they are: make the target match "
                "(add / alter / drop the column), or run the sync with schema_drift='evolve' (change the "
                "target to follow) or 'discard' (keep syncing the known columns)",
            )
        return plan

    refused = [c for c in changes if c.kind == "changed" or (c.kind == "narrowed" and policy == "evolve")]
    if policy == "evolve":
        refused += [
            c for c in changes if c.kind == "widened" and compare_types(target[c.column], c.new_type or "") == "changed"
        ]
    else:
        refused += [c for c in changes if c.kind == "widened" and not holds(target[c.column], c.new_type or "")]
        refused += [c for c in changes if c.kind == "dropped" and c.column in not_null]
    if refused:
        why = {
            "evolve": "schema_drift='evolve' adds columns and widens types, but a narrowed or changed type "
            "cannot be applied to the target automatically (its rows may not fit the new type, or mean "
            "something else): alter the target column by hand, then re-run",
            "discard": "schema_drift='discard' keeps the target's columns as they are, but the target column "
            "cannot hold every value of the new type (or, for a dropped column, is NOT NULL): alter the "
            "target column by hand, then re-run",
        }[policy]
        raise _fail(manifest, display, policy, refused, why)

    for change in changes:
        column = sql.Identifier(change.column)
        if change.kind == "added" and policy == "evolve":
            new_type = validate_pg_type(change.new_type or "")
            plan.statements.append(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(ident, column, sql.SQL(new_type)))
            plan.actions.append(f"added column {change.column!r} {new_type}")
        elif change.kind == "added":
            plan.discarded.append(change.column)
            plan.actions.append(f"ignored new column {change.column!r} {change.new_type}")
        elif change.kind == "dropped":
            if change.column in not_null:
                plan.statements.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(ident, column))
            plan.actions.append(f"kept dropped column {change.column!r}: rows synced from now on hold NULL there")
        elif (
            change.kind == "widened" and policy == "evolve" and not holds(target[change.column], change.new_type or "-")
        ):
            new_type = validate_pg_type(change.new_type or "")
            plan.statements.append(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(ident, column, sql.SQL(new_type))
            )
            plan.actions.append(f"widened column {change.column!r} from {target[change.column]} to {new_type}")
        else:
            plan.actions.append(
                f"kept column {change.column!r} as {target[change.column]} (holds every {change.new_type} value)"
            )
    return plan


def not_null_columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull "
        "AND NOT a.atthasdef",
        (schema, table),
    ).fetchall()
    return [str(r[0]) for r in rows]


def apply_drift(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    known: Sequence[tuple[str, str]] | None,
    target: Mapping[str, str],
    log: Logger | None = None,
    check_types: bool = True,
) -> DriftPlan:
    """Inside the load transaction: plan (or refuse) and run the DDL; returns the plan.

    The DDL commits with the data and the state (or rolls back with them).  Columns ``discard``
    leaves out are in ``plan.discarded``: load :func:`narrowed` ``(manifest, plan.discarded)``.
    """
    log = log or LOG
    not_null = not_null_columns(conn, manifest.target_schema, manifest.target_table)
    plan = plan_drift(manifest, known, target, not_null, check_types=check_types)
    for statement in plan.statements:
        conn.execute(statement)
    history = getattr(manifest, "history_table", None)
    if plan.statements and history:
        _evolve_history(conn, manifest.target_schema, history, plan)
    if plan.changes:
        log.warning(
            "sync %s: schema drift in %s.%s (schema_drift=%s): %s -> %s",
            manifest.sync_id,
            manifest.target_schema,
            manifest.target_table,
            plan.policy,
            "; ".join(c.describe() for c in plan.changes),
            "; ".join(plan.actions),
        )
    if plan.discarded:
        narrowed(manifest, plan.discarded)  # refuses a CDC batch before anything else runs
    return plan


def _column_types(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, tuple[str, bool]]:
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (schema, table),
    ).fetchall()
    return {str(r[0]): (str(r[1]), bool(r[2])) for r in rows}


def _evolve_history(conn: psycopg.Connection[Any], schema: str, history: str, plan: DriftPlan) -> None:
    """``evolve`` keeps an SCD2 history table (see :mod:`.history`) in step with the target table."""
    columns = _column_types(conn, schema, history)
    if not columns:
        return  # not created yet: it will be created from the evolved target
    ident = sql.Identifier(schema, history)
    for change in plan.changes:
        column = sql.Identifier(change.column)
        if change.kind == "added" and change.column not in columns:
            new_type = sql.SQL(validate_pg_type(change.new_type or ""))
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(ident, column, new_type))
        elif change.kind == "widened" and change.column in columns:
            if not holds(columns[change.column][0], change.new_type or "-"):
                new_type = sql.SQL(validate_pg_type(change.new_type or ""))
                conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(ident, column, new_type))
        elif change.kind == "dropped" and columns.get(change.column, ("", False))[1]:
            conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(ident, column))


def narrowed(manifest: Manifest, discarded: Sequence[str]) -> Manifest:
    """The manifest to load when ``discard`` leaves ``discarded`` columns out.

    The staged Parquet files keep the columns; the stage, COPY and merge take the manifest's.  CDC
    batches mark unchanged TOAST values by column *position*, so leaving a column out would shift
    them: refused there.
    """
    if manifest.mode == "cdc":
        raise SchemaError(
            f"schema_drift='discard' cannot leave out column(s) {list(discarded)} of a CDC batch",
            sync_id=manifest.sync_id,
            table=f"{manifest.target_schema}.{manifest.target_table}",
            column=list(discarded),
            rule="schema drift: discard",
        )
    return replace(manifest, columns=tuple(c for c in manifest.columns if c.name not in set(discarded)))


def recorded_columns(manifest: Manifest) -> list[tuple[str, str]]:
    """The columns a committed load records as the source's (after ``discard`` left some out)."""
    return [(c.name, c.pg_type) for c in manifest.columns]
