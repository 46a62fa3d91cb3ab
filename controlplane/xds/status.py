"""What every sidecar was sent, ACKed and NACKed: the control plane's view of rollout.

The ADS server reports each stream event here; ``greymesh status`` and rollout
measurements read it.  A node is *in sync* when, for every resource type, the
version it last ACKed is its current snapshot's version for that type.  A type
without resources also counts as in sync if the node never subscribed to it:
Envoy only asks for EDS/RDS names its clusters/listeners reference, so a sidecar
that calls nothing never subscribes to EDS and would otherwise never converge.

"ACKed version V" means the sidecar holds all it asked for at V: a SotW ACK that
already asks for further names does not count yet, and a delta sidecar, which ACKs
resources piecemeal (or declares them on reconnect), counts once it holds exactly
V's resources.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from controlplane.xds.snapshot import TYPE_ORDER, Snapshot

XdsProtocol = Literal["sotw", "delta"]


@dataclass(slots=True)
class Nack:
    version: str  # the version the sidecar rejected
    message: str  # Envoy's error_detail.message
    at: float


@dataclass(slots=True)
class TypeStatus:
    sent_version: str | None = None
    sent_nonce: str | None = None
    sent_at: float | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    nack: Nack | None = None  # stays until a different version is ACKed


@dataclass(slots=True)
class NodeRecord:
    connected: int = 0  # open streams; more than one while a reconnect overlaps
    protocol: XdsProtocol | None = None
    envoy_version: str | None = None
    connected_since: float | None = None
    last_seen: float | None = None
    pushes: int = 0
    types: dict[str, TypeStatus] = field(default_factory=dict)


class NodeStatus:
    """Per-node delivery records, keyed by node id.  Timestamps are wall-clock seconds."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}

    # --- written by the ADS server -----------------------------------------------

    def connected(self, node_id: str, protocol: XdsProtocol, envoy_version: str | None) -> None:
        rec = self._nodes.setdefault(node_id, NodeRecord())
        now = self._clock()
        if rec.connected == 0:
            rec.connected_since = now
        rec.connected += 1
        rec.protocol = protocol
        rec.envoy_version = envoy_version
        rec.last_seen = now

    def disconnected(self, node_id: str) -> None:
        rec = self._nodes[node_id]
        rec.connected -= 1
        rec.last_seen = self._clock()
        if rec.connected == 0:
            rec.connected_since = None

    def seen(self, node_id: str) -> None:
        self._nodes[node_id].last_seen = self._clock()

    def sent(self, node_id: str, type_url: str, version: str, nonce: str) -> None:
        rec = self._nodes[node_id]
        rec.pushes += 1
        ts = rec.types.setdefault(type_url, TypeStatus())
        ts.sent_version, ts.sent_nonce, ts.sent_at = version, nonce, self._clock()

    def acked(self, node_id: str, type_url: str, version: str) -> None:
        """Record that the node holds ``version``; idempotent, so ``acked_at`` is when it first did."""
        ts = self._nodes[node_id].types.setdefault(type_url, TypeStatus())
        if ts.nack is not None and ts.nack.version != version:
            ts.nack = None
        if ts.acked_version != version:
            ts.acked_version, ts.acked_at = version, self._clock()

    def nacked(self, node_id: str, type_url: str, version: str, message: str) -> None:
        ts = self._nodes[node_id].types.setdefault(type_url, TypeStatus())
        ts.nack = Nack(version, message, self._clock())

    def forget(self, node_id: str) -> None:
        """Drop a node that is gone for good (its instance was removed), unless still connected."""
        if (rec := self._nodes.get(node_id)) is not None and rec.connected == 0:
            del self._nodes[node_id]

    # --- read by everyone else ---------------------------------------------------

    def node(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    def synced_at(self, node_id: str, snapshot: Snapshot) -> float | None:
        """When the node finished ACKing ``snapshot`` (latest ACK time), or None if it has not."""
        rec = self._nodes.get(node_id)
        if rec is None:
            return None
        latest = 0.0
        for type_url in TYPE_ORDER:
            ts = rec.types.get(type_url)
            if ts is not None and ts.acked_version == snapshot.version(type_url):
                latest = max(latest, ts.acked_at or 0.0)
            elif snapshot.resources(type_url) or (ts is not None and ts.sent_version is not None):
                return None
        return latest

    def lagging(self, snapshots: Mapping[str, Snapshot]) -> list[str]:
        """Node ids that have not ACKed their current snapshot yet."""
        return [n for n, snap in snapshots.items() if self.synced_at(n, snap) is None]

    def acked_everywhere(self, snapshots: Mapping[str, Snapshot]) -> bool:
        return not self.lagging(snapshots)

    def status(self, snapshots: Mapping[str, Snapshot] | None = None) -> dict[str, dict[str, Any]]:
        """JSON-ready records by node id; with ``snapshots``, each also says whether it is ``in_sync``."""
        out: dict[str, dict[str, Any]] = {}
        for node_id, rec in sorted(self._nodes.items()):
            out[node_id] = asdict(rec)
            if snapshots is not None:
                snap = snapshots.get(node_id)
                out[node_id]["in_sync"] = snap is not None and self.synced_at(node_id, snap) is not None
        return out
