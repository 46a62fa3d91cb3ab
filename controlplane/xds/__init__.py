"""xDS serving: per-node snapshots and the Aggregated Discovery Service (SotW and delta).

Modelled on go-control-plane: the translator produces a complete :class:`Snapshot`
per node, :class:`SnapshotCache` stores them and wakes the streams of nodes whose
snapshot changed, and the ADS servicer turns snapshots into DiscoveryResponses,
tracking what every sidecar ACKed or NACKed.
"""

from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    TYPE_ORDER,
    Resource,
    Snapshot,
)

__all__ = ["CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "TYPE_ORDER", "Resource", "Snapshot"]
