"""The reference pgoutput decoder (``CdcSpec.decoder="per_message"``): one :func:`.pgoutput.decode`
per message, rows buffered as Python lists.  :mod:`.bulk` stages the same rows faster."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_sync_provider.core.cdc import pgoutput, slot
from airflow_sync_provider.core.cdc.manifest import TruncateEvent
from airflow_sync_provider.core.cdc.read import (
    ChangeRead,
    TableStream,
    flush_stream,
    refuse_not_utf8,
    relation_shape,
)
from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.staging import delete_staged_file

_ROW_TAGS = frozenset(b"IUD")


@dataclass(slots=True)
class _Txn:
    """The transaction being read: its changes are in the tables' buffers (and, for a big one, files).

    ``marks`` remembers, per table it touched, where its rows begin (files written, buffer rows), so
    ``undo`` can take them back when the batch must end before this transaction.
    """

    changes: int = 0
    bytes: int = 0  # buffered, not yet written out
    total_bytes: int = 0
    truncates: list[TruncateEvent] = field(default_factory=list)
    marks: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, stream: TableStream, row: list[Any], size: int) -> None:
        if stream.source.oid not in self.marks:
            self.marks[stream.source.oid] = (len(stream.files), len(stream.buffer))
        stream.buffer.append(row)
        stream.buffer_bytes += size
        self.bytes += size
        self.total_bytes += size

    def reset(self) -> None:
        """Ready for the next transaction (one per commit: cheaper than a new object)."""
        self.changes = self.bytes = self.total_bytes = 0
        if self.truncates:
            self.truncates = []
        if self.marks:
            self.marks = {}

    def spill(self, streams: dict[int, TableStream], flush: Any) -> None:
        """Write out every buffer: the rows of earlier transactions and this one's in separate files."""
        for oid, (files, start) in list(self.marks.items()):
            stream = streams[oid]
            if start:  # earlier transactions' rows first, on their own
                mine = stream.buffer[start:]
                del stream.buffer[start:]
                flush(stream)
                stream.buffer = mine
            self.marks[oid] = (len(stream.files) if start else files, 0)
            flush(stream)
        self.bytes = 0

    def undo(self, streams: dict[int, TableStream]) -> None:
        """Take this transaction's rows back out of the buffers and the staged files."""
        for oid, (files, start) in self.marks.items():
            stream = streams[oid]
            for staged in stream.files[files:]:
                delete_staged_file(staged.uri)
                stream.rows -= staged.rows
            del stream.files[files:]
            del stream.buffer[start:]
        self.marks.clear()


def _pending_rows(values: Sequence[object], op: str, lsn: int, seq: int, moved_from: int | None = None) -> list[Any]:
    lsn = lsn - 2**63 if lsn >= 2**63 else lsn
    if not any(v is pgoutput.UNCHANGED_TOAST for v in values):  # the common case: one list, no per-value test
        return [*values, op, lsn, seq, None, moved_from]
    unchanged = [i + 1 for i, v in enumerate(values) if v is pgoutput.UNCHANGED_TOAST]
    row: list[Any] = [None if v is pgoutput.UNCHANGED_TOAST else v for v in values]
    row += [op, lsn, seq, "{" + ",".join(map(str, unchanged)) + "}", moved_from]
    return row


