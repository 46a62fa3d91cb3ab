"""tapstream.spool: the bounded on-disk FIFO behind the tap producer (no Kafka here).

Order across segment rolls, the byte bound, reopening (only undelivered records come
back), torn and corrupt tails (cut off with a warning, the records before them kept),
segment deletion on ack, concurrent use, and a real SIGKILL of a process that is
appending.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tapstream.spool import MAGIC, Spool, SpoolInUseError

ROOT = Path(__file__).resolve().parents[1]


def _value(i: int, size: int = 200) -> bytes:
    head = f"rec-{i:06d}|".encode()
    return head + bytes((i + j) % 251 for j in range(size - len(head)))


def _segments(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.seg"))


def _drain(spool: Spool, chunk: int = 7) -> list[bytes]:
    """Every record, oldest first, acking as it goes."""
    out = []
    while batch := spool.peek(chunk):
        out += [r.value for r in batch]
        spool.ack(batch[-1].position)
    return out


def test_fifo_order_across_segment_rolls(tmp_path: Path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    n = 300
    for i in range(n):
        # Sizes vary so records straddle the roll point in different ways.
        assert spool.append(f"greymesh.tap.l{i % 3}", f"svc-{i % 5}".encode(), _value(i, 50 + (i * 37) % 700), events=i)
    assert len(spool) == spool.records == n
    assert len(_segments(tmp_path)) > 10, "small segments: the records must span many files"

    seen = []
    while batch := spool.peek(11):
        for r in batch:
            i = int(r.value[4:10])
            assert (r.topic, r.key, r.value, r.events) == (
                f"greymesh.tap.l{i % 3}", f"svc-{i % 5}".encode(), _value(i, 50 + (i * 37) % 700), i)
            seen.append(i)
        assert [r.position for r in batch] == sorted(r.position for r in batch)
        spool.ack(batch[-1].position)
    assert seen == list(range(n))
    assert len(spool) == 0 and spool.bytes == 0
    assert _segments(tmp_path) == []
    spool.close()


def test_peek_does_not_consume_and_respects_max_bytes(tmp_path: Path):
    with Spool(tmp_path) as spool:
        for i in range(10):
            spool.append("t", b"k", _value(i, 1000))
        assert [r.value for r in spool.peek(3)] == [r.value for r in spool.peek(3)]
        assert len(spool.peek(10, max_bytes=2500)) == 2
        assert len(spool.peek(10, max_bytes=10)) == 1, "at least one record, however large"
        assert len(spool) == 10


def test_peek_after_a_position_reads_on_without_acking(tmp_path: Path):
    with Spool(tmp_path, segment_bytes=4096) as spool:
        for i in range(40):
            spool.append("t", b"k", _value(i, 500))
        first = spool.peek(12)
        rest = spool.peek(100, after=first[-1].position)  # across segment boundaries
        assert [r.value for r in first + rest] == [_value(i, 500) for i in range(40)]
        assert spool.peek(5, after=rest[-1].position) == []
        spool.ack(first[5].position)
        # A position before the cursor reads from the cursor on.
        assert spool.peek(1, after=first[2].position)[0].value == _value(6, 500)
        spool.ack(rest[-1].position)
        assert spool.peek(5, after=first[-1].position) == [] and len(spool) == 0


def test_bound_is_respected_and_append_refuses_at_the_bound(tmp_path: Path):
    max_bytes = 64 << 10
    spool = Spool(tmp_path, max_bytes=max_bytes, segment_bytes=16 << 10)
    accepted = 0
    while spool.append("t", b"k", _value(accepted, 1000)):
        accepted += 1
        assert spool.bytes <= max_bytes
    # A 1,000-byte value is a 1,020-byte frame (8 length+CRC, 10 field sizes, topic, key):
    # 16 fit in a 16 KiB segment with its 8-byte header, and 4 such segments in 64 KiB.
    assert accepted == 64, accepted
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert on_disk == spool.bytes <= max_bytes
    # Full stays full, and a refused append writes nothing.
    for i in range(5):
        assert spool.append("t", b"k", _value(10_000 + i, 1000)) is False
    assert len(spool) == accepted
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == on_disk
    assert spool.append("t", b"k", b"x" * (max_bytes + 1)) is False, "a record larger than the bound"

    # Delivering the oldest segment frees its space.
    first = spool.peek(accepted)
    seg0 = [r for r in first if r.position.segment == first[0].position.segment]
    spool.ack(seg0[-1].position)
    assert spool.bytes < on_disk
    assert spool.append("t", b"k", _value(99_999, 1000))
    values = _drain(spool, chunk=100)
    assert values == [_value(i, 1000) for i in range(len(seg0), accepted)] + [_value(99_999, 1000)]
    spool.close()


def test_reopen_after_close_replays_exactly_the_unacked_records(tmp_path: Path):
    spool = Spool(tmp_path, segment_bytes=4096)
    for i in range(100):
        spool.append("t", f"k{i}".encode(), _value(i), events=3)
    batch = spool.peek(30)
    spool.ack(batch[-1].position)
    # Peeked but not acked: must come back.
    spool.peek(20)
    spool.close()

    spool = Spool(tmp_path, segment_bytes=4096)
    assert len(spool) == 70
    records = spool.peek(1000)
    assert [r.value for r in records] == [_value(i) for i in range(30, 100)]
    assert [r.key for r in records] == [f"k{i}".encode() for i in range(30, 100)]
    assert {r.events for r in records} == {3}
    # Appends after a reopen go after the old records.
    spool.append("t", b"new", b"after-reopen")
    assert _drain(spool)[-1] == b"after-reopen"
    spool.close()

    spool = Spool(tmp_path)
    assert len(spool) == 0 and spool.peek(10) == []
    spool.close()


def test_a_directory_is_opened_by_one_spool_at_a_time(tmp_path: Path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolInUseError):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_torn_or_corrupt_tail_is_discarded_and_the_rest_survives(tmp_path: Path, caplog, damage):
    spool = Spool(tmp_path)
    for i in range(10):
        spool.append("t", b"k", _value(i, 500))
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    size = seg.stat().st_size
    if damage == "truncate":  # the process died in the middle of the last write
        os.truncate(seg, size - 3)
    else:  # one bit of the last record's value went bad
        with seg.open("r+b") as f:
            f.seek(size - 100)
            b = f.read(1)
            f.seek(size - 100)
            f.write(bytes([b[0] ^ 0x01]))

    with caplog.at_level(logging.WARNING, logger="greymesh.tapstream"):
        spool = Spool(tmp_path)
    warnings = [r for r in caplog.records if r.name == "greymesh.tapstream" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "discarded" in warnings[0].getMessage(), caplog.text
    assert ("torn" if damage == "truncate" else "corrupt") in warnings[0].getMessage()
    assert b"rec-" not in warnings[0].getMessage().encode(), "never log record contents"
    assert len(spool) == 9
    assert spool.discarded_bytes > 0
    spool.append("t", b"k", b"after")
    assert _drain(spool) == [_value(i, 500) for i in range(9)] + [b"after"]
    spool.close()

    # Cut off for good: a second reopen finds nothing to complain about.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="greymesh.tapstream"):
        Spool(tmp_path).close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_corruption_in_an_older_segment_keeps_the_records_before_it_and_later_segments(tmp_path: Path, caplog):
    spool = Spool(tmp_path, segment_bytes=2048)
    for i in range(20):
        spool.append("t", b"k", _value(i, 500))
    spool.close()
    segs = sorted(tmp_path.glob("*.seg"))
    assert len(segs) >= 3
    # Flip a byte in the value of the second record of the first segment.
    first = Spool(tmp_path)
    recs = first.peek(2)
    first.close()
    with segs[0].open("r+b") as f:
        f.seek(recs[1].position.end - 10)
        b = f.read(1)
        f.seek(recs[1].position.end - 10)
        f.write(bytes([b[0] ^ 0xFF]))
    per_segment = len([r for r in recs if r.position.segment == recs[0].position.segment])
    assert per_segment == 2
    with caplog.at_level(logging.WARNING, logger="greymesh.tapstream"):
        spool = Spool(tmp_path, segment_bytes=2048)
    assert "corrupt" in caplog.text
    values = _drain(spool)
    assert values[0] == _value(0, 500)
    lost = {_value(i, 500) for i in range(20)} - set(values)
    assert _value(1, 500) in lost
    # Only the rest of the damaged segment is gone; later segments are intact.
    assert values[1:] == [_value(i, 500) for i in range(20) if _value(i, 500) not in lost][1:]
    assert values[-1] == _value(19, 500)
    spool.close()


def test_ack_deletes_fully_acked_segments_and_the_cursor_survives_a_reopen(tmp_path: Path):
    spool = Spool(tmp_path, segment_bytes=2048)
    for i in range(30):
        spool.append("t", b"k", _value(i, 400))
    segs = _segments(tmp_path)
    assert len(segs) >= 5
    records = spool.peek(30)
    by_seg: dict[int, list] = {}
    for r in records:
        by_seg.setdefault(r.position.segment, []).append(r)
    ids = sorted(by_seg)

    # The last record of segment 0 and the first of segment 1: segment 0 goes, 1 stays.
    spool.ack(by_seg[ids[1]][0].position)
    assert _segments(tmp_path) == segs[1:]
    # Acking the end of segment 2 removes 1 and 2 at once.
    spool.ack(by_seg[ids[2]][-1].position)
    assert _segments(tmp_path) == segs[3:]
    acked = len(by_seg[ids[0]]) + len(by_seg[ids[1]]) + len(by_seg[ids[2]])
    assert len(spool) == 30 - acked
    spool.ack(records[0].position)  # an old position: nothing happens
    assert len(spool) == 30 - acked
    # Half of segment 3, then reopen: the cursor is persisted, no delivered record returns.
    half = by_seg[ids[3]][len(by_seg[ids[3]]) // 2]
    spool.ack(half.position)
    spool.close()
    spool = Spool(tmp_path, segment_bytes=2048)
    first_left = records.index(half) + 1
    assert len(spool) == 30 - first_left
    assert spool.peek(1)[0].value == _value(first_left, 400)
    with pytest.raises(ValueError):
        spool.ack(spool.peek(1)[0].position._replace(index=10_000))
    spool.close()


def test_concurrent_appenders_keep_their_own_order(tmp_path: Path):
    spool = Spool(tmp_path, segment_bytes=8192)
    writers, per_writer = 4, 250
    got: list[tuple[int, int]] = []
    done = threading.Event()

    def write(w: int) -> None:
        for i in range(per_writer):
            assert spool.append("t", str(w).encode(), f"{w}:{i}".encode())

    def read() -> None:
        while not (done.is_set() and len(spool) == 0):
            batch = spool.peek(50)
            for r in batch:
                w, i = r.value.decode().split(":")
                got.append((int(w), int(i)))
            if batch:
                spool.ack(batch[-1].position)
            else:
                time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join(30)
    assert len(got) == writers * per_writer
    for w in range(writers):
        assert [i for ww, i in got if ww == w] == list(range(per_writer))
    spool.close()


_CRASHER = """
import sys
sys.path.insert(0, {root!r})
from tapstream.spool import Spool
spool = Spool({dir!r}, segment_bytes=64 << 10)
i = 0
while True:
    assert spool.append("t", b"k", b"%08d|" % i + bytes(3000))
    i += 1
    if i % 100 == 0:
        print(i, flush=True)
"""


def test_a_process_killed_while_appending_leaves_a_readable_spool(tmp_path: Path):
    """SIGKILL a process in the middle of appending: everything it was told was appended
    is there, in order; at most a torn last record is cut off."""
    spool_dir = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER.format(root=str(ROOT), dir=str(spool_dir))],
                            stdout=subprocess.PIPE, text=True)
    try:
        confirmed = 0
        while confirmed < 2000:
            line = proc.stdout.readline()
            assert line, "the appending process died on its own"
            confirmed = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    assert len(list(spool_dir.glob("*.seg"))) > 3

    spool = Spool(spool_dir, segment_bytes=64 << 10)  # the lock died with the process
    n = len(spool)
    assert n >= confirmed
    values = _drain(spool, chunk=500)
    assert [int(v[:8]) for v in values] == list(range(n))
    assert all(v[9:] == bytes(3000) for v in values)
    spool.close()


def test_segment_files_start_with_the_magic(tmp_path: Path):
    with Spool(tmp_path) as spool:
        spool.append("t", b"k", b"v")
    (seg,) = tmp_path.glob("*.seg")
    assert seg.read_bytes().startswith(MAGIC)
