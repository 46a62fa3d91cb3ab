"""The Aggregated Discovery Service: state-of-the-world and incremental (delta) ADS on grpc.aio.

One coroutine serves each Envoy stream.  Requests (read by a small pump task) and
"your node's snapshot changed" wake-ups from :class:`SnapshotCache` arrive on one
queue, so all of a stream's state is touched by a single task and needs no locks.
A wake-up re-evaluates the subscribed types in :data:`TYPE_ORDER` (CDS, EDS, SDS,
LDS, RDS: make-before-break) and sends only what changed for that stream, plus one
exception: Envoy rebuilds a changed cluster and keeps it warming until it receives
that cluster's ClusterLoadAssignment again, changed or not (otherwise it waits out
the 15 s initial fetch timeout), so every CDS response is followed by the EDS
resources of the clusters it carried.

Every stream must first prove which node it serves (:mod:`core.sidecar_auth`): a
stream without a valid credential, or whose first request names another node, is closed
before it is told anything, so it gets no resource, no secret, and no ACK of it is ever
recorded (rollout waits such as `greymesh ca rotate` count recorded ACKs only).

ACK/NACK follow the xDS protocol: a request answers the response whose nonce it
carries; ``error_detail`` makes it a NACK.  A NACK is recorded and not answered:
the rejected content is only sent again if something else calls for it (a newer
snapshot, or a SotW sidecar changing the names it asks for), so a sidecar that
keeps rejecting a version never loops.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds
from google.protobuf import any_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, TYPE_ORDER, WILDCARD_TYPES, Resource, Snapshot
from controlplane.xds.status import NodeStatus, XdsProtocol
from core.sidecar_auth import METADATA_KEY, Authenticator

log = logging.getLogger("greymesh.xds")

WILDCARD = "*"
_WAKE = object()  # queue token: the node's snapshot changed
_EOF = object()  # queue token: the request stream ended

Request = xds.DiscoveryRequest | xds.DeltaDiscoveryRequest
Response = xds.DiscoveryResponse | xds.DeltaDiscoveryResponse


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _any(r: Resource) -> any_pb2.Any:
    return any_pb2.Any(type_url=r.type_url, value=r.body)


def _eds_name(cluster: Resource) -> str:
    """The ClusterLoadAssignment an (EDS) cluster reads."""
    return cluster_pb2.Cluster.FromString(cluster.body).eds_cluster_config.service_name or cluster.name


def _envoy_version(node: base_pb2.Node) -> str | None:
    if node.HasField("user_agent_build_version"):
        v = node.user_agent_build_version.version
        return f"{v.major_number}.{v.minor_number}.{v.patch}"
    return node.user_agent_version or None


class _Subscription:
    """Which resources of one type a stream wants (xDS: "how the client specifies what to return")."""

    __slots__ = ("wildcard", "names", "_legacy")

    def __init__(self, wildcard: bool):
        self.wildcard = wildcard
        self.names: set[str] = set()
        # SotW only: an empty name list means "*" until the stream names something.
        self._legacy = wildcard

    def replace(self, names: Iterable[str]) -> None:
        """SotW: every request carries the full list."""
        wanted = set(names)
        if self._legacy and not wanted:
            return
        self._legacy = False
        self.wildcard = WILDCARD in wanted
        self.names = wanted - {WILDCARD}

    def change(self, subscribe: Iterable[str], unsubscribe: Iterable[str]) -> None:
        """Delta: requests carry additions and removals."""
        for name in subscribe:
            if name == WILDCARD:
                self.wildcard = True
            else:
                self.names.add(name)
        for name in unsubscribe:
            if name == WILDCARD:
                self.wildcard = False
            else:
                self.names.discard(name)

    def selects(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def select(self, resources: Mapping[str, Resource]) -> Mapping[str, Resource]:
        if self.wildcard:
            return resources
        return {n: resources[n] for n in sorted(self.names) if n in resources}

    @property
    def key(self) -> tuple[bool, frozenset[str]]:
        return self.wildcard, frozenset(self.names)


@dataclass(slots=True)
class _Sent:
    """A response awaiting its ACK/NACK."""

    version: str
    updates: dict[str, str] = field(default_factory=dict)  # delta: name -> resource version
    removed: tuple[str, ...] = ()  # delta


_Built = tuple[Response, _Sent, Sequence[Resource]]  # a response, its ACK record, the resources it carries


@dataclass(slots=True)
class _TypeState:
    sub: _Subscription
    pending: dict[str, _Sent] = field(default_factory=dict)  # by nonce


@dataclass(slots=True)
class _SotwState(_TypeState):
    last_nonce: str | None = None
    sent: tuple[str, tuple[bool, frozenset[str]]] | None = None  # (version, subscription) last sent


@dataclass(slots=True)
class _DeltaState(_TypeState):
    client: dict[str, str] = field(default_factory=dict)  # versions the client holds ("" = must resend)
    rejected: dict[str, str] = field(default_factory=dict)  # NACKed versions: never resent
    reply_if_empty: bool = False

    def expected(self) -> dict[str, str]:
        """What the client will hold once it accepts everything in flight."""
        have = dict(self.client)
        for sent in self.pending.values():
            have.update(sent.updates)
            for name in sent.removed:
                have.pop(name, None)
        return have

    def invalidate(self, name: str) -> None:
        """Forget what the client has of ``name`` so it is sent again (or reported removed)."""
        self._strip(name)
        self.client[name] = ""

    def drop(self, name: str) -> None:
        """The client unsubscribed ``name`` and discards it itself."""
        self._strip(name)
        self.client.pop(name, None)

    def _strip(self, name: str) -> None:
        for sent in self.pending.values():
            sent.updates.pop(name, None)


ReqT = TypeVar("ReqT", xds.DiscoveryRequest, xds.DeltaDiscoveryRequest)
StateT = TypeVar("StateT", bound=_TypeState)


class _Stream(ABC, Generic[ReqT, StateT]):
    """One Envoy's ADS stream; subclasses speak SotW or delta."""

    protocol: ClassVar[XdsProtocol]

    def __init__(self, cache: SnapshotCache, status: NodeStatus, context: grpc.aio.ServicerContext, node_id: str):
        self.cache, self.status, self.context, self.node_id = cache, status, context, node_id
        self.types: dict[str, StateT] = {}
        self._nonce = 0
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._woken = False
        self._unknown_types: set[str] = set()
        self._rebuilt: dict[str, Resource] = {}  # clusters sent before EDS was subscribed

    async def run(self, first: ReqT, requests: AsyncIterator[ReqT], envoy_version: str | None) -> None:
        reader = asyncio.create_task(_pump(requests, self._inbox))
        unwatch = self.cache.watch(self.node_id, self._wake)
        self.status.connected(self.node_id, self.protocol, envoy_version)
        log.info("node %s connected (%s ADS, Envoy %s)", self.node_id, self.protocol, envoy_version or "unknown")
        try:
            await self.handle(first)
            while (item := await self._inbox.get()) is not _EOF:
                if item is _WAKE:
                    self._woken = False
                    await self.push()
                else:
                    await self.handle(item)  # type: ignore[arg-type]  # the queue also carries tokens
        finally:
            # Bookkeeping first: grpc may cancel this task again while it awaits below.
            unwatch()
            self.status.disconnected(self.node_id)
            log.info("node %s disconnected (%s ADS)", self.node_id, self.protocol)
            reader.cancel()
            await asyncio.wait([reader])

    def _wake(self) -> None:
        if not self._woken:  # coalesce bursts of updates into one re-evaluation
            self._woken = True
            self._inbox.put_nowait(_WAKE)

    async def push(self) -> None:
        """Send every subscribed type what changed in the node's snapshot, in make-before-break order."""
        if (snapshot := self.cache.snapshot(self.node_id)) is None:
            return
        for type_url in TYPE_ORDER:
            if (state := self.types.get(type_url)) is not None:
                await self._respond(type_url, state, snapshot)

    async def handle(self, req: ReqT) -> None:
        if req.HasField("node") and req.node.id and req.node.id != self.node_id:
            # The stream was authenticated as self.node_id: it cannot become another node.
            log.warning("closing ADS stream of node %s: a request names node %r", self.node_id, req.node.id)
            await self.context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                     f"this stream is node {self.node_id!r}; it cannot switch to {req.node.id!r}")
        type_url = req.type_url
        if type_url not in TYPE_ORDER:
            if type_url not in self._unknown_types:
                self._unknown_types.add(type_url)
                log.warning("node %s: ignoring requests for unsupported type %r", self.node_id, type_url)
            return
        self.status.seen(self.node_id)
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = self._open(type_url, req)
            if type_url == ENDPOINT:  # e.g. a reconnect: CDS was answered first
                self._rewarm(state, list(self._rebuilt.values()))
                self._rebuilt.clear()
        elif not self._current(state, req):
            log.debug("node %s: ignoring %s request with stale nonce %r",
                      self.node_id, _short(type_url), req.response_nonce)
            return
        self._subscribe(state, req)
        self._resolve(type_url, state, req)
        if self._woken:  # a newer snapshot is queued: push() answers every type, in TYPE_ORDER
            return
        if (snapshot := self.cache.snapshot(self.node_id)) is None:
            return
        responded = await self._respond(type_url, state, snapshot)
        if responded and type_url == CLUSTER and (eds := self.types.get(ENDPOINT)) is not None:
            await self._respond(ENDPOINT, eds, snapshot)  # re-warm the clusters that response rebuilt

    def _resolve(self, type_url: str, state: StateT, req: ReqT) -> None:
        """Match an ACK/NACK to the response it answers; anything else is a subscription update."""
        sent = state.pending.pop(req.response_nonce, None) if req.response_nonce else None
        if sent is None:
            return
        if req.HasField("error_detail"):
            reason = req.error_detail.message
            log.warning("node %s NACKed %s version %s: %s", self.node_id, _short(type_url), sent.version, reason)
            self.status.nacked(self.node_id, type_url, sent.version, reason)
            self._rejected(state, sent)
        else:
            self._accepted(type_url, state, sent)

    async def _respond(self, type_url: str, state: StateT, snapshot: Snapshot) -> bool:
        """Send the type what it needs, if anything; True if a response went out."""
        if (built := self._build(type_url, state, snapshot)) is None:
            return False
        msg, sent, carried = built
        self._nonce += 1
        msg.nonce = nonce = str(self._nonce)
        self._track(state, nonce, sent)
        self.status.sent(self.node_id, type_url, sent.version, nonce)
        log.debug("push %s %s to %s (nonce %s, %d resources)",
                  _short(type_url), sent.version, self.node_id, nonce, len(msg.resources))
        await self.context.write(msg)
        if type_url == CLUSTER:
            self._clusters_sent(carried)
        return True

    def _clusters_sent(self, clusters: Sequence[Resource]) -> None:
        """Envoy rebuilds the clusters it receives and keeps them warming until their endpoints arrive again."""
        if (eds := self.types.get(ENDPOINT)) is not None:
            self._rewarm(eds, clusters)
        else:
            self._rebuilt.update((c.name, c) for c in clusters)

    # --- protocol specifics ------------------------------------------------------

    @abstractmethod
    def _open(self, type_url: str, req: ReqT) -> StateT: ...

    @abstractmethod
    def _current(self, state: StateT, req: ReqT) -> bool:
        """Whether a request for an already-open type is to be processed at all."""

    @abstractmethod
    def _subscribe(self, state: StateT, req: ReqT) -> None: ...

    @abstractmethod
    def _build(self, type_url: str, state: StateT, snapshot: Snapshot) -> _Built | None:
        """The response this type needs now (and the resources it carries), or None if the client is up to date."""

    @abstractmethod
    def _rewarm(self, eds: StateT, clusters: Sequence[Resource]) -> None:
        """Make the next EDS evaluation resend the load assignments of ``clusters``."""

    @abstractmethod
    def _track(self, state: StateT, nonce: str, sent: _Sent) -> None: ...

    @abstractmethod
    def _accepted(self, type_url: str, state: StateT, sent: _Sent) -> None: ...

    @abstractmethod
    def _rejected(self, state: StateT, sent: _Sent) -> None: ...


