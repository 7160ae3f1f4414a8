"""CDC operators: stage a batch of changes, apply it, or both in one task; re-snapshot some tables.

The engine is :mod:`airflow_sync_provider.core.cdc` (logical decoding with ``pgoutput``).  The first
run of a sync takes the initial snapshot; later runs stage the committed transactions the slot
holds past the position committed in the target.  XCom carries only the manifest (paths, counts,
LSN range) and the load result, never rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk import BaseOperator, Context

from airflow_sync_provider import lineage
from airflow_sync_provider.assets import emit_table_events
from airflow_sync_provider.core import ConfigurationError, SyncError
from airflow_sync_provider.core.cdc import (
    CdcManifest,
    CdcPosition,
    CdcSpec,
    changes_to_staging,
    committed_cdc_state,
    confirm_applied,
    load_cdc_manifest,
    resnapshot_tables,
    run_cdc_sync,
)
from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn
from airflow_sync_provider.core.spec import DEFAULT_SCHEMA_DRIFT
from airflow_sync_provider.core.streaming import IDLE_ADVANCE_BYTES, CdcStream
from airflow_sync_provider.hooks.cdc import PostgresCdcHook
from airflow_sync_provider.hooks.source import source_connection_defined, source_engine
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.operators.common import (
    as_task_error,
    check_shared_staging,
    extends_signature,
    record_dag_run,
    staging_area,
    task_errors,
    xcom_dict,
)
from airflow_sync_provider.operators.streaming import (
    STREAM_PARAMS_DOC,
    STREAM_TEMPLATE_FIELDS,
    StreamingOperator,
)
from airflow_sync_provider.operators.streaming import seconds_of as seconds_of  # its former home
from airflow_sync_provider.plugins.links import SYNC_LINKS

if TYPE_CHECKING:
    import psycopg
    import sqlalchemy as sa
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_sync_provider.core.cdc import CdcLoadResult

CDC_TEMPLATE_FIELDS: tuple[str, ...] = (
    "sync_id",
    "tables",
    "slot_name",
    "publication",
    "target_schema",
    "source_conn_id",
    "target_conn_id",
    "staging_uri",
)


def _table_list(tables: Sequence[str] | str) -> tuple[str, ...]:
    """A sequence of names, or one string (e.g. a rendered template) of comma-separated names."""
    if isinstance(tables, str):
        return tuple(t.strip() for t in tables.split(",") if t.strip())
    return tuple(tables)


class CdcDeclaration(Protocol):
    """The arguments of an operator that declares a CDC sync (see :class:`CdcSpec`)."""

    sync_id: str | None
    tables: Sequence[str] | str
    target_schema: str
    slot_name: str
    publication: str
    delete_mode: str
    max_changes: int
    batch_rows: int
    batch_bytes: int
    max_batch_bytes: int | None
    max_retained_wal_bytes: int | None
    state_table: str
    schema_drift: str
    history: bool
    decoder: str


def build_cdc_spec(declaration: CdcDeclaration) -> CdcSpec:
    """The validated :class:`CdcSpec` of an operator's (rendered) CDC declaration.

    ``tables`` may be one comma-separated string (a rendered template); ``sync_id`` defaults to the
    name of the only table.  Raises :class:`ConfigurationError` for a declaration it refuses.
    """
    tables = _table_list(declaration.tables)
    sync_id = declaration.sync_id
    if not sync_id:
        if len(tables) != 1:
            raise ConfigurationError(f"a CDC sync of {len(tables)} tables needs an explicit sync_id")
        sync_id = tables[0].rpartition(".")[2]
    return CdcSpec(
        sync_id=sync_id,
        tables=tables,
        target_schema=declaration.target_schema,
        slot_name=declaration.slot_name or "",
        publication=declaration.publication or "",
        delete_mode=declaration.delete_mode,  # type: ignore[arg-type]
        max_changes=int(declaration.max_changes),
        batch_rows=int(declaration.batch_rows),
        batch_bytes=int(declaration.batch_bytes),
        max_batch_bytes=None if declaration.max_batch_bytes is None else int(declaration.max_batch_bytes),
        max_retained_wal_bytes=declaration.max_retained_wal_bytes,
        state_table=declaration.state_table,
        schema_drift=declaration.schema_drift,  # type: ignore[arg-type]
        history=bool(declaration.history),
        decoder=declaration.decoder,  # type: ignore[arg-type]
    )


def log_slot_lag(log: Any, conn_id: str, spec: CdcSpec) -> dict[str, Any]:
    """Log (and return) how much WAL the slot retains and where it is confirmed, without peeking."""
    with source_connection_defined(conn_id, spec.sync_id):
        lag = PostgresCdcHook(source_conn_id=conn_id).slot_lag(spec, check_pending=False)
    log.info("sync %s: %s", spec.sync_id, lag["description"])
    return lag


def parse_cdc_manifest(value: Any) -> CdcManifest:
    """Accept the manifest as XCom gives it: a dict (XComArg), JSON text, or a rendered dict repr."""
    if isinstance(value, CdcManifest):
        return value
    try:
        return CdcManifest.from_dict(xcom_dict(value, producer="a CDC extract task"))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigurationError(f"manifest is not a CDC manifest: {error}") from error


def manifest_spec(manifest: CdcManifest) -> CdcSpec:
    """The spec a manifest was extracted for (enough to confirm its slot)."""
    return CdcSpec(
        sync_id=manifest.sync_id,
        tables=tuple(t.source_table for t in manifest.tables),
        target_schema=manifest.target_schema,
        slot_name=manifest.slot_name,
        publication=manifest.publication,
        delete_mode=manifest.delete_mode,  # type: ignore[arg-type]
        state_table=manifest.state_table,
    )


def manifest_summary(manifest: CdcManifest) -> dict[str, Any]:
    """The manifest without its file lists: what a one-task sync returns as XCom."""
    summary = {k: v for k, v in manifest.to_dict().items() if k not in ("tables", "truncates")}
    summary["tables"] = {t.source_table: t.rows for t in manifest.tables}
    summary["truncates"] = len(manifest.truncates)
    summary["rows"] = manifest.rows
    return summary


#: The ``:param`` lines of a CDC declaration: the arguments of :class:`BaseCdcOperator`, which every
#: operator that declares a sync takes and documents (its docstring ends with them).
_DECLARATION_DOC = """
    :param source_conn_id: Airflow ``postgres`` connection of the source (PostgreSQL 14+,
        ``wal_level=logical``, a user with ``REPLICATION``). (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target; it holds the position. (templated)
    :param tables: source tables (``"table"`` or ``"schema.table"``), or one comma-separated string. (templated)
    :param sync_id: names the sync (and by default its slot and publication); default the name of
        the only table. (templated)
    :param target_schema: schema the tables land in (under their own names). (templated)
    :param slot_name: replication slot; default ``sync_<sync_id>``. (templated)
    :param publication: publication; default ``sync_<sync_id>``. (templated)
    :param delete_mode: ``"hard"`` (delete) or ``"soft"`` (set ``_sync_deleted_at``).
    :param max_changes: at most this many changes per run (a run ends at a transaction boundary).
    :param batch_rows: rows per staged file (bounds memory).
    :param batch_bytes: bytes of changes per staged file (bounds memory for wide rows).
    :param max_batch_bytes: a run ends at the first transaction boundary past this many bytes of
        changes; ``None``: no limit.
    :param max_retained_wal_bytes: fail when the slot retains more WAL than this (e.g. a paused DAG).
    :param state_table: the state table (in ``target_schema``).
    :param schema_drift: when a table's columns changed at the source: ``"freeze"`` (fail) or ``"evolve"``.
    :param history: keep an SCD type 2 history of every table in ``<table>_history``.
    :param decoder: ``"bulk"`` (numpy over a whole read, the default) or ``"per_message"`` (the
        reference pgoutput decoder, kept for comparison and as a fallback).
    :param staging_uri: where batches are staged; default ``[sync] staging_uri``, else
        ``$SYNC_STAGING_DIR``, else a local cache folder. (templated)
"""


class BaseCdcOperator(BaseOperator):
    __doc__ = (
        """Base of the operators that declare a CDC sync: the connections and a :class:`CdcSpec`.

    It keeps the declaration, builds the spec from the rendered arguments, and runs a task's work
    with the source and target open (the run recorded in the target).  A subclass that takes more
    arguments declares only its own and passes the rest on in ``**kwargs``;
    :func:`~airflow_sync_provider.operators.common.extends_signature` gives its ``__init__`` the
    whole signature (these first), and its docstring ends with these ``:param`` lines, then its own.
    The declaration (``tables`` ... ``history``) is that of :class:`~airflow_sync_provider.core.cdc.CdcSpec`.
"""
        + _DECLARATION_DOC
    )

    template_fields: Sequence[str] = CDC_TEMPLATE_FIELDS
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        source_conn_id: str,
        target_conn_id: str,
        tables: Sequence[str] | str,
        sync_id: str | None = None,
        target_schema: str = "public",
        slot_name: str = "",
        publication: str = "",
        delete_mode: str = "hard",
        max_changes: int = 1_000_000,
        batch_rows: int = 50_000,
        batch_bytes: int = 16 * 1024 * 1024,
        max_batch_bytes: int | None = 2 * 1024 * 1024 * 1024,
        max_retained_wal_bytes: int | None = None,
        state_table: str = "_sync_state",
        schema_drift: str = DEFAULT_SCHEMA_DRIFT,
        history: bool = False,
        decoder: str = "bulk",
        staging_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.tables = tables
        self.sync_id = sync_id
        self.target_schema = target_schema
        self.slot_name = slot_name
        self.publication = publication
        self.delete_mode = delete_mode
        self.max_changes = max_changes
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.max_batch_bytes = max_batch_bytes
        self.max_retained_wal_bytes = max_retained_wal_bytes
        self.state_table = state_table
        self.schema_drift = schema_drift
        self.history = history
        self.decoder = decoder
        self.staging_uri = staging_uri

    def build_spec(self) -> CdcSpec:
        """The :class:`CdcSpec` of the (rendered) arguments; raises ``ConfigurationError``."""
        return build_cdc_spec(self)

    def _spec(self) -> CdcSpec:
        with task_errors(self.sync_id):
            return self.build_spec()

    @contextmanager
    def _source_and_target(
        self, spec: CdcSpec, context: Context
    ) -> Iterator[tuple[sa.Engine, psycopg.Connection[Any]]]:
        """The source engine and the target connection of a run (the slot's lag logged first, the
        run tied to its DAG in the target), closed after the block."""
        log_slot_lag(self.log, self.source_conn_id, spec)
        with (
            source_engine(self.source_conn_id, sync_id=spec.sync_id) as engine,
            closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target,
        ):
            record_dag_run(
                target,
                spec.target_schema,
                spec.sync_id,
                context,
                source_conn_id=self.source_conn_id,
                slot_name=spec.slot_name,
            )
            yield engine, target

    def _applied(self, manifest: CdcManifest, result: CdcLoadResult, context: Context) -> dict[str, Any]:
        """What a task that applied ``manifest`` logs, announces (table asset events) and returns."""
        self._manifest, self._result = manifest, result
        self.log.info("%s", manifest.summary())
        emit_table_events(context, self.outlets, self.target_conn_id, lineage.cdc_writes(manifest, result), self.log)
        return {"manifest": manifest_summary(manifest), "load": result.to_dict()}

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The source tables -> the target tables, with column lineage and per-table row counts of
        the batch the task applied (none applied: no datasets)."""
        manifest: CdcManifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        return cdc_lineage(
            manifest,
            getattr(self, "_result", None),
            source_conn_id=self.source_conn_id,
            target_conn_id=self.target_conn_id,
        )


class CdcExtractOperator(BaseCdcOperator):
    __doc__ = (
        """Stage the next CDC batch: the initial snapshot on the first run, then the pending changes.

    Reads the committed position from the target's state table, so it needs ``target_conn_id`` too.
    Returns the manifest (a small dict) as XCom; pass it to :class:`CdcLoadOperator`.  The slot is not
    consumed here: it moves only after the target has committed the batch.  The declaration
    (``tables`` ... ``history``) is that of :class:`~airflow_sync_provider.core.cdc.CdcSpec`.
"""
        + _DECLARATION_DOC
    )

    ui_color = "#e3eefc"

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self._spec()
        with task_errors(spec.sync_id):
            log_slot_lag(self.log, self.source_conn_id, spec)
            manifest = self._extract(spec, context["run_id"])
        self._manifest = manifest
        self.log.info("%s", manifest.summary())
        return manifest.to_dict()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The source tables -> the sync's staging folder."""
        manifest: CdcManifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        staged = lineage.staging_dataset(manifest.staging_dir)
        return cdc_lineage(manifest, None, source_conn_id=self.source_conn_id, output=lambda _: staged)

    def _extract(self, spec: CdcSpec, run_id: str) -> CdcManifest:
        with source_engine(self.source_conn_id, sync_id=spec.sync_id) as engine:
            with closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target:
                state = committed_cdc_state(target, spec)
            return changes_to_staging(
                engine,
                spec,
                state=state,
                staging=staging_area(self.staging_uri, split=True, executor=self.executor),
                run_id=run_id,
                logger=self.log,
            )


class CdcLoadOperator(BaseOperator):
    """Apply a staged CDC batch to PostgreSQL together with its position, exactly once.

    ``manifest`` is the extract task's XCom (``extract_task.output``).  With ``source_conn_id`` the
    slot is confirmed right after the commit, so the source frees the WAL at once; without it the
    next extract confirms it.  A batch that was already committed (retry) or overtaken is a no-op.
    Returns the load result, plus ``confirmed_lsn`` when the slot was confirmed.

    :param manifest: the CDC extract task's XCom (a dict, or its JSON or repr). (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target. (templated)
    :param source_conn_id: the source connection, to confirm the slot right after the commit. (templated)
    :param keep_staged: keep the staged files after the load (they are removed by default).
    """

    template_fields: Sequence[str] = ("manifest", "target_conn_id", "source_conn_id")
    ui_color = "#e3f6e8"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        manifest: Any,
        target_conn_id: str,
        source_conn_id: str | None = None,
        keep_staged: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.target_conn_id = target_conn_id
        self.source_conn_id = source_conn_id
        self.keep_staged = keep_staged

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            manifest = parse_cdc_manifest(self.manifest)
        except SyncError as error:
            raise as_task_error(error) from error
        spec = manifest_spec(manifest)
        self._manifest = manifest
        with task_errors(spec.sync_id):
            check_shared_staging(manifest.staging_dir, executor=self.executor, what=f"the load of {spec.sync_id}")
            if self.source_conn_id:
                log_slot_lag(self.log, self.source_conn_id, spec)
            with closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target:
                record_dag_run(
                    target,
                    spec.target_schema,
                    spec.sync_id,
                    context,
                    source_conn_id=self.source_conn_id or None,
                    slot_name=spec.slot_name,
                )
                result = load_cdc_manifest(
                    target, manifest, run_id=context["run_id"], logger=self.log, keep_staged=self.keep_staged
                )
                position = (
                    CdcPosition.from_state(committed_cdc_state(target, spec))
                    if self.source_conn_id and result.status in ("applied", "already_applied")
                    else None
                )
            self._result = result
            emit_table_events(
                context, self.outlets, self.target_conn_id, lineage.cdc_writes(manifest, result), self.log
            )
            output = result.to_dict()
            if position is not None and self.source_conn_id:
                output["confirmed_lsn"] = self._confirm(spec, position.end_lsn)
        return output

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The sync's staging folder -> the target tables, with per-table row counts."""
        manifest: CdcManifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        staged = lineage.staging_dataset(manifest.staging_dir)
        return cdc_lineage(manifest, getattr(self, "_result", None), target_conn_id=self.target_conn_id, input=staged)

    def _confirm(self, spec: CdcSpec, end_lsn: int) -> str:
        assert self.source_conn_id
        with source_engine(self.source_conn_id, sync_id=spec.sync_id) as engine:
            confirmed = confirm_applied(engine, spec, end_lsn)
        self.log.info("sync %s: slot %s confirmed up to %s", spec.sync_id, spec.slot_name, int_to_lsn(confirmed))
        return int_to_lsn(confirmed)


class CdcSyncOperator(BaseCdcOperator, StreamingOperator):
    __doc__ = (
        """Stage, apply and confirm one CDC batch in a single task: the simple case; or stream.

    Runs :func:`~airflow_sync_provider.core.cdc.run_cdc_sync`.  Returns ``{"manifest": <manifest
    summary>, "load": <load result>}``.  With ``stream_for`` it runs such batches one after another
    (:class:`~airflow_sync_provider.core.streaming.CdcStream`: before each, a peek at the slot, which
    writes nothing on the source) and returns ``{"stream": <stats>}``.  The declaration (``tables``
    ... ``history``) is that of :class:`~airflow_sync_provider.core.cdc.CdcSpec`.
"""
        + _DECLARATION_DOC
        + STREAM_PARAMS_DOC
        + """    :param idle_advance_bytes: streaming: run a batch even without changes once the slot retains
        this much WAL written by others, so the slot advances and the source can recycle it.
"""
    )

    template_fields: Sequence[str] = (*CDC_TEMPLATE_FIELDS, *STREAM_TEMPLATE_FIELDS)
    ui_color = "#fcf0dc"

    @extends_signature(BaseCdcOperator.__init__, StreamingOperator.__init__)
    def __init__(self, *, idle_advance_bytes: int = IDLE_ADVANCE_BYTES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_advance_bytes = idle_advance_bytes

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self._spec()
        with task_errors(spec.sync_id):  # a bad stream_for fails at once: a retry cannot fix it
            stream_seconds = self.stream_seconds()
        if stream_seconds is not None:
            return self._stream(spec, stream_seconds, context)
        with task_errors(spec.sync_id), self._source_and_target(spec, context) as (engine, target):
            manifest, result = run_cdc_sync(
                engine,
                target,
                spec,
                staging=staging_area(self.staging_uri),
                run_id=context["run_id"],
                logger=self.log,
            )
        return self._applied(manifest, result, context)

    def _stream(self, spec: CdcSpec, stream_seconds: float, context: Context) -> dict[str, Any]:
        """Micro-batches for ``stream_seconds`` (a streaming run reports no lineage: it never
        completes one manifest)."""
        with (
            task_errors(spec.sync_id),
            self.stopping() as stop,
            self._source_and_target(spec, context) as (engine, target),
        ):
            stream = CdcStream(
                engine,
                target,
                spec,
                staging=staging_area(self.staging_uri),
                run_id=context["run_id"],
                logger=self.log,
                idle_advance_bytes=int(self.idle_advance_bytes),
            )
            try:
                stats = self.run_stream(stream, stop, stream_for=stream_seconds, what=f"sync {spec.sync_id}: stream")
            finally:
                stream.close()
        return {"stream": stats.to_dict()}


class CdcResnapshotOperator(BaseCdcOperator):
    __doc__ = (
        """Copy some tables of a CDC sync anew, replacing their target rows, without resetting the sync.

    Runs :func:`~airflow_sync_provider.core.cdc.resnapshot_tables`: the recovery for a table whose
    target copy cannot be trusted (a load failed with ``rule=unchanged TOAST value``, rows were
    edited in the target, a schema change inside one transaction).  The other tables keep their rows
    and position; the next change batches skip, for the re-snapshotted tables only, what the new
    copy already holds.  Give it the same declaration as the sync's other tasks (``tables`` ...
    ``history``, see :class:`~airflow_sync_provider.core.cdc.CdcSpec`), and pause the sync's DAG
    while it runs (a change batch committed meanwhile makes it retry, ``attempts`` times).
    Returns ``{"manifest": <manifest summary>, "load": <load result>}``.
"""
        + _DECLARATION_DOC
        + """    :param resnapshot: the tables to copy anew: some of ``tables`` (same spelling rules), or one
        comma-separated string. (templated)
    :param attempts: copies tried when change batches keep committing between a copy and its load.
"""
    )

    template_fields: Sequence[str] = (*CDC_TEMPLATE_FIELDS, "resnapshot")
    ui_color = "#f6e3f0"

    @extends_signature(BaseCdcOperator.__init__)
    def __init__(self, *, resnapshot: Sequence[str] | str, attempts: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resnapshot = resnapshot
        self.attempts = attempts

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self._spec()
        tables = _table_list(self.resnapshot)
        with task_errors(spec.sync_id), self._source_and_target(spec, context) as (engine, target):
            manifest, result = resnapshot_tables(
                engine,
                target,
                spec,
                tables,
                staging=staging_area(self.staging_uri),
                run_id=context["run_id"],
                logger=self.log,
                attempts=int(self.attempts),
            )
        return self._applied(manifest, result, context)


def cdc_lineage(
    manifest: CdcManifest,
    result: CdcLoadResult | None,
    *,
    source_conn_id: str | None = None,
    target_conn_id: str | None = None,
    input: lineage.DatasetName | None = None,
    output: Any = None,
) -> OperatorLineage:
    """Per table of ``manifest``: its source table (``source_conn_id``) or ``input`` -> its target
    table (``target_conn_id``) or ``output(table)``, with the counts of ``result``."""
    source_url = lineage.connection_url(source_conn_id) if source_conn_id else None
    target_url = lineage.connection_url(target_conn_id) if target_conn_id else None
    writes = {(w.schema, w.table): w for w in lineage.cdc_writes(manifest, result)} if result is not None else {}
    inputs: dict[lineage.DatasetName, Any] = {}
    outputs: dict[lineage.DatasetName, Any] = {}
    for table in manifest.tables:
        source = lineage.database_dataset(source_url, table.source_table) if source_url else input
        if target_url is not None:
            target = lineage.database_dataset(target_url, f"{table.target_schema}.{table.target_table}")
        else:
            target = output(table)
        assert source is not None and target is not None
        source_in, target_out = lineage.table_lineage(
            source, target, table, write=writes.get((table.target_schema, table.target_table))
        )
        inputs.setdefault(source, source_in)
        outputs.setdefault(target, target_out)  # an extract stages every table in one folder
    return lineage.operator_lineage(list(inputs.values()), list(outputs.values()))


__all__: Sequence[str] = (
    "BaseCdcOperator",
    "CdcExtractOperator",
    "CdcLoadOperator",
    "CdcResnapshotOperator",
    "CdcSyncOperator",
    "parse_cdc_manifest",
)
