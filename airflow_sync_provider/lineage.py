"""Lineage of a sync: the datasets it reads and writes, named as OpenLineage and the Airflow
postgres provider name them, and which source column feeds which target column.

The mapping (manifest + connection URL -> dataset names and columns) is plain Python; only
:func:`connection_url` looks a connection up (never the database), and only the builders of
OpenLineage objects (``input_dataset``, ``output_dataset``, ``quality_facet``, ``table_lineage``,
``operator_lineage``) import OpenLineage, inside the function, so the provider works without it.  Naming (https://openlineage.io/docs/spec/naming):

* PostgreSQL: namespace ``postgres://host:port``, name ``database.schema.table``; the Airflow asset
  URI of the same table is ``postgres://host:port/database/schema/table`` (the postgres provider's
  ``sanitize_uri`` form, which it converts to exactly that OpenLineage dataset);
* MySQL/MariaDB: ``mysql://host:port``, ``database.table``; other SQLAlchemy databases: their
  backend name as the scheme, ``database.schema.table``; SQLite: ``sqlite://<file>``, ``main.table``;
* a staging area (the Parquet batches between extract and load): ``file`` + the sync's staging
  folder, or ``s3://bucket`` + its path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from airflow_sync_provider.core.manifest import Manifest

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_sync_provider.core.cdc import CdcLoadResult, CdcManifest
    from airflow_sync_provider.core.extract import BatchTransform
    from airflow_sync_provider.core.load import LoadResult

#: Columns the sync adds (the load's ``_sync_*``, a CDC batch's ``_cdc_*``): no source column feeds them.
METADATA_PREFIXES = ("_sync_", "_cdc_")

#: Load outcomes that committed the batch (or find it committed: a retry), so the table changed.
COMMITTED = ("applied", "backfilled", "already_applied")

#: A transform may declare what it does to columns: ``{target column: (source columns, description)}``
#: as its ``column_lineage`` attribute (e.g. ``{"total": (("quantity", "unit_price"), "quantity * unit_price")}``).
LINEAGE_ATTRIBUTE = "column_lineage"

_SCHEMES = {"postgresql": "postgres", "mariadb": "mysql"}
_DEFAULT_PORTS = {"postgres": 5432, "mysql": 3306}


@dataclass(frozen=True)
class DatasetName:
    """An OpenLineage dataset identity: ``namespace`` (where) and ``name`` (what)."""

    namespace: str
    name: str


@dataclass(frozen=True)
class ColumnSource:
    """One input column feeding a target column; ``transformation`` says how when known."""

    dataset: DatasetName
    column: str
    transformation: str | None = None


def _split(qualified: str, default_schema: str | None) -> tuple[str | None, str]:
    schema, _, table = qualified.rpartition(".")
    return (schema or default_schema), table


def database_dataset(url: sa.URL, qualified_table: str) -> DatasetName:
    """The dataset of ``schema.table`` (or ``table``: the database's default schema) at ``url``."""
    backend = url.get_backend_name()
    scheme = _SCHEMES.get(backend, backend)
    if scheme == "sqlite":
        return DatasetName(f"sqlite://{url.database or ':memory:'}", f"main.{_split(qualified_table, None)[1]}")
    authority = f"{url.host or 'localhost'}:{url.port or _DEFAULT_PORTS.get(scheme, '')}".rstrip(":")
    namespace = f"{scheme}://{authority}"
    if scheme == "mysql":  # a MySQL "schema" is its database
        schema, table = _split(qualified_table, None)
        return DatasetName(namespace, f"{schema or url.database}.{table}")
    schema, table = _split(qualified_table, "public" if scheme == "postgres" else None)
    return DatasetName(namespace, ".".join(part for part in (url.database, schema, table) if part))


def postgres_asset_uri(url: sa.URL, schema: str, table: str) -> str:
    """``postgres://host:port/database/schema/table``: the Airflow asset URI of a PostgreSQL table."""
    return f"postgres://{url.host or 'localhost'}:{url.port or 5432}/{url.database}/{schema}/{table}"


def staging_dataset(staging_dir: str) -> DatasetName:
    """The sync's staging folder (the batch folder's parent: one dataset per sync, not per run)."""
    sync_folder = staging_dir.rstrip("/").rsplit("/", 1)[0]
    parts = urlsplit(sync_folder)
    if parts.scheme in ("", "file"):
        return DatasetName("file", parts.path or sync_folder)
    return DatasetName(f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/"))


def target_columns(manifest: Manifest) -> list[str]:
    """The manifest's columns as the target gets them (without the sync's own metadata columns)."""
    return [c.name for c in manifest.columns if not c.name.startswith(METADATA_PREFIXES)]


def column_lineage(
    columns: Iterable[str],
    source: DatasetName,
    *,
    source_columns: Iterable[str] | None = None,
    declared: Mapping[str, tuple[Sequence[str], str]] | None = None,
) -> dict[str, list[ColumnSource]]:
    """Which ``source`` column feeds each of ``columns``.

    A column a transform declared (``declared``: see :data:`LINEAGE_ATTRIBUTE`) comes from its
    declared columns; any other comes from the source column of the same name when the source has
    it (``source_columns``; ``None``: no transform ran, every column is the source's).  A column
    neither explains (a transform made it) is left out rather than guessed.
    """
    known = None if source_columns is None else set(source_columns)
    lineage: dict[str, list[ColumnSource]] = {}
    for column in columns:
        if column.startswith(METADATA_PREFIXES):
            continue
        if declared and column in declared:
            inputs, how = declared[column]
            lineage[column] = [ColumnSource(source, name, how) for name in inputs]
        elif known is None or column in known:
            lineage[column] = [ColumnSource(source, column)]
    return lineage


@dataclass
class TransformWatch:
    """Wraps a batch transform to note the columns it receives (no database needed to learn them)."""

    transform: Callable[[Any], Any]
    seen: list[str] | None = None

    def __call__(self, batch: Any) -> Any:
        if self.seen is None:
            self.seen = [str(c) for c in batch.columns]
        return self.transform(batch)

    @property
    def __name__(self) -> str:  # errors name the user's transform, not this wrapper
        return str(getattr(self.transform, "__name__", self.transform))

    @property
    def declared(self) -> Mapping[str, tuple[Sequence[str], str]] | None:
        return getattr(self.transform, LINEAGE_ATTRIBUTE, None)


@dataclass
class TableWrite:
    """One table a task wrote, with the counts and range its asset event and lineage report."""

    schema: str
    table: str
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.inserted + self.updated + self.deleted


def _counts(values: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(values.get(k) or 0) for k in ("inserted", "updated", "deleted")}


def sync_writes(manifest: Manifest, result: LoadResult) -> list[TableWrite]:
    """The tables a committed table-sync load wrote (the target, and its SCD2 history table), with
    the counts and the range an asset event carries; none for a stale batch."""
    if result.status not in COMMITTED:
        return []
    extra: dict[str, Any] = {
        "sync_id": manifest.sync_id,
        "status": result.status,
        "state_version": result.version,
        "watermark_low": manifest.watermark_low,
        "watermark_high": manifest.watermark_high,
    }
    if manifest.window is not None:
        extra["window"] = manifest.window
    counts = _counts(result.to_dict())
    writes = [TableWrite(manifest.target_schema, manifest.target_table, **counts, extra=extra)]
    if manifest.history_table:
        writes.append(TableWrite(manifest.target_schema, manifest.history_table, **counts, extra=extra))
    return writes


def cdc_writes(manifest: CdcManifest, result: CdcLoadResult) -> list[TableWrite]:
    """The tables a committed CDC batch wrote, each with its own counts and the batch's LSN range."""
    if result.status not in COMMITTED:
        return []
    extra = {
        "sync_id": manifest.sync_id,
        "status": result.status,
        "state_version": result.version,
        "kind": manifest.kind,
        "lsn_low": _lsn(manifest.applied_lsn),
        "lsn_high": result.commit_lsn or _lsn(manifest.commit_lsn),
    }
    return [
        TableWrite(
            table.target_schema, table.target_table, **_counts(result.tables.get(table.source_table, {})), extra=extra
        )
        for table in manifest.tables
        if table.source_table in result.tables or result.status == "already_applied"
    ]


def _lsn(value: int) -> str:
    from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn

    return int_to_lsn(value)


def table_lineage(
    source: DatasetName,
    target: DatasetName,
    manifest: Manifest,
    *,
    write: TableWrite | None = None,
    watch: TransformWatch | None = None,
) -> tuple[Any, Any]:
    """The input and output datasets of one table moved from ``source`` to ``target``."""
    lineage = column_lineage(
        target_columns(manifest),
        source,
        # a transform that never ran (no rows) tells nothing: only what it declares is known
        source_columns=None if watch is None else (watch.seen or ()),
        declared=watch.declared if watch is not None else None,
    )
    return input_dataset(source), output_dataset(target, manifest_columns(manifest), lineage, write)


def stream_dataset(conn_type: str, host: str | None, port: int | None, stream: str) -> DatasetName:
    """An event stream: namespace ``<broker type>://host:port`` (``redis``, ``nats``, ``mqtt``), name the
    stream key, JetStream stream or topic filter."""
    authority = f"{host or 'localhost'}{f':{port}' if port else ''}"
    return DatasetName(f"{conn_type}://{authority}", stream)


# --------------------------------------------------------------------------- OpenLineage facets


def connection_url(conn_id: str) -> sa.URL:
    """The SQLAlchemy URL of Airflow connection ``conn_id`` (a lookup; nothing is connected)."""
    from airflow_sync_provider.hooks.source import SyncSourceHook

    return SyncSourceHook(conn_id).get_sqlalchemy_url()


def _schema_facet(columns: Sequence[tuple[str, str | None]]) -> Any:
    from airflow.providers.common.compat.openlineage.facet import SchemaDatasetFacet, SchemaDatasetFacetFields

    return SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=n, type=t) for n, t in columns])


