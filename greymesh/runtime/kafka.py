"""The launcher of a single-node Apache Kafka broker (KRaft: broker and controller in one JVM) for the
local runtime and the tests.

deploy/install.sh puts the pinned Kafka's jars (from Maven Central) in
``kafka_home()/libs``; there are no ``bin/*.sh`` scripts, so this module builds the
``java`` command lines those scripts would. A run directory holds everything one
broker owns: ``server.properties`` (0600: it holds the SASL/PLAIN passwords of the broker
and the admin), ``log4j2.properties`` and the data under ``data/``.

Security (docs/security.md, "Kafka"): both listeners take SASL only.  The KRaft controller
listener admits the broker itself (PLAIN; KRaft cannot use SCRAM there, its credentials
would live in the metadata the controller serves).  The client listener admits the broker
and the runtime's admin (PLAIN, super users) and every component's own principal
(SCRAM-SHA-512, created by the admin through the Admin API: no password on any argv), each
allowed only what :data:`GRANTS` lists; StandardAuthorizer denies everything else.

    issue_secrets(dd)                                         # at `up`: every principal's 0600 secret
    config = write_config(run_dir, dd, port=9092, controller_port=9093)
    format_storage(run_dir, config)          # once; a no-op when already formatted
    proc = subprocess.Popen(broker_argv(config))
    core.kafka.wait_ready("127.0.0.1:9092", timeout=60, auth=KafkaAuth.of(dd, ADMIN))
    setup("127.0.0.1:9092", dd)              # topics, SCRAM credentials, ACLs (after every start)
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core import credentials
from core.contracts import ACTION_TOPIC, ALERTS_TOPIC, ANOMALY_TOPIC, LAYERS, topic
from core.datadir import DataDir
from core.installs import greymesh_home, pinned_versions
from core.kafka import (ACTIONS, ADMIN, BROKER, PLAIN_PRINCIPALS, READER, SCORER, SCRAM_MECHANISM, SCRAM_PRINCIPALS,
                        SECURITY_PROTOCOL, SINK, SINK_GROUP, TAPS, KafkaAuth, client_config, ensure_topics,
                        secret_path)

MAIN_CLASS = "kafka.Kafka"
MESH_TOPICS = [*map(topic, LAYERS), ALERTS_TOPIC]  # every topic a mesh uses
TAP_TOPICS = [topic(layer) for layer in LAYERS if topic(layer) not in (ANOMALY_TOPIC, ACTION_TOPIC)]  # the tap service's
CLIENT_LISTENER, CONTROLLER_LISTENER = "CLIENT", "CONTROLLER"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
_PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
# The passwords go into a JAAS string in server.properties: only characters that need no quoting.
_JAAS_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


@dataclass(frozen=True)
class Grant:
    """One ACL: ``principal`` may do ``operation`` on the topic or consumer group ``name``."""

    principal: str
    operation: Literal["READ", "WRITE"]
    resource: Literal["TOPIC", "GROUP"]
    name: str


# Everything a component may do; anything else is denied (allow.everyone.if.no.acl.found=false).
# READ implies DESCRIBE (metadata, offsets); WRITE on a topic also allows the idempotent
# producer's InitProducerId (KIP-679), so no principal holds a cluster-wide right.
GRANTS: tuple[Grant, ...] = (
    *(Grant(TAPS, "WRITE", "TOPIC", t) for t in (*TAP_TOPICS, ALERTS_TOPIC)),
    *(Grant(SINK, "READ", "TOPIC", topic(layer)) for layer in LAYERS),
    Grant(SINK, "READ", "GROUP", SINK_GROUP),
    Grant(SCORER, "WRITE", "TOPIC", ANOMALY_TOPIC),
    Grant(ACTIONS, "READ", "TOPIC", ANOMALY_TOPIC),
    Grant(ACTIONS, "WRITE", "TOPIC", ACTION_TOPIC),
    *(Grant(READER, "READ", "TOPIC", t) for t in MESH_TOPICS),  # the CLI's `taps tail` (no group)
)
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


def issue_secrets(dd: DataDir) -> dict[str, Path]:
    """Every Kafka principal's password, created (0600) unless it exists; principal -> file."""
    paths = {p: secret_path(dd, p) for p in (*PLAIN_PRINCIPALS, *SCRAM_PRINCIPALS)}
    for path in paths.values():
        credentials.issue(path)
    return paths


def _jaas_password(auth: KafkaAuth) -> str:
    password = auth.password()
    if not _JAAS_SAFE.fullmatch(password):
        raise credentials.CredentialError(
            f"{auth.secret}: a Kafka password may hold only letters, digits and ._~-; remove the file "
            "and run `greymesh up` again to issue a new one")
    return password


