"""Kafka admits only the mesh's principals, each to what it does (docs/security.md, "Kafka").

On a real broker secured as `greymesh up` secures it (tests/support/kafka.py: SASL on both
listeners, SCRAM credentials and ACLs set by the runtime's setup).  Every forged record
carries FORGED in its value; the last test reads every mesh topic and finds none of them,
next to the legitimate records the principals sent.

kafka-python reports a refused credential as a failed bootstrap (after bootstrap_timeout_ms);
the broker's answers to its SASL requests are in its DEBUG log, which :class:`SaslAnswers`
counts (keeping no message: the requests carry the password) to tell "refused" from "not
reachable".  The right credential is shown to get through at the same moment.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import (ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, KafkaAdminClient,
                         ResourcePattern, ResourceType)
from kafka.errors import GroupAuthorizationFailedError, KafkaError, TopicAuthorizationFailedError

from core.contracts import ACTION_TOPIC, ANOMALY_TOPIC, topic
from core.credentials import CredentialError
from core.kafka import (ACTIONS, ADMIN, BROKER, PLAIN_PRINCIPALS, READER, SCORER, SCRAM_MECHANISM, SCRAM_PRINCIPALS,
                        SECURITY_PROTOCOL, SINK, SINK_GROUP, TAPS, KafkaAuth, client_config)
from greymesh.runtime import kafka as broker
from tests.support.kafka import Broker

TAP_TOPIC = topic("l7")
FORGED = b"FORGED"
LEGIT = b"legit"
# Refusals show up as a failed bootstrap: do not wait kafka-python's default 30 s for each.
FAST = {"bootstrap_timeout_ms": 4_000, "request_timeout_ms": 5_000}
READ_S = 45.0  # a group's first join on a busy 2-core machine


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("kafka-security"))
    broker.format_storage(b.run_dir, b.config)
    b.start()
    yield b
    b.kill()


def _send(kafka: Broker, security: dict[str, str], value: bytes, topic_name: str = TAP_TOPIC) -> None:
    """One record with acks=all, waited for.  Not idempotent, so that the topic's ACL (not
    InitProducerId's) is what decides."""
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=False,
                             max_block_ms=4_000, **FAST, **security)
    try:
        producer.send(topic_name, key=b"k", value=value).get(timeout=20)
    finally:
        producer.close(timeout=5)


def _read(kafka: Broker, security: dict[str, str], topic_name: str = TAP_TOPIC, group: str | None = None,
          until: bytes | None = None) -> list[bytes]:
    """The records of ``topic_name`` from the beginning: assigned, up to the current end; or
    through ``group``, until ``until`` arrived (at most READ_S either way)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, **FAST, **security)
    try:
        deadline = time.monotonic() + READ_S
        values: list[bytes] = []
        if group is None:
            partitions = [TopicPartition(topic_name, p) for p in range(3)]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            end = consumer.end_offsets(partitions)
            done = lambda: all(consumer.position(tp) >= end[tp] for tp in partitions)  # noqa: E731
        else:
            consumer.subscribe([topic_name])
            done = lambda: until in values  # noqa: E731
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in batch]
            if done():
                break
        return values
    finally:
        consumer.close()


class SaslAnswers(logging.Handler):
    """Counts completed and refused SASL authentications of kafka-python while in a
    ``with`` block.  Keeps no message, and stops kafka-python's DEBUG lines from reaching
    pytest's captured log: they print the password."""

    LOGGER = "kafka.net.connection"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.accepted = self.refused = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Authenticated as " in message:  # logged once the exchange completed (SCRAM: server verified too)
            self.accepted += 1
        elif "SaslAuthenticateResponse(" in message and "error_code=0," not in message:
            self.refused += 1

    def __enter__(self) -> SaslAnswers:
        log = logging.getLogger(self.LOGGER)
        self._saved = log.level, log.propagate
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log = logging.getLogger(self.LOGGER)
        log.removeHandler(self)
        log.level, log.propagate = self._saved


