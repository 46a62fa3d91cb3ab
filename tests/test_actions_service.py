"""The actions process at its edges, on a real Kafka: the anomaly feed's offsets and the
decision log's outbox (actions/feed.py), then `python -m actions.service` itself, killed -9
in an episode: anomalies in Kafka become one PagerDuty incident and Slack messages at
loopback receivers (tests/support/receivers.py), its decisions reach ``greymesh.actions``,
and its API takes only the CLI's token.

The store and the control plane are not running here, so the loop is blind: it holds, says
so with a ``mesh/loop_blind`` alert and records a held decision for the anomaly, which is
what this module checks of the loop (tests/test_loop.py and the E2E test check its moves)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from actions.feed import AnomalyFeed, DecisionLog
from actions.scaling import ScaleError
from actions.service import CommandScaler
from core import credentials, jsonhttp
from core.contracts import ACTION_TOPIC, ANOMALY_TOPIC, ActionDecision, AnomalyEvent, ServiceRouting
from core.kafka import ACTIONS, secret_path
from tests.support.kafka import Broker, read_all, running_broker
from tests.support.mesh import wait_for
from tests.support.net import free_port
from tests.support.receivers import PagerDutyEvents, SlackWebhook

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    with running_broker(tmp_path_factory.mktemp("kafka")) as b:
        yield b


def anomaly(state: str, service: str = "payments", anomaly_id: str | None = None, window: int | None = None,
            feature: str = "latency_p95_ms") -> AnomalyEvent:
    anomaly_id = anomaly_id or uuid.uuid4().hex
    window = window if window is not None else int(time.time()) // 10 * 10
    return AnomalyEvent(v=1, event_id=f"{anomaly_id}-{state}", time_us=window * 1_000_000, service=service,
                        anomaly_id=anomaly_id, state=state, window=window, score=9.0, threshold=2.0, peak_score=9.0,
                        windows=3, explanation=f"{feature} 480 ms, normally 40 ms",
                        causes=json.dumps([{"feature": feature, "share": 0.9, "value": 480.0, "normal": 40.0}]),
                        detector="pca", model_version="t1")


def produce(kafka: Broker, *records: bytes | list[AnomalyEvent]) -> None:
    """Records to the anomalies topic, as the scorer writes them (a JSON array per record)."""
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", **kafka.admin.client_config())
    try:
        for r in records:
            value = r if isinstance(r, bytes) else json.dumps([e.to_event() for e in r]).encode()
            producer.send(ANOMALY_TOPIC, key=b"payments", value=value).get(timeout=30)
    finally:
        producer.close()


def poll_until(feed: AnomalyFeed, want: int, timeout: float = 30.0) -> list[AnomalyEvent]:
    events: list[AnomalyEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        batch = feed.poll()
        events.extend(batch.events)
        feed.advance(batch)
        feed.db.commit()
    return events


def test_the_feed_starts_at_the_end_skips_bad_records_and_resumes_where_its_state_says(kafka: Broker, tmp_path: Path):
    db = sqlite3.connect(tmp_path / "state.db")
    old = anomaly("open")
    produce(kafka, [old])  # before the stage ever ran: history, not to act on
    feed = AnomalyFeed(db, kafka.bootstrap, kafka.admin)
    assert feed.poll().events == ()

    first, second = anomaly("open"), anomaly("open")
    produce(kafka, b"not json", b'[{"v": 1}]', [first])
    batch = feed.poll(timeout_ms=5000)
    while not batch.events:
        batch = feed.poll(timeout_ms=2000)
    assert [e.event_id for e in batch.events] == [first.event_id]
    assert batch.refused == 2
    feed.advance(batch)
    db.commit()
    feed.close()

    # A new process over the same state reads on from the stored offsets, not from the end.
    produce(kafka, [second])
    feed = AnomalyFeed(db, kafka.bootstrap, kafka.admin)
    assert [e.event_id for e in poll_until(feed, 1)] == [second.event_id]
    feed.close()

    # A batch handled but not committed (a crash, a rolled-back round) is read again.
    third = anomaly("resolved", anomaly_id=second.anomaly_id)
    produce(kafka, [third])
    feed = AnomalyFeed(db, kafka.bootstrap, kafka.admin)
    batch = feed.poll(timeout_ms=5000)
    while not batch.events:
        batch = feed.poll(timeout_ms=2000)
    feed.advance(batch)
    db.rollback()
    feed.rewind()
    assert [e.event_id for e in poll_until(feed, 1)] == [third.event_id]
    feed.close()


def decision(service: str) -> ActionDecision:
    return ActionDecision(v=1, event_id=uuid.uuid4().hex, time_us=int(time.time() * 1e6), service=service,
                          anomaly_id="a1", action="none", outcome="held", verdict="unknown", guardrail="blind",
                          mode="on", before="{}", after="{}", override_id="", evidence="{}", reason="test", by="loop")


def test_decisions_wait_in_the_state_while_kafka_is_away_and_go_out_in_order(kafka: Broker, tmp_path: Path):
    db = sqlite3.connect(tmp_path / "state.db")
    service = f"svc-{uuid.uuid4().hex[:8]}"
    away = DecisionLog(db, f"127.0.0.1:{free_port()}", None)
    made = [decision(service) for _ in range(3)]
    for d in made:
        away.record(d)
    db.commit()
    assert away.flush() == 0
    assert away.unsent() == 3
    away.close()

    log = DecisionLog(db, kafka.bootstrap, kafka.auth(ACTIONS))  # as the stage's own principal
    assert log.flush() == 3
    assert log.unsent() == 0
    log.close()
    sent = [json.loads(r.value)[0] for r in read_all(kafka, [ACTION_TOPIC]) if r.key == service.encode()]
    assert [d["event_id"] for d in sent] == [d.event_id for d in made]


class Routing:
    """The control plane's routing view of one service, for the scaler."""

    def __init__(self, instances: dict[str, int], effective: dict[str, int]):
        self.view = ServiceRouting(service="payments", subsets=tuple(instances), instances=tuple(instances.items()),
                                   callers=("orders",), declared=tuple(effective.items()),
                                   effective=tuple(effective.items()), override=None)

    def routing(self) -> list[ServiceRouting]:
        return [self.view]


