"""Where staged batches live: a local folder by default, or any URI pyarrow's filesystems open
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``), so a cluster's workers can share them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from airflow_sync_provider.core.manifest import Manifest

DEFAULT_STAGING_DIR = Path(
    os.environ.get("SYNC_STAGING_DIR", Path.home() / ".cache" / "airflow_sync_provider" / "staging")
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


class StagedBatch(Protocol):
    """What staging needs of a manifest (table or CDC): where its batch lives, and its JSON."""

    @property
    def staging_dir(self) -> str: ...

    def to_json(self) -> str: ...


def _to_uri(location: str | Path) -> str:
    text = str(location)
    if "://" in text:
        return text.rstrip("/")
    return Path(text).expanduser().resolve().as_uri()


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


class StagingArea:
    """Writes and reads staged Parquet batches under one base location."""

    def __init__(self, location: str | Path | None = None) -> None:
        self.base_uri = _to_uri(location or DEFAULT_STAGING_DIR)

    @staticmethod
    def file_label(name: str) -> str:
        """A file-name-safe, URI-safe and unique label for ``name`` (a table name may hold anything)."""
        digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
        return f"{_UNSAFE.sub('_', name)[:60]}-{digest}"

    def batch_uri(self, sync_id: str, manifest_id: str) -> str:
        return f"{self.base_uri}/{_UNSAFE.sub('_', sync_id)}/{manifest_id}"

    def open_writer(self, file_uri: str, schema: pa.Schema) -> pq.ParquetWriter:
        fs, path = filesystem_for(file_uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        # A staged batch is written once and read once, whole: LZ4 without dictionaries or column
        # statistics writes ~2.3x and reads ~5x faster than snappy with both (50k rows x 7 columns).
        return pq.ParquetWriter(
            path, schema, filesystem=fs, compression="lz4", use_dictionary=False, write_statistics=False
        )

    def discard(self, batch_uri: str, log: Any = None) -> None:
        """Remove a batch directory (best effort: failing to clean up must not hide the real error)."""
        try:
            _remove_dir(batch_uri)
        except OSError as error:
            if log is not None:
                log.warning("could not remove partial staged batch %s: %s", batch_uri, error)

    def write_manifest(self, manifest: StagedBatch) -> str:
        uri = f"{manifest.staging_dir}/manifest.json"
        fs, path = filesystem_for(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(manifest.to_json().encode())
        return uri


def iter_staged_batches(file_uri: str, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Stream one staged file batch by batch (memory stays bounded by ``batch_rows``)."""
    fs, path = filesystem_for(file_uri)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        yield from parquet.iter_batches(batch_size=batch_rows)


def staged_schema(file_uri: str) -> pa.Schema:
    fs, path = filesystem_for(file_uri)
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).schema_arrow


def read_manifest(uri: str) -> Manifest:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as stream:
        return Manifest.from_dict(json.loads(stream.read().decode()))


def remove_staged(manifest: StagedBatch) -> None:
    """Delete a batch's files once it is committed (staging is a buffer, not an archive)."""
    if manifest.staging_dir:
        _remove_dir(manifest.staging_dir)


def _remove_dir(uri: str) -> None:
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
