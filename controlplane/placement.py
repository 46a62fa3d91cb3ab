"""Which instances exist and where each one and its sidecar listen: the discovery half of the config.

The mesh spec is intent; a placement says where workloads actually are, the way
Kubernetes Endpoints complement a Service.  The local runtime allocates one and
writes it as JSON next to the spec; a Kubernetes deployment would derive it from
pod addresses instead.  Either way the translator only reads this typed view.

The spec's ``instances`` are what `greymesh up` places; `greymesh scale` places more
(or fewer), so the placement, not the spec, is the list of instances that exist
(:func:`placed_spec`).  An instance is *serving* once its app and sidecar are ready:
only serving instances are callers' endpoints, so a new one gets traffic only when it
can answer, and one being removed stops getting traffic before it stops.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from controlplane.meshspec import Instance, MeshSpec


@dataclass(frozen=True)
class SidecarPorts:
    """Ports of one instance: its application and its sidecar's listeners."""

    app: int  # the workload itself (plain HTTP, reached only by its own sidecar)
    inbound: int  # sidecar listener other sidecars call
    outbound: int  # sidecar listener the workload calls other services through
    ingress: int  # sidecar listener for traffic from outside the mesh (entrypoint only)
    admin: int  # Envoy admin API (loopback)
    service: str = ""  # the service and subset it is an instance of ("": as the spec says)
    subset: str = "default"
    serving: bool = True  # an endpoint of the callers' clusters (False while it starts or drains)


@dataclass(frozen=True)
class Placement:
    host: str
    sidecars: Mapping[str, SidecarPorts]  # by instance name (= sidecar node id)
    authz: int | None = None  # the host's authorization bridge (ext_authz gRPC); None: no authz
    taps: tuple[int, ...] = ()  # the host's tap collectors (gRPC access log service); (): no taps

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
                   authz=raw.get("authz"), taps=_ports(raw.get("taps")))

    @classmethod
    def load(cls, path: Path) -> Placement:
        return cls.from_json(path.read_text(encoding="utf-8"))


def _ports(raw: int | list[int] | None) -> tuple[int, ...]:
    """A placement's collectors: a list, or (written before there were several) one port or null."""
    if raw is None:
        return ()
    return (raw,) if isinstance(raw, int) else tuple(raw)


def placed_spec(spec: MeshSpec, placement: Placement) -> tuple[MeshSpec, list[str]]:
    """The spec with each service's instances as the placement has them, and the problems.

    A placement written before instances named their service lists only the spec's own:
    those keep the spec's list.  Problems: a spec instance with no placement, or a placed
    instance of a subset the service does not have."""
    problems: list[str] = []
    placed = {n: p for n, p in placement.sidecars.items() if p.service}
    services = []
    for svc in spec.services:
        missing = [i.name for i in svc.instances if i.name not in placement.sidecars]
        if missing:
            problems.append(f"instance(s) {', '.join(missing)} are new and have no sidecar yet: "
                            "run `greymesh up <file>` to place and start them")
        if not placed:
            services.append(svc)
            continue
        mine = sorted((n, p) for n, p in placed.items() if p.service == svc.name)
        unknown = sorted(n for n, p in mine if p.subset not in svc.subsets)
        if unknown:
            problems.append(f"services.{svc.name}: placed instance(s) {', '.join(unknown)} are of a subset the spec "
                            f"does not have ({', '.join(svc.subsets)}): scale the subsets the spec names")
        services.append(replace(svc, instances=tuple(Instance(n, p.subset) for n, p in mine)) if mine else svc)
    return replace(spec, services=tuple(services)), problems