def test_each_principal_can_do_its_own_job(kafka: Broker):
    """The positive control: the same calls the refusals below make succeed for the
    principal whose job they are."""
    _send(kafka, kafka.auth(TAPS).client_config(), LEGIT + b"-tap")
    _send(kafka, kafka.auth(SCORER).client_config(), LEGIT + b"-anomaly", ANOMALY_TOPIC)
    by_sink = _read(kafka, kafka.auth(SINK).client_config(), group=SINK_GROUP, until=LEGIT + b"-tap")
    by_reader = _read(kafka, kafka.auth(READER).client_config(), ANOMALY_TOPIC)
    assert LEGIT + b"-tap" in by_sink
    assert LEGIT + b"-anomaly" in by_reader


def test_no_credentials_cannot_produce_or_consume(kafka: Broker):
    with pytest.raises(KafkaError, match="bootstrap"):
        _send(kafka, {}, FORGED + b"-anonymous")
    with pytest.raises(KafkaError, match="bootstrap"):
        _read(kafka, {})
    # Not a dead broker: the right credential gets through at the same moment.
    by_reader = _read(kafka, kafka.auth(READER).client_config())
    assert LEGIT + b"-tap" in by_reader


@pytest.mark.parametrize("principal", [TAPS, ADMIN, "intruder"])
def test_a_wrong_password_is_refused(kafka: Broker, principal: str):
    mechanism = "PLAIN" if principal in PLAIN_PRINCIPALS else SCRAM_MECHANISM
    wrong = {"security_protocol": SECURITY_PROTOCOL, "sasl_mechanism": mechanism,
             "sasl_plain_username": principal, "sasl_plain_password": "not-the-password"}
    with SaslAnswers() as answers, pytest.raises(KafkaError, match="bootstrap"):
        _send(kafka, wrong, FORGED + b"-wrong-password")
    # Refused: with an error answer, or (seen with PLAIN) the broker closing the connection
    # mid-authentication, which kafka-python logs as a disconnect, not as an answer.
    assert answers.accepted == 0
    with SaslAnswers() as answers:  # the same client with the right password
        _send(kafka, kafka.auth(TAPS).client_config(), LEGIT + b"-tap")
    assert answers.accepted > 0 and answers.refused == 0


def test_the_sink_cannot_produce_to_a_tap_topic(kafka: Broker):
    with pytest.raises(TopicAuthorizationFailedError):
        _send(kafka, kafka.auth(SINK).client_config(), FORGED + b"-by-sink")


def test_the_taps_cannot_consume(kafka: Broker):
    with pytest.raises(TopicAuthorizationFailedError):
        _read(kafka, kafka.auth(TAPS).client_config())
    with pytest.raises(GroupAuthorizationFailedError):  # nor take the sink's partitions away
        _read(kafka, kafka.auth(TAPS).client_config(), group=SINK_GROUP)


@pytest.mark.parametrize("tap_topic", broker.TAP_TOPICS)
def test_the_scorer_cannot_produce_to_tap_topics(kafka: Broker, tap_topic: str):
    with pytest.raises(TopicAuthorizationFailedError):
        _send(kafka, kafka.auth(SCORER).client_config(), FORGED + b"-by-scorer", tap_topic)


def test_the_taps_cannot_forge_anomalies_and_the_reader_cannot_write(kafka: Broker):
    with pytest.raises(TopicAuthorizationFailedError):
        _send(kafka, kafka.auth(TAPS).client_config(), FORGED + b"-anomaly-by-taps", ANOMALY_TOPIC)
    with pytest.raises(TopicAuthorizationFailedError):
        _send(kafka, kafka.auth(READER).client_config(), FORGED + b"-by-reader")


def test_the_actions_stage_writes_only_decisions_and_nobody_else_forges_them(kafka: Broker):
    """The actions principal reads anomalies and writes decisions, nothing more; no other
    component can put a decision (the evidence of an automated change) on its topic."""
    for topic_name in (ANOMALY_TOPIC, TAP_TOPIC):
        with pytest.raises(TopicAuthorizationFailedError):
            _send(kafka, kafka.auth(ACTIONS).client_config(), FORGED + b"-by-actions", topic_name)
    for principal in (TAPS, SCORER, SINK, READER):
        with pytest.raises(TopicAuthorizationFailedError):
            _send(kafka, kafka.auth(principal).client_config(), FORGED + b"-decision", ACTION_TOPIC)
    _send(kafka, kafka.auth(ACTIONS).client_config(), LEGIT + b"-decision", ACTION_TOPIC)


