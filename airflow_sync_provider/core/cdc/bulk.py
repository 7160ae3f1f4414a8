"""The bulk pgoutput decoder: whole buffers of messages decoded with numpy, no Python per message.

The slot is read in a few large parts (:func:`.slot.read_change_parts`: one binary fetch per part,
the messages' bytes concatenated server-side, their lengths alongside).  In a part, the messages
that steer the read (Relation, Truncate, logical Message, and anything unknown) are decoded one by one
with :mod:`.pgoutput`, exactly as the per-message reference does; they are rare (a Relation per table
per read, one logical message: the heartbeat).  Between two of them everything is done over whole
arrays: Begin and Commit fields gathered at once, the skip decision per transaction (already applied,
in the snapshot, a re-snapshotted table's), and, per table, the TupleData walked column by column
across all its messages at once (a column's kind, length and offset for every message in one numpy
step), then every staged column built as an Arrow string array straight from those offsets.

It stages the same rows as the per-message reference (``CdcSpec.decoder="per_message"``): same
values, operations, commit LSNs, sequence numbers (commit order, a key change's delete first),
unchanged-TOAST positions and key-change links; tests/faults/test_cdc_bulk_property.py checks that
on random workloads.  Files may be cut at other rows (a part's end rather than a commit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from airflow_sync_provider.core.cdc import pgoutput, slot
from airflow_sync_provider.core.cdc.manifest import TruncateEvent
from airflow_sync_provider.core.cdc.position import SnapshotFilter
from airflow_sync_provider.core.cdc.read import (
    ChangeRead,
    TableStream,
    refuse_not_utf8,
    relation_shape,
    stream_columns,
)
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.staging import delete_staged_file

_B, _C, _R, _Y, _I, _U, _D, _T, _O, _M = (ord(c) for c in "BCRYIUDTOM")
_TEXT, _NULL, _UNCHANGED, _BINARY = (ord(c) for c in "tnub")
_NEW, _KEY, _OLD = (ord(c) for c in "NKO")
#: Tags decoded over whole arrays; every other tag is decoded one message at a time.
_VECTOR_TAGS = np.zeros(256, dtype=bool)
_VECTOR_TAGS[[_B, _C, _I, _U, _D, _Y, _O]] = True
_OPS = np.frombuffer(b"IUD", dtype=np.uint8)
_OP_I, _OP_U, _OP_D = 0, 1, 2

#: Bytes of messages per part read from the server (a part's rows are decoded at once).
PART_BYTES = 8 * 1024 * 1024
#: Pending WAL up to which the slot is read in one fetch (see ``slot.read_change_parts``).
WHOLE_READ_WAL_BYTES = 64 * 1024 * 1024


def _be(buf: np.ndarray, pos: np.ndarray, width: int, dtype: str) -> np.ndarray:
    """The big-endian integers of ``width`` bytes at every position of ``pos``."""
    out = np.uint64 if dtype == ">u8" else np.int64
    if not len(pos):
        return np.zeros(0, dtype=out)
    raw = buf[pos[:, None] + np.arange(width)]
    return np.ascontiguousarray(raw).view(dtype).ravel().astype(out)


def _visible(snapshot: SnapshotFilter, xids: np.ndarray) -> np.ndarray:
    """:meth:`SnapshotFilter.visible` over an array of 32-bit xids."""
    full = (snapshot.xmax & ~0xFFFFFFFF) + xids.astype(np.int64)
    full = np.where(full > snapshot.xmax + 2**31, full - 2**32, full)
    full = np.where(full < snapshot.xmax - 2**31, full + 2**32, full)
    held = np.isin(full, np.fromiter(snapshot.in_progress, dtype=np.int64, count=len(snapshot.in_progress)))
    return (full < snapshot.xmin) | ((full < snapshot.xmax) & ~held)


@dataclass
class _Tuples:
    """One TupleData per message, walked: per message and column its kind, value offset and length."""

    kinds: np.ndarray  # (messages, columns) uint8
    starts: np.ndarray  # (messages, columns) int64
    lengths: np.ndarray  # (messages, columns) int64; 0 unless text
    end: np.ndarray  # (messages,) offset after the tuple


def _fail(tags: np.ndarray, at: np.ndarray, what: str) -> None:
    """Raise the DecodeError the per-message decoder would raise for the first bad message."""
    bad = int(np.argmax(at))
    tag = chr(int(tags[bad]))
    raise pgoutput.DecodeError(f"{pgoutput.MESSAGE_TYPES.get(tag, '?')} message ({tag!r}): {what}")


def _walk(buf: np.ndarray, tags: np.ndarray, pos: np.ndarray, end: np.ndarray, columns: int) -> _Tuples:
    """Walk a TupleData at ``pos`` in every message at once, one column per step."""
    if np.any(pos + 2 > end):
        _fail(tags, pos + 2 > end, "tuple truncated")
    count = _be(buf, pos, 2, ">i2")
    if np.any(count != columns):
        _fail(tags, count != columns, f"a tuple of {count[count != columns][0]} columns for a relation of {columns}")
    m = len(pos)
    kinds = np.empty((m, columns), dtype=np.uint8)
    starts = np.empty((m, columns), dtype=np.int64)
    lengths = np.zeros((m, columns), dtype=np.int64)
    p = pos + 2
    limit = len(buf) - 4
    for j in range(columns):
        if np.any(p >= end):
            _fail(tags, p >= end, "message truncated")
        kind = buf[p]
        text = (kind == _TEXT) | (kind == _BINARY)
        if np.any(~text & (kind != _NULL) & (kind != _UNCHANGED)):
            bad = ~text & (kind != _NULL) & (kind != _UNCHANGED)
            _fail(tags, bad, f"unknown tuple column kind {chr(int(kind[bad][0]))!r}")
        length = np.where(text, _be(buf, np.minimum(p + 1, limit), 4, ">i4"), 0)
        step = np.where(text, 5 + length, 1)
        if np.any((length < 0) | (p + step > end)):
            _fail(tags, (length < 0) | (p + step > end), "value truncated")
        kinds[:, j] = kind
        starts[:, j] = p + 5
        lengths[:, j] = length
        p = p + step
    return _Tuples(kinds, starts, lengths, p)


def _strings(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> pa.Array:
    """An Arrow string array of the byte ranges ``buf[start:start + length]`` (NULL where not ``valid``)."""
    n = len(starts)
    sizes = np.where(valid, lengths, 0)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    if total:
        index = np.repeat(starts - offsets[:-1], sizes) + np.arange(total, dtype=np.int64)
        data = buf[index]
    else:
        data = np.zeros(0, dtype=np.uint8)
    if total >= 2**31:  # a part is at most 1 GB (a bytea): never
        raise pgoutput.DecodeError(f"{total:,} bytes of values in one column of one part")
    return pa.Array.from_buffers(
        pa.string(), n, [_validity(valid), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def _validity(valid: np.ndarray) -> pa.Buffer | None:
    return None if bool(valid.all()) else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _int64s(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    return pa.Array.from_buffers(
        pa.int64(), len(values), [None if valid is None else _validity(valid), pa.py_buffer(values.astype(np.int64))]
    )


@dataclass
class _Rows:
    """A table's rows decoded in one segment, before their sequence numbers are known."""

    message: np.ndarray  # index of the message (in the segment) each row comes from
    half: np.ndarray  # 0: the delete half of a key change (precedes its message's main row), 1: the main row
    op: np.ndarray  # _OP_I/_OP_U/_OP_D
    kinds: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    produced: np.ndarray  # per message of the table: rows it yields (1, or 2 for a key change)
    messages: np.ndarray  # the table's message indices (in the segment), in order


