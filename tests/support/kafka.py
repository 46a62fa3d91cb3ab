"""A real single-node Kafka broker (KRaft) for tests, in a temporary directory, secured as
`greymesh up` secures it: SASL on both listeners, every principal's password a 0600 file
under ``<run dir>/secrets/kafka/``, SCRAM credentials and ACLs set after every start."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from core.datadir import DataDir
from core.kafka import ADMIN, KafkaAuth, wait_ready
from greymesh.runtime import kafka as broker
from tests.support.net import free_port

READY_TIMEOUT = 90.0


class Broker:
    """One broker JVM on a run directory; start() may be called again after kill()."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.dd = DataDir(run_dir)  # only its secrets/ is used
        self.port, self.controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        broker.issue_secrets(self.dd)
        self.config = broker.write_config(run_dir, self.dd, port=self.port, controller_port=self.controller_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = run_dir / "broker.log"
        self.setup_s = 0.0  # what the last start spent in broker.setup (topics, credentials, ACLs)

    def auth(self, principal: str) -> KafkaAuth:
        """The credential of one of the mesh's principals (core.kafka)."""
        return KafkaAuth.of(self.dd, principal)

    @property
    def admin(self) -> KafkaAuth:
        """The runtime's admin: a super user, for tests that make topics and groups of their own."""
        return self.auth(ADMIN)

    def start(self) -> float:
        """Start the JVM, wait until it serves, and set the mesh's topics, credentials and
        ACLs as the supervisor's on_ready does; returns the seconds that took."""
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(broker.broker_argv(self.config), cwd=self.run_dir,
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.bootstrap, timeout=READY_TIMEOUT, auth=self.admin)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- broker log ---\n{self.log.read_text()[-4000:]}") from exc
        assert self.proc.poll() is None, self.log.read_text()[-4000:]
        t1 = time.monotonic()
        broker.setup(self.bootstrap, self.dd)
        self.setup_s = time.monotonic() - t1
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean shutdown, the log is recovered on restart
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def running_broker(run_dir: Path) -> Iterator[Broker]:
    """A fresh broker on ``run_dir``, started (storage formatted) and killed on exit."""
    b = Broker(run_dir)
    broker.format_storage(b.run_dir, b.config)
    b.start()
    try:
        yield b
    finally:
        b.kill()


def read_all(kafka: Broker, topics: list[str], timeout: float = 60.0) -> list:
    """Every record of ``topics`` from the beginning up to their current end."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False,
                             max_partition_fetch_bytes=4 << 20, **kafka.admin.client_config())
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, "could not read the topics back in time"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()