def test_the_sink_reads_only_through_its_own_group(kafka: Broker):
    with pytest.raises(GroupAuthorizationFailedError):
        _read(kafka, kafka.auth(SINK).client_config(), group="another-group")


def test_the_controller_listener_admits_only_the_broker(kafka: Broker):
    """The KRaft quorum port knows one user, the broker itself: the admin's valid client
    credential is never accepted there (the controller refuses it, or drops the connection
    before its answer is read), nor is a client without SASL; the broker's own is."""
    controller = f"127.0.0.1:{kafka.controller_port}"
    for security in ({}, kafka.admin.client_config()):
        with SaslAnswers() as answers, pytest.raises(KafkaError):
            KafkaAdminClient(bootstrap_servers=controller, **FAST, **security).close()
        assert answers.accepted == 0
    with SaslAnswers() as answers, pytest.raises(KafkaError):  # authenticated, it finds no client API there
        KafkaAdminClient(bootstrap_servers=controller, **FAST, **kafka.auth(BROKER).client_config()).close()
    assert answers.accepted > 0 and answers.refused == 0


def test_setup_removes_an_acl_it_did_not_grant(kafka: Broker):
    """An ACL added behind the runtime's back (here: the sink may write a tap topic) lasts
    only until the next start's setup, which makes the ACLs exactly broker.GRANTS."""
    stray = ACL(f"User:{SINK}", "*", ACLOperation.WRITE, ACLPermissionType.ALLOW,
                ResourcePattern(ResourceType.TOPIC, TAP_TOPIC, ACLResourcePatternType.LITERAL))
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, **client_config(kafka.admin))
    try:
        assert not admin.create_acls([stray])["failed"]
    finally:
        admin.close()
    _send(kafka, kafka.auth(SINK).client_config(), LEGIT + b"-while-the-stray-acl-held")  # the stray ACL works
    broker.setup(kafka.bootstrap, kafka.dd)
    with pytest.raises(TopicAuthorizationFailedError):
        _send(kafka, kafka.auth(SINK).client_config(), FORGED + b"-after-setup")


def test_no_password_on_argv_and_every_password_file_is_private(kafka: Broker):
    assert kafka.proc is not None
    argv = open(f"/proc/{kafka.proc.pid}/cmdline", "rb").read()
    principals = [kafka.auth(p) for p in (*PLAIN_PRINCIPALS, *SCRAM_PRINCIPALS)]
    # Names only in the assertions: a failure must not print a password.
    assert [a.principal for a in principals if a.password().encode() in argv] == []
    assert [a.principal for a in principals if a.password() in repr(a)] == []
    assert {a.principal: oct(stat.S_IMODE(a.secret.stat().st_mode)) for a in principals} == \
        {a.principal: oct(0o600) for a in principals}
    assert stat.S_IMODE(kafka.config.stat().st_mode) == 0o600  # it holds the PLAIN passwords


def test_a_secret_others_can_read_or_of_no_principal_is_refused(kafka: Broker, tmp_path):
    leaked = tmp_path / TAPS
    leaked.write_text(kafka.auth(TAPS).password() + "\n")
    os.chmod(leaked, 0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        KafkaAuth.from_secret(leaked).client_config()
    with pytest.raises(CredentialError, match="principal"):
        KafkaAuth.from_secret(tmp_path / "api.token")


def test_nothing_forged_reached_any_topic(kafka: Broker):
    """Last: every record of every mesh topic, read as the super user."""
    values = [v for t in broker.MESH_TOPICS for v in _read(kafka, kafka.admin.client_config(), t)]
    assert LEGIT + b"-tap" in values and LEGIT + b"-anomaly" in values  # the read itself works
    assert [v for v in values if FORGED in v] == []
