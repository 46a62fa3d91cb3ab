"""The runtime as data: a table of workloads, built from mesh.yaml, the placement and the
mesh's endpoints.

Every process greymesh runs is one :class:`Workload` row: its name, argv, extra
environment, the ports it listens on, how to tell it is ready, what must be ready
before it starts, its restart policy and what it belongs to.  The local supervisor
(greymesh/runtime/supervisor.py) runs the table; a Kubernetes renderer reads the same
rows.  Every component starts one way: ``python -m <module>`` with flags (its
``main(argv)``), except the external binaries (Kafka's JVM, OPA, Envoy).

The table is saved as the data dir's ``workloads.json``; the supervisor re-reads it when
it changes, so `up`, `scale` and a spec change only rewrite the table.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from controlplane.bootstrap import BOOTSTRAP_MODE, sidecar_bootstrap
from controlplane.meshspec import MeshSpec
from controlplane.placement import Placement
from core.datadir import DataDir, write_atomic
from core.endpoints import (
    ACTIONS_HTTP, AUTHZ, CP_ADMIN, CP_XDS, HOST, KAFKA, OPA_HTTP, SINK_HTTP, TAP_SERVICES, Endpoints,
)
from core.installs import opa_binary
from core.jsonhttp import HEALTH_PATH
from core.kafka import ACTIONS, ADMIN, SCORER, SINK, TAPS, mesh_auth, secret_path
from core.sidecar_auth import SidecarIdentity, SidecarKey, purpose_secret
from greymesh.runtime import kafka as broker
from greymesh.runtime import opa

ProbeKind = Literal["http", "tcp", "kafka", "none"]
Restart = Literal["always", "never"]
STORE_PASSWORD = "store.password"  # the secret holding a server store's password; the sink reads it


@dataclass(frozen=True)
class Probe:
    """How the supervisor tells a workload is ready: an HTTP 200 at ``target`` (a URL),
    a TCP connect to ``target`` (host:port), a ready Kafka broker at ``target``
    (bootstrap servers; asked as the principal whose password file is ``secret``, if any),
    or nothing to wait for."""

    kind: ProbeKind
    target: str = ""
    secret: str = ""  # a Kafka probe's credential file (core.kafka.KafkaAuth.from_secret), never its value


@dataclass(frozen=True)
class Workload:
    name: str  # unique: "controlplane", "envoy:orders-1", "app:orders-1", ...
    argv: tuple[str, ...]
    owner: str  # "infrastructure", "mesh", or "instance:<service>/<subset>/<instance>"
    ready: Probe = Probe("none")
    after: tuple[str, ...] = ()  # workloads that must be ready before this one starts
    ports: tuple[str, ...] = ()  # Endpoints.ports keys it listens on
    env: tuple[tuple[str, str], ...] = ()  # added to the supervisor's environment
    restart: Restart = "always"
    on_ready: tuple[str, ...] = ()  # argv run after every start, once ready; the workload counts
    # as ready only when it succeeded (OPA: restore the last pushed policy)
    stop_grace_s: float = 10.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class Options:
    """What `up` was asked for, beyond the spec."""

    load_rps: float = 5.0
    watch: bool = True
    auto_train_minutes: float | None = 20.0  # the scorer trains the first model after this much traffic


@dataclass
class Table:
    workloads: list[Workload] = field(default_factory=list)
    options: Options = field(default_factory=Options)  # what it was built with (scale rebuilds it alike)

    def names(self) -> list[str]:
        return [w.name for w in self.workloads]

    def get(self, name: str) -> Workload | None:
        return next((w for w in self.workloads if w.name == name), None)

    def save(self, dd: DataDir) -> None:
        write_atomic(dd.workloads, json.dumps({"options": asdict(self.options),
                                               "workloads": [asdict(w) for w in self.workloads]}, indent=2))

    @classmethod
    def load(cls, dd: DataDir) -> Table:
        if not dd.workloads.exists():
            return cls()
        doc = json.loads(dd.workloads.read_text())
        return cls([_workload(raw) for raw in doc["workloads"]], Options(**doc["options"]))

    def problems(self) -> list[str]:
        """What makes the table unrunnable: duplicate names, unknown or circular dependencies."""
        names = self.names()
        problems = [f"workload {n!r} appears more than once" for n in sorted({n for n in names if names.count(n) > 1})]
        known = set(names)
        for w in self.workloads:
            problems += [f"workload {w.name!r} waits for {d!r}, which is not in the table" for d in w.after
                         if d not in known]
        if not problems:
            try:
                start_order(self.workloads)
            except ValueError as exc:
                problems.append(str(exc))
        return problems


def _workload(raw: dict) -> Workload:
    return Workload(**(raw | {"argv": tuple(raw["argv"]), "ready": Probe(**raw["ready"]), "after": tuple(raw["after"]),
                              "ports": tuple(raw["ports"]), "env": tuple(tuple(e) for e in raw["env"]),
                              "on_ready": tuple(raw["on_ready"])}))


def start_order(workloads: Iterable[Workload]) -> list[Workload]:
    """Dependencies first (a stable topological order); ValueError on a cycle."""
    pending = {w.name: w for w in workloads}
    order: list[Workload] = []
    done: set[str] = set()
    while pending:
        ready = [w for w in pending.values() if all(d in done or d not in pending for d in w.after)]
        if not ready:
            raise ValueError(f"workloads wait for each other in a circle: {', '.join(sorted(pending))}")
        for w in ready:
            order.append(w)
            done.add(w.name)
            del pending[w.name]
    return order


# The tokens of greymesh's HTTP APIs (core/jsonhttp.py), besides the CLI's (DataDir.api_token):
# the scorer's, for the sink's /query, and OPA's, for the tap services' /logs.  The runtime
# issues them at `up` (api_token_files); each holder is given its file's path.
SCORER_TOKEN = "scorer.token"
DECISIONLOG_TOKEN = "decisionlog.token"
ACTIONS_TOKEN = "actions.token"  # the actions stage's, for the control plane's overrides and the sink's /query


def api_token_files(dd: DataDir) -> tuple[Path, ...]:
    """Every API token file of the mesh in ``dd``, for `up` to issue."""
    return dd.api_token, dd.secret(SCORER_TOKEN), dd.secret(DECISIONLOG_TOKEN), dd.secret(ACTIONS_TOKEN)


def _python(module: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *args)


def _kafka_secret(dd: DataDir, endpoints: Endpoints, principal: str) -> tuple[str, ...]:
    """A component's ``--kafka-secret``: the path of its principal's password, for the local
    broker (an external cluster given with ``--kafka`` gets no credential from greymesh)."""
    auth = mesh_auth(dd, endpoints, principal)
    return ("--kafka-secret", str(auth.secret)) if auth is not None else ()


def build(dd: DataDir, spec: MeshSpec, endpoints: Endpoints, placement: Placement, envoy: str,
          options: Options) -> Table:
    """The whole mesh as a table: infrastructure, the audit pipe, authorization, the control
    plane, every placed instance (app + sidecar) and the demo load."""
    p = endpoints.ports
    kafka = endpoints.kafka_bootstrap()
    rows: list[Workload] = []
    pipe_after: tuple[str, ...] = ()
    if endpoints.kafka is None:
        rows.append(Workload(
            "kafka", tuple(broker.broker_argv(dd.root / "kafka" / "server.properties")), "infrastructure",
            ready=Probe("kafka", kafka, secret=str(secret_path(dd, ADMIN))), ports=(KAFKA,), stop_grace_s=30.0,
            on_ready=_python("greymesh.runtime.kafka", "--setup", kafka, "--data-dir", str(dd.root))))
        pipe_after = ("kafka",)
    # Two tap services: the sidecars' access-log cluster lists both and health-checks them, so
    # a crashed one's streams move to the other (docs/faults.md).  Each has its own spool: the
    # first under the data dir, the second under <data dir>/taps-2.
    for name, als, http in TAP_SERVICES:
        state = dd.root if name == "taps" else dd.root / name
        rows.append(Workload(
            name, _python("tapstream.service", "--data-dir", str(state), "--grpc-port", str(p[als]),
                          "--http-port", str(p[http]), "--kafka", kafka, *_kafka_secret(dd, endpoints, TAPS),
                          "--opa-token-file", str(dd.secret(DECISIONLOG_TOKEN)), "--api-token-file", str(dd.api_token),
                          "--sidecar-key-file", str(dd.secret(purpose_secret("als")))),
            "infrastructure", ready=Probe("http", endpoints.url(http) + HEALTH_PATH), after=pipe_after,
            ports=(als, http)))
    rows.append(Workload(
        "sink", _python("audit.sink", "--data-dir", str(dd.root), "--kafka", kafka, *_kafka_secret(dd, endpoints, SINK),
                        "--http-port", str(p[SINK_HTTP]), "--api-token-file", str(dd.api_token),
                        "--scorer-token-file", str(dd.secret(SCORER_TOKEN)),
                        "--actions-token-file", str(dd.secret(ACTIONS_TOKEN)),
                        *(["--store", endpoints.store] if endpoints.store else []),
                        # The path of the server's password, never the password (core/credentials.py).
                        *(["--store-password-file", str(dd.secret(STORE_PASSWORD))]
                          if endpoints.store and dd.secret(STORE_PASSWORD).exists() else [])),
        "infrastructure", ready=Probe("http", endpoints.url(SINK_HTTP) + HEALTH_PATH), after=pipe_after,
        ports=(SINK_HTTP,), stop_grace_s=30.0))
    rows.append(Workload(
        "scorer", _python("ml.scorer", "--sink-url", endpoints.url(SINK_HTTP),
                          "--sink-token-file", str(dd.secret(SCORER_TOKEN)), "--kafka", kafka,
                          *_kafka_secret(dd, endpoints, SCORER),
                          "--registry", str(dd.models), "--stats", str(dd.scorer_stats),
                          *(["--auto-train-minutes", str(options.auto_train_minutes)]
                            if options.auto_train_minutes is not None else [])),
        "infrastructure", after=("sink",)))
    opa_url, opa_files = endpoints.url(OPA_HTTP), opa.files(dd)
    rows.append(Workload(
        "opa", tuple(opa.opa_argv(opa_binary(), f"{HOST}:{p[OPA_HTTP]}", opa_files)),
        "infrastructure", ready=Probe("http", opa_url + "/health"), after=("taps",), ports=(OPA_HTTP,),
        on_ready=_python("controlplane.policy", "--opa-url", opa_url, "--opa-token-file", str(opa_files.admin_token),
                         "--bundle", str(opa_files.policy_bundle), "--journal", str(dd.policy_journal))))
    rows.append(Workload(
        "authz", _python("controlplane.authz", "--port", str(p[AUTHZ]), "--opa-port", str(p[OPA_HTTP]),
                         "--opa-token-file", str(opa_files.bridge_token),
                         "--sidecar-key-file", str(dd.secret(purpose_secret("authz")))),
        "mesh", ready=Probe("tcp", f"{HOST}:{p[AUTHZ]}"), after=("opa",), ports=(AUTHZ,)))
    rows.append(Workload(
        "controlplane", _python("controlplane.daemon", "--data-dir", str(dd.root), "--xds-port", str(p[CP_XDS]),
                                "--admin-port", str(p[CP_ADMIN]), "--opa-port", str(p[OPA_HTTP]),
                                "--opa-token-file", str(opa_files.admin_token),
                                "--api-token-file", str(dd.api_token),
                                "--actions-token-file", str(dd.secret(ACTIONS_TOKEN)),
                                *(["--watch"] if options.watch else [])),
        "mesh", ready=Probe("http", endpoints.url(CP_ADMIN) + HEALTH_PATH), after=("opa",), ports=(CP_XDS, CP_ADMIN)))
    # The actions stage: anomalies -> alerts and guarded overrides; it scales through the CLI's
    # own `scale` (the runtime's one way to add instances), given as a command, not an import.
    scale_command = shlex.join([sys.executable, "-m", "greymesh.cli", "scale", "--data-dir", str(dd.root)])
    rows.append(Workload(
        "actions", _python("actions.service", "--data-dir", str(dd.root), "--kafka", kafka,
                           *_kafka_secret(dd, endpoints, ACTIONS),
                           "--controlplane-url", endpoints.url(CP_ADMIN), "--sink-url", endpoints.url(SINK_HTTP),
                           "--token-file", str(dd.secret(ACTIONS_TOKEN)), "--api-token-file", str(dd.api_token),
                           "--http-port", str(p[ACTIONS_HTTP]), "--scorer-stats", str(dd.scorer_stats),
                           "--scale-command", scale_command),
        "infrastructure", ready=Probe("http", endpoints.url(ACTIONS_HTTP) + HEALTH_PATH),
        after=("sink", "controlplane"), ports=(ACTIONS_HTTP,)))
    calls = {s.name: s.calls for s in spec.services}
    for name, placed in sorted(placement.sidecars.items()):
        owner = f"instance:{placed.service}/{placed.subset}/{name}"
        rows.append(Workload(
            f"app:{name}", _python("greymesh.demo.service", "--data-dir", str(dd.root), "--service", placed.service,
                                   "--instance", name, "--subset", placed.subset, "--port", str(placed.app),
                                   "--egress-port", str(placed.outbound),
                                   "--calls", ",".join(calls.get(placed.service, ()))),
            owner, ready=Probe("tcp", f"{HOST}:{placed.app}")))
        rows.append(Workload(
            f"envoy:{name}", (envoy, "-c", str(dd.bootstrap(name)), "--disable-hot-restart", "--concurrency", "1",
                              "--log-level", "warning", "--service-node", name, "--service-cluster", placed.service,
                              "--drain-time-s", "2"),
            owner, ready=Probe("http", f"http://{HOST}:{placed.admin}/ready"),
            after=("controlplane", "authz", *(t for t, _, _ in TAP_SERVICES), f"app:{name}")))
    if options.load_rps > 0 and endpoints.entrypoint:
        sidecars = tuple(w.name for w in rows if w.name.startswith("envoy:"))
        rows.append(Workload(
            "loadgen", _python("greymesh.demo.loadgen", "--url", endpoints.entrypoint, "--rps", str(options.load_rps),
                               "--tally", str(dd.loadgen_tally), "--ca", str(endpoints.entrypoint_ca)),
            "mesh", after=sidecars))
    return Table(rows, options)


def write_sidecar_files(dd: DataDir, placement: Placement, endpoints: Endpoints) -> None:
    """Each placed instance's Envoy bootstrap (static: everything else comes over xDS), holding
    that sidecar's xDS credential (0600), and the keys the tap collectors and the authz bridge
    check the sidecars' credentials with (core/sidecar_auth.py)."""
    key = SidecarKey.issue(dd)
    for purpose in ("als", "authz"):
        key.hand_out(dd, purpose)
    xds = key.tokens("xds")
    for name, placed in placement.sidecars.items():
        write_atomic(dd.bootstrap(name), json.dumps(sidecar_bootstrap(
            node_id=name, service=placed.service, admin_host=HOST, admin_port=placed.admin,
            xds_host=HOST, xds_port=endpoints.ports[CP_XDS], xds_api=endpoints.xds_api,
            xds_token=xds.mint(SidecarIdentity(name, placed.service)),
        ), indent=2), mode=BOOTSTRAP_MODE)
