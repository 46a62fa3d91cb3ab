"""The loop closed on the demo mesh: a latency fault on payments v2 (its knobs) becomes an
anomaly (the scorer, a PCA model trained on this mesh's own traffic), the actions stage
judges v1 against v2 from the store, shifts traffic away from v2 through the control plane's
overrides, pages once (loopback PagerDuty) and posts to Slack (loopback webhook), and, once
the fault is gone, restores the declared split step by step; every decision is in the store.
Then in shadow mode the same fault moves nothing and is recorded as what would have been done.

Timings are the spec's (below): hold-down 20 s, restore after 20 s healthy; the anomaly
needs 6 calm windows (60 s) to resolve."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from core import credentials
from core.contracts import WINDOW_SECONDS
from core.datadir import write_atomic
from greymesh.demo.service import knobs_path
from tests.support.mesh import DEMO_SPEC, Mesh, running_mesh, wait_for
from tests.support.receivers import PagerDutyEvents, SlackWebhook

RPS = 20
FAULT_MS = 300


@pytest.fixture(scope="module")
def receivers() -> Iterator[tuple[SlackWebhook, PagerDutyEvents]]:
    with SlackWebhook() as slack, PagerDutyEvents() as pd:
        yield slack, pd


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, receivers: tuple[SlackWebhook, PagerDutyEvents]) -> Iterator[Mesh]:
    slack, pd = receivers
    work = tmp_path_factory.mktemp("actions")
    secrets = work / "receiver-secrets"
    credentials.issue(secrets / "slack", slack.url)
    credentials.issue(secrets / "pd", uuid.uuid4().hex)
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    doc["services"]["payments"]["routes"][0]["split"] = {"v1": 50, "v2": 50}
    doc["actions"] = {"mode": "shadow", "services": {"payments": {"mode": "on"}}, "hold_down": "20s",
                      "routing": {"step": 25, "floor": 0, "restore_after": "20s"}}
    doc["alerts"] = {"group_wait": "0s", "group_interval": "5s",
                     "receivers": {"chat": {"slack": {"webhook_url_file": str(secrets / "slack")}},
                                   "oncall": {"pagerduty": {"routing_key_file": str(secrets / "pd"),
                                                            "url": pd.enqueue_url, "change_url": pd.change_url}}},
                     "routes": [{"services": ["payments"], "receivers": ["oncall", "chat"]}]}
    with running_mesh(work, doc, "delta", up_args=("--rps", str(RPS))) as m:
        yield m


def closed_windows(mesh: Mesh, service: str) -> int:
    rows = mesh.query(f"SELECT count() AS n FROM service_windows WHERE service = '{service}' "
                      f"AND window < toDateTime({int(time.time()) - 5 - WINDOW_SECONDS})")
    return int(rows[0]["n"])


def decisions(mesh: Mesh, service: str = "payments") -> list[dict]:
    out = mesh.cli("actions", "list", "--service", service, "--limit", "200", "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def routing(mesh: Mesh, service: str = "payments") -> dict:
    doc = mesh.api(f"http://127.0.0.1:{mesh.ports()['controlplane.admin']}/overrides")
    return next(s for s in doc["services"] if s["service"] == service)


def failed_requests(mesh: Mesh) -> int:
    outcomes = json.loads((mesh.data_dir / "loadgen.json").read_text())["outcomes"]
    return sum(n for status, n in outcomes.items() if status != "200")


def inject(mesh: Mesh, subset: str) -> Path:
    knobs = knobs_path(mesh.data_dir, "payments", subset)
    write_atomic(knobs, json.dumps({"latency_ms": FAULT_MS}))
    return knobs


def test_a_model_trained_on_this_mesh_is_scoring(mesh: Mesh) -> None:
    wait_for(lambda: closed_windows(mesh, "payments") >= 17, 360, "17 windows of payments traffic")
    trained = mesh.cli("ml", "train", "--since", "15m", "--detector", "pca", timeout=300)
    assert "saved model v0001" in trained.stdout, trained.stdout
    wait_for(lambda: mesh.status()["ml"]["model_version"] == "v0001", 30, "the scorer to load v0001")
    status = mesh.status()["actions"]
    assert not status["loop"]["blind"], status["health"]


def test_a_slow_canary_is_drained_then_restored_with_one_incident_and_no_failed_request(
        mesh: Mesh, receivers: tuple[SlackWebhook, PagerDutyEvents]) -> None:
    slack, pd = receivers
    failed_before = failed_requests(mesh)
    injected = time.time()
    knobs = inject(mesh, "v2")
    try:
        wait_for(lambda: routing(mesh)["effective"].get("v2", 50) < 50, 150, "the loop to shift weight away from v2")
        first_shift_s = time.time() - injected
        override = routing(mesh)["override"]
        assert override["by"] == "actions" and override["weights"]["v2"] < 50
        acted = [d for d in decisions(mesh) if d["action"] == "shift_weight" and d["outcome"] == "acted"]
        assert acted, decisions(mesh)
        evidence = json.loads(acted[-1]["evidence"])
        judged = {j["subset"]: j for j in evidence["judgements"]}
        assert judged["v2"]["verdict"] == "fail" and judged["v1"]["verdict"] == "pass", evidence
        print(f"fault -> first shift: {first_shift_s:.1f}s")
        wait_for(lambda: routing(mesh)["effective"].get("v2") == 0, 90, "v2 drained to 0")
    finally:
        knobs.unlink(missing_ok=True)
    drained_at = time.time()

    # The fault is gone: the anomaly resolves (6 calm windows), then each step back waits 20 s healthy.
    wait_for(lambda: routing(mesh)["override"] is None, 300, "the declared split back (override cleared)")
    print(f"drained -> declared split again: {time.time() - drained_at:.1f}s")
    assert routing(mesh)["effective"] == {"v1": 50, "v2": 50}
    restored = [d for d in decisions(mesh) if d["action"] == "restore_weight" and d["outcome"] == "acted"]
    assert restored and json.loads(restored[0]["after"])["weights"]["v2"] > 0
    assert failed_requests(mesh) == failed_before, "a request failed while the loop moved traffic"

    # One incident for the payments latency episode, triggered once and resolved.
    def payments_incidents() -> list:
        return [i for i in pd.incidents if any("payments" in s for s in i.summaries)]
    wait_for(lambda: payments_incidents() and all(i.resolved for i in payments_incidents()), 120,
             "the payments incident resolved")
    assert len({i.dedup_key for i in payments_incidents()}) == len(payments_incidents())
    assert pd.changes, "the loop's moves go to PagerDuty as change events"
    assert any("payments" in json.dumps(m) for m in slack.messages)

    # Every decision is in the audit stream (Kafka -> store), with its inputs.
    ids = {d["event_id"] for d in acted + restored}
    wait_for(lambda: ids <= {r["event_id"] for r in mesh.query(
        "SELECT event_id FROM actions WHERE service = 'payments'")}, 60, "the decisions in the store")


def test_in_shadow_mode_the_same_fault_is_recorded_not_acted_on(mesh: Mesh) -> None:
    mesh.cli("actions", "mode", "payments", "shadow")
    since = time.time()
    knobs = inject(mesh, "v2")
    try:
        wait_for(lambda: any(d["outcome"] == "shadowed" and d["time_us"] / 1e6 > since for d in decisions(mesh)),
                 150, "a shadowed decision")
        assert routing(mesh)["override"] is None, "shadow mode changed the mesh"
        shadowed = next(d for d in decisions(mesh) if d["outcome"] == "shadowed")
        assert shadowed["action"] == "shift_weight" and shadowed["guardrail"] == "mode"
    finally:
        knobs.unlink(missing_ok=True)
    status = mesh.cli("status").stdout
    assert "actions: mode shadow (payments shadow)" in status, status