def input_dataset(dataset: DatasetName, columns: Sequence[tuple[str, str | None]] = (), quality: Any = None) -> Any:
    """An input dataset with its schema and (``quality``: :func:`quality_facet`) the checks run on it."""
    from airflow.providers.common.compat.openlineage.facet import InputDataset

    facets = {"schema": _schema_facet(columns)} if columns else {}
    input_facets = {"dataQualityAssertions": quality} if quality is not None else {}
    return InputDataset(namespace=dataset.namespace, name=dataset.name, facets=facets, inputFacets=input_facets)


def _input_field(source: ColumnSource) -> Any:
    from airflow.providers.common.compat.openlineage.facet import InputField
    from openlineage.client.generated.column_lineage_dataset import Transformation

    how = (
        Transformation(type="DIRECT", subtype="IDENTITY")
        if source.transformation is None
        else Transformation(type="DIRECT", subtype="TRANSFORMATION", description=source.transformation)
    )
    return InputField(
        namespace=source.dataset.namespace, name=source.dataset.name, field=source.column, transformations=[how]
    )


def output_dataset(
    dataset: DatasetName,
    columns: Sequence[tuple[str, str | None]] = (),
    lineage: Mapping[str, Sequence[ColumnSource]] | None = None,
    write: TableWrite | None = None,
) -> Any:
    """An output dataset with its schema, column lineage and, for ``write``, output statistics
    (``rowCount``: rows written) and a ``syncStatistics`` facet (inserted / updated / deleted)."""
    from airflow.providers.common.compat.openlineage.facet import (
        ColumnLineageDatasetFacet,
        Fields,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
    )
    from openlineage.client.generated.base import OutputDatasetFacet

    facets: dict[str, Any] = {}
    if columns:
        facets["schema"] = _schema_facet(columns)
    if lineage:
        facets["columnLineage"] = ColumnLineageDatasetFacet(
            fields={
                column: Fields(
                    inputFields=[_input_field(s) for s in sources],
                    transformationType="IDENTITY" if all(s.transformation is None for s in sources) else None,
                    transformationDescription="; ".join(
                        dict.fromkeys(s.transformation for s in sources if s.transformation)
                    )
                    or None,
                )
                for column, sources in lineage.items()
            }
        )
    output_facets: dict[str, Any] = {}
    if write is not None:
        output_facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=write.rows)
        output_facets["syncStatistics"] = OutputDatasetFacet().with_additional_properties(
            inserted=write.inserted, updated=write.updated, deleted=write.deleted
        )
    return OutputDataset(namespace=dataset.namespace, name=dataset.name, facets=facets, outputFacets=output_facets)


