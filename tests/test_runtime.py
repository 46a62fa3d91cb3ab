"""The local runtime's promises: data dirs do not collide, `down` leaves nothing, one spec rule, scale
without failed requests, a restarted OPA gets its policy back, honest status."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.meshspec import load_spec
from core.endpoints import Endpoints
from greymesh.runtime import local as runtime
from tests.support.mesh import DEMO_SPEC, ROOT, Mesh, Traffic, get, payments_route, wait_for


def _our_processes(data_dir: Path) -> list[int]:
    """Pids of live processes whose command line names the data dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if str(data_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_ports_are_stable_per_data_dir_and_distinct_between_them(tmp_path: Path):
    spec = load_spec(DEMO_SPEC)
    keys = [f"{i.name}.{r}" for s in spec.services for i in s.instances for r in ("app", "inbound")]
    a, b = Endpoints(), Endpoints()
    runtime.allocate(a, tmp_path / "a", keys)
    runtime.allocate(b, tmp_path / "b", keys)
    assert len(set(a.ports.values())) == len(keys)
    assert not set(a.ports.values()) & set(b.ports.values())
    again = Endpoints(ports=dict(a.ports))
    runtime.allocate(again, tmp_path / "a", [*keys, "extra.app"])
    assert {k: again.ports[k] for k in keys} == a.ports  # existing ports kept
    assert again.ports["extra.app"] not in a.ports.values()


def test_two_meshes_run_side_by_side_and_down_leaves_no_process(tmp_path: Path):
    meshes = []
    for name in ("one", "two"):
        spec = tmp_path / f"{name}.yaml"
        shutil.copy(DEMO_SPEC, spec)
        meshes.append(Mesh(tmp_path / name, spec, "delta"))
    try:
        for m in meshes:
            m.up()
        one, two = meshes
        assert one.entrypoint != two.entrypoint
        assert get(one.entrypoint).status == 200 and get(two.entrypoint).status == 200
        assert len(_our_processes(one.data_dir)) >= 12  # control plane, 5 apps, 5 sidecars, load

        out = one.cli("down").stdout
        assert "stopped" in out
        assert _our_processes(one.data_dir) == []
        assert get(two.entrypoint).status == 200  # the other mesh is untouched
    finally:
        for m in meshes:
            m.cli("down", check=False)
    assert _our_processes(meshes[1].data_dir) == []


def test_invalid_spec_starts_nothing(tmp_path: Path):
    bad = tmp_path / "mesh.yaml"
    bad.write_text(DEMO_SPEC.read_text().replace("entrypoint: frontend", "entrypoint: nowhere"))
    m = Mesh(tmp_path / "data", bad, "delta")
    proc = m.cli("up", str(bad), check=False)
    assert proc.returncode == 2
    assert f"{bad}:" in proc.stderr and "entrypoint" in proc.stderr
    assert _our_processes(m.data_dir) == []


# --- one mesh for the runtime's promises ---------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A demo mesh started by `up` without a file, with payments split 50/50."""
    work = tmp_path_factory.mktemp("runtime")
    m = Mesh(work / "data", work / "unused.yaml", "delta")
    try:
        m.cli("up", "--rps", "2")
        doc = m.spec()
        payments_route(doc)["split"] = {"v1": 50, "v2": 50}
        m.baseline = doc
        assert m.apply(doc).returncode == 0
        yield m
    finally:
        m.cli("down", check=False)


def test_one_spec_rule_up_watches_a_copy_apply_moves_the_watch_and_up_keeps_it(mesh: Mesh):
    copy = mesh.data_dir / "mesh.yaml"
    first = mesh.status()
    candidate = mesh.last_applied  # what the fixture applied last
    assert first["spec_source"] == str(candidate) == first["controlplane"]["watching"]
    assert copy.read_text() == DEMO_SPEC.read_text()  # `up` without a file watched a copy, not the checkout's file

    doc = mesh.spec()
    payments_route(doc)["timeout"] = "2500ms"
    other = mesh.write_spec(doc, mesh.data_dir.parent / "other.yaml")
    assert mesh.cli("apply", str(other)).returncode == 0
    assert mesh.status()["controlplane"]["watching"] == str(other)

    # Edits to the file that is no longer watched change nothing; edits to the watched one apply.
    doc["services"]["payments"]["routes"][0]["timeout"] = "2s"
    mesh.write_spec(doc, candidate)
    time.sleep(1.5)
    assert mesh.status()["controlplane"]["spec"]["source"] == str(other)
    mesh.write_spec(doc, other)
    wait_for(lambda: mesh.status()["controlplane"]["spec"]["sha256"]
             == hashlib.sha256(other.read_text().encode()).hexdigest(), 5, "the watched file's edit to apply")

    cp_pid = mesh.status()["processes"]["controlplane"]["pid"]
    mesh.cli("up", "--rps", "2")  # no file: keeps the watched one, restarts nothing
    after = mesh.status()
    assert after["spec_source"] == str(other) and after["processes"]["controlplane"]["pid"] == cp_pid
    assert mesh.apply(mesh.baseline).returncode == 0


def test_scale_out_and_in_under_load_fails_no_request(mesh: Mesh):
    with Traffic(mesh.entrypoint, interval_s=0.05) as traffic:  # 20 rps
        time.sleep(1.0)
        out = mesh.cli("scale", "payments/v2", "3")
        assert "payments-v2-1, payments-v2-2, payments-v2-3" in out.stdout
        listed = mesh.status()["instances"]["payments/v2"]
        assert [(i["name"], i["serving"]) for i in listed] == [
            ("payments-v2-1", True), ("payments-v2-2", True), ("payments-v2-3", True)]
        wait_for(lambda: {"payments-v2-2", "payments-v2-3"} <= set().union(
            *(r.instances_seen("payments") for _, r in traffic.replies)), 20, "traffic to reach the new instances")
        mesh.cli("scale", "payments/v2", "1")
        assert [i["name"] for i in mesh.status()["instances"]["payments/v2"]] == ["payments-v2-1"]
        time.sleep(1.0)
    assert len(traffic.replies) >= 100
    assert traffic.failures() == [], f"{len(traffic.failures())} of {len(traffic.replies)} failed while scaling"
    procs = mesh.status()["processes"]
    assert not any(n.endswith(("payments-v2-2", "payments-v2-3")) for n in procs)
    assert mesh.all_in_sync()


def test_scale_refuses_what_it_cannot_do(mesh: Mesh):
    for args, says in ((("payments", "2"), "say which, e.g. payments/v2"), (("nope/v1", "2"), "no service 'nope'"),
                       (("payments/v9", "2"), "no subset 'v9'"), (("payments/v1", "0"), "at least 1")):
        proc = mesh.cli("scale", *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)


def test_a_restarted_opa_gets_the_policy_that_was_pushed_last(mesh: Mesh, tmp_path: Path):
    draft = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", draft)
    rego = draft / "authz.rego"
    rego.write_text(rego.read_text() + "\n# pushed by the restart test\n")
    mesh.cli("policy", "push", "--dir", str(draft))
    opa = mesh.status()["processes"]["opa"]
    os.kill(opa["pid"], signal.SIGKILL)
    wait_for(lambda: (p := mesh.status()["processes"]["opa"])["ready"] and p["pid"] != opa["pid"], 20,
             "OPA to be restarted and its policy restored")
    diff = mesh.cli("policy", "diff", "--dir", str(draft))
    assert "runs exactly" in diff.stdout, diff.stdout  # the draft, not the checkout's policies/
    journal = [json.loads(line) for line in (mesh.data_dir / "policy-journal.jsonl").read_text().splitlines()]
    assert journal[-1]["outcome"] == "restored" and "greymesh runtime" in journal[-1]["actor"]
    assert journal[-1]["sha256"] == journal[-2]["sha256"]  # the policy of the push before the kill
    assert get(mesh.entrypoint).status == 200


def test_status_after_down_says_the_mesh_is_stopped(tmp_path: Path):
    m = Mesh(tmp_path / "data", DEMO_SPEC, "delta")
    m.data_dir.mkdir()
    (m.data_dir / "runtime.json").write_text("{}")  # placed once, nothing runs
    proc = m.cli("status", "--json", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["mesh"] == "stopped"
    assert "loadgen" not in json.loads(proc.stdout) and "ml" not in json.loads(proc.stdout)
