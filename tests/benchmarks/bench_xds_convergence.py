"""xDS convergence: from a mesh.yaml change until every affected sidecar has ACKed it.

Part 1, real Envoys: the demo mesh (delta and SotW in turn) and a change that
re-configures two sidecars (payments' split and orders' connect timeout). The clock
starts just before POST /apply to the control plane. It stops at the latest ACK the
control plane recorded for the new versions, on the same host clock.

Part 2, simulated: one control-plane process and 1,000 simulated ADS clients
(tests/support/adsclient.py, which follows EDS, RDS and SDS names as Envoy does) in
a second process. Every node gets an SVID from the control plane's CA, as in a real
mesh, so convergence is read from the control plane's own ACK records. The mesh has 50 services of 20
instances, and each service calls three others. Measured:
- the initial sync;
- a change to one service's split, which re-configures its callers' 60 sidecars;
- a change to every service's route timeout, which re-configures all 1,000;
- the control plane's resident memory (VmRSS, VmHWM).
Both processes share these 2 cores, so the clients' own protobuf work is in the
numbers.

Usage: .venv/bin/python tests/benchmarks/bench_xds_convergence.py [--nodes-per-service 20] [--services 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.meshspec import parse_spec  # noqa: E402
from controlplane.placement import Placement, SidecarPorts  # noqa: E402
from tests.support.adsclient import SimulatedEnvoy  # noqa: E402
from tests.support.mesh import DEMO_SPEC, Mesh, wait_for  # noqa: E402


def _post_apply(admin: str, text: str) -> dict:
    req = urllib.request.Request(admin + "/apply", data=text.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _status(admin: str) -> dict:
    with urllib.request.urlopen(admin + "/status", timeout=60) as resp:
        return json.loads(resp.read())


def _converged_at(admin: str, nodes: list[str], timeout: float = 60, poll_s: float = 0.01) -> float:
    """Wall-clock time of the last ACK (as the control plane recorded it) once all `nodes` are in sync."""
    deadline = time.monotonic() + timeout
    while True:
        doc = _status(admin)["nodes"]
        if all(doc.get(n, {}).get("in_sync") for n in nodes):
            return max(t["acked_at"] for n in nodes for t in doc[n]["types"].values() if t.get("acked_at"))
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in sync after {timeout}s: {[n for n in nodes if not doc.get(n, {}).get('in_sync')]}")
        time.sleep(poll_s)


# --- part 1: real Envoys --------------------------------------------------------------


def real_envoys(xds_api: str, changes: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "mesh.yaml"
        shutil.copy(DEMO_SPEC, spec)
        mesh = Mesh(Path(tmp) / "data", spec, xds_api)
        mesh.cli("up", str(spec), "--rps", "0", "--xds-api", xds_api, "--no-watch")
        admin = f"http://127.0.0.1:{json.loads((mesh.data_dir / 'runtime.json').read_text())['ports']['controlplane.admin']}"
        took = []
        try:
            wait_for(mesh.all_in_sync, 30, "initial sync")
            for i in range(changes):
                doc = mesh.spec()
                doc["services"]["payments"]["routes"][0]["split"] = {"v1": 100 - 10 * (i % 2 + 1), "v2": 10 * (i % 2 + 1)}
                doc["services"]["orders"]["connect_timeout"] = f"{1100 + 100 * (i % 2)}ms"
                t0 = time.time()
                changed = _post_apply(admin, yaml.safe_dump(doc))["changed"]
                assert changed == ["frontend-1", "orders-1"], changed
                took.append(_converged_at(admin, changed) - t0)
        finally:
            mesh.cli("down", check=False)
    return took


# --- part 2: simulated clients ----------------------------------------------------------


def big_spec(services: int, per_service: int, timeout_ms: int = 3000, split_v2: int = 0) -> str:
    doc = {"version": 1, "mesh": "bench", "entrypoint": "svc-0", "services": {}}
    for s in range(services):
        doc["services"][f"svc-{s}"] = {
            "calls": [f"svc-{(s + k) % services}" for k in (1, 2, 3)],
            "instances": [{"name": f"svc-{s}-{i}", "subset": "v1" if i % 2 == 0 else "v2"} for i in range(per_service)],
            "routes": [{
                "name": "default", "match": {"prefix": "/"},
                "split": {"v1": 100 - (split_v2 if s == 0 else 0), "v2": split_v2 if s == 0 else 0},
                "timeout": f"{timeout_ms}ms",
            }],
        }
    return yaml.safe_dump(doc, sort_keys=False)


def big_placement(spec_text: str) -> Placement:
    spec = parse_spec(spec_text)
    sidecars, port = {}, 10000
    for s in spec.services:
        for inst in s.instances:
            sidecars[inst.name] = SidecarPorts(port, port + 1, port + 2, port + 3, port + 4)
            port += 5
    return Placement("127.0.0.1", sidecars)


def _rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def simulated(services: int, per_service: int, protocol: str) -> dict:
    result: dict = {"nodes": services * per_service, "protocol": protocol}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        text = big_spec(services, per_service)
        placement = big_placement(text)
        (data / "mesh.yaml").write_text(text)
        (data / "placement.json").write_text(placement.to_json())
        xds_port, admin_port = 31990, 31991
        cp = subprocess.Popen(
            [sys.executable, "-m", "greymesh.cli", "run-controlplane", "--data-dir", str(data),
             "--xds-port", str(xds_port), "--admin-port", str(admin_port)],
            stdout=open(data / "cp.log", "w"), stderr=subprocess.STDOUT,
        )
        admin = f"http://127.0.0.1:{admin_port}"
        try:
            wait_for(lambda: _probe(admin), 120, "control plane")
            result["cp_rss_kb_idle"] = _rss_kb(cp.pid)
            nodes = list(placement.sidecars)
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}") for _ in range(8)]
            sims = [SimulatedEnvoy(n, "", protocol, channel=channels[i % len(channels)]) for i, n in enumerate(nodes)]
            t0 = time.time()
            for sim in sims:
                await sim.start()
            # The control plane's own ACK records say when each node converged; polling
            # them slowly keeps the poll from competing with the pushes it measures.
            result["initial_sync_s"] = await asyncio.to_thread(_converged_at, admin, nodes, 300, 0.5) - t0
            result["cp_rss_kb_connected"] = _rss_kb(cp.pid)

            for label, new_text in (
                ("one_service_split", big_spec(services, per_service, split_v2=50)),
                ("all_route_timeouts", big_spec(services, per_service, timeout_ms=2500, split_v2=50)),
            ):
                t0 = time.time()
                changed = (await asyncio.to_thread(_post_apply, admin, new_text))["changed"]
                apply_s = time.time() - t0
                last = await asyncio.to_thread(_converged_at, admin, changed, 300, 0.1)
                result[label] = {"affected": len(changed), "apply_call_s": apply_s, "all_acked_s": last - t0}
            result["cp_rss_kb_after_changes"] = _rss_kb(cp.pid)
            for sim in sims:
                await sim.close()
            for ch in channels:
                await ch.close()
        finally:
            cp.terminate()
            cp.wait(10)
    return result


def _probe(admin: str) -> bool:
    try:
        urllib.request.urlopen(admin + "/healthz", timeout=1).close()
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--nodes-per-service", type=int, default=20)
    ap.add_argument("--changes", type=int, default=10)
    args = ap.parse_args()

    for api in ("delta", "sotw"):
        took = real_envoys(api, args.changes)
        print(f"real Envoys ({api}): change -> both affected sidecars ACKed, {len(took)} changes: "
              f"median {statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms", flush=True)
    for protocol in ("delta", "sotw"):
        res = asyncio.run(simulated(args.services, args.nodes_per_service, protocol))
        print(json.dumps(res, indent=2), flush=True)


if __name__ == "__main__":
    main()