class _SotwStream(_Stream[xds.DiscoveryRequest, _SotwState]):
    """State of the world: a response carries every selected resource of its type."""

    protocol = "sotw"

    def _open(self, type_url: str, req: xds.DiscoveryRequest) -> _SotwState:
        return _SotwState(_Subscription(type_url in WILDCARD_TYPES))

    def _current(self, state: _SotwState, req: xds.DiscoveryRequest) -> bool:
        # A request answering an older response was written before the client saw the
        # newer one; the protocol says to ignore it (go-control-plane does the same).
        return state.last_nonce is None or req.response_nonce == state.last_nonce

    def _subscribe(self, state: _SotwState, req: xds.DiscoveryRequest) -> None:
        state.sub.replace(req.resource_names)

    def _build(self, type_url: str, state: _SotwState, snapshot: Snapshot) -> _Built | None:
        version = snapshot.version(type_url)
        key = (version, state.sub.key)
        if key == state.sent:  # same content for the same names: nothing to say, even after a NACK
            return None
        state.sent = key
        selected = list(state.sub.select(snapshot.resources(type_url)).values())
        msg = xds.DiscoveryResponse(version_info=version, type_url=type_url, resources=[_any(r) for r in selected])
        return msg, _Sent(version), selected

    def _rewarm(self, eds: _SotwState, clusters: Sequence[Resource]) -> None:
        eds.sent = None  # a SotW EDS response carries all subscribed names anyway

    def _track(self, state: _SotwState, nonce: str, sent: _Sent) -> None:
        state.pending = {nonce: sent}  # a newer response makes older nonces stale
        state.last_nonce = nonce

    def _accepted(self, type_url: str, state: _SotwState, sent: _Sent) -> None:
        # An ACK that asks for other names accepted a version without all it needs:
        # the node holds the version once it ACKs the answer to its new names.
        if state.sent == (sent.version, state.sub.key):
            self.status.acked(self.node_id, type_url, sent.version)

    def _rejected(self, state: _SotwState, sent: _Sent) -> None:
        pass  # state.sent still names the rejected content, so it is not sent again