def scaler(tmp_path: Path, routing: Routing, fail: bool = False) -> tuple[CommandScaler, Path]:
    calls = tmp_path / "calls"
    script = f"import sys; open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n'); sys.exit({int(fail)})"
    return CommandScaler([sys.executable, "-c", script], routing), calls  # type: ignore[arg-type]


def test_a_split_service_is_scaled_per_subset_growing_before_shrinking(tmp_path: Path):
    s, calls = scaler(tmp_path, Routing({"v1": 1, "v2": 1}, {"v1": 75, "v2": 25}))
    assert s.instances("payments") == 2
    assert s.plan("payments", 4) == [("payments/v1", 3)]  # one each, the other two after the traffic
    s.overrides = Routing({"v1": 3, "v2": 1}, {"v1": 0, "v2": 100})  # type: ignore[assignment]
    assert s.plan("payments", 4) == [("payments/v2", 3), ("payments/v1", 1)]
    s.scale("payments", 4)
    assert calls.read_text().splitlines() == ["payments/v2 3", "payments/v1 1"]
    with pytest.raises(ScaleError, match="one for each of its subsets"):
        s.plan("payments", 1)


def test_a_failed_scale_command_says_what_it_said(tmp_path: Path):
    s, _ = scaler(tmp_path, Routing({"main": 1}, {"main": 100}), fail=True)
    assert s.plan("payments", 2) == [("payments", 2)]
    with pytest.raises(ScaleError, match="scaling payments to 2 failed"):
        s.scale("payments", 2)


# --- the process ----------------------------------------------------------------------------


