"""The launcher of a single-node Apache Kafka broker (KRaft: broker and controller in one JVM) for the
local runtime and the tests.

deploy/install.sh puts the pinned Kafka's jars (from Maven Central) in
``kafka_home()/libs``; there are no ``bin/*.sh`` scripts, so this module builds the
``java`` command lines those scripts would. A run directory holds everything one
broker owns: ``server.properties``, ``log4j2.properties`` and the data under ``data/``.

    config = write_config(run_dir, port=9092, controller_port=9093)
    format_storage(run_dir, config)          # once; a no-op when already formatted
    proc = subprocess.Popen(broker_argv(config))
    core.kafka.wait_ready("127.0.0.1:9092", timeout=60)   # readiness and topics: core/kafka.py
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import uuid
from pathlib import Path

from core.contracts import ALERTS_TOPIC, LAYERS, topic
from core.installs import greymesh_home, pinned_versions
from core.kafka import ensure_topics

MAIN_CLASS = "kafka.Kafka"
MESH_TOPICS = [*map(topic, LAYERS), ALERTS_TOPIC]  # every topic a mesh uses
STORAGE_TOOL = "kafka.tools.StorageTool"
# Kafka's own scripts' defaults (kafka-run-class.sh), with a heap sized for a dev box.
JVM_OPTS = (
    "-Xmx512m", "-Xms256m",
    "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
)
# Everything at WARN to stdout: no kafka.log/server.log files in the working directory.
LOG4J2 = """\
status = warn
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
"""


def kafka_version() -> str:
    """The pinned Kafka version (deploy/versions.env)."""
    return pinned_versions()["KAFKA_VERSION"]


def kafka_home() -> Path:
    """Where deploy/install.sh put the pinned Kafka: ``<greymesh home>/kafka/<version>``."""
    return greymesh_home() / "kafka" / kafka_version()


def classpath(home: Path | None = None) -> str:
    """The JVM classpath: every jar in libs/ (a wildcard the JVM expands itself)."""
    libs = (home or kafka_home()) / "libs"
    if not (libs / f"kafka_2.13-{kafka_version()}.jar").exists():
        raise FileNotFoundError(f"Kafka {kafka_version()} is not installed in {libs}: run deploy/install.sh")
    return str(libs / "*")


def java() -> str:
    """The ``java`` executable (Kafka 4 needs Java >= 17; install.sh checks that)."""
    path = shutil.which("java")
    if path is None:
        raise FileNotFoundError("'java' is not on PATH: Kafka needs Java 17 or newer")
    return path


def write_config(dir: Path, *, port: int, controller_port: int, node_id: int = 1) -> Path:
    """Write ``dir/server.properties`` for one combined broker+controller listening on
    127.0.0.1 only (PLAINTEXT clients on ``port``, the KRaft quorum on ``controller_port``),
    data in ``dir/data``; also writes the log4j2 config broker_argv() points the JVM at.
    Returns the path of server.properties."""
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    props = {
        # KRaft, one node that is both broker and (the only) controller.
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(dir / "data"),
        # Topics are created on purpose, with 3 partitions unless said otherwise.
        "num.partitions": "3",
        "auto.create.topics.enable": "false",
        # One node: every internal topic has a single replica.
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # A consumer group starts at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
        # After a crash the restarted broker is fenced until its old registration's session
        # expires (default 9 s); one node has nobody to fail over to, so expire it sooner.
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "1000",
        # A 2-core machine: fewer threads than the defaults (3 network, 8 I/O).
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    config = dir / "server.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (dir / "log4j2.properties").write_text(LOG4J2)
    return config


def _read_properties(config: Path) -> dict[str, str]:
    props = {}
    for line in Path(config).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith(("#", "!")):
            props[key.strip()] = value.strip()
    return props


def new_cluster_id() -> str:
    """A random Kafka cluster id, as ``kafka-storage random-uuid`` makes it (base64url of
    16 random bytes, unpadded, never starting with '-'), without starting a JVM."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def format_storage(dir: Path, config: Path, *, cluster_id: str | None = None) -> bool:
    """Format the log directory of ``config`` for a new single-voter KRaft cluster
    (``kafka-storage format --standalone``). Idempotent: returns False without running
    anything when meta.properties is already there, True when it formatted.
    ``dir`` is the run directory, used as the tool's working directory."""
    log_dirs = _read_properties(config)["log.dirs"].split(",")
    if all((Path(d) / "meta.properties").exists() for d in log_dirs):
        return False
    argv = [
        java(), "-Xmx256m", f"-Dlog4j2.configurationFile={_log4j_config(config)}",
        "-cp", classpath(), STORAGE_TOOL, "format",
        "-t", cluster_id or new_cluster_id(), "-c", str(config), "--standalone",
    ]
    out = subprocess.run(argv, cwd=dir, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kafka-storage format failed ({out.returncode}): {out.stdout}{out.stderr}")
    return True


def _log4j_config(config: Path) -> Path:
    path = Path(config).resolve().with_name("log4j2.properties")
    if not path.exists():
        path.write_text(LOG4J2)
    return path


def broker_argv(config: Path) -> list[str]:
    """The command line that runs the broker for ``config`` in the foreground, logging
    at WARN to stdout."""
    return [
        java(), *JVM_OPTS,
        f"-Dlog4j2.configurationFile={_log4j_config(config)}",
        "-cp", classpath(), MAIN_CLASS, str(Path(config).resolve()),
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m greymesh.runtime.kafka --ensure-topics BOOTSTRAP`: create the mesh's topics
    (what the supervisor runs once the local broker is ready)."""
    p = argparse.ArgumentParser(prog="python -m greymesh.runtime.kafka")
    p.add_argument("--ensure-topics", metavar="BOOTSTRAP", required=True)
    args = p.parse_args(argv)
    created = ensure_topics(args.ensure_topics, MESH_TOPICS)
    print(f"created topics {', '.join(created)}" if created else "every topic exists")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
