"""Overrides merged over the spec (controlplane/overrides.py) and the control plane's
/overrides API, driven in process: a ControlPlane with its ADS and admin servers on
loopback, simulated sidecars ACKing what it pushes."""

from __future__ import annotations

import json
import stat
import time
from dataclasses import replace

import pytest
import yaml
from envoy.config.route.v3 import route_pb2

from controlplane import daemon
from controlplane.daemon import ControlPlane
from controlplane.meshspec import OutlierDetection, RetryPolicy, Route, RouteMatch, parse_spec
from controlplane.overrides import OverrideSet, merge, reconcile, routing
from controlplane.placement import placed_spec
from controlplane.translate import build_snapshots
from controlplane.xds.snapshot import ROUTE
from core.contracts import Override
from core.jsonhttp import ACTIONS, CLI
from core.specread import SpecError
from greymesh import cli
from tests.support.adsclient import expected_acks
from tests.support.controlplane import admin_plane, placement_of, prepare
from tests.support.mesh import DEMO_SPEC

SPEC_TEXT = """
version: 1
mesh: t
entrypoint: frontend
services:
  frontend:
    calls: [payments, inventory]
    instances: [{name: frontend-1}]
  payments:
    outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 50}
    instances:
      - {name: payments-v1-1, subset: v1}
      - {name: payments-v2-1, subset: v2}
    routes:
      - name: main
        match: {prefix: /pay}
        split: {v1: 90, v2: 10}
        timeout: 3s
        retries: {attempts: 2, retry_on: [5xx]}
      - name: canary
        match: {prefix: /, headers: {x-canary: "1"}}
        split: {v2: 100}
      - name: rest
        match: {prefix: /}
        split: {v2: 50, v1: 50}
  inventory:
    instances:
      - {name: inventory-a-1, subset: a}
      - {name: inventory-a-2, subset: a}
      - {name: inventory-b-1, subset: b}
"""
SPEC = parse_spec(SPEC_TEXT)