def _security_props(dd: DataDir) -> dict[str, str]:
    """SASL on both listeners, PLAIN for the broker and admin, SCRAM for the components, ACLs."""
    broker, admin = _jaas_password(KafkaAuth.of(dd, BROKER)), _jaas_password(KafkaAuth.of(dd, ADMIN))
    me = f'username="{BROKER}" password="{broker}" user_{BROKER}="{broker}"'
    client, controller = CLIENT_LISTENER.lower(), CONTROLLER_LISTENER.lower()
    return {
        "listener.security.protocol.map": ",".join(f"{name}:{SECURITY_PROTOCOL}"
                                                   for name in (CLIENT_LISTENER, CONTROLLER_LISTENER)),
        "sasl.mechanism.controller.protocol": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        f"listener.name.{controller}.sasl.enabled.mechanisms": "PLAIN",
        f"listener.name.{controller}.plain.sasl.jaas.config": f"{_PLAIN_MODULE} required {me};",
        f"listener.name.{client}.sasl.enabled.mechanisms": f"{SCRAM_MECHANISM},PLAIN",
        f"listener.name.{client}.plain.sasl.jaas.config": f'{_PLAIN_MODULE} required {me} user_{ADMIN}="{admin}";',
        # The server side of SCRAM needs a login module too; the credentials come from the metadata.
        f"listener.name.{client}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": f"{_SCRAM_MODULE} required;",
        "authorizer.class.name": AUTHORIZER,
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join(f"User:{p}" for p in PLAIN_PRINCIPALS),
    }


def write_config(dir: Path, dd: DataDir, *, port: int, controller_port: int, node_id: int = 1) -> Path:
    """Write ``dir/server.properties`` (0600) for one combined broker+controller listening on
    127.0.0.1 only (SASL clients on ``port``, the SASL-authenticated KRaft quorum on
    ``controller_port``), data in ``dir/data``, the broker's and admin's passwords read from
    ``dd``'s secrets (:func:`issue_secrets` first); also writes the log4j2 config
    broker_argv() points the JVM at.  Returns the path of server.properties."""
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    props = {
        # KRaft, one node that is both broker and (the only) controller.
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "controller.listener.names": CONTROLLER_LISTENER,
        "listeners": f"{CLIENT_LISTENER}://127.0.0.1:{port},{CONTROLLER_LISTENER}://127.0.0.1:{controller_port}",
        "advertised.listeners": f"{CLIENT_LISTENER}://127.0.0.1:{port}",
        "inter.broker.listener.name": CLIENT_LISTENER,
        **_security_props(dd),
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
        # A broker loads every partition of its internal topics before it serves again
        # after a crash; the defaults (50 for offsets and transactions) are sized for
        # clusters and cost seconds of every local restart.  A new cluster only: existing
        # internal topics keep their partitions.
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.num.partitions": "1",
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
    tmp = config.with_name(config.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, credentials.SECRET_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(f"{k}={v}\n" for k, v in props.items()))
    os.replace(tmp, config)
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


def setup(bootstrap: str, dd: DataDir) -> list[str]:
    """As the admin: create the mesh's missing topics, set every component's SCRAM
    credential from its secret, and make the ACLs exactly :data:`GRANTS`.  Idempotent;
    returns the topics created."""
    from kafka import KafkaAdminClient
    from kafka.admin import (ACL, ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType,
                             ResourcePattern, ResourcePatternFilter, ResourceType, ScramMechanism,
                             UserScramCredentialUpsertion)

    auth = KafkaAuth.of(dd, ADMIN)
    created = ensure_topics(bootstrap, MESH_TOPICS, auth=auth)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="greymesh-setup", request_timeout_ms=10_000,
                             **client_config(auth))
    try:
        # Set every time: a secret re-issued since the last `up` takes effect now.
        mechanism = ScramMechanism[SCRAM_MECHANISM.replace("-", "_")]
        failed = {user: why for user, why in admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(p, mechanism, KafkaAuth.of(dd, p).password())
             for p in SCRAM_PRINCIPALS]).items() if why}
        if failed:
            raise RuntimeError(f"Kafka refused SCRAM credentials: {failed}")
        wanted = {ACL(f"User:{g.principal}", "*", ACLOperation[g.operation], ACLPermissionType.ALLOW,
                      ResourcePattern(ResourceType[g.resource], g.name, ACLResourcePatternType.LITERAL))
                  for g in GRANTS}
        every = ACLFilter(None, None, ACLOperation.ANY, ACLPermissionType.ANY,
                          ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))
        present, _ = admin.describe_acls(every)  # raises on an error
        if stale := [a for a in present if a not in wanted]:  # from an older greymesh, or added by hand
            admin.delete_acls(stale)
        if missing := [a for a in wanted if a not in set(present)]:
            result = admin.create_acls(missing)
            if result["failed"]:
                raise RuntimeError(f"Kafka refused ACLs: {result['failed']}")
        return created
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m greymesh.runtime.kafka --setup BOOTSTRAP --data-dir DIR`: :func:`setup`
    (what the supervisor runs after every start of the local broker, once it is ready)."""
    p = argparse.ArgumentParser(prog="python -m greymesh.runtime.kafka")
    p.add_argument("--setup", metavar="BOOTSTRAP", required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the mesh whose secrets/kafka/ holds the passwords")
    args = p.parse_args(argv)
    created = setup(args.setup, DataDir(args.data_dir))
    print(f"created topics {', '.join(created)}; " if created else "every topic exists; ", end="")
    print(f"credentials and {len(GRANTS)} ACLs set for {', '.join(SCRAM_PRINCIPALS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