class _DeltaStream(_Stream[xds.DeltaDiscoveryRequest, _DeltaState]):
    """Incremental: responses carry only changed resources plus the names removed."""

    protocol = "delta"

    def _open(self, type_url: str, req: xds.DeltaDiscoveryRequest) -> _DeltaState:
        wildcard = type_url in WILDCARD_TYPES and not req.resource_names_subscribe
        return _DeltaState(
            _Subscription(wildcard),
            client=dict(req.initial_resource_versions),
            # A fresh Envoy waits for its first CDS/LDS response to finish initialising,
            # even if there is nothing to send; a reconnecting one already has its config.
            reply_if_empty=wildcard and not req.initial_resource_versions,
        )

    def _current(self, state: _DeltaState, req: xds.DeltaDiscoveryRequest) -> bool:
        return True  # delta must honour subscription changes even with a stale nonce

    def _subscribe(self, state: _DeltaState, req: xds.DeltaDiscoveryRequest) -> None:
        state.sub.change(req.resource_names_subscribe, req.resource_names_unsubscribe)
        for name in req.resource_names_subscribe:
            # An explicit (re)subscription must be answered even if the client should
            # have it already, unless it declared that version on connect.
            if name != WILDCARD and name not in req.initial_resource_versions:
                state.invalidate(name)
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD:
                continue
            if state.sub.wildcard:
                state.invalidate(name)  # still covered by "*": tell the client whether it exists
            else:
                state.drop(name)

    def _build(self, type_url: str, state: _DeltaState, snapshot: Snapshot) -> _Built | None:
        version = snapshot.version(type_url)
        resources = snapshot.resources(type_url)
        have = state.expected()
        stale = [r for n, r in state.sub.select(resources).items() if have.get(n) != r.version]
        updates = [r for r in stale if state.rejected.get(r.name) != r.version]
        removed = tuple(sorted(n for n in have if n not in resources and state.sub.selects(n)))
        if not updates and not removed and not state.reply_if_empty:
            if not stale and not state.pending:
                # The client holds exactly this version (ACKed piecemeal, or declared on reconnect).
                self.status.acked(self.node_id, type_url, version)
            return None
        state.reply_if_empty = False
        for r in updates:
            state.rejected.pop(r.name, None)
        msg = xds.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            resources=[xds.Resource(name=r.name, version=r.version, resource=_any(r)) for r in updates],
            removed_resources=removed,
        )
        return msg, _Sent(version, {r.name: r.version for r in updates}, removed), updates

    def _rewarm(self, eds: _DeltaState, clusters: Sequence[Resource]) -> None:
        have = eds.expected()
        for cluster in clusters:
            if (name := _eds_name(cluster)) in have:
                eds.invalidate(name)

    def _track(self, state: _DeltaState, nonce: str, sent: _Sent) -> None:
        state.pending[nonce] = sent  # every delta response is ACKed on its own

    def _accepted(self, type_url: str, state: _DeltaState, sent: _Sent) -> None:
        # Status is updated by the re-evaluation that follows, once the client holds a whole version.
        state.client.update(sent.updates)
        for name in sent.removed:
            state.client.pop(name, None)

    def _rejected(self, state: _DeltaState, sent: _Sent) -> None:
        state.rejected.update(sent.updates)  # the client keeps its old versions