@dataclass
class _Txn:
    """The transaction being read (carried from one segment or part to the next)."""

    lsn: int = 0
    skip: bool = False
    skip_tables: frozenset[int] = frozenset()
    changes: int = 0
    bytes: int = 0
    truncates: list[TruncateEvent] = field(default_factory=list)
    seq0: int = 0  # the last seq before it began: its rows have larger ones
    #: Per table, the index of the first staged file holding this transaction's rows.
    files: dict[int, int] = field(default_factory=dict)


class BulkDecoder:
    """Decodes parts of the slot's messages into the tables' streams (see the module doc)."""

    def __init__(self, read: ChangeRead) -> None:
        self.read = read
        self.relation_map: dict[int, int] = {}
        self.seq = 0
        self.read_bytes = 0
        self.txn = _Txn()
        self.in_heartbeat = False
        self.stopped = False
        self.buffered_rows: dict[int, int] = {}
        self.buf = np.zeros(0, dtype=np.uint8)

    # ------------------------------------------------------------------ parts and segments

    def feed(self, part: slot.MessagePart) -> bool:
        """Decode one part; False once the batch has ended (a byte limit, a relation change)."""
        buf = self.buf = np.frombuffer(part.data, dtype=np.uint8)
        starts, lengths = part.starts, part.lengths
        if np.any(lengths < 1):
            raise pgoutput.DecodeError("an empty pgoutput message")
        tags = buf[starts]
        events = np.flatnonzero(~_VECTOR_TAGS[tags])
        begin = 0
        for event in [*events.tolist(), len(starts)]:
            if event > begin:
                self._segment(buf, tags[begin:event], starts[begin:event], lengths[begin:event])
                if self.stopped:
                    return False
            if event < len(starts):
                start = int(starts[event])
                self._event(part.data[start : start + int(lengths[event])])
                if self.stopped:
                    return False
            begin = event + 1
        self._flush_full()
        return True

    def _event(self, data: bytes) -> None:
        """A message that steers the read, decoded as the per-message reference does."""
        read, txn = self.read, self.txn
        message = pgoutput.decode(data)
        if isinstance(message, pgoutput.Relation):
            oid = read.by_name.get((message.namespace, message.name))
            if oid is None:
                return
            self.relation_map[message.relation_id] = oid
            stream = read.streams[oid]
            if (
                stream.relation is not None
                and relation_shape(stream.relation) != relation_shape(message)
                and read.relation_changed(stream, txn.lsn, read.transactions)
            ):
                self._undo()
                self.stopped = True
                return
            read.new_relation(stream, message)
        elif isinstance(message, pgoutput.Truncate):
            if txn.skip:
                return
            for relation_id in message.relation_ids:
                oid = self.relation_map.get(relation_id)
                if oid is not None and oid not in txn.skip_tables:
                    self.seq += 1
                    txn.changes += 1
                    txn.truncates.append(TruncateEvent(read.streams[oid].source.qualified, txn.lsn, self.seq))
        elif isinstance(message, pgoutput.LogicalMessage):
            self.in_heartbeat = self.in_heartbeat or (
                message.prefix == slot.HEARTBEAT_PREFIX and message.content == read.heartbeat.encode()
            )

    def _segment(self, buf: np.ndarray, tags: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Messages between two events: Begin, Commit, row changes (and ignored Type/Origin messages)."""
        read, spec, position, txn = self.read, self.read.spec, self.read.position, self.txn
        n = len(tags)
        is_begin, is_commit = tags == _B, tags == _C
        ends = starts + lengths
        # Transactions: slot 0 is the one carried in, slot k the k-th Begin of the segment.
        slot_of = np.cumsum(is_begin)
        begins = np.flatnonzero(is_begin)
        if np.any(lengths[begins] < 21):
            raise pgoutput.DecodeError("begin message truncated")
        begin_lsn = _be(buf, starts[begins] + 1, 8, ">u8")
        xids = _be(buf, starts[begins] + 17, 4, ">u4")
        slots = len(begins) + 1
        slot_lsn = np.concatenate([np.array([txn.lsn], dtype=np.uint64), begin_lsn])
        skip = np.zeros(slots, dtype=bool)
        skip[0] = txn.skip
        skip[1:] = begin_lsn <= np.uint64(position.commit_lsn)
        if read.snapshot_filter is not None and position.snapshot_lsn is not None:
            skip[1:] |= (begin_lsn <= np.uint64(position.snapshot_lsn)) & _visible(read.snapshot_filter, xids)
        table_skip: dict[int, np.ndarray] = {}
        for oid, (held, lsn) in read.table_filters.items():
            skips = np.zeros(slots, dtype=bool)
            skips[0] = oid in txn.skip_tables
            skips[1:] = (begin_lsn <= np.uint64(lsn)) & _visible(held, xids)
            table_skip[oid] = skips
        # Row changes of the tables this sync streams, in transactions that are not skipped.
        rows = np.flatnonzero((tags == _I) | (tags == _U) | (tags == _D))
        rows = rows[~skip[slot_of[rows]]]
        if len(rows) and np.any(lengths[rows] < 6):
            _fail(tags[rows], lengths[rows] < 6, "message truncated")
        relation_ids = _be(buf, starts[rows] + 1, 4, ">u4")
        oids = np.full(len(rows), -1, dtype=np.int64)
        for relation_id in np.unique(relation_ids).tolist():
            tracked = self.relation_map.get(relation_id)
            if tracked is not None:
                oids[relation_ids == relation_id] = tracked
        for oid, skips in table_skip.items():
            oids[(oids == oid) & skips[slot_of[rows]]] = -1
        keep = oids >= 0
        rows, oids = rows[keep], oids[keep]
        produced = np.zeros(n, dtype=np.int64)
        decoded: dict[int, _Rows] = {}
        for oid in np.unique(oids).tolist():
            stream = read.streams[oid]
            if stream.relation is None:
                raise SyncError(
                    "a change arrived before its relation description",
                    sync_id=spec.sync_id,
                    table=stream.source.qualified,
                )
            mine = rows[oids == oid]
            table_rows = self._decode_rows(buf, stream, tags[mine], starts[mine], ends[mine])
            table_rows.messages = mine
            produced[mine] = table_rows.produced
            decoded[oid] = table_rows
        changed = np.zeros(n, dtype=np.int64)
        changed[rows] = 1
        row_bytes = lengths * produced
        seq_after = self.seq + np.cumsum(produced)
        # Commits: the transactions that end here, in order (the heartbeat's ends the read).
        commits = np.flatnonzero(is_commit)
        if np.any(lengths[commits] < 26):
            raise pgoutput.DecodeError("commit message truncated")
        commit_lsn = _be(buf, starts[commits] + 2, 8, ">u8")
        end_lsn = _be(buf, starts[commits] + 10, 8, ">u8")
        commit_slot = slot_of[commits]
        slot_changes = np.bincount(slot_of, weights=changed, minlength=slots).astype(np.int64)
        slot_bytes = np.bincount(slot_of, weights=row_bytes, minlength=slots).astype(np.int64)
        slot_changes[0] += txn.changes
        slot_bytes[0] += txn.bytes
        cut = n  # messages from here on are not part of the batch
        heartbeat_commit = -1
        if self.in_heartbeat and len(commits):
            heartbeat_commit = 0  # everything committed before this transaction has been read
        counted = ~skip[commit_slot] & (slot_changes[commit_slot] > 0)
        if heartbeat_commit == 0:
            counted[0] = False
        batch_bytes = self.read_bytes + np.cumsum(np.where(counted, slot_bytes[commit_slot], 0))
        last = len(commits)
        if spec.max_batch_bytes is not None:
            over = np.flatnonzero(counted & (batch_bytes >= spec.max_batch_bytes))
            if len(over):
                last = int(over[0]) + 1
                cut = int(commits[over[0]]) + 1
                self.stopped = True
                read.notes.append(f"the batch ends at {int(batch_bytes[over[0]]):,} bytes of changes (max_batch_bytes)")
        done = np.arange(last)
        if heartbeat_commit == 0:
            read.reached, self.in_heartbeat, read.heartbeat_end = True, False, int(end_lsn[0])
            done = done[1:]
        if len(done):
            read.last_commit, read.last_end = int(commit_lsn[done[-1]]), int(end_lsn[done[-1]])
            read.skipped += int(np.count_nonzero(skip[commit_slot[done]]))
            finished = done[counted[done]]
            read.transactions += len(finished)
            read.changes += int(slot_changes[commit_slot[finished]].sum())
            if len(finished):
                self.read_bytes = int(batch_bytes[finished[-1]])
            if len(finished) and commit_slot[finished[0]] == 0:
                read.truncates.extend(txn.truncates)
            read.progress.add(int(slot_changes[commit_slot[finished]].sum()))
        # Stage the rows (up to the cut), each with its transaction's commit LSN and its seq.
        for oid, table_rows in decoded.items():
            self._stage(oid, table_rows, cut, seq_after, slot_lsn[slot_of], lengths)
        # The transaction left open at the segment's end is carried on.
        if cut < n:
            self.seq = int(seq_after[cut - 1])
            return
        self.seq = int(seq_after[-1])
        open_slot = int(slot_of[-1])
        if len(commits) and int(commit_slot[-1]) == open_slot:  # it committed: none is open
            self.txn = _Txn(lsn=int(slot_lsn[open_slot]), skip=bool(skip[open_slot]), seq0=self.seq)
            return
        if open_slot == 0:
            txn.changes, txn.bytes = int(slot_changes[0]), int(slot_bytes[0])
            return
        b = int(begins[open_slot - 1])
        self.txn = _Txn(
            lsn=int(slot_lsn[open_slot]),
            skip=bool(skip[open_slot]),
            skip_tables=frozenset(oid for oid, skips in table_skip.items() if skips[open_slot]),
            changes=int(slot_changes[open_slot]),
            bytes=int(slot_bytes[open_slot]),
            seq0=int(seq_after[b]),
        )

    # ------------------------------------------------------------------ rows of one table

    def _decode_rows(
        self, buf: np.ndarray, stream: TableStream, tags: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> _Rows:
        """Walk one table's row messages (of one segment) and lay out the rows they yield."""
        assert stream.relation is not None
        columns = len(stream.relation.columns)
        kind = buf[starts + 5]
        inserts, deletes, updates = tags == _I, tags == _D, tags == _U
        if np.any(inserts & (kind != _NEW)):
            _fail(tags, inserts & (kind != _NEW), "insert without a new tuple")
        if np.any(deletes & (kind != _KEY) & (kind != _OLD)):
            _fail(tags, deletes & (kind != _KEY) & (kind != _OLD), "delete without an old key or row")
        has_old = updates & ((kind == _KEY) | (kind == _OLD))
        if np.any(updates & ~has_old & (kind != _NEW)):
            _fail(tags, updates & ~has_old & (kind != _NEW), "update without a new tuple")
        first = _walk(buf, tags, starts + 6, ends, columns)
        olds = np.flatnonzero(has_old)
        second = None
        if len(olds):
            after = first.end[olds]
            if np.any(after >= ends[olds]) or np.any(buf[np.minimum(after, len(buf) - 1)] != _NEW):
                _fail(
                    tags[olds],
                    (after >= ends[olds]) | (buf[np.minimum(after, len(buf) - 1)] != _NEW),
                    "update without a new tuple",
                )
            second = _walk(buf, tags[olds], after + 1, ends[olds], columns)
            tail = second.end
            done_end = first.end.copy()
            done_end[olds] = tail
        else:
            done_end = first.end
        if np.any(done_end != ends):
            _fail(tags, done_end != ends, "unexpected byte(s) after its last field")
        m = len(tags)
        produced = np.ones(m, dtype=np.int64)
        # The rows: one per message from its first (or only) tuple, the new tuple of an update with an old one.
        kinds, vstarts, vlengths = first.kinds.copy(), first.starts.copy(), first.lengths.copy()
        op = np.where(inserts, _OP_I, np.where(deletes, _OP_D, _OP_U))
        halves: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # delete halves of key changes
        if second is not None:
            old_kinds, old_starts, old_lengths = first.kinds[olds], first.starts[olds], first.lengths[olds]
            new_kinds, new_starts, new_lengths = second.kinds.copy(), second.starts.copy(), second.lengths.copy()
            full = kind[olds] == _OLD
            moved = ~full  # 'K': the key changed
            if np.any(full):
                # REPLICA IDENTITY FULL: the whole old row; a value left out as unchanged is the old one,
                # and the key changed if a key column differs (compared as the reference compares).
                fill = full[:, None] & (new_kinds == _UNCHANGED) & (old_kinds != _UNCHANGED)
                key_changed = np.zeros(len(olds), dtype=bool)
                names = [c.name for c in stream.relation.columns]
                for key in stream.source.primary_key:
                    j = names.index(key)
                    key_changed |= _differs(
                        buf,
                        old_kinds[:, j],
                        old_starts[:, j],
                        old_lengths[:, j],
                        second.kinds[:, j],
                        second.starts[:, j],
                        second.lengths[:, j],
                    )
                new_kinds = np.where(fill, old_kinds, new_kinds)
                new_starts = np.where(fill, old_starts, new_starts)
                new_lengths = np.where(fill, old_lengths, new_lengths)
                moved |= full & key_changed
            kinds[olds], vstarts[olds], vlengths[olds] = new_kinds, new_starts, new_lengths
            produced[olds[moved]] = 2
            which = olds[moved]
            halves.append((which, old_kinds[moved], old_starts[moved], old_lengths[moved]))
        index = np.arange(m)
        message, half = index, np.ones(m, dtype=np.int8)
        if halves and len(halves[0][0]):
            which, hk, hs, hl = halves[0]
            message = np.concatenate([index, which])
            half = np.concatenate([half, np.zeros(len(which), dtype=np.int8)])
            op = np.concatenate([op, np.full(len(which), _OP_D)])
            kinds, vstarts, vlengths = (np.concatenate(p) for p in ((kinds, hk), (vstarts, hs), (vlengths, hl)))
            order = np.lexsort((half, message))
            message, half, op = message[order], half[order], op[order]
            kinds, vstarts, vlengths = kinds[order], vstarts[order], vlengths[order]
        return _Rows(message, half, op, kinds, vstarts, vlengths, produced, index)

    def _stage(
        self,
        oid: int,
        rows: _Rows,
        cut: int,
        seq_after: np.ndarray,
        message_lsn: np.ndarray,
        message_bytes: np.ndarray,
    ) -> None:
        """Add a table's decoded rows (those before ``cut``) to its stream as one Arrow batch."""
        read, stream = self.read, self.read.streams[oid]
        at = rows.messages[rows.message]  # the segment's message index of every row
        keep = at < cut
        if not np.any(keep):
            return
        if not bool(keep.all()):
            at = at[keep]
            rows = _Rows(
                rows.message[keep],
                rows.half[keep],
                rows.op[keep],
                rows.kinds[keep],
                rows.starts[keep],
                rows.lengths[keep],
                rows.produced,
                rows.messages,
            )
        buf = self.buf
        seq = seq_after[at] - (1 - rows.half)
        columns = stream.relation.columns if stream.relation is not None else ()
        text = (rows.kinds == _TEXT) | (rows.kinds == _BINARY)
        unchanged = rows.kinds == _UNCHANGED
        arrays = [_strings(buf, rows.starts[:, j], rows.lengths[:, j], text[:, j]) for j in range(len(columns))]
        if read.sql_ascii:
            self._check_utf8(stream, arrays, rows)
        lsn = message_lsn[at].astype(np.uint64)
        lsn = np.where(lsn >= np.uint64(2**63), lsn - np.uint64(2**63), lsn).astype(np.int64)
        moved_from = np.zeros(len(seq), dtype=np.int64)
        has_moved = np.zeros(len(seq), dtype=bool)
        if not bool(rows.half.all()):
            # The main row of a key change follows its delete half: moved_from is that half's seq.
            is_half = rows.half == 0
            follows = np.flatnonzero(is_half) + 1
            moved_from[follows] = seq[is_half]
            has_moved[follows] = True
        arrays += [
            _op_strings(rows.op),
            _int64s(lsn),
            _int64s(seq),
            _unchanged_strings(unchanged),
            _int64s(moved_from, has_moved),
        ]
        if not stream.columns:
            stream.columns = stream_columns(stream, read.conn, read.pending_types)
        batch = pa.RecordBatch.from_arrays(arrays, schema=stream.schema())
        stream.pieces.append(batch)
        stream.buffer_bytes += int(message_bytes[at].sum())
        self.buffered_rows[oid] = self.buffered_rows.get(oid, 0) + batch.num_rows

    # ------------------------------------------------------------------ files

    def _flush_full(self) -> None:
        """After a part: write out the buffers holding batch_rows rows, or that the next part could take
        past batch_bytes (so memory stays bounded by bytes, whatever the row width or transaction size)."""
        spec = self.read.spec
        for oid, stream in self.read.streams.items():
            if stream.pieces and (
                self.buffered_rows.get(oid, 0) >= spec.batch_rows
                or stream.buffer_bytes + _part_bytes(spec) > spec.batch_bytes  # the next part could overflow it
            ):
                self._flush(oid, stream)

    def _flush(self, oid: int, stream: TableStream) -> None:
        """Write a stream's buffer; the open transaction's rows go to a file of their own (see ``_undo``)."""
        table = pa.Table.from_batches(stream.pieces, schema=stream.schema())
        seqs = table.column(stream.schema().get_field_index("_cdc_seq")).to_numpy()
        mine = int(np.searchsorted(seqs, self.txn.seq0, side="right"))
        stream.pieces.clear()
        if 0 < mine < len(seqs):
            stream.pieces = table.slice(0, mine).to_batches()
            self.read.flush(stream)
            table = table.slice(mine)
        if mine < len(seqs):
            self.txn.files.setdefault(oid, len(stream.files))
        stream.pieces = table.to_batches()
        self.read.flush(stream)
        self.buffered_rows[oid] = 0

    def _undo(self) -> None:
        """Take the open transaction's rows back out of the buffers and the staged files."""
        for oid, stream in self.read.streams.items():
            first = self.txn.files.get(oid)
            if first is not None:
                for staged in stream.files[first:]:
                    delete_staged_file(staged.uri)
                    stream.rows -= staged.rows
                del stream.files[first:]
            if stream.pieces:
                table = pa.Table.from_batches(stream.pieces, schema=stream.schema())
                seqs = table.column(stream.schema().get_field_index("_cdc_seq")).to_numpy()
                keep = int(np.searchsorted(seqs, self.txn.seq0, side="right"))
                stream.pieces = table.slice(0, keep).to_batches() if keep else []
                self.buffered_rows[oid] = keep
        self.txn.files.clear()

    def _check_utf8(self, stream: TableStream, arrays: list[pa.Array], rows: _Rows) -> None:
        """A SQL_ASCII source passes text through unconverted: refuse a value that is not UTF-8, by name."""
        for array in arrays:
            try:
                array.validate(full=True)
            except pa.ArrowInvalid:
                for r in range(len(array)):
                    try:
                        array.slice(r, 1).validate(full=True)
                    except pa.ArrowInvalid:
                        refuse_not_utf8(stream, self._python_row(rows, r), self.read.spec)
                raise

    def _python_row(self, rows: _Rows, r: int) -> list[Any]:
        """One row as the per-message decoder holds it (for an error message)."""
        values: list[Any] = []
        for j in range(rows.kinds.shape[1]):
            kind = rows.kinds[r, j]
            if kind in (_TEXT, _BINARY):
                raw = bytes(self.buf[rows.starts[r, j] : rows.starts[r, j] + rows.lengths[r, j]])
                try:
                    values.append(raw.decode())
                except UnicodeDecodeError:
                    values.append(pgoutput.NotUtf8(raw))
            else:
                values.append(None)
        return values


def _differs(
    buf: np.ndarray,
    kinds_a: np.ndarray,
    starts_a: np.ndarray,
    lengths_a: np.ndarray,
    kinds_b: np.ndarray,
    starts_b: np.ndarray,
    lengths_b: np.ndarray,
) -> np.ndarray:
    """Whether two values differ, as the reference compares decoded values (kind, then bytes)."""
    text_a = (kinds_a == _TEXT) | (kinds_a == _BINARY)
    text_b = (kinds_b == _TEXT) | (kinds_b == _BINARY)
    differs = (kinds_a != kinds_b) | (text_a & (lengths_a != lengths_b))
    same_size = np.flatnonzero(text_a & text_b & ~differs)
    if len(same_size):
        a = _strings(buf, starts_a[same_size], lengths_a[same_size], np.ones(len(same_size), dtype=bool))
        b = _strings(buf, starts_b[same_size], lengths_b[same_size], np.ones(len(same_size), dtype=bool))
        differs[same_size] = ~np.asarray(pa.compute.equal(a, b).to_numpy(zero_copy_only=False), dtype=bool)
    return differs


def _op_strings(op: np.ndarray) -> pa.Array:
    n = len(op)
    return pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32)), pa.py_buffer(_OPS[op])]
    )