def edited(change) -> str:
    """SPEC_TEXT with ``change(doc)`` applied to its YAML."""
    doc = yaml.safe_load(SPEC_TEXT)
    change(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def weights(service: str, **split: int) -> Override:
    return Override(service=service, id=f"{service}-1", reason="test", weights=tuple(split.items()))


def splits(spec, service: str) -> dict[str, tuple]:
    return {r.name: r.split for r in spec.service(service).routes}


def problems(exc: pytest.ExceptionInfo[SpecError]) -> dict[str, str]:
    return {p.path: p.message for p in exc.value.problems}


# --- merge ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_weights_replace_the_split_of_every_route_over_exactly_those_subsets():
    merged = merge(SPEC, [weights("payments", v2=20, v1=80)])
    assert splits(merged, "payments") == {"main": (("v1", 80), ("v2", 20)), "canary": (("v2", 100),),
                                          "rest": (("v2", 20), ("v1", 80))}  # each route keeps its order
    assert merged.service("payments").routes[0].timeout_s == 3.0  # nothing else of the route changes
    # The other services are the very same objects: their sidecars' resources stay as they were.
    assert merged.service("inventory") is SPEC.service("inventory")
    assert merged.service("frontend") is SPEC.service("frontend")
    assert merge(SPEC, []) == SPEC


@pytest.mark.unit
def test_timeout_and_retries_replace_those_of_every_route():
    merged = merge(SPEC, [Override("payments", "d", "slow dependency", timeout_s=1.5, retry_attempts=0)])
    routes = merged.service("payments").routes
    assert [r.timeout_s for r in routes] == [1.5, 1.5, 1.5]
    assert routes[0].retries == RetryPolicy(attempts=0, retry_on=("5xx",))  # the spec's conditions stay
    assert routes[1].retries == RetryPolicy(attempts=0)
    assert [r.split for r in routes] == [r.split for r in SPEC.service("payments").routes]


@pytest.mark.unit
def test_outlier_detection_only_tightens():
    merged = merge(SPEC, [Override("payments", "d", "r", outlier_consecutive_5xx=2, outlier_max_ejection_percent=80)])
    assert merged.service("payments").outlier_detection == OutlierDetection(2, 10.0, 30.0, 80)
    with pytest.raises(SpecError) as loose:
        merge(SPEC, [Override("payments", "d", "r", outlier_consecutive_5xx=8, outlier_max_ejection_percent=20)])
    assert problems(loose) == {
        "overrides.payments.outlier_consecutive_5xx": "8 would loosen the spec's 5: an override only tightens "
                                                      "outlier detection",
        "overrides.payments.outlier_max_ejection_percent": "20 would loosen the spec's 50: an override only "
                                                           "tightens outlier detection"}
    # A service without outlier detection gets it: any value is tighter than none.
    merged = merge(SPEC, [Override("inventory", "d", "r", outlier_consecutive_5xx=3)])
    assert merged.service("inventory").outlier_detection == OutlierDetection(consecutive_5xx=3)


@pytest.mark.unit
def test_a_route_less_service_gets_its_catch_all_reweighted_and_its_callers_carry_it():
    merged = merge(SPEC, [weights("inventory", a=10, b=90)])
    assert merged.service("inventory").routes == (Route("default", RouteMatch(prefix="/"), (("a", 10), ("b", 90))),)
    rds = build_snapshots(merged, placement_of(SPEC))["frontend-1"].resources(ROUTE)["outbound"]
    host = next(h for h in route_pb2.RouteConfiguration.FromString(rds.body).virtual_hosts if h.name == "inventory")
    assert [(c.name, c.weight.value) for c in host.routes[0].route.weighted_clusters.clusters] == [
        ("outbound|inventory|a", 10), ("outbound|inventory|b", 90)]


@pytest.mark.unit
def test_an_override_that_cannot_apply_is_refused_naming_the_field():
    cases = [
        (weights("nosuch", v1=100), "overrides.nosuch", "mesh t has no service nosuch; its services: frontend, "
                                                        "payments, inventory"),
        (weights("payments", v1=50, v3=50), "overrides.payments.weights.v3",
         "payments has no instance in subset 'v3'; its subsets: v1, v2"),
        (weights("payments", v1=50, v2=40), "overrides.payments", "weights: must sum to 100, not 90"),
        (weights("payments", v1=100), "overrides.payments.weights",
         "no route of payments splits over exactly v1 (its routes: main over v1, v2; canary over v2; rest over v2, "
         "v1): name the subsets of the split to change"),
        (Override("payments", "d", "r", timeout_s=0.0), "overrides.payments",
         "timeout_s: must be a float in 0.001..3600.0, not 0.0"),
        (Override("payments", "", "r", timeout_s=1.0), "overrides.payments", "id: must be a non-empty string"),
        (Override("payments", "d", "r"), "overrides.payments", "changes nothing: give weights, timeout_s, "
                                                               "retry_attempts, outlier_consecutive_5xx or "
                                                               "outlier_max_ejection_percent"),
    ]
    for override, path, message in cases:
        with pytest.raises(SpecError) as refused:
            merge(SPEC, [override])
        assert problems(refused) == {path: message}, override
        assert str(refused.value).startswith("<overrides>: ")
    with pytest.raises(SpecError) as both:  # every problem at once
        merge(SPEC, [weights("nosuch", v1=100), weights("inventory", a=1, c=99)])
    assert set(problems(both)) == {"overrides.nosuch", "overrides.inventory.weights.c"}


# --- the set on disk --------------------------------------------------------------------------


@pytest.mark.unit
def test_the_set_persists_privately_one_override_per_service(tmp_path):
    path = tmp_path / "overrides.json"
    assert len(OverrideSet.load(path)) == 0  # none saved yet
    first = replace(weights("payments", v1=80, v2=20), by=ACTIONS, created_at=1000.0)
    s = OverrideSet(path).put(weights("inventory", a=50, b=50)).put(first)
    s = s.put(replace(first, id="payments-2", weights=(("v1", 60), ("v2", 40))))  # replaces, never adds
    s.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = OverrideSet.load(path)
    assert loaded == s and [o.service for o in loaded] == ["inventory", "payments"]
    assert loaded.get("payments").id == "payments-2" and loaded.get("payments").by == ACTIONS
    assert [o.service for o in loaded.without("payments")] == ["inventory"]
    for text, says in (("{", "not JSON"), ('{"overrides": []}', '"version": 1'),
                       ('{"version": 1, "overrides": [{"service": "p", "id": "x", "reason": "r", "wat": 1}]}',
                        "overrides[0]: unknown field(s) ['wat']"),
                       (json.dumps({"version": 1, "overrides": [first.to_json(), first.to_json()]}),
                        "overrides[1]: a second override of payments")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: .*") as bad:
            OverrideSet.load(path)
        assert says in str(bad.value)


# --- the rule on apply --------------------------------------------------------------------------


@pytest.mark.unit
def test_an_apply_keeps_an_override_while_it_fits_and_the_operators_edit_wins(tmp_path):
    both = OverrideSet(tmp_path / "o.json").put(weights("payments", v1=80, v2=20)).put(weights("inventory", a=50, b=50))

    def after(text: str, previous=SPEC) -> tuple[list[str], dict[str, str]]:
        declared = parse_spec(text)
        kept, cleared = reconcile(both, previous, declared, declared)
        return [o.service for o in kept], {c.override.service: c.reason for c in cleared}

    assert after(SPEC_TEXT) == (["inventory", "payments"], {})
    # Another service's edit keeps both.
    assert after(edited(lambda d: d["services"]["frontend"].update(tags=["pci"]))) == (["inventory", "payments"], {})
    # An edit of payments' own routes, or of its outlier detection, clears its override only.
    wins = {"payments": "the apply changed payments's routes or outlier detection: the operator's edit wins"}
    assert after(edited(lambda d: d["services"]["payments"]["routes"][0].update(timeout="2s"))) == (["inventory"], wins)
    assert after(edited(lambda d: d["services"]["payments"]["outlier_detection"].update(consecutive_5xx=7))) == (
        ["inventory"], wins)
    # A subset it names is gone: it no longer fits.
    assert after(edited(lambda d: d["services"]["inventory"]["instances"].pop())) == (["payments"], {
        "inventory": "it no longer fits the spec: inventory has no instance in subset 'b'; its subsets: a"})

    def drop_inventory(d: dict) -> None:
        del d["services"]["inventory"]
        d["services"]["frontend"]["calls"] = ["payments"]

    assert after(edited(drop_inventory)) == (["payments"], {"inventory": "service inventory is no longer in the spec"})
    # At start-up there is no previous spec to compare: what fits is kept.
    assert after(edited(lambda d: d["services"]["payments"]["routes"][0].update(timeout="2s")), previous=None) == (
        ["inventory", "payments"], {})


@pytest.mark.unit
def test_routing_reports_declared_and_effective_splits_and_serving_instances(tmp_path):
    placement = placement_of(SPEC, not_serving=("payments-v2-1",))
    spec, problems_ = placed_spec(SPEC, placement)
    assert problems_ == []
    overrides = OverrideSet(tmp_path / "o.json").put(weights("payments", v1=70, v2=30))
    by_service = {r.service: r for r in routing(spec, placement, overrides)}
    assert set(by_service) == {s.name for s in SPEC.services}  # every service: the loop scales any of them
    frontend, payments, inventory = by_service["frontend"], by_service["payments"], by_service["inventory"]
    assert (frontend.subsets, frontend.declared, frontend.instances) == (("default",), (("default", 100),),
                                                                        (("default", 1),))
    assert payments.to_json() == {
        "service": "payments", "subsets": ["v1", "v2"], "instances": {"v1": 1, "v2": 0}, "callers": ["frontend"],
        "declared": {"v1": 90, "v2": 10}, "effective": {"v1": 70, "v2": 30},
        "override": overrides.get("payments").to_json()}
    assert (inventory.declared, inventory.effective, inventory.instances, inventory.override) == (
        (("a", 67), ("b", 33)), (("a", 67), ("b", 33)), (("a", 2), ("b", 1)), None)


# --- the control plane: its admin API, in process --------------------------------------------


def _outbound_split(env, service: str) -> dict[str, int]:
    """The split ``env`` (a simulated sidecar) holds for ``service`` in its outbound routes."""
    config = route_pb2.RouteConfiguration.FromString(env.resources[ROUTE]["outbound"])
    action = next(h for h in config.virtual_hosts if h.name == service).routes[0].route
    if action.cluster:
        return {action.cluster.rsplit("|", 1)[1]: 100}
    return {c.name.rsplit("|", 1)[1]: c.weight.value for c in action.weighted_clusters.clusters}


def _journal(plane) -> list[dict]:
    return [json.loads(line) for line in plane.dd.applies_journal.read_text().splitlines()]


@pytest.mark.unit
@pytest.mark.asyncio
async def test_put_get_delete_reach_the_callers_sidecars_and_are_journaled(tmp_path):
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    async with admin_plane(dd) as plane, plane.envoy("orders-1", "orders") as orders:
        await orders.wait_acked(expected_acks(plane.cp.cache.snapshots()["orders-1"]))
        assert _outbound_split(orders, "payments") == {"v1": 100}
        before = time.time()
        body = {"id": "d-1", "reason": "v1 slow", "weights": {"v1": 50, "v2": 50}, "by": "forged", "created_at": 1}
        status, doc = await plane.call("PUT", "/overrides/payments?wait=1", body, principal=ACTIONS)
        assert status == 200, doc
        assert doc["changed"] == ["orders-1"] and 0 <= doc["acked_s"] < 5
        assert (doc["override"]["by"], doc["override"]["weights"]) == (ACTIONS, {"v1": 50, "v2": 50})
        assert before <= doc["override"]["created_at"] <= time.time()  # the control plane's clock, not the body's
        assert _outbound_split(orders, "payments") == {"v1": 50, "v2": 50}  # held by the sidecar before the answer

        status, listing = await plane.call("GET", "/overrides", principal=ACTIONS)
        assert status == 200
        assert [s for s in listing["services"] if s["service"] == "payments"] == [{
            "service": "payments", "subsets": ["v1", "v2"], "instances": {"v1": 1, "v2": 1}, "callers": ["orders"],
            "declared": {"v1": 100, "v2": 0}, "effective": {"v1": 50, "v2": 50}, "override": doc["override"]}]
        assert (await plane.call("GET", "/status"))[1]["overrides"] == [doc["override"]]
        last = _journal(plane)[-1]
        assert (last["outcome"], last["source"], last["service"], last["changed"]) == (
            "override", ACTIONS, "payments", ["orders-1"])

        # Without waiting the answer comes at once, acked_s null; the same override again changes nothing.
        status, again = await plane.call("PUT", "/overrides/payments", body)
        assert (status, again["changed"], again["acked_s"], again["override"]["by"]) == (200, [], None, CLI)

        status, cleared = await plane.call("DELETE", "/overrides/payments?wait=1")
        assert (status, cleared["changed"], cleared["override"]["id"]) == (200, ["orders-1"], "d-1")
        assert isinstance(cleared["acked_s"], float)
        assert _outbound_split(orders, "payments") == {"v1": 100}
        assert (await plane.call("DELETE", "/overrides/payments"))[0] == 404
        assert (await plane.call("GET", "/status"))[1]["overrides"] == []
        last = _journal(plane)[-1]
        assert (last["outcome"], last["source"], last["override"]["id"]) == ("override-cleared", CLI, "d-1")
        assert json.loads(dd.overrides.read_text())["overrides"] == []


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_refused_override_changes_nothing_and_says_why(tmp_path):
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    async with admin_plane(dd) as plane:
        versions = {n: s.version_key for n, s in plane.cp.cache.snapshots().items()}
        journal = dd.applies_journal.read_text()
        cases = [
            ("/overrides/payments", {"id": "x", "reason": "r", "weights": {"v1": 50, "v2": 40}},
             "weights: must sum to 100, not 90"),
            ("/overrides/payments", {"id": "x", "reason": "r", "weights": {"v1": 50, "v3": 50}},
             "<overrides>: overrides.payments.weights.v3: payments has no instance in subset 'v3'; "
             "its subsets: v1, v2"),
            ("/overrides/nosuch", {"id": "x", "reason": "r", "timeout_s": 1},
             "<overrides>: overrides.nosuch: mesh demo has no service nosuch; its services: frontend, orders, "
             "payments, inventory"),
            ("/overrides/payments", {"service": "orders", "id": "x", "reason": "r"},
             "service: the body names 'orders' but the path 'payments'"),
            ("/overrides/payments", {"id": "x", "reason": "r", "timeout": "1s"}, "unknown field(s) ['timeout']"),
            ("/overrides/payments", {"id": "x", "reason": "r", "retry_attempts": 11},
             "retry_attempts: must be a int in 0..10, not 11"),
            ("/overrides/payments", b"{not json", "send an override as JSON"),
            ("/overrides/payments", b"[1]", "an override is a JSON object"),
        ]
        for path, body, says in cases:
            status, doc = await plane.call("PUT", path, body, principal=ACTIONS)
            assert status == 400 and says in doc["errors"][0], (body, doc)
        assert (await plane.call("PUT", "/overrides/", {"id": "x", "reason": "r"}))[0] == 404
        assert (await plane.call("PUT", "/overrides/a/b", {"id": "x", "reason": "r"}))[0] == 404
        assert {n: s.version_key for n, s in plane.cp.cache.snapshots().items()} == versions
        assert not dd.overrides.exists() and dd.applies_journal.read_text() == journal
        assert (await plane.call("GET", "/overrides"))[1]["services"][0]["override"] is None


@pytest.mark.unit
@pytest.mark.asyncio
async def test_the_actions_stage_changes_the_mesh_through_overrides_only(tmp_path):
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    async with admin_plane(dd) as plane:
        spec = {"spec": DEMO_SPEC.read_text()}
        for method, path, body in (("POST", "/apply", spec), ("POST", "/placement", None),
                                   ("POST", "/ca/rotate", None)):
            assert (await plane.call(method, path, body, principal=ACTIONS))[0] == 403, path
        assert (await plane.call("GET", "/status", principal=ACTIONS))[0] == 200
        plane.tokens["wrong"] = plane.tokens[ACTIONS][:-1] + "x"
        for principal in (None, "wrong"):
            status, _ = await plane.call("PUT", "/overrides/payments", {"id": "x", "reason": "r", "timeout_s": 1},
                                         principal=principal)
            assert status == 401, principal
        assert (await plane.call("POST", "/apply", spec))[0] == 200  # the CLI still may


@pytest.mark.unit
@pytest.mark.asyncio
async def test_wait_names_the_sidecars_that_did_not_ack(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon, "OVERRIDE_ACK_TIMEOUT_S", 0.3)
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    async with admin_plane(dd) as plane:  # no sidecar connects
        started = time.monotonic()
        status, doc = await plane.call("PUT", "/overrides/payments?wait=1",
                                       {"id": "d-2", "reason": "r", "weights": {"v1": 10, "v2": 90}})
        assert (status, doc["laggards"], doc["changed"]) == (504, ["orders-1"], ["orders-1"])
        assert "orders-1 did not ACK the new config within 0.3 s" in doc["errors"][0]
        assert time.monotonic() - started < 5
        # The change is in force all the same: a sidecar that connects gets it.
        assert (await plane.call("GET", "/status"))[1]["overrides"][0]["id"] == "d-2"


@pytest.mark.unit
@pytest.mark.asyncio
async def test_overrides_survive_a_restart_and_an_apply_that_edits_the_service_clears_them(tmp_path):
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    async with admin_plane(dd) as plane:
        status, doc = await plane.call("PUT", "/overrides/payments",
                                       {"id": "d-3", "reason": "r", "weights": {"v1": 30, "v2": 70}, "timeout_s": 2})
        assert status == 200
        route_version = plane.cp.cache.snapshots()["orders-1"].version(ROUTE)
    assert stat.S_IMODE(dd.overrides.stat().st_mode) == 0o600

    async with admin_plane(dd) as plane:  # a new control plane on the same data dir
        assert (await plane.call("GET", "/status"))[1]["overrides"] == [doc["override"]]
        assert plane.cp.cache.snapshots()["orders-1"].version(ROUTE) == route_version  # the same config, no push
        # An apply that leaves payments alone keeps it ...
        spec = yaml.safe_load(DEMO_SPEC.read_text())
        spec["services"]["inventory"]["tags"] = ["stock"]
        assert (await plane.call("POST", "/apply", {"spec": yaml.safe_dump(spec)}))[0] == 200
        assert [o["id"] for o in (await plane.call("GET", "/status"))[1]["overrides"]] == ["d-3"]
        # ... one that edits payments' routes clears it: the operator's edit wins.
        spec["services"]["payments"]["routes"][0]["split"] = {"v1": 90, "v2": 10}
        status, applied = await plane.call("POST", "/apply", {"spec": yaml.safe_dump(spec)})
        assert status == 200 and applied["changed"] == ["orders-1"]
        assert (await plane.call("GET", "/status"))[1]["overrides"] == []
        cleared = [e for e in _journal(plane) if e["outcome"] == "override-cleared"]
        assert [(e["source"], e["override"]["id"]) for e in cleared] == [(CLI, "d-3")]
        assert "the operator's edit wins" in cleared[0]["reason"]
    async with admin_plane(dd) as plane:
        assert plane.cp.overrides.overrides == ()


@pytest.mark.unit
def test_a_corrupt_overrides_file_is_set_aside_not_fatal(tmp_path):
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    dd.overrides.write_text('{"version": 1, "overrides": [{"service": "payments"}]}')
    cp = ControlPlane(dd)
    assert len(cp.overrides) == 0 and not dd.overrides.exists()
    (aside,) = dd.root.glob("overrides.json.refused-*")
    assert "payments" in aside.read_text()


@pytest.mark.unit
def test_status_shows_each_override_and_who_made_it():
    override = replace(weights("payments", v1=70, v2=30), by=ACTIONS, created_at=time.time() - 42, timeout_s=1.5)
    doc = {"data_dir": "/d", "controlplane": {"overrides": [override.to_json()]},
           "supervisor": {"running": True, "pid": 1}, "processes": {}}
    line = next(x for x in cli._render_status(doc).splitlines() if x.startswith("override:"))
    assert line == "override:   payments: v1 70 / v2 30, timeout 1.5 s, by actions 42 s ago (id payments-1: test)"