class ActionsProcess:
    """`python -m actions.service` on a data dir, as the runtime starts it (minus the store
    and the control plane, which are not running: the loop is blind)."""

    def __init__(self, root: Path, kafka: Broker, spec: Path):
        self.root, self.spec, self.kafka = root, spec, kafka
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        secrets = root / "secrets"
        secrets.mkdir(parents=True, mode=0o700, exist_ok=True)
        self.cli_token = credentials.issue(secrets / "api.token")
        credentials.issue(secrets / "actions.token")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "actions.log"

    def start(self) -> None:
        unused = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "actions.service", "--data-dir", str(self.root), "--spec", str(self.spec),
                "--kafka", self.kafka.bootstrap, "--kafka-secret", str(secret_path(self.kafka.dd, ACTIONS)),
                "--controlplane-url", unused, "--sink-url", unused,
                "--token-file", str(self.root / "secrets" / "actions.token"),
                "--api-token-file", str(self.root / "secrets" / "api.token"), "--http-port", str(self.port),
                "--scale-command", "false"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: jsonhttp.http_ok(self.url + jsonhttp.HEALTH_PATH), 60, f"the actions API ({self.log})")
        wait_for(lambda: self.status()["rounds"] >= 2, 60, "two rounds (the feed assigned)")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=30)

    def api(self, path: str, body: dict | None = None) -> dict:
        return jsonhttp.call(self.url + path, body, token=self.cli_token, timeout_s=30,
                             method="POST" if body is not None else None)

    def status(self) -> dict:
        return self.api("/status")


def write_spec(path: Path, slack: SlackWebhook, pd: PagerDutyEvents) -> None:
    secrets = path.parent / "receiver-secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    credentials.issue(secrets / "slack", slack.url)
    credentials.issue(secrets / "pd", uuid.uuid4().hex)  # a 32-character routing key
    path.write_text(f"""\
services: {{payments: {{}}, orders: {{}}}}
alerts:
  group_wait: 0s
  group_interval: 1s
  receivers:
    chat: {{slack: {{webhook_url_file: {secrets / 'slack'}}}}}
    oncall: {{pagerduty: {{routing_key_file: {secrets / 'pd'}, url: {pd.enqueue_url}, change_url: {pd.change_url}}}}}
  routes:
    - {{receivers: [oncall, chat]}}
actions:
  mode: on
""")


@contextlib.contextmanager
def running_actions(tmp_path: Path, kafka: Broker) -> Iterator[tuple[ActionsProcess, SlackWebhook, PagerDutyEvents]]:
    """The process started on a spec routing every alert to a loopback Slack and PagerDuty;
    killed on exit if a test left it running."""
    with SlackWebhook() as slack, PagerDutyEvents() as pd:
        spec = tmp_path / "applied.yaml"
        write_spec(spec, slack, pd)
        proc = ActionsProcess(tmp_path / "dd", kafka, spec)
        try:
            proc.start()
            yield proc, slack, pd
        finally:
            if proc.proc and proc.proc.poll() is None:
                proc.kill()


def test_the_process_turns_anomalies_into_one_incident_and_survives_kill_9_mid_episode(kafka: Broker, tmp_path: Path):
    with running_actions(tmp_path, kafka) as (proc, slack, pd):
        assert (tmp_path / "dd" / "actions" / "state.db").stat().st_mode & 0o077 == 0

        # Blind (no store, no control plane): it says so and holds.
        wait_for(lambda: proc.status()["loop"]["blind"], 30, "the loop to say it is blind")
        health = proc.status()["health"]
        assert not health["store_ok"] and "store" in health["detail"]

        opened = anomaly("open")
        slack.delay_next(10, 4)  # Slack answers late: its messages are still in flight at the kill
        produce(kafka, [opened])
        payments = lambda: [i for i in pd.incidents if "payments" in " ".join(i.summaries)]  # noqa: E731
        wait_for(lambda: bool(payments()), 60, "a PagerDuty trigger for the anomaly")
        # Its delivery recorded (a kill between PagerDuty's answer and that record sends it again:
        # at least once, which PagerDuty's dedup_key makes one incident).
        wait_for(lambda: {r["name"]: r for r in proc.api("/alerts")["receivers"]}["oncall"]["sent"] >= 2, 30,
                 "the trigger recorded as sent")

        # kill -9 with the episode open and a Slack message unconfirmed, the resolve arriving
        # while it is down.
        proc.kill()
        # A resolve's causes are the calm window's: it must still close the incident the open raised.
        produce(kafka, [anomaly("resolved", anomaly_id=opened.anomaly_id, feature="response_bytes")])
        proc.start()
        wait_for(lambda: payments() and all(i.resolved for i in payments()), 60,
                 "the payments incident resolved after the restart")
        assert len(payments()) == 1, "one incident per episode, even across a kill -9"
        assert payments()[0].triggers == 1
        wait_for(lambda: any("payments" in json.dumps(m) for m in slack.messages), 60, "a Slack message on payments")
        wait_for(lambda: {r["name"]: r for r in proc.api("/alerts")["receivers"]}["chat"]["queued"] == 0, 60,
                 "Slack's queue drained after the restart")

        # Its decisions are in Kafka, written as the stage's own principal.
        def held() -> list[dict]:
            records = read_all(kafka, [ACTION_TOPIC])
            return [d for r in records for d in json.loads(r.value)
                    if d["anomaly_id"] == opened.anomaly_id and d["outcome"] == "held"]
        wait_for(lambda: bool(held()), 30, "a held decision for the anomaly on greymesh.actions")
        assert held()[0]["guardrail"] == "blind"

        receivers = {r["name"]: r for r in proc.api("/alerts")["receivers"]}
        assert receivers["oncall"]["state"] == "ok" and receivers["oncall"]["sent"] >= 2
        assert receivers["chat"]["sent"] >= 1
        assert receivers["chat"]["failed"] == 0, "a message in flight at the kill was dropped on restart"
        assert str(slack.url) not in (proc.log.read_text() + json.dumps(proc.status()))
        assert proc.stop() == 0


