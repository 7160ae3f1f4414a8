"""What the operators share: how a ``SyncError`` fails a task, XCom manifests, the staging location
(default, connection URIs, the executor check), transforms by path, the target connection of a run,
the sync declaration (the ``SyncSpec`` arguments) of the table operators, and the explicit signature
of an operator whose base class takes most of its arguments.

Importing this module registers :func:`airflow_sync_provider.staging_location.resolve` with the
core, so staging URIs that name a connection (``s3://aws_default@bucket/prefix``) resolve in every
task that runs one of the provider's operators, including a load that only has a manifest.
"""

from __future__ import annotations

import ast
import datetime as dt
import importlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from typing import Any, Protocol, TypeVar

import psycopg
from airflow.sdk.exceptions import AirflowFailException

from airflow_sync_provider import staging_location
from airflow_sync_provider.core import ConfigurationError, Manifest, SyncError, SyncSpec, UnavailableError
from airflow_sync_provider.core.extract import BatchTransform
from airflow_sync_provider.core.staging import StagingArea, register_filesystem_resolver
from airflow_sync_provider.core.status import RunContext, record_run_context
from airflow_sync_provider.hooks.target import target_connection

register_filesystem_resolver(staging_location.resolve)

#: Executors that run every task on the machine of the scheduler (so a local staging folder is shared).
LOCAL_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})

#: Template fields of the sync declaration (every operator declaring a :class:`SyncSpec`).
SPEC_TEMPLATE_FIELDS: tuple[str, ...] = (
    "sync_id",
    "source_table",
    "target_table",
    "source_schema",
    "target_schema",
    "cursor_column",
    "source_conn_id",
    "target_conn_id",
    "staging_uri",
)


def as_task_error(error: SyncError) -> Exception:
    """The exception a task raises for ``error``.

    An :class:`UnavailableError` (a database unreachable or lost) as it is, so Airflow retries the
    task; any other :class:`SyncError` (bad config or bad data fails the same way on every retry)
    as ``AirflowFailException``: fail fast, keep the message.
    """
    if isinstance(error, UnavailableError):
        return error
    return AirflowFailException(str(error))


@contextmanager
def task_errors(sync_id: str | None) -> Iterator[None]:
    """A :class:`SyncError` raised in the block fails the task as :func:`as_task_error` says."""
    try:
        yield
    except SyncError as error:
        raise as_task_error(error.with_context(sync_id=sync_id)) from error


def default_staging_uri() -> str | None:
    """``[sync] staging_uri`` from the Airflow config, else ``SYNC_STAGING_DIR``, else the engine default."""
    from airflow.configuration import conf

    return conf.get("sync", "staging_uri", fallback=None) or os.environ.get("SYNC_STAGING_DIR") or None


def configured_executor(task_executor: str | None = None) -> str:
    """The class name of the executor a task runs on: its own ``executor`` argument, else the
    default one (the first of ``[core] executor``, which may list several, ``alias:module.Class``)."""
    from airflow.configuration import conf

    name = task_executor or conf.get("core", "executor", fallback="LocalExecutor").split(",")[0]
    return name.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def check_shared_staging(staging_uri: str, *, executor: str | None = None, what: str = "this task") -> None:
    """Refuse a local staging folder when tasks may run on other machines (any non-local executor).

    The split operators (extract, gate, load as separate tasks) hand batches from one task to the
    next through staging; on CeleryExecutor, KubernetesExecutor, EdgeExecutor... the next task may
    run where the folder does not exist.  Raises :class:`ConfigurationError` naming what to set.
    """
    name = configured_executor(executor)
    if name in LOCAL_EXECUTORS or not StagingArea(staging_uri).is_local:
        return
    raise ConfigurationError(
        f"{what} stages batches in the local folder {staging_uri} but runs on {name}, whose tasks may run "
        "on other machines: set [sync] staging_uri (AIRFLOW__SYNC__STAGING_URI) or the operator's staging_uri "
        "to shared storage, e.g. s3://aws_default@my-bucket/sync-staging (credentials from the Airflow "
        "connection aws_default)"
    )


