"""tapstream.producer.TapProducer against the real local Kafka broker (tests/support/kafka.py).

1. The broker is SIGKILLed while records stream in and comes back ~20 s later: every
   record reaches Kafka at least once, in order per key, through the spool.
2. The broker is down from the start and the spool is tiny: exactly the records beyond
   the bound are dropped, counted, reported to on_drop and logged (not per record);
   everything else arrives, in order per key, once the broker is up.
3. Records left in the spool by a closed producer are delivered by the next one, which
   then sends directly; records Kafka refuses (too large) are dropped and counted, and
   the records around them still arrive.

No timing assertions: a restart after SIGKILL takes ~15 s before the port opens.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from core import contracts
from tapstream.producer import ProducerStats, TapProducer
from tests.support.kafka import Broker, read_all, running_broker

SERVICES = [f"svc-{i}" for i in range(10)]
DRAIN_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    with running_broker(tmp_path_factory.mktemp("kafka")) as b:
        yield b


# The tests' own topics are no mesh topic the taps' principal may write: they produce and
# read as the broker's admin (tests/test_security_kafka.py holds the principals' limits).
def _create_topics(kafka: Broker, names: list[str], partitions: int = 3, configs: dict | None = None) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, **kafka.admin.client_config())
    try:
        admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})
                             for n in names], wait_for_metadata=True)
    finally:
        admin.close()



def _wait_drained(producer: TapProducer, timeout: float = DRAIN_TIMEOUT) -> ProducerStats:
    deadline = time.monotonic() + timeout
    while True:
        st = producer.stats()
        if st.spool_records == 0 and st.broker_up:
            producer.flush(30)
            st = producer.stats()
            if st.spool_records == 0 and st.broker_up:  # still: nothing failed during the flush
                return st
        assert time.monotonic() < deadline, f"spool not drained in {timeout:.0f} s: {st}"
        time.sleep(0.25)


def _first_seen_in_order(records, seq_of) -> dict[bytes, list[int]]:
    """Per key, the sequence numbers in partition-offset order, duplicates after their
    first occurrence removed."""
    by_key: dict[bytes, list[tuple[int, int, int]]] = defaultdict(list)
    for r in records:
        by_key[r.key].append((r.partition, r.offset, seq_of(r)))
    out = {}
    for key, seen in by_key.items():
        assert len({p for p, _, _ in seen}) == 1, f"{key!r} landed in several partitions"
        seen.sort()
        first, done = [], set()
        for _, _, seq in seen:
            if seq not in done:
                done.add(seq)
                first.append(seq)
        out[key] = first
    return out


# 100 small tap events (~3 KB): one record is one ALS batch of a sidecar.  Kept small on
# purpose: without the `crc32c` C package kafka-python computes CRC-32C in pure Python, at
# ~5 MB/s of record data on one core, and this test shares two cores with the broker.
_EVENTS = json.dumps([{"e": f"{j:08x}", "t": 1_700_000_000 + j, "s": 200} for j in range(100)],
                     separators=(",", ":")).encode()


def _tap_value(i: int, service: str, seq: int) -> bytes:
    return b'{"id":%d,"seq":%d,"service":"%s","events":%s}' % (i, seq, service.encode(), _EVENTS)


def test_broker_killed_mid_stream_loses_nothing(kafka: Broker, tmp_path: Path):
    topics = [contracts.topic(layer) for layer in contracts.LAYERS]  # Broker.start's setup created them
    drops: list[tuple[int, int]] = []
    producer = TapProducer(kafka.bootstrap, tmp_path / "spool", auth=kafka.admin, on_drop=lambda r, e: drops.append((r, e)))
    n, rate = 5_000, 200.0  # 25 s of ~3 KB records at a steady rate
    errors: list[BaseException] = []

    def stream() -> None:
        seq: dict[str, int] = defaultdict(int)
        t0 = time.monotonic()
        try:
            for i in range(n):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                service = SERVICES[i % len(SERVICES)]
                topic = contracts.topic(contracts.LAYERS[(i // len(SERVICES)) % len(contracts.LAYERS)])
                producer.send(topic, service, _tap_value(i, service, seq[topic, service]), events=100)
                seq[topic, service] += 1
        except BaseException as exc:
            errors.append(exc)

    try:
        streamer = threading.Thread(target=stream, name="test-streamer")
        streamer.start()
        time.sleep(3.0)
        assert streamer.is_alive()
        kafka.kill()
        time.sleep(5.0)
        deadline = time.monotonic() + 30
        while (down := producer.stats()).broker_up:  # noticed within TapProducer.STALL_S
            assert time.monotonic() < deadline, f"the outage never showed in stats: {down}"
            time.sleep(0.2)
        assert streamer.is_alive(), "the stream should still be running while the broker is down"
        restart = kafka.start()
        streamer.join(120)
        assert not streamer.is_alive() and not errors, errors
        st = _wait_drained(producer)
    finally:
        producer.close()

    records = read_all(kafka, topics)
    values = [json.loads(r.value) for r in records]
    ids = [v["id"] for v in values]
    missing = set(range(n)) - set(ids)
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:10]}"
    assert st.spool_records == 0 and st.spool_bytes == 0
    assert st.spooled_records > 0 and st.replayed_records > 0, st
    assert st.dropped_records == 0 and drops == []
    assert st.sent_records >= n and st.sent_events == 100 * st.sent_records
    assert down.last_error and down.spool_records > 0, down
    # Keyed by service: one partition per (topic, service), records in the order sent.
    for topic in topics:
        ordered = _first_seen_in_order([r for r in records if r.topic == topic], lambda r: json.loads(r.value)["seq"])
        assert set(ordered) == {s.encode() for s in SERVICES}
        for key, seqs in ordered.items():
            assert seqs == list(range(len(seqs))), f"{topic} {key!r} out of order"
    print(f"\nbroker down ~{5 + restart:.0f} s: {len(records)} records in Kafka for {n} sent, "
          f"{len(records) - len(set(ids))} duplicates; spooled {st.spooled_records}, "
          f"replayed {st.replayed_records}; outage seen as: {down.last_error}")


def test_spool_full_drops_are_counted_reported_and_the_rest_arrives_in_order(kafka: Broker, tmp_path: Path, caplog):
    topic = "tap-test-spool-full"
    _create_topics(kafka, [topic])
    kafka.kill()
    drops: list[tuple[int, int]] = []
    n, keys = 200, [f"svc-{i}" for i in range(5)]
    caplog.set_level(logging.INFO, logger="greymesh.tapstream")
    producer = TapProducer(kafka.bootstrap, tmp_path / "spool", auth=kafka.admin, max_spool_bytes=64 << 10,
                           on_drop=lambda r, e: drops.append((r, e)))
    try:
        seq: dict[str, int] = defaultdict(int)
        for i in range(n):
            key = keys[i % len(keys)]
            value = b"%06d:%06d:" % (i, seq[key]) + b"x" * 986  # every record the same size
            producer.send(topic, key, value, events=3)
            seq[key] += 1
        full = producer.stats()
        accepted = full.spool_records
        assert 0 < accepted < n
        assert full.sent_records == 0 and not full.broker_up
        assert full.spooled_records == accepted
        assert full.dropped_records == n - accepted, full
        assert full.dropped_events == 3 * full.dropped_records
        assert full.spool_bytes <= 64 << 10
        assert drops and sum(r for r, _ in drops) == full.dropped_records
        assert sum(e for _, e in drops) == full.dropped_events

        kafka.start()
        st = _wait_drained(producer)
        assert st.replayed_records >= accepted and st.dropped_records == full.dropped_records
    finally:
        producer.close()

    dropped_logs = [r for r in caplog.records
                    if r.name == "greymesh.tapstream" and r.levelno == logging.ERROR and "DROPPED" in r.getMessage()]
    assert 1 <= len(dropped_logs) <= 3, [r.getMessage() for r in dropped_logs]
    assert str(full.dropped_records) in dropped_logs[-1].getMessage()
    assert not [r for r in caplog.records if "xxxxxxxx" in r.getMessage()], "record contents must not be logged"

    records = read_all(kafka, [topic])
    ids = {int(r.value[:6]) for r in records}
    # FIFO and equal sizes: the first `accepted` records were kept, every later one dropped.
    assert ids == set(range(accepted))
    ordered = _first_seen_in_order(records, lambda r: int(r.value[7:13]))
    for key, seqs in ordered.items():
        assert seqs == list(range(len(seqs))), f"{key!r} out of order"
    print(f"\nspool of 64 KiB: {accepted} records kept, {full.dropped_records} dropped, "
          f"{len(dropped_logs)} ERROR log lines, {len(records) - len(ids)} duplicates")


def _unused_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_records_left_in_the_spool_are_delivered_by_the_next_producer(kafka: Broker, tmp_path: Path):
    topic = "tap-test-restart"
    _create_topics(kafka, [topic], configs={"max.message.bytes": "200000"})
    spool_dir = tmp_path / "spool"
    # A collector that never reaches its broker (nothing listens there), then stops.
    first = TapProducer(_unused_address(), spool_dir)
    for i in range(50):
        first.send(topic, f"svc-{i % 3}", b"left-%03d" % i, events=2)
    first.close(timeout=2)
    left = first.stats()
    assert left.spool_records == 50 and left.sent_records == 0 and left.dropped_records == 0
    assert "cannot reach Kafka" in left.last_error
    with pytest.raises(RuntimeError):
        first.send(topic, "svc-0", b"after close")

    drops: list[tuple[int, int]] = []
    second = TapProducer(kafka.bootstrap, spool_dir, auth=kafka.admin, on_drop=lambda r, e: drops.append((r, e)))
    try:
        st = _wait_drained(second)
        assert st.replayed_records == 50 and st.sent_events == 100
        # Back to direct sends: nothing new goes through the spool.
        for i in range(10):
            second.send(topic, "svc-0", b"direct-%03d" % i)
        second.flush(30)
        st = second.stats()
        assert st.sent_records == 60 and st.spooled_records == 0 and st.spool_records == 0
        # Records Kafka can never take are dropped and counted, not retried forever, and
        # the records around them are delivered: one over MAX_RECORD_BYTES (refused at
        # send()), one over this topic's max.message.bytes (refused by the broker, which
        # fails the record sent right after it too: that one must not be dropped).
        second.send(topic, "svc-1", bytes(3 << 20), events=7)
        second.send(topic, "svc-1", os.urandom(300_000), events=5)  # incompressible: records go zstd
        second.send(topic, "svc-1", b"after-big")
        st = _wait_drained(second)
        assert (st.dropped_records, st.dropped_events) == (2, 12), st
        assert drops == [(1, 7), (1, 5)]
        assert st.sent_records == 61 and "MessageSizeTooLarge" in st.last_error, st
    finally:
        second.close()

    records = read_all(kafka, [topic])
    by_key = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key[r.key].append(r.value)
    assert by_key[b"svc-1"] == [b"left-%03d" % i for i in range(50) if i % 3 == 1] + [b"after-big"]
    assert by_key[b"svc-2"] == [b"left-%03d" % i for i in range(50) if i % 3 == 2]
    assert by_key[b"svc-0"] == [b"left-%03d" % i for i in range(50) if i % 3 == 0] + [b"direct-%03d" % i for i in range(10)]
