"""The declarative mesh spec (``mesh.yaml``): typed model, loader and validator.

The spec says *what* the mesh is: services, their instances, who calls whom, and the
traffic policy callers apply (weighted splits between subsets, timeouts, retries,
circuit breakers, outlier detection, fault injection).  *Where* instances run
(addresses and ports) is not part of the spec: the runtime supplies it as a
:class:`controlplane.placement.Placement`, the way Kubernetes Endpoints complement a
Service.

Loading never half-applies: :func:`load_spec` either returns a complete, validated
:class:`MeshSpec` or raises :class:`SpecError` listing every problem with its file,
key path, line and a hint, so a rejected file leaves the running config in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPEC_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One reason a spec was refused."""

    path: str  # dotted key path, e.g. "services.payments.routes[0].split.v3"
    message: str  # what is wrong and what to do about it
    line: int | None = None  # 1-based line in the YAML file, when known

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}"


class SpecError(ValueError):
    """A mesh spec was refused; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


@dataclass(frozen=True)
class Instance:
    """One workload instance of a service; it gets its own sidecar (node id = name)."""

    name: str
    subset: str = "default"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2
    retry_on: tuple[str, ...] = ("5xx", "reset", "connect-failure")
    per_try_timeout_s: float | None = None


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class FaultDelay:
    percent: float
    fixed_delay_s: float


@dataclass(frozen=True)
class FaultAbort:
    percent: float
    http_status: int


@dataclass(frozen=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True)
class RouteMatch:
    """Exactly one of prefix, path or regex is set; regex is RE2 syntax (Envoy's)."""

    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # exact-match (name, value) pairs


@dataclass(frozen=True)
class Route:
    """A route callers of the owning service apply, in order; first match wins."""

    name: str
    match: RouteMatch
    split: tuple[tuple[str, int], ...]  # (subset, weight) pairs; weights sum to 100
    timeout_s: float | None = None
    retries: RetryPolicy | None = None
    fault: Fault | None = None


@dataclass(frozen=True)
class Service:
    name: str
    instances: tuple[Instance, ...]
    calls: tuple[str, ...] = ()  # services this one may call (its sidecar gets routes only for these)
    routes: tuple[Route, ...] = ()  # empty: one catch-all route spread over subsets by instance count
    connect_timeout_s: float = 1.0
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection | None = None

    @property
    def subsets(self) -> tuple[str, ...]:
        """Subsets that have at least one instance, in first-seen order."""
        return tuple(dict.fromkeys(i.subset for i in self.instances))


@dataclass(frozen=True)
class MeshSpec:
    name: str
    services: tuple[Service, ...]
    entrypoint: str  # the service whose ingress is the mesh's front door

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def callers_of(self, name: str) -> tuple[Service, ...]:
        return tuple(s for s in self.services if name in s.calls)


def load_spec(path: str | Path) -> MeshSpec:
    """Read and validate a mesh.yaml file; raise SpecError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [Problem("", f"cannot read file: {exc.strerror}")]) from exc
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<mesh.yaml>") -> MeshSpec:
    """Validate YAML text as a mesh spec; raise SpecError naming every problem."""
    raise NotImplementedError  # filled in by the validator
