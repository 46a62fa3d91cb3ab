"""A bounded, append-only FIFO of Kafka records on disk: the tap producer's spool.

The collector appends here what it cannot hand to Kafka right now, and replays it in
order once the broker is back (tapstream/producer.py).  A record is
``(topic, key, value)`` plus the number of tap events it carries.

Layout of the spool directory::

    lock                       flock()ed while a Spool is open: one process per directory
    cursor                     "<segment> <offset>": everything before it was delivered
    00000000000000000007.seg   segments, oldest first; each starts with MAGIC

A segment holds records framed as::

    u32 length | u32 crc32(length, payload) | payload
    payload = u32 events | u16 len(topic) | u32 len(key) | topic | key | value

(little-endian).  A reader trusts a record only when its whole frame is there and the
CRC matches, so a torn record (the process died in the middle of a write, or the machine
before the data reached the disk) or a corrupt one is detected.  On open, the first bad
record of a segment and everything after it in that segment are cut off with a warning;
the records before it are kept and replayed.  In the last segment (the usual case: a
crash while appending) that loses at most the torn record itself; corruption in the
middle of an older segment loses the rest of that segment, and is logged as such.

Durability.  Every append is one ``write()`` to the OS, so a crash of the collector
process loses nothing that append() accepted.  Segments are fsync()ed when they are
closed (roll, close()), not per append: a power loss or kernel crash can lose the
unsynced tail of the newest segment (what the OS had not yet written back).

Delivery positions.  :meth:`Spool.ack` persists the cursor (a small file replaced
atomically, not fsync()ed) and deletes every segment that is entirely delivered.  A
reopen therefore replays only undelivered records; if the cursor update itself was lost
(power loss), records between the lost cursor and the real one are sent again, at most
what the segments still on disk hold.  Re-sends are duplicates, which the store removes
by event id; records are never skipped.

Bound.  ``max_bytes`` bounds the bytes the segment files occupy on disk (headers and
framing included).  Delivered records at the front of the oldest segment keep using
space until that whole segment is delivered and deleted; with the default segment size
(1/16 of the bound) that is at most ~6% of the bound.  When everything is delivered all
segments are deleted, so an empty spool occupies nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("greymesh.tapstream")

MAGIC = b"GMSPOOL1"
_FRAME = struct.Struct("<II")  # payload length, crc32 over the length bytes and the payload
_FIELDS = struct.Struct("<IHI")  # events, topic length, key length
MAX_RECORD_BYTES = 256 << 20  # a frame claiming more than this is corruption, not a record
DEFAULT_MAX_BYTES = 256 << 20
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
CURSOR_FILE = "cursor"
LOCK_FILE = "lock"


class Position(NamedTuple):
    """Where a record ends: its segment, the offset just past it, its index in the segment.
    Positions order like the records they belong to."""

    segment: int
    end: int
    index: int


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    topic: str
    key: bytes
    value: bytes
    events: int
    position: Position


@dataclass(slots=True)
class _Segment:
    id: int
    path: Path
    size: int  # bytes in the file that hold valid records (MAGIC included)
    count: int  # records in it


class SpoolInUseError(RuntimeError):
    """Another Spool (in this or another process) has the directory open."""


class Spool:
    """A bounded FIFO of ``(topic, key, value)`` records in segment files under ``directory``.

    Thread-safe: every method takes one lock.  ``append`` returns False (and writes
    nothing) when the record would push the files past ``max_bytes``; the caller counts
    that drop.  ``peek`` reads the oldest undelivered records without consuming them;
    ``ack(position)`` marks everything up to and including that record delivered.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 segment_bytes: int | None = None) -> None:
        if max_bytes <= len(MAGIC):
            raise ValueError(f"max_bytes must be more than {len(MAGIC)}, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 << 10, min(16 << 20, max_bytes // 16))
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active_fd: int | None = None  # open for append: always the last segment
        self._head_off = len(MAGIC)  # first undelivered byte of _segments[0]
        self._head_idx = 0  # index of the first undelivered record in _segments[0]
        self._records = 0
        self._disk = 0
        self._closed = False
        self.discarded_bytes = 0  # torn or corrupt bytes cut off (on open or read)

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolInUseError(f"spool {self.directory} is already open (by this or another process)") from None
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ---------------------------------------------------------------------

    def _read_cursor(self) -> tuple[int, int] | None:
        path = self.directory / CURSOR_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            seg, off = (int(x) for x in text.split())
            if seg < 0 or off < 0:
                raise ValueError("negative")
            return seg, off
        except ValueError:
            # Replaying from the oldest segment only re-sends (duplicates), never skips.
            log.warning("spool %s: unreadable cursor %r; replaying from the oldest segment", self.directory, text[:64])
            return None

    def _recover(self) -> None:
        cursor = self._read_cursor()
        ids = sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT_RE.match(p.name)))
        self._next_id = max([*ids, cursor[0] if cursor else -1]) + 1
        for seg_id in ids:
            path = self._segment_path(seg_id)
            if cursor is not None and seg_id < cursor[0]:
                path.unlink()  # delivered: ack() could not delete it before the process ended
                continue
            seg = self._scan(seg_id, path)
            if seg is None:
                continue
            if not self._segments and cursor is not None and seg_id == cursor[0]:
                self._head_off, self._head_idx = self._locate(seg, cursor[1])
                if self._head_off >= seg.size:
                    path.unlink()  # entirely delivered
                    self._head_off, self._head_idx = len(MAGIC), 0
                    continue
            self._segments.append(seg)
        self._disk = sum(s.size for s in self._segments)
        self._records = sum(s.count for s in self._segments) - (self._head_idx if self._segments else 0)
        if not self._segments:
            self._head_off, self._head_idx = len(MAGIC), 0
        if self._records:
            log.info("spool %s: %d undelivered records (%d bytes) from a previous run",
                     self.directory, self._records, self._disk)

    def _scan(self, seg_id: int, path: Path) -> _Segment | None:
        """Validate a segment, cutting off a torn or corrupt tail; None if nothing usable."""
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                if MAGIC.startswith(magic):  # created, header not (fully) written: a crash at roll
                    path.unlink()
                    return None
                bad = path.with_name(path.name + ".corrupt")
                path.rename(bad)
                log.warning("spool %s: %s is not a spool segment (bad header); moved aside to %s",
                            self.directory, path.name, bad.name)
                self.discarded_bytes += size
                return None
            off, count = len(MAGIC), 0
            while off < size:
                if _read_frame(f) is None:
                    break
                off = f.tell()
                count += 1
        if off < size:
            # Re-read to tell a torn end from corruption in the middle, for the message only.
            torn = off + _FRAME.size > size or (_peek_len(path, off) + off + _FRAME.size > size)
            what = "a torn record (a crash while writing)" if torn else "a corrupt record (CRC mismatch)"
            log.warning("spool %s: %s: discarded %d bytes from offset %d, %s; the %d records before it are kept",
                        self.directory, path.name, size - off, off, what, count)
            self.discarded_bytes += size - off
            os.truncate(path, off)
        return _Segment(seg_id, path, off, count)

    @staticmethod
    def _locate(seg: _Segment, cursor_off: int) -> tuple[int, int]:
        """(offset, index) of the first record of ``seg`` that ends after ``cursor_off``."""
        off, idx = len(MAGIC), 0
        with seg.path.open("rb") as f:
            f.seek(off)
            while idx < seg.count:
                frame = _read_frame(f)
                if frame is None or f.tell() > cursor_off:
                    break
                off, idx = f.tell(), idx + 1
        return off, idx

    def _segment_path(self, seg_id: int) -> Path:
        return self.directory / f"{seg_id:020d}.seg"

    # -- the queue -------------------------------------------------------------------

    def append(self, topic: str, key: bytes, value: bytes, events: int = 1) -> bool:
        """Append one record at the end; False, writing nothing, when it would exceed
        ``max_bytes``.  Flushed to the OS before it returns.  An OSError (disk full, I/O
        error) propagates, with the partial write removed."""
        tb = topic.encode()
        if len(tb) > 0xFFFF:
            raise ValueError("topic name too long")
        payload = b"".join((_FIELDS.pack(events, len(tb), len(key)), tb, key, value))
        frame = _frame(payload)
        with self._lock:
            self._check_open()
            active = self._segments[-1] if self._active_fd is not None else None
            roll = active is None or (active.count > 0 and active.size + len(frame) > self.segment_bytes)
            if self._disk + len(frame) + (len(MAGIC) if roll else 0) > self.max_bytes:
                return False
            if roll:
                active = self._roll()
            assert active is not None and self._active_fd is not None
            _write_all(self._active_fd, frame, active.size)
            active.size += len(frame)
            active.count += 1
            self._records += 1
            self._disk += len(frame)
            return True

    def peek(self, n: int, max_bytes: int | None = None, *, after: Position | None = None) -> list[SpooledRecord]:
        """Up to ``n`` of the oldest undelivered records, oldest first, without consuming
        them; with ``max_bytes``, stop before the values would exceed it (but return at
        least one record).  With ``after``, only records after that position (a reader
        that has already taken the records up to it, not yet acked)."""
        out: list[SpooledRecord] = []
        total = 0
        with self._lock:
            self._check_open()
            i = 0
            while i < len(self._segments) and len(out) < n:
                seg = self._segments[i]
                off, idx = (self._head_off, self._head_idx) if i == 0 else (len(MAGIC), 0)
                if after is not None and after.segment > seg.id:
                    i += 1
                    continue
                if after is not None and after.segment == seg.id and after.index >= idx:
                    off, idx = after.end, after.index + 1
                with seg.path.open("rb") as f:
                    f.seek(off)
                    while idx < seg.count and len(out) < n:
                        payload = _read_frame(f)
                        if payload is None:
                            self._cut(i, off, idx)
                            break
                        rec = _parse(payload, Position(seg.id, f.tell(), idx))
                        if max_bytes is not None and out and total + len(rec.value) > max_bytes:
                            return out
                        out.append(rec)
                        total += len(rec.value)
                        off, idx = f.tell(), idx + 1
                if i < len(self._segments) and self._segments[i] is seg:
                    i += 1
        return out

    def ack(self, position: Position) -> None:
        """Everything up to and including the record at ``position`` is delivered: persist
        that, and delete the segments it completes.  Acking an older position again is a
        no-op."""
        with self._lock:
            self._check_open()
            if not self._segments or position.segment < self._segments[0].id:
                return  # delivered before
            target = next((s for s in self._segments if s.id == position.segment), None)
            if position.segment > self._segments[-1].id or (
                    target is not None and (position.index >= target.count or position.end > target.size)):
                raise ValueError(f"{position} is beyond the end of the spool")
            if target is self._segments[0] and position.index < self._head_idx:
                return  # delivered before
            while self._segments and self._segments[0].id < position.segment:
                self._records -= self._segments[0].count - self._head_idx
                self._drop_head()
            seg = self._segments[0] if self._segments else None
            if seg is not None and seg is target:
                self._records -= position.index + 1 - self._head_idx
                self._head_off, self._head_idx = position.end, position.index + 1
                if self._head_idx >= seg.count:
                    # Entirely delivered; if it was the segment being appended to, the next
                    # append starts a new one, so an empty spool occupies nothing.
                    self._drop_head()
            self._write_cursor(position.segment, position.end)

    def __len__(self) -> int:
        with self._lock:
            return self._records

    @property
    def records(self) -> int:
        """Undelivered records."""
        return len(self)

    @property
    def bytes(self) -> int:
        """Bytes the segment files occupy on disk (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._disk

    def close(self) -> None:
        """fsync the open segment and release the directory.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._active_fd is not None:
                    os.fsync(self._active_fd)
                    os.close(self._active_fd)
                    self._active_fd = None
            finally:
                os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with the lock held) -------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self.directory} is closed")

    def _roll(self) -> _Segment:
        if self._active_fd is not None:
            os.fsync(self._active_fd)  # a finished segment is durable
            os.close(self._active_fd)
            self._active_fd = None
        seg = _Segment(self._next_id, self._segment_path(self._next_id), len(MAGIC), 0)
        fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all(fd, MAGIC, 0)
        except BaseException:
            os.close(fd)
            seg.path.unlink(missing_ok=True)
            raise
        self._next_id += 1
        self._fsync_dir()
        if not self._segments:
            self._head_off, self._head_idx = len(MAGIC), 0
        self._segments.append(seg)
        self._active_fd = fd
        self._disk += len(MAGIC)
        return seg

    def _drop_head(self) -> None:
        """Delete the oldest segment (it is delivered, or cut off)."""
        seg = self._segments.pop(0)
        if not self._segments and self._active_fd is not None:
            os.close(self._active_fd)  # the next append starts a new segment
            self._active_fd = None
        seg.path.unlink(missing_ok=True)
        self._disk -= seg.size
        self._head_off, self._head_idx = len(MAGIC), 0

    def _cut(self, i: int, off: int, idx: int) -> None:
        """A record that was valid became unreadable: drop it and the rest of its segment."""
        seg = self._segments[i]
        lost = seg.count - idx
        log.error("spool %s: %s: record %d at offset %d no longer reads back (disk corruption?): "
                  "%d records of this segment are lost", self.directory, seg.path.name, idx, off, lost)
        self.discarded_bytes += seg.size - off
        self._records -= lost
        self._disk -= seg.size - off
        seg.size, seg.count = off, idx
        os.truncate(seg.path, off)
        if i == 0 and seg.count == self._head_idx and (len(self._segments) > 1 or self._active_fd is None):
            self._drop_head()

    def _write_cursor(self, seg: int, off: int) -> None:
        tmp = self.directory / (CURSOR_FILE + ".tmp")
        tmp.write_text(f"{seg} {off}\n")
        os.replace(tmp, self.directory / CURSOR_FILE)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _frame(payload: bytes) -> bytes:
    lb = struct.pack("<I", len(payload))
    return lb + struct.pack("<I", zlib.crc32(payload, zlib.crc32(lb))) + payload


