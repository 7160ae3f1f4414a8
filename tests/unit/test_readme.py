"""The README's Python API reference is checked against the code, so it cannot drift silently.

The tables under "Python API: the engine without Airflow" (``SyncSpec``/``CdcSpec`` fields with
types and defaults, result fields, state/audit/history/metadata columns, error classes) and the
``run_sync``/``run_cdc_sync`` signatures are parsed and compared with the real classes, functions
and tables; the API example is run against the test PostgreSQL.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest

from airflow_sync_provider.core import errors, history, state
from airflow_sync_provider.core import staging as staging_module
from airflow_sync_provider.core.audit import AUDIT_TABLE, AuditEntry
from airflow_sync_provider.core.cdc import CdcLoadResult, CdcSpec, run_cdc_sync
from airflow_sync_provider.core.load import LoadResult
from airflow_sync_provider.core.quality import QualityError
from airflow_sync_provider.core.spec import DELETED_AT_COLUMN, RUN_ID_COLUMN, SYNCED_AT_COLUMN, SyncSpec
from airflow_sync_provider.core.sync import run_sync

from ..conftest import SyncEnv

README = Path(__file__).resolve().parents[2] / "README.md"
REQUIRED = "required"
NONE = "—"


def readme_lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def section(heading: str) -> list[str]:
    """The lines under a heading (``## x`` or ``### x``, exact text) up to the next heading of that level or above."""
    lines = readme_lines()
    level = heading.split(" ", 1)[0]
    starts = [i for i, line in enumerate(lines) if line == heading]
    assert len(starts) == 1, f"README has {len(starts)} headings {heading!r}"
    body: list[str] = []
    fenced = False
    for line in lines[starts[0] + 1 :]:
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"#{{1,{len(level)}}} ", line):
            break
        body.append(line)
    return body


