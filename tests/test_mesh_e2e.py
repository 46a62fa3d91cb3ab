"""The demo mesh end to end: real Envoy sidecars on loopback, driven by our control plane.

The whole module runs once per xDS variant (delta and state-of-the-world).  Every test
leaves the mesh on the baseline demo spec, which the autouse fixture re-applies.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.support.mesh import DEMO_SPEC, Mesh, Traffic, get, payments_route, running_mesh, wait_for


@pytest.fixture(scope="module", params=["delta", "sotw"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    with running_mesh(tmp_path_factory.mktemp(f"mesh-{request.param}"), doc, request.param) as m:
        yield m


@pytest.fixture(autouse=True)
def baseline(mesh: Mesh):
    yield
    mesh.write_spec(mesh.spec())  # the watched file back to the demo spec
    assert mesh.apply(mesh.spec()).returncode == 0
    wait_for(mesh.all_in_sync, 15, "every sidecar to ACK the baseline spec again")


def test_request_crosses_frontend_orders_payments_through_sidecars(mesh: Mesh):
    before = mesh.envoy_stat("orders-1", "cluster.outbound|payments|v1.upstream_rq_200")
    reply = get(mesh.entrypoint)
    assert reply.status == 200, reply.body
    assert reply.body["service"] == "frontend"
    orders = reply.body["calls"][0]
    assert (orders["service"], orders["status"]) == ("orders", 200)
    callees = {c["service"]: c for c in orders["response"]["calls"]}
    assert callees.keys() == {"payments", "inventory"}
    assert callees["payments"]["response"]["subset"] == "v1"
    # orders reached payments through its sidecar's outbound cluster, not directly.
    wait_for(lambda: mesh.envoy_stat("orders-1", "cluster.outbound|payments|v1.upstream_rq_200") > before,
             5, "orders' sidecar to count the call to payments")


def test_weight_shift_reaches_live_traffic_within_2s_without_errors(mesh: Mesh):
    doc = mesh.spec()
    payments_route(doc)["split"] = {"v1": 0, "v2": 100}
    with Traffic(mesh.entrypoint) as traffic:
        time.sleep(0.5)
        applied_at = time.monotonic()  # before `greymesh apply` even starts: a conservative clock
        assert mesh.apply(doc).returncode == 0
        wait_for(lambda: any(r.subsets_seen("payments") == {"v2"} for _, r in traffic.replies[-5:]),
                 5, "traffic to reach payments v2")
        time.sleep(0.5)
    first_v2 = min(t for t, r in traffic.replies if r.subsets_seen("payments") == {"v2"})
    assert first_v2 - applied_at <= 2.0, f"weight change took {first_v2 - applied_at:.2f}s to show in traffic"
    assert all(r.subsets_seen("payments") == {"v2"} for t, r in traffic.replies if t >= first_v2)
    assert traffic.failures() == [], f"{len(traffic.failures())} failed requests during the shift"
    print(f"weight shift visible {first_v2 - applied_at:.2f}s after `greymesh apply` started")


def test_broken_route_is_refused_and_traffic_keeps_the_old_config(mesh: Mesh):
    doc = mesh.spec()
    payments_route(doc)["split"] = {"v1": 50, "v3": 50}
    with Traffic(mesh.entrypoint) as traffic:
        proc = mesh.apply(doc)
        assert proc.returncode == 2
        assert "routes[0].split.v3" in proc.stderr and f"{mesh.last_applied}:" in proc.stderr, proc.stderr
        # The same mistake in the watched file (the one applied last) is refused by the control plane itself.
        watched = Path(mesh.status()["controlplane"]["watching"])
        mesh.write_spec(doc, watched)
        wait_for(lambda: (mesh.status()["controlplane"].get("last_rejected") or {}).get("source")
                 == str(watched), 5, "the watcher to refuse the broken file")
        time.sleep(1.0)
    rejected = mesh.status()["controlplane"]["last_rejected"]
    assert any("split.v3" in e for e in rejected["errors"]), rejected
    assert traffic.failures() == []
    assert all(r.subsets_seen("payments") == {"v1"} for _, r in traffic.replies)


def test_envoy_nack_is_shown_in_status_with_envoys_reason(mesh: Mesh):
    doc = mesh.spec()
    # Python's re accepts look-ahead, Envoy's RE2 does not: valid for us, NACKed by Envoy.
    payments_route(doc)["match"] = {"regex": "/(?=pay).*"}
    assert mesh.apply(doc).returncode == 0

    def nack() -> dict | None:
        types = mesh.nodes().get("orders-1", {}).get("types", {})
        return next((t["nack"] for t in types.values() if t.get("nack")), None)

    wait_for(lambda: nack() is not None, 10, "orders-1 to NACK the route")
    assert "(?=" in nack()["message"], nack()  # RE2's own words, e.g. "invalid perl operator: (?="
    human = mesh.cli("status", check=False).stdout
    assert "orders-1" in human and nack()["message"][:40] in human
    assert get(mesh.entrypoint).status == 200  # still serving on the config it had


def test_traffic_survives_control_plane_loss_and_the_supervisor_brings_it_back(mesh: Mesh):
    before = mesh.status()["processes"]
    pid, restarts = before["controlplane"]["pid"], before["controlplane"]["restarts"]
    with Traffic(mesh.entrypoint) as traffic:
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: (p := mesh.status()["processes"]["controlplane"])["ready"] and p["pid"] != pid, 40,
                 "the supervisor to restart the control plane")  # the faults table: docs/faults.md
        back_at = time.monotonic()
        took = wait_for(mesh.all_in_sync, 30, "every sidecar to resync")
        time.sleep(1.0)
    after = mesh.status()["processes"]
    assert after["controlplane"]["restarts"] == restarts + 1
    assert after["controlplane"]["last_exit"]["signal"] == "SIGKILL"
    assert {n: p["pid"] for n, p in after.items() if n != "controlplane"} == \
        {n: p["pid"] for n, p in before.items() if n != "controlplane"}  # nothing else restarted
    assert traffic.failures() == [], f"{len(traffic.failures())} failed while the control plane was away"
    during_outage = [r for t, r in traffic.replies if killed_at < t < back_at]
    assert during_outage, "no request was sent while the control plane was down"
    # And the restarted control plane really drives them: a change lands.
    doc = mesh.spec()
    payments_route(doc)["split"] = {"v1": 0, "v2": 100}
    assert mesh.apply(doc).returncode == 0
    wait_for(lambda: get(mesh.entrypoint).subsets_seen("payments") == {"v2"}, 5, "the post-restart change")
    print(f"resync took {took:.1f}s after restart")


def test_only_sidecars_that_call_a_changed_service_get_a_push(mesh: Mesh):
    before = {n: rec["pushes"] for n, rec in mesh.nodes().items()}
    doc = mesh.spec()
    payments_route(doc)["timeout"] = "2500ms"
    proc = mesh.apply(doc)
    assert proc.returncode == 0 and "orders-1" in proc.stdout
    wait_for(mesh.all_in_sync, 10, "orders-1 to ACK")
    after = {n: rec["pushes"] for n, rec in mesh.nodes().items()}
    assert after["orders-1"] > before["orders-1"]
    assert {n: after[n] for n in after if n != "orders-1"} == {n: before[n] for n in before if n != "orders-1"}


def test_fault_injection_aborts_about_half_and_removal_restores(mesh: Mesh):
    doc = mesh.spec()
    payments_route(doc)["fault"] = {"abort": {"percent": 50, "http_status": 503}}
    assert mesh.apply(doc).returncode == 0
    wait_for(mesh.all_in_sync, 10, "the fault to be ACKed")
    n = 400
    statuses = [get(mesh.entrypoint).status for _ in range(n)]
    errors = sum(s != 200 for s in statuses)
    # Binomial(400, 0.5): 3.5 sigma is +-35.
    assert 165 <= errors <= 235, f"{errors}/{n} errors with a 50% abort"
    assert set(statuses) <= {200, 502}, set(statuses)

    assert mesh.apply(mesh.spec()).returncode == 0
    wait_for(mesh.all_in_sync, 10, "the fault removal to be ACKed")
    statuses = [get(mesh.entrypoint).status for _ in range(200)]
    assert statuses.count(200) == 200


def test_status_lists_every_process_and_sidecar(mesh: Mesh):
    doc = mesh.status()
    procs = doc["processes"]
    instances = ["frontend-1", "orders-1", "payments-v1-1", "payments-v2-1", "inventory-1"]
    host_wide = {"controlplane", "loadgen", "opa", "authz", "kafka", "taps", "taps-2", "sink",
                 "scorer", "actions"}
    assert {f"envoy:{i}" for i in instances} | {f"app:{i}" for i in instances} | host_wide == set(procs)
    assert all(p["running"] and p["ready"] and p["state"] == "ready" for p in procs.values())
    assert mesh.cli("status", check=False).returncode == 0
    assert set(doc["controlplane"]["nodes"]) == set(instances)
    assert doc["entrypoint"].startswith("https://127.0.0.1:")
