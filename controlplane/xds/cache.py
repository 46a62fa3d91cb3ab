"""The current snapshot of every node, and wake-ups for the streams serving it.

Like go-control-plane's snapshot cache, but asyncio-native: every method must be
called on the event loop that runs the ADS server, so no locking is needed.
Setting a snapshot equal to the node's current one is a no-op that wakes nobody;
that is what keeps unaffected sidecars from being pushed to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from controlplane.xds.snapshot import Snapshot

Notify = Callable[[], None]


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Notify]] = {}

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> bool:
        """Store ``snapshot`` for ``node_id``; False, and no wake-up, if it equals the current one."""
        if self._snapshots.get(node_id) == snapshot:
            return False
        self._snapshots[node_id] = snapshot
        for notify in tuple(self._watchers.get(node_id, ())):
            notify()
        return True

    def snapshot(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def snapshots(self) -> Mapping[str, Snapshot]:
        """Read-only live view of all snapshots by node id."""
        return MappingProxyType(self._snapshots)

    def node_ids(self) -> list[str]:
        return list(self._snapshots)

    def clear(self, node_id: str) -> None:
        """Forget a node's snapshot.  Its streams keep what they have and get nothing new."""
        self._snapshots.pop(node_id, None)

    def watch(self, node_id: str, notify: Notify) -> Callable[[], None]:
        """Call ``notify()`` whenever ``node_id``'s snapshot changes (or is first set).

        Returns the function that stops watching.  ``notify`` runs synchronously
        inside :meth:`set_snapshot`, so it must only schedule work (e.g. put a token
        on the stream's queue).  Only the node's own watchers run, so an update of
        every node costs O(nodes), not O(nodes x streams).
        """
        watchers = self._watchers.setdefault(node_id, set())
        watchers.add(notify)

        def cancel() -> None:
            watchers.discard(notify)
            if not watchers and self._watchers.get(node_id) is watchers:
                del self._watchers[node_id]

        return cancel