def cells(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` is a pipe inside a cell)."""
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [p.strip().replace("\\|", "|") for p in parts]


def tables(lines: list[str]) -> list[list[list[str]]]:
    """Every Markdown table in ``lines``: a list of rows of cells, header row first, separator dropped."""
    found: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in lines:
        if line.startswith("|"):
            if current is None:
                current = []
                found.append(current)
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
                current.append(cells(line))
        else:
            current = None
    return found


def table_after(lines: list[str], marker: str) -> list[list[str]]:
    """The first table after the first line that contains ``marker``."""
    start = next(i for i, line in enumerate(lines) if marker in line)
    return tables(lines[start:])[0]


def code(cell: str) -> str:
    """The single code span of a cell: `` `x` `` -> ``x``."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected one code span, got {cell!r}"
    return match.group(1)


def names(cell: str) -> list[str]:
    """Every code span of a cell: `` `a`, `b` `` -> ``[a, b]``."""
    return re.findall(r"`([^`]*)`", cell)


def code_blocks(lines: list[str], language: str = "python") -> list[str]:
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines:
        if current is None and line.strip() == f"```{language}":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


# --------------------------------------------------------------------------- spec field tables

_TYPE_NAMESPACE: dict[str, Any] = {"dt": dt, "Any": Any, "Literal": Literal}


def _default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED


@pytest.mark.parametrize(("heading", "cls"), [("### `SyncSpec` fields", SyncSpec), ("### `CdcSpec` fields", CdcSpec)])
def test_spec_field_table_matches_the_dataclass(heading: str, cls: type) -> None:
    rows = tables(section(heading))[0]
    assert rows[0] == ["Field", "Type", "Default", "Meaning"]
    documented = {code(row[0]): row for row in rows[1:]}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert list(documented) == list(fields), "the README lists other fields (or in another order) than the code"
    hints = typing.get_type_hints(cls)
    for name, (_, type_cell, default_cell, meaning) in documented.items():
        assert eval(code(type_cell), dict(_TYPE_NAMESPACE)) == hints[name], f"{cls.__name__}.{name}: type"
        expected = _default_of(fields[name])
        if expected is REQUIRED:
            assert default_cell == REQUIRED, f"{cls.__name__}.{name} has no default"
        else:
            shown = eval(code(default_cell), dict(_TYPE_NAMESPACE))
            assert shown == expected and type(shown) is type(expected), f"{cls.__name__}.{name}: default"
        assert meaning, f"{cls.__name__}.{name}: no meaning given"


# --------------------------------------------------------------------------- signatures and results


def test_signatures_match_the_functions() -> None:
    blocks = [b for b in code_blocks(section("### `run_sync` and `run_cdc_sync`")) if "def run_sync(" in b]
    assert len(blocks) == 1
    documented = {node.name: node for node in ast.parse(blocks[0]).body if isinstance(node, ast.FunctionDef)}
    functions: dict[str, Callable[..., Any]] = {"run_sync": run_sync, "run_cdc_sync": run_cdc_sync}
    assert set(documented) == set(functions)
    for name, function in functions.items():
        node, signature = documented[name], inspect.signature(function)
        args = node.args
        shown: list[tuple[str, inspect._ParameterKind]] = [
            *((a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args.args),
            *((a.arg, inspect.Parameter.KEYWORD_ONLY) for a in args.kwonlyargs),
        ]
        assert shown == [(p.name, p.kind) for p in signature.parameters.values()], name
        annotations = [ast.unparse(a.annotation) if a.annotation else None for a in [*args.args, *args.kwonlyargs]]
        assert annotations == [p.annotation for p in signature.parameters.values()], f"{name}: annotations"
        positional = [inspect.Parameter.empty] * (len(args.args) - len(args.defaults))
        defaults = [*positional, *(ast.literal_eval(d) for d in args.defaults)]
        defaults += [inspect.Parameter.empty if d is None else ast.literal_eval(d) for d in args.kw_defaults]
        assert defaults == [p.default for p in signature.parameters.values()], f"{name}: defaults"
        assert node.returns is not None and ast.unparse(node.returns) == signature.return_annotation, name
    arguments = {
        n
        for row in table_after(section("### `run_sync` and `run_cdc_sync`"), "| Argument |")[1:]
        for n in names(row[0])
    }
    parameters = {p for f in functions.values() for p in inspect.signature(f).parameters}
    assert arguments == parameters - {"spec"}, "the argument table"


def test_result_table_matches_the_result_classes() -> None:
    rows = table_after(section("### `run_sync` and `run_cdc_sync`"), "| Field | `LoadResult` |")
    assert rows[0] == ["Field", "`LoadResult`", "`CdcLoadResult`"]
    for column, cls, extra in ((1, LoadResult, {"unchanged"}), (2, CdcLoadResult, set())):
        documented = {n for row in rows[1:] if row[column] != NONE for n in names(row[0])}
        assert documented == {f.name for f in dataclasses.fields(cls)} | extra, cls.__name__


# --------------------------------------------------------------------------- tables in the target

TARGET_TABLES = "### Tables the engine keeps in the target"
STATE_MARKER = "**State table** `_sync_state`"
AUDIT_MARKER = f"**Audit ledger** `{AUDIT_TABLE}`"
METADATA_MARKER = "**Metadata columns**"
HISTORY_MARKER = "**SCD2 history table**"


def documented_columns(marker: str) -> list[str]:
    """The column names in the first cell of each row of the table after ``marker``."""
    return [n for row in table_after(section(TARGET_TABLES), marker)[1:] for n in names(row[0])]


def test_state_table_columns_match_the_code() -> None:
    assert documented_columns(STATE_MARKER) == [*state.STATE_COLUMNS, "source_schema"]


def test_metadata_and_history_columns_match_the_code() -> None:
    assert documented_columns(METADATA_MARKER) == [RUN_ID_COLUMN, SYNCED_AT_COLUMN, DELETED_AT_COLUMN]
    assert documented_columns(HISTORY_MARKER) == [name for name, _ in history.HISTORY_COLUMNS]


def test_audit_columns_match_the_code() -> None:
    fields = [f.name for f in dataclasses.fields(AuditEntry)]
    assert documented_columns(AUDIT_MARKER) == ["entry_id", "recorded_at", *fields, "recorded_by"]


def test_error_table_names_every_error_class() -> None:
    rows = tables(section("### Errors"))[0]
    documented = {code(row[0].split(" ")[0]) for row in rows[1:]}
    defined = {
        name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, errors.SyncError)
    }
    assert documented == defined | {QualityError.__name__}
    for row in rows[1:]:
        assert all(row), f"incomplete row {row}"


# --------------------------------------------------------------------------- backfill example


def test_backfill_examples_state_inclusive_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"airflow backfill create[^`]*?--to-date (\S+)", text)
    assert commands, "no backfill example found"
    for to_date in commands:
        # --to-date is inclusive: a whole-day example must end at 23:00, not at the next midnight
        assert not re.match(r"\d{4}-\d\d-\d\d(T00:00(:00)?)?([+-]00:00|Z)?$", to_date), to_date
    assert "**both inclusive**" in text


# --------------------------------------------------------------------------- the example, for real


def _api_example() -> str:
    blocks = [b for b in code_blocks(section("## Python API: the engine without Airflow")) if "run_sync(" in b]
    return blocks[0]


def test_python_api_example_runs(
    env: SyncEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _api_example()
    compiled = compile(example, "README.md (Python API example)", "exec")
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, customer text, amount numeric(10, 2), "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO orders (id, customer, amount) VALUES (1, 'ann', 9.5), (2, 'bob', 3), (3, 'cy', 7)")
    monkeypatch.setenv("SYNC_SOURCE_URL", env.source_url)
    monkeypatch.setenv("SYNC_TARGET_URL", env.server.url(env.target_db, driver="postgresql"))
    monkeypatch.setattr(staging_module, "DEFAULT_STAGING_DIR", str(tmp_path / "staging"))

    exec(compiled, {"__name__": "readme_example"})
    first = capsys.readouterr().out
    assert "applied: 3 staged, 3 inserted, 0 updated, 0 unchanged, 0 deleted; state version 1" in first
    assert "the next run continues after [{'$datetime':" in first

    with env.source() as conn:
        conn.execute("UPDATE orders SET amount = 10, updated_at = now() WHERE id = 1")
        conn.execute("DELETE FROM orders WHERE id = 2")
    exec(compiled, {"__name__": "readme_example"})
    second = capsys.readouterr().out
    assert "applied: 1 staged, 0 inserted, 1 updated, 0 unchanged, 1 deleted; state version 2" in second

    # the documented tables as the engine really created them
    with psycopg.connect(env.server.url(env.target_db, driver="postgresql")) as target:

        def columns(table: str) -> list[str]:
            rows = target.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name = %s ORDER BY ordinal_position",
                (table,),
            ).fetchall()
            return [str(r[0]) for r in rows]

        assert columns("orders") == ["id", "customer", "amount", "updated_at", RUN_ID_COLUMN, SYNCED_AT_COLUMN]
        assert columns("_sync_state") == documented_columns(STATE_MARKER)
        assert columns(AUDIT_TABLE) == documented_columns(AUDIT_MARKER)
