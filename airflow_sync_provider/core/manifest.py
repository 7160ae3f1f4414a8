"""The manifest: the small, JSON-safe description of a staged batch that travels through XCom.

It never carries rows.  It says where the staged Parquet files are, how many rows they hold, the
column types the target needs, and the range extracted (state version, watermark low/high) so the
load can refuse a stale batch and commit the new watermark with the data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ManifestColumn:
    name: str
    pg_type: str
    nullable: bool = True


@dataclass(frozen=True)
class StagedFile:
    uri: str
    rows: int


@dataclass(frozen=True)
class Manifest:
    sync_id: str
    run_id: str
    manifest_id: str
    mode: str
    source_table: str
    target_schema: str
    target_table: str
    primary_key: tuple[str, ...]
    cursor_column: str | None
    columns: tuple[ManifestColumn, ...]
    files: tuple[StagedFile, ...]
    rows: int
    #: State version the extraction started from; the load applies only on top of that version.
    base_version: int
    #: Encoded watermarks ``[cursor, *key]`` (see :mod:`.values`); ``None`` = beginning of table.
    watermark_low: list[Any] | None
    watermark_high: list[Any] | None
    upper_bound: Any = None
    extracted_at: str = ""
    staging_dir: str = ""
    delete_mode: str = "hard"
    #: Whether the load removes target rows whose key is not in the source (see ``key_files``).
    detect_deletes: bool = False
    #: Incremental + detect_deletes: every source key, from the same snapshot as the rows.
    key_files: tuple[StagedFile, ...] = ()
    state_table: str = "_sync_state"
    max_delete_fraction: float | None = None
    #: SCD2 history table maintained with the target (see :mod:`.history`).
    history_table: str | None = None
    #: A backfill: the encoded cursor window ``[low, high)`` re-read; the load leaves the state alone.
    window: list[Any] | None = None
    extract_seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: The sync's schema-drift policy (see :mod:`.drift`); manifests written before it load as "freeze".
    schema_drift: str = "freeze"
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["primary_key"] = list(self.primary_key)
        data["columns"] = [asdict(c) for c in self.columns]
        data["files"] = [asdict(f) for f in self.files]
        data["key_files"] = [asdict(f) for f in self.key_files]
        data["notes"] = list(self.notes)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> Manifest:
        if isinstance(data, str):
            data = json.loads(data)
        assert isinstance(data, dict)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')!r} (expected {MANIFEST_FORMAT})")
        values = dict(data)
        values["primary_key"] = tuple(values["primary_key"])
        values["columns"] = tuple(ManifestColumn(**c) for c in values["columns"])
        values["files"] = tuple(StagedFile(**f) for f in values["files"])
        values["key_files"] = tuple(StagedFile(**f) for f in values.get("key_files", ()))
        values["notes"] = tuple(values.get("notes", ()))
        return cls(**values)

    def summary(self) -> str:
        return (
            f"manifest {self.manifest_id} of sync {self.sync_id!r}: {self.rows} rows in "
            f"{len(self.files)} file(s), mode={self.mode}, base_version={self.base_version}, "
            f"watermark {self.watermark_low} -> {self.watermark_high}"
        )