def test_the_api_takes_only_the_clis_token_and_checks_what_it_is_given(kafka: Broker, tmp_path: Path):
    with running_actions(tmp_path, kafka) as (proc, slack, _):
        with pytest.raises(jsonhttp.ApiError) as refused:
            jsonhttp.call(proc.url + "/status", timeout_s=10)
        assert refused.value.status == 401
        actions_token = credentials.read(tmp_path / "dd" / "secrets" / "actions.token")
        with pytest.raises(jsonhttp.ApiError) as refused:
            jsonhttp.call(proc.url + "/freeze", {}, token=actions_token, timeout_s=10)
        assert refused.value.status == 401, "the stage's own token is for its clients, not its API"

        for path, body, says in [
            ("/silences", {"duration_s": -1, "comment": "x"}, "duration_s"),
            ("/silences", {"duration_s": 60, "comment": "x", "service": {"a": 1}}, "service"),
            ("/mode", {"service": "payments", "mode": "fast"}, "mode"),
            ("/mode", {"service": "../x", "mode": "on"}, "service"),
            ("/revert", {"id": "nope"}, "no decision"),
            ("/silences/expire", {"id": "nope"}, "no active silence"),
        ]:
            with pytest.raises(jsonhttp.ApiError) as bad:
                proc.api(path, body)
            assert bad.value.status == 400 and says in str(bad.value), (path, body, str(bad.value))

        silence = proc.api("/silences", {"service": "payments", "duration_s": 600, "comment": "maintenance"})
        listed = proc.api("/alerts")["alerts"]["silences"]
        assert [s["id"] for s in listed] == [silence["silence"]["id"]]
        assert listed[0]["created_by"] == "cli"
        proc.api("/silences/expire", {"id": silence["silence"]["id"]})
        assert proc.api("/alerts")["alerts"]["silences"] == []

        proc.api("/mode", {"service": "payments", "mode": "shadow"})
        assert proc.status()["loop"]["modes"] == {"payments": "shadow"}
        verdict = proc.api("/alerts/test", {"receiver": "chat"})
        assert verdict == {"outcome": "sent", "error": ""}
        assert any("test message" in json.dumps(m) for m in slack.messages)
        assert proc.api("/alerts/test", {"receiver": "nobody"})["outcome"] == "failed"


def test_a_spec_edited_into_nonsense_keeps_the_running_config(kafka: Broker, tmp_path: Path):
    with running_actions(tmp_path, kafka) as (proc, _, _):
        assert proc.status()["loop"]["default_mode"] == "on"
        spec = proc.spec
        spec.write_text(spec.read_text().replace("mode: on", "mode: sideways"))
        os.utime(spec, (time.time() + 5, time.time() + 5))
        wait_for(lambda: proc.status()["spec_problem"] is not None, 30, "the bad spec reported")
        problem = proc.status()["spec_problem"]
        assert str(spec) in problem and "mode" in problem and "keeping the running config" in problem
        assert proc.status()["loop"]["default_mode"] == "on"
        assert proc.proc is not None and proc.proc.poll() is None