def staging_area(staging_uri: str | None, *, split: bool = False, executor: str | None = None) -> StagingArea:
    """The :class:`StagingArea` of an operator: its ``staging_uri``, else :func:`default_staging_uri`.

    ``split``: the operator hands its batch to another task (extract, gate, load run separately),
    so the location must be shared when the executor is not local (:func:`check_shared_staging`).
    """
    staging = StagingArea(staging_uri or default_staging_uri())
    if split:
        check_shared_staging(staging.base_uri, executor=executor)
    return staging


def resolve_transform(transform: BatchTransform | str | None) -> BatchTransform | None:
    """Accept a callable or a ``"package.module:function"`` path (handy in templated or YAML DAGs)."""
    if transform is None or callable(transform):
        return transform
    module_name, _, attribute = transform.partition(":")
    if not attribute:
        raise ConfigurationError(f"transform {transform!r} must look like 'package.module:function'")
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise ConfigurationError(f"transform {transform!r} is not callable")
    return function


def xcom_dict(value: Any, *, argument: str = "manifest", producer: str = "an extract task") -> dict[str, Any]:
    """A dict as a templated argument receives it from XCom: a dict (``XComArg``), JSON text, or
    the repr of a dict that Jinja rendered.  ``argument`` and ``producer`` name them in errors."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)  # a Jinja-rendered Python dict
            except (ValueError, SyntaxError):
                raise ConfigurationError(f"{argument} is neither JSON nor a dict") from None
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{argument} must be a dict from {producer}'s XCom, got {type(value).__name__}")
    return dict(value)


def parse_manifest(value: Any) -> Manifest:
    """The table-sync manifest an extract (or gate) task returned, as XCom gives it."""
    if isinstance(value, Manifest):
        return value
    try:
        return Manifest.from_dict(xcom_dict(value))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigurationError(f"manifest is not a table-sync manifest: {error!r}") from error


def manifest_argument(value: Any) -> Manifest:
    """A task's ``manifest`` argument as a :class:`Manifest`; one that is not fails the task (a retry
    would get the same XCom)."""
    try:
        return parse_manifest(value)
    except SyncError as error:
        raise as_task_error(error) from error


def record_dag_run(
    target: psycopg.Connection[Any],
    schema: str,
    sync_id: str,
    context: Mapping[str, Any],
    *,
    source_conn_id: str | None = None,
    slot_name: str | None = None,
) -> None:
    """Tie this run of ``sync_id`` to its DAG and task in the target (``_sync_run_context``), so the
    status view shows a sync only to users who may read its DAG.  Best effort: a target that refuses
    the write (no CREATE privilege, say) costs the view its DAG filter, never the sync."""
    task_instance = context.get("ti") or context.get("task_instance")
    dag_id = getattr(task_instance, "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
    if not dag_id:
        return
    try:
        record_run_context(
            target,
            schema,
            RunContext(
                sync_id=sync_id,
                run_id=str(context["run_id"]),
                dag_id=str(dag_id),
                task_id=str(getattr(task_instance, "task_id", "")),
                source_conn_id=source_conn_id,
                slot_name=slot_name,
            ),
        )
    except psycopg.Error as error:
        logging.getLogger(__name__).warning(
            "sync %s: could not record its DAG %s in %s._sync_run_context: %s", sync_id, dag_id, schema, error
        )


@contextmanager
def target_for_run(
    conn_id: str,
    schema: str,
    sync_id: str,
    context: Mapping[str, Any],
    *,
    source_conn_id: str | None = None,
    slot_name: str | None = None,
) -> Iterator[psycopg.Connection[Any]]:
    """The target connection of a task run, its DAG run recorded (:func:`record_dag_run`), closed after."""
    with closing(target_connection(conn_id, sync_id=sync_id)) as target:
        record_dag_run(target, schema, sync_id, context, source_conn_id=source_conn_id, slot_name=slot_name)
        yield target


_Init = TypeVar("_Init", bound=Callable[..., None])


def extends_signature(*bases: Callable[..., Any]) -> Callable[[_Init], _Init]:
    """Give an operator's ``__init__`` that passes ``**kwargs`` on to its bases' the whole signature.

    The arguments a base class declares are written (typed, with their defaults) once, in that
    base; the subclass declares only its own.  ``inspect.signature`` of the subclass's ``__init__``
    (Airflow's required-argument check and ``partial``/``expand`` validation, the docs) then still
    lists every keyword-only argument the operator takes, in the order base arguments, own arguments.
    """

    def decorate(init: _Init) -> _Init:
        own = inspect.signature(init)
        parameters = list(own.parameters.values())
        head = [p for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY and p.kind is not p.VAR_KEYWORD]
        mine = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        names = {p.name for p in mine}
        inherited: list[inspect.Parameter] = []
        for base in bases:
            for parameter in inspect.signature(base).parameters.values():
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name not in names:
                    names.add(parameter.name)
                    inherited.append(parameter)
        rest = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
        init.__signature__ = own.replace(parameters=[*head, *inherited, *mine, *rest])  # type: ignore[attr-defined]
        return init

    return decorate


class SyncDeclaration(Protocol):
    """The arguments of an operator that declares a table sync (see :class:`SyncSpec`).

    Operators keep them as attributes (templated ones are rendered before ``execute``) and build
    the spec in ``execute`` with :func:`build_sync_spec`.
    """

    sync_id: str
    source_table: str
    target_table: str | None
    source_schema: str | None
    target_schema: str
    mode: str
    cursor_column: str | None
    primary_key: Sequence[str]
    columns: Sequence[str]
    delete_mode: str
    detect_deletes: bool | None
    batch_rows: int
    lag: dt.timedelta
    lookback: dt.timedelta | int | None
    guard_open_transactions: bool
    state_table: str
    max_delete_fraction: float | None
    history_table: str | None
    schema_drift: str


def build_sync_spec(declaration: SyncDeclaration) -> SyncSpec:
    """The validated :class:`SyncSpec` of an operator's (rendered) sync declaration.

    Empty strings (what Jinja renders for nothing) count as not given.  Raises
    :class:`ConfigurationError` for a declaration ``SyncSpec`` refuses.
    """
    return SyncSpec(
        sync_id=declaration.sync_id,
        source_table=declaration.source_table,
        target_table=declaration.target_table or "",
        source_schema=declaration.source_schema or None,
        target_schema=declaration.target_schema,
        mode=declaration.mode,  # type: ignore[arg-type]
        cursor_column=declaration.cursor_column or None,
        primary_key=tuple(declaration.primary_key),
        columns=tuple(declaration.columns),
        delete_mode=declaration.delete_mode,  # type: ignore[arg-type]
        detect_deletes=declaration.detect_deletes,
        batch_rows=declaration.batch_rows,
        lag=declaration.lag,
        lookback=declaration.lookback,
        guard_open_transactions=declaration.guard_open_transactions,
        state_table=declaration.state_table,
        max_delete_fraction=declaration.max_delete_fraction,
        history_table=declaration.history_table or None,
        schema_drift=declaration.schema_drift,  # type: ignore[arg-type]
    )


__all__ = [
    "SPEC_TEMPLATE_FIELDS",
    "SyncDeclaration",
    "as_task_error",
    "build_sync_spec",
    "check_shared_staging",
    "configured_executor",
    "default_staging_uri",
    "extends_signature",
    "manifest_argument",
    "parse_manifest",
    "record_dag_run",
    "resolve_transform",
    "staging_area",
    "target_for_run",
    "task_errors",
    "xcom_dict",
]