def quality_facet(results: Sequence[Mapping[str, Any]]) -> Any:
    """The gate's expectations as a ``DataQualityAssertionsDatasetFacet`` (one assertion per result
    of :meth:`GateResult.summary`: the expectation type, its success and column)."""
    from openlineage.client.generated.data_quality_assertions_dataset import (
        Assertion,
        DataQualityAssertionsDatasetFacet,
    )

    assertions = []
    for result in results:  # GateResult.summary() results, or hand-made ones of the same shape
        column = result.get("column")
        assertions.append(
            Assertion(
                assertion=str(result["expectation"]),
                success=bool(result["success"]),
                column=column if isinstance(column, str) else None,
                severity=result.get("severity"),
                actual=None if result.get("unexpected_count") is None else str(result["unexpected_count"]),
            )
        )
    return DataQualityAssertionsDatasetFacet(assertions=assertions)


def operator_lineage(inputs: Sequence[Any] = (), outputs: Sequence[Any] = ()) -> OperatorLineage:
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(inputs=list(inputs), outputs=list(outputs))


def manifest_columns(manifest: Manifest) -> list[tuple[str, str | None]]:
    return [(c.name, c.pg_type) for c in manifest.columns if not c.name.startswith(METADATA_PREFIXES)]


def watch_transform(transform: BatchTransform | None) -> TransformWatch | None:
    """The transform, wrapped to note the source columns it receives (for column lineage)."""
    return TransformWatch(transform) if transform is not None else None


