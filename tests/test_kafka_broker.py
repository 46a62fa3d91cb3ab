"""The real Kafka broker greymesh installs (deploy/install.sh) and runs (greymesh/runtime/kafka.py):
a single KRaft node in a temporary directory, driven with kafka-python.

Produces 1,000 keyed records with acks=all, reads them back in a consumer group,
kills the JVM with SIGKILL, starts it again on the same directory and checks that
the records and the group's committed offsets are still there.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from greymesh.runtime import kafka as broker
from tests.support.kafka import Broker
from greymesh import doctor

TOPIC = "audit-test"
GROUP = "audit-test-readers"
PARTITIONS = 3
N = 1_000
KEYS = [f"svc-{i:02d}" for i in range(20)]
CONSUME_TIMEOUT = 60.0


# The test's own topic and group: it produces and consumes as the broker's admin (the
# mesh principals' limits: tests/test_security_kafka.py).
def _produce(b: Broker) -> dict[tuple[int, int], tuple[str, str]]:
    """N records, 50 per key, value '<key>:<seq>'; returns (partition, offset) -> (key, value)."""
    producer = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all", linger_ms=5,
                             key_serializer=str.encode, value_serializer=str.encode, **b.admin.client_config())
    try:
        futures = []
        seq: dict[str, int] = defaultdict(int)
        for i in range(N):
            key = KEYS[i % len(KEYS)]
            value = f"{key}:{seq[key]}"
            seq[key] += 1
            futures.append((key, value, producer.send(TOPIC, key=key, value=value)))
        producer.flush(timeout=60)
        placed = {}
        for key, value, fut in futures:
            meta = fut.get(timeout=30)
            placed[(meta.partition, meta.offset)] = (key, value)
        return placed
    finally:
        producer.close(timeout=10)


def _drain(consumer: KafkaConsumer, want: int) -> list:
    """Poll until ``want`` records arrived (or the bounded wait ends), then a little more
    so that duplicates would show up too."""
    records = []
    deadline = time.monotonic() + CONSUME_TIMEOUT
    while len(records) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    for batch in consumer.poll(timeout_ms=1000).values():
        records.extend(batch)
    return records


def _group_consumer(b: Broker) -> KafkaConsumer:
    return KafkaConsumer(TOPIC, bootstrap_servers=b.bootstrap, group_id=GROUP,
                         auto_offset_reset="earliest", enable_auto_commit=False,
                         key_deserializer=bytes.decode, value_deserializer=bytes.decode, **b.admin.client_config())


def _read_all(b: Broker) -> dict[tuple[int, int], tuple[str, str]]:
    """Every record of the topic, from the beginning, without a group."""
    consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, group_id=None, enable_auto_commit=False,
                             key_deserializer=bytes.decode, value_deserializer=bytes.decode, **b.admin.client_config())
    try:
        tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return {(r.partition, r.offset): (r.key, r.value) for r in _drain(consumer, N)}
    finally:
        consumer.close()


def test_doctor_finds_the_pinned_kafka():
    rows, _ = doctor.report()
    row = next(r for r in rows if r["name"] == "kafka")
    assert row["installed"], f"{row['problem']}: run deploy/install.sh"
    assert row["version"] == broker.kafka_version()
    assert row["path"] == str(broker.kafka_home() / "libs")


def test_records_and_committed_offsets_survive_a_kill_9(tmp_path: Path):
    b = Broker(tmp_path / "kafka")
    try:
        t0 = time.monotonic()
        assert broker.format_storage(b.run_dir, b.config) is True
        formatted = time.monotonic() - t0
        first_start = b.start()

        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, **b.admin.client_config())
        try:
            admin.create_topics([NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1)],
                                wait_for_metadata=True)
        finally:
            admin.close()

        placed = _produce(b)
        assert len(placed) == N
        assert {p for p, _ in placed} == set(range(PARTITIONS)), "keys should spread over all 3 partitions"

        consumer = _group_consumer(b)
        try:
            assert consumer.partitions_for_topic(TOPIC) == set(range(PARTITIONS))
            records = _drain(consumer, N)
            consumer.commit()  # synchronous: the group's offsets are stored when this returns
            tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
            committed = {tp.partition: consumer.committed(tp) for tp in tps}
            end = {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
        finally:
            consumer.close(autocommit=False)

        # Exactly the records produced, each once, where the producer was told they went.
        got = {(r.partition, r.offset): (r.key, r.value) for r in records}
        assert len(records) == N, f"{len(records)} records consumed, {N} expected"
        assert got == placed
        # One key, one partition; within it, the key's records in the order they were sent.
        by_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        for r in records:
            by_key[r.key].append((r.partition, r.offset, int(r.value.split(":")[1])))
        assert set(by_key) == set(KEYS)
        for key, seen in by_key.items():
            assert len({p for p, _, _ in seen}) == 1, f"{key} landed in several partitions"
            seen.sort(key=lambda s: s[1])
            assert [s for _, _, s in seen] == list(range(N // len(KEYS))), f"{key} out of order"
        assert committed == end and sum(committed.values()) == N

        # kill -9 and start again on the same directory: no new format, same data.
        b.kill()
        assert broker.format_storage(b.run_dir, b.config) is False
        second_start = b.start()

        assert _read_all(b) == placed
        consumer = _group_consumer(b)
        try:
            assert {tp.partition: consumer.committed(tp) for tp in tps} == committed
            leftover = []
            deadline = time.monotonic() + CONSUME_TIMEOUT
            while not consumer.assignment() and time.monotonic() < deadline:  # joining the group
                leftover += [r for batch in consumer.poll(timeout_ms=500).values() for r in batch]
            assert consumer.assignment() == set(tps)
            leftover += [r for batch in consumer.poll(timeout_ms=2000).values() for r in batch]
            assert leftover == [], "the group should resume after its committed offsets"
            assert {tp.partition: consumer.position(tp) for tp in tps} == committed
        finally:
            consumer.close(autocommit=False)

        print(f"\nkafka {broker.kafka_version()}: format {formatted:.1f} s, first start {first_start:.1f} s, "
              f"restart after kill -9 {second_start:.1f} s (Popen to ready)")
    finally:
        b.kill()
