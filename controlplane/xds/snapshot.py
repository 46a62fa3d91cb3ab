"""Immutable per-node snapshots of Envoy resources, versioned by content.

Versions are content hashes, so recomputing the same config (for example after a
control-plane restart) yields the same versions and causes no push, and a node
whose resources did not change keeps its snapshot version.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break order for ADS pushes: clusters before the endpoints that fill
# them, listeners before the routes they name (Envoy's xDS ordering guidance).
# Secrets are named by clusters (upstream TLS) and listeners (downstream TLS), and
# Envoy asks for a name once something references it, so a new name always follows
# its parent.  A changed secret pushed with other changes goes after the clusters
# and endpoints but before listeners and routes, so a cluster's certificate and
# trust bundle are current before traffic is routed to it (go-control-plane sends
# secrets last).  See docs/identity.md.
TYPE_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)

# Types Envoy subscribes to as a wildcard (all resources); the others by name.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Resource:
    """One serialized Envoy resource (the bytes of its proto message)."""

    name: str
    type_url: str
    body: bytes

    @functools.cached_property
    def version(self) -> str:
        return _digest([self.body])


class Snapshot:
    """All resources of one node, by type URL and name; immutable."""

    def __init__(self, resources: Iterable[Resource]):
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in TYPE_ORDER}
        for r in resources:
            if r.type_url not in by_type:
                raise ValueError(f"unsupported resource type {r.type_url!r}")
            if r.name in by_type[r.type_url]:
                raise ValueError(f"duplicate {r.type_url.rsplit('.', 1)[-1]} {r.name!r}")
            by_type[r.type_url][r.name] = r
        self._by_type = {t: MappingProxyType(dict(sorted(m.items()))) for t, m in by_type.items()}
        self._versions = {
            t: _digest(f"{n}={r.version}".encode() for n, r in m.items()) for t, m in self._by_type.items()
        }

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        return self._by_type[type_url]

    def version(self, type_url: str) -> str:
        """Content version of one type: changes iff any resource of it changes."""
        return self._versions[type_url]

    @property
    def version_key(self) -> str:
        """One string naming the whole snapshot's content."""
        return _digest(v.encode() for v in self._versions.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.version_key == self.version_key

    def __hash__(self) -> int:
        return hash(self.version_key)