def load_lineage(
    target_conn_id: str,
    source: DatasetName,
    manifest: Manifest,
    result: LoadResult | None,
    watch: TransformWatch | None,
) -> OperatorLineage:
    """``source`` -> the manifest's target table (and its history table) in ``target_conn_id``."""
    url = connection_url(target_conn_id)
    writes = {w.table: w for w in sync_writes(manifest, result)} if result is not None else {}
    tables = [manifest.target_table, *([manifest.history_table] if manifest.history_table else [])]
    outputs = []
    for table in tables:
        target = database_dataset(url, f"{manifest.target_schema}.{table}")
        source_in, output = table_lineage(source, target, manifest, write=writes.get(table), watch=watch)
        outputs.append(output)
    return operator_lineage([source_in], outputs)


__all__ = [
    "LINEAGE_ATTRIBUTE",
    "ColumnSource",
    "DatasetName",
    "TableWrite",
    "TransformWatch",
    "cdc_writes",
    "column_lineage",
    "connection_url",
    "database_dataset",
    "input_dataset",
    "load_lineage",
    "manifest_columns",
    "operator_lineage",
    "output_dataset",
    "postgres_asset_uri",
    "quality_facet",
    "staging_dataset",
    "stream_dataset",
    "sync_writes",
    "table_lineage",
    "target_columns",
    "watch_transform",
]