async def _pump(requests: AsyncIterator[Request], inbox: asyncio.Queue[object]) -> None:
    """Move requests onto the stream's queue; a broken stream just ends it."""
    try:
        async for req in requests:
            inbox.put_nowait(req)
    except Exception as exc:  # the transport's errors when a client vanishes
        log.debug("ADS request stream broke: %r", exc)
    finally:
        inbox.put_nowait(_EOF)


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Serves every node's snapshot from ``cache`` to the sidecar ``authenticator`` proves is
    that node, reporting delivery to ``status``."""

    def __init__(self, cache: SnapshotCache, status: NodeStatus, authenticator: Authenticator):
        self.cache, self.status, self.authenticator = cache, status, authenticator

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[xds.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(_SotwStream, request_iterator, context)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[xds.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(_DeltaStream, request_iterator, context)

    async def _serve(
        self, kind: type[_Stream[Any, Any]], requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        # Checked before reading a request: an impostor is told nothing, not even which nodes exist.
        who = self.authenticator.authenticate(context.invocation_metadata())
        if who is None:
            log.warning("refused %s ADS stream from %s: no valid sidecar credential", kind.protocol, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"a sidecar credential is required ({METADATA_KEY}: Bearer <token> metadata, "
                                "from the sidecar's bootstrap)")
        first = await anext(aiter(requests), None)
        if first is None:
            return
        if not first.node.id:
            log.warning("closing %s ADS stream from %s: first request has no node.id", kind.protocol, context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
        if first.node.id != who.node:
            log.warning("refused %s ADS stream from %s: credential of node %s, request as node %r",
                        kind.protocol, context.peer(), who.node, first.node.id)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the credential is node {who.node!r}'s; it cannot ask as {first.node.id!r}")
        # Only the first request is guaranteed to carry the node; later ones may omit it.
        stream = kind(self.cache, self.status, context, first.node.id)
        await stream.run(first, requests, _envoy_version(first.node))


@dataclass(frozen=True)
class AdsServer:
    server: grpc.aio.Server
    port: int

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


# Never share a port with another control plane by accident, and never kick a
# sidecar off for sending keepalive pings on its otherwise idle ADS stream.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.http2.max_ping_strikes", 0)]


async def start_ads_server(
    cache: SnapshotCache, status: NodeStatus, host: str, port: int, authenticator: Authenticator
) -> AdsServer:
    """Serve ADS on ``host:port`` (port 0 picks a free one; see ``AdsServer.port``) to the sidecars
    ``authenticator`` accepts (in a mesh: ``SidecarKey.tokens("xds")``), each its own node only."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    service = AggregatedDiscoveryService(cache, status, authenticator)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(service, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    await server.start()
    return AdsServer(server, bound)