def _unchanged_strings(unchanged: np.ndarray) -> pa.Array:
    """The ``_cdc_unchanged`` column: ``{2,5}`` (1-based positions) for a row with unchanged TOAST values."""
    n = len(unchanged)
    rows = np.flatnonzero(unchanged.any(axis=1))
    if not len(rows):
        return pa.nulls(n, pa.string())
    patterns, which = np.unique(unchanged[rows], axis=0, return_inverse=True)
    texts = pa.array(["{" + ",".join(str(i + 1) for i in np.flatnonzero(p)) + "}" for p in patterns], pa.string())
    index = np.zeros(n, dtype=np.int32)
    index[rows] = np.asarray(which).ravel()
    return texts.take(pa.array(index, mask=~unchanged.any(axis=1)))


def _part_bytes(spec: CdcSpec) -> int:
    return min(PART_BYTES, spec.batch_bytes)


def read_bulk(read: ChangeRead) -> None:
    """Stage the slot's changes with the bulk decoder (counterpart of :func:`~.per_message.read_per_message`)."""
    decoder = BulkDecoder(read)
    # A read of at most WHOLE_READ_WAL_BYTES of WAL is fetched in one row (its messages are rarely more
    # than the WAL that holds them: only compressed TOAST values grow); a bigger one part by part.
    whole = read.upto - read.position.end_lsn <= WHOLE_READ_WAL_BYTES
    parts = slot.read_change_parts(read.conn, read.spec, read.upto, _part_bytes(read.spec), whole=whole)
    try:
        for part in parts:
            if not decoder.feed(part):
                break
    finally:
        parts.close()  # ends the read's transaction (also after a break)
