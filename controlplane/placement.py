"""Where each instance and its sidecar listen: the discovery half of the config.

The mesh spec is intent; a placement says where workloads actually are, the way
Kubernetes Endpoints complement a Service.  The local runtime allocates one and
writes it as JSON next to the spec; a Kubernetes deployment would derive it from
pod addresses instead.  Either way the translator only reads this typed view.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SidecarPorts:
    """Ports of one instance: its application and its sidecar's listeners."""

    app: int  # the workload itself (plain HTTP, reached only by its own sidecar)
    inbound: int  # sidecar listener other sidecars call
    outbound: int  # sidecar listener the workload calls other services through
    ingress: int  # sidecar listener for traffic from outside the mesh (entrypoint only)
    admin: int  # Envoy admin API (loopback)


@dataclass(frozen=True)
class Placement:
    host: str
    sidecars: Mapping[str, SidecarPorts]  # by instance name (= sidecar node id)
    authz: int | None = None  # the host's authorization bridge (ext_authz gRPC); None: no authz
    taps: int | None = None  # the host's tap collector (gRPC access log service); None: no taps

    def ports(self, instance: str) -> SidecarPorts:
        try:
            return self.sidecars[instance]
        except KeyError:
            raise KeyError(f"instance {instance!r} has no placement; re-run `greymesh up` to place it") from None

    def to_json(self) -> str:
        return json.dumps(
            {"host": self.host, "authz": self.authz, "taps": self.taps,
             "sidecars": {n: asdict(p) for n, p in sorted(self.sidecars.items())}},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Placement:
        raw = json.loads(text)
        return cls(host=raw["host"], sidecars={n: SidecarPorts(**p) for n, p in raw["sidecars"].items()},
                   authz=raw.get("authz"), taps=raw.get("taps"))

    @classmethod
    def load(cls, path: Path) -> Placement:
        return cls.from_json(path.read_text(encoding="utf-8"))
