"""Staging on Airflow's object storage: ``s3://aws_default@bucket/prefix`` with credentials from a connection.

The URI is the one ``ObjectStoragePath`` takes (a connection id as the user part).  The core stages
through pyarrow filesystems, so the URI is turned into one:

* ``s3`` (``s3a``, ``s3n``): pyarrow's own ``S3FileSystem`` (C++: multipart uploads, parallel reads),
  built from the AWS connection's credentials, region and ``endpoint_url`` (MinIO, moto, Ceph...),
  the fast path;
* any other scheme, or an S3 connection that needs what pyarrow cannot do (a request signer, a
  proxy, botocore ``config_kwargs``): the fsspec filesystem Airflow builds for the connection
  (``ObjectStoragePath(uri).fs``) wrapped in ``PyFileSystem(FSSpecHandler(...))``.

:func:`resolve` is registered with the core (:func:`~airflow_sync_provider.core.staging.register_filesystem_resolver`)
when the operators are imported, so a manifest's staging URI resolves on whichever worker loads it.
One filesystem per (scheme, connection) and process: a task process reads its connection once.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.staging import names_connection

log = logging.getLogger(__name__)

S3_SCHEMES = frozenset({"s3", "s3a", "s3n"})

#: AWS connection settings pyarrow's S3 client has no equivalent for: such a connection goes through fsspec.
_FSSPEC_ONLY_S3_SETTINGS = ("signer", "proxy-uri")


def resolve(uri: str) -> tuple[pafs.FileSystem, str] | None:
    """``(filesystem, path)`` of a staging URI that names a connection; None for any other URI."""
    conn_id = names_connection(uri)
    if conn_id is None:
        return None
    scheme, _, rest = uri.partition("://")
    path = rest.split("@", 1)[1].rstrip("/")
    return filesystem(scheme.lower(), conn_id), path


@functools.cache
def filesystem(scheme: str, conn_id: str) -> pafs.FileSystem:
    """The pyarrow filesystem of ``scheme`` with the credentials of connection ``conn_id`` (cached)."""
    if scheme in S3_SCHEMES:
        fast = s3_filesystem(conn_id)
        if fast is not None:
            log.info("staging on %s://%s@...: pyarrow S3FileSystem", scheme, conn_id)
            return fast
    from airflow.sdk import ObjectStoragePath

    try:
        fs = ObjectStoragePath(f"{scheme}://{conn_id}@staging/").fs
    except Exception as error:  # fsspec and the providers raise anything: name the connection and scheme
        raise ConfigurationError(
            f"cannot open staging {scheme}://{conn_id}@...: {error!r} (is the provider of {scheme!r} installed "
            f"and the connection {conn_id!r} defined?)"
        ) from error
    log.info("staging on %s://%s@...: fsspec %s", scheme, conn_id, type(fs).__name__)
    return pafs.PyFileSystem(_TimedFSSpecHandler(fs))


class _TimedFSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's fsspec bridge, with modification times where the fsspec filesystem names them otherwise.

    pyarrow reads ``info["mtime"]`` only; s3fs says ``LastModified``, gcsfs ``updated``, adlfs
    ``last_modified``.  Without a time, :meth:`StagingArea.sweep_abandoned` cannot age a batch and
    keeps it for ever.
    """

    @staticmethod
    def _create_file_info(path: str, info: dict[str, Any]) -> pafs.FileInfo:
        base = pafs.FSSpecHandler._create_file_info(path, info)
        if base.mtime is not None:
            return base
        stamp = next((info[key] for key in _MTIME_KEYS if info.get(key)), None)
        if isinstance(stamp, str):
            stamp = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if isinstance(stamp, (int, float)):
            stamp = dt.datetime.fromtimestamp(stamp, dt.UTC)
        return pafs.FileInfo(path, base.type, size=base.size, mtime=stamp)


_MTIME_KEYS = ("LastModified", "last_modified", "updated", "created", "mtime")


def s3_filesystem(conn_id: str) -> pafs.S3FileSystem | None:
    """pyarrow's S3 client configured from an AWS connection, or None when only fsspec can honour it."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=conn_id)
    config = hook.conn_config
    if any(hook.service_config.get(key) for key in _FSSPEC_ONLY_S3_SETTINGS) or config.extra_config.get(
        "config_kwargs"
    ):
        return None
    credentials = hook.get_credentials()
    options: dict[str, Any] = {"region": hook.conn_region_name or "us-east-1"}
    if credentials.access_key and credentials.secret_key:
        options.update(
            access_key=credentials.access_key, secret_key=credentials.secret_key, session_token=credentials.token
        )
    else:
        options["anonymous"] = True
    endpoint = config.get_service_endpoint_url(service_name="s3")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    return pafs.S3FileSystem(**options)


__all__ = ["filesystem", "resolve", "s3_filesystem"]