def _read_frame(f) -> bytes | None:
    """The payload of the frame at the file's position, or None (torn, corrupt, or EOF)."""
    head = f.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    length, crc = _FRAME.unpack(head)
    if length < _FIELDS.size or length > MAX_RECORD_BYTES:
        return None
    payload = f.read(length)
    if len(payload) < length or zlib.crc32(payload, zlib.crc32(head[:4])) != crc:
        return None
    return payload


def _peek_len(path: Path, off: int) -> int:
    with path.open("rb") as f:
        f.seek(off)
        head = f.read(4)
    return struct.unpack("<I", head)[0] if len(head) == 4 else 0


def _parse(payload: bytes, position: Position) -> SpooledRecord:
    events, tlen, klen = _FIELDS.unpack_from(payload)
    p = _FIELDS.size
    topic = payload[p:p + tlen].decode()
    key = payload[p + tlen:p + tlen + klen]
    value = payload[p + tlen + klen:]
    return SpooledRecord(topic, key, value, events, position)


def _write_all(fd: int, data: bytes, size_before: int) -> None:
    """Write all of ``data`` at the end of ``fd``; on failure remove what was written."""
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BaseException:
        try:
            os.ftruncate(fd, size_before)
        except OSError:
            pass  # the CRC check discards the partial frame on the next open
        raise