def read_per_message(read: ChangeRead) -> None:
    """The reference decoder: one :func:`.pgoutput.decode` per message, rows buffered as Python lists."""
    spec, conn, position, streams = read.spec, read.conn, read.position, read.streams
    staging, staging_dir, pending_types, sql_ascii = read.staging, read.staging_dir, read.pending_types, read.sql_ascii
    snapshot_filter, table_filters, by_name, heartbeat = (
        read.snapshot_filter,
        read.table_filters,
        read.by_name,
        read.heartbeat,
    )
    progress, notes, truncates = read.progress, read.notes, read.truncates
    reached = in_heartbeat = False
    heartbeat_end = 0
    relation_map: dict[int, int] = {}  # relation id in the stream -> source oid we track
    seq = 0
    changes = transactions = skipped = 0
    read_bytes = 0  # of the changes staged so far (their pgoutput messages)
    last_commit, last_end = read.last_commit, read.last_end
    skip = False
    skip_tables: set[int] = set()
    txn_lsn = 0
    # Rows go to their table's buffer as they arrive; a buffer is written out at a commit once it
    # holds batch_rows rows or batch_bytes bytes, and within a transaction bigger than batch_bytes
    # (see _Txn), so memory is bounded by bytes whatever the row width or transaction size.
    txn = _Txn()
    reader = slot.read_changes(conn, spec, read.upto)
    for data in reader:
        tag = data[0]
        if tag in _ROW_TAGS:
            if skip:
                continue
            message = pgoutput.decode(data)
            assert isinstance(message, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete))
            oid = relation_map.get(message.relation_id)
            if oid is None or oid in skip_tables:
                continue
            stream = streams[oid]
            if stream.relation is None:
                raise SyncError(
                    "a change arrived before its relation description",
                    sync_id=spec.sync_id,
                    table=stream.source.qualified,
                )
            txn.changes += 1
            size = len(data)
            if isinstance(message, pgoutput.Insert):
                seq += 1
                rows = [_pending_rows(message.new, "I", txn_lsn, seq)]
            elif isinstance(message, pgoutput.Update):
                moved_from = None
                new = message.new
                rows = []
                if message.old_kind == "O" and message.old is not None:
                    new = _with_old_values(new, message.old)
                if message.old_kind == "K" and message.old is not None:
                    seq += 1  # the key changed: delete the old key, then upsert the new one
                    moved_from = seq
                    rows.append(_pending_rows(message.old, "D", txn_lsn, seq))
                elif (
                    message.old_kind == "O"
                    and message.old is not None
                    and _key_changed(stream, message.old, message.new)
                ):
                    seq += 1
                    moved_from = seq
                    rows.append(_pending_rows(message.old, "D", txn_lsn, seq))
                seq += 1
                rows.append(_pending_rows(new, "U", txn_lsn, seq, moved_from))
            else:
                seq += 1
                rows = [_pending_rows(message.old, "D", txn_lsn, seq)]
            for row in rows:
                if sql_ascii and any(isinstance(v, pgoutput.NotUtf8) for v in row):
                    refuse_not_utf8(stream, row, spec)
                txn.add(stream, row, size)
            if txn.bytes > spec.batch_bytes:  # a big transaction: write out what it holds so far
                txn.spill(streams, lambda s: flush_stream(staging, staging_dir, s, conn, pending_types, spec))
            continue
        if tag == 66:  # Begin: one per transaction, so read without building a message object
            txn_lsn, xid = pgoutput.begin_fields(data)
            skip = txn_lsn <= position.commit_lsn or bool(
                snapshot_filter
                and position.snapshot_lsn is not None
                and txn_lsn <= position.snapshot_lsn
                and snapshot_filter.visible(xid)
            )
            if table_filters:
                skip_tables = {
                    oid for oid, (held, lsn) in table_filters.items() if txn_lsn <= lsn and held.visible(xid)
                }
            continue
        if tag == 67:  # Commit: likewise
            commit_lsn, end_lsn = pgoutput.commit_fields(data)
            if in_heartbeat:  # everything committed before this transaction has been read
                reached, in_heartbeat, heartbeat_end = True, False, end_lsn
                continue
            last_commit, last_end = commit_lsn, end_lsn
            if skip:
                skipped += 1
                continue
            if not txn.changes:
                continue  # only other tables' rows or logical messages
            transactions += 1
            changes += txn.changes
            read_bytes += txn.total_bytes
            truncates.extend(txn.truncates)
            for oid in txn.marks:
                stream = streams[oid]
                if len(stream.buffer) >= spec.batch_rows or stream.buffer_bytes >= spec.batch_bytes:
                    flush_stream(staging, staging_dir, stream, conn, pending_types, spec)
            progress.add(txn.changes)
            txn.reset()
            if spec.max_batch_bytes is not None and read_bytes >= spec.max_batch_bytes:
                notes.append(f"the batch ends at {read_bytes:,} bytes of changes (max_batch_bytes)")
                break
            continue
        message = pgoutput.decode(data)
        if isinstance(message, pgoutput.Relation):
            oid = by_name.get((message.namespace, message.name))
            if oid is None:
                continue
            relation_map[message.relation_id] = oid
            stream = streams[oid]
            if (
                stream.relation is not None
                and relation_shape(stream.relation) != relation_shape(message)
                and read.relation_changed(stream, txn_lsn, transactions)
            ):
                txn.undo(streams)
                break
            read.new_relation(stream, message)
        elif isinstance(message, pgoutput.Truncate):
            if skip:
                continue
            for relation_id in message.relation_ids:
                oid = relation_map.get(relation_id)
                if oid is not None and oid not in skip_tables:
                    seq += 1
                    txn.changes += 1
                    txn.truncates.append(TruncateEvent(streams[oid].source.qualified, txn_lsn, seq))
        elif isinstance(message, pgoutput.LogicalMessage):
            in_heartbeat = in_heartbeat or (
                message.prefix == slot.HEARTBEAT_PREFIX and message.content == heartbeat.encode()
            )
    reader.close()  # ends the read's transaction (also after a break)
    read.transactions, read.changes, read.skipped = transactions, changes, skipped
    read.last_commit, read.last_end = last_commit, last_end
    read.reached, read.heartbeat_end = reached, heartbeat_end


def _with_old_values(new: tuple[object, ...], old: tuple[object, ...]) -> tuple[object, ...]:
    """REPLICA IDENTITY FULL: the old row arrives whole (TOASTed values detoasted), so a value the new
    row leaves out as unchanged is the old row's; the load then needs neither the batch nor the target."""
    if not any(v is pgoutput.UNCHANGED_TOAST for v in new):
        return new
    return tuple(
        o if n is pgoutput.UNCHANGED_TOAST and o is not pgoutput.UNCHANGED_TOAST else n
        for n, o in zip(new, old, strict=True)
    )


def _key_changed(stream: TableStream, old: Sequence[object], new: Sequence[object]) -> bool:
    """REPLICA IDENTITY FULL sends the whole old row: compare the primary-key columns."""
    assert stream.relation is not None
    names = [c.name for c in stream.relation.columns]
    return any(old[names.index(k)] != new[names.index(k)] for k in stream.source.primary_key)
