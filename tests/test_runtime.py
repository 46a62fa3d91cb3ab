"""The local runtime's own promises: separate data dirs do not collide, `down` leaves nothing."""

from __future__ import annotations

import shutil
from pathlib import Path


from controlplane.meshspec import load_spec
from core.endpoints import Endpoints
from greymesh.runtime import local as runtime
from tests.support.mesh import DEMO_SPEC, Mesh, get


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
