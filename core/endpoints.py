"""How a component finds another: the addresses of one mesh.

Locally, the runtime allocates every port when it places the mesh and records them in
the data dir's ``runtime.json``; every other component and command reads them through
:class:`Endpoints`.  A component is always *given* its peers' addresses (flags its
workload's argv carries, as Kubernetes would give service DNS names), and only the CLI
and the runtime look them up here.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from core.datadir import DataDir, write_atomic
from core.errors import NotRunning

HOST = "127.0.0.1"

# Keys of Endpoints.ports: "<component>.<role>", and "<instance>.<role>" for sidecars.
CP_XDS, CP_ADMIN = "controlplane.xds", "controlplane.admin"
OPA_HTTP, AUTHZ = "opa.http", "authz.grpc"
KAFKA, KAFKA_CONTROLLER = "kafka.client", "kafka.controller"
TAPS_GRPC, TAPS_HTTP, SINK_HTTP = "taps.grpc", "taps.http", "sink.http"
# Two tap services per host, both in the sidecars' access-log cluster: when one dies, the
# sidecars' next flush goes to the other (docs/faults.md).  OPA and the CLI use the first.
TAPS2_GRPC, TAPS2_HTTP = "taps-2.grpc", "taps-2.http"
TAP_SERVICES = (("taps", TAPS_GRPC, TAPS_HTTP), ("taps-2", TAPS2_GRPC, TAPS2_HTTP))  # (workload, ALS, HTTP)
ACTIONS_HTTP = "actions.http"  # the actions stage's API (the CLI's `actions` and `alerts` commands)
HOST_KEYS = (CP_XDS, CP_ADMIN, OPA_HTTP, AUTHZ, KAFKA, KAFKA_CONTROLLER, TAPS_GRPC, TAPS_HTTP, TAPS2_GRPC, TAPS2_HTTP,
             SINK_HTTP, ACTIONS_HTTP)
SIDECAR_ROLES = ("app", "inbound", "outbound", "ingress", "admin")

XdsApi = Literal["delta", "sotw"]


@dataclass
class Endpoints:
    """Where the parts of one mesh listen; persisted as the data dir's runtime.json."""

    ports: dict[str, int] = field(default_factory=dict)
    xds_api: XdsApi = "delta"
    entrypoint: str | None = None  # the mesh's front door, https://host:port/
    # The PEM a client of the front door trusts: the mesh CA's bundle, or the certificate
    # mesh.yaml gives the ingress (see entrypoint_tls).
    entrypoint_ca: str | None = None
    kafka: str | None = None  # bootstrap servers of an external Kafka; None: the local broker
    store: str | None = None  # tap store URL (audit.store.open_store); None: embedded chdb

    def kafka_bootstrap(self) -> str:
        return self.kafka or f"{HOST}:{self.ports[KAFKA]}"

    def url(self, key: str) -> str:
        """http://host:port of the component at ``key`` (one of the keys above)."""
        return f"http://{HOST}:{self.ports[key]}"

    @classmethod
    def load(cls, dd: DataDir) -> Endpoints:
        """What the data dir records; empty when no mesh was ever placed there."""
        if not dd.state.exists():
            return cls()
        raw = json.loads(dd.state.read_text())
        known = {k: raw[k] for k in ("ports", "xds_api", "entrypoint", "entrypoint_ca", "kafka", "store") if k in raw}
        return cls(**known)

    @classmethod
    def require(cls, dd: DataDir, key: str, what: str) -> Endpoints:
        """The endpoints of a mesh that has ``key``; NotRunning (saying to run `up`) otherwise."""
        endpoints = cls.load(dd)
        if key not in endpoints.ports:
            raise NotRunning(f"no mesh with {what} has been started in {dd.root}: run `greymesh up` first")
        return endpoints

    def save(self, dd: DataDir) -> None:
        write_atomic(dd.state, json.dumps(asdict(self), indent=2))


def entrypoint_tls(ca_file: str | Path) -> ssl.SSLContext:
    """A client's TLS context for the mesh's front door: verifies the ingress's certificate
    and host name against ``ca_file`` alone.  Partial chains are accepted, so the file may
    hold the ingress's own certificate (one mesh.yaml gives) as well as a root."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
