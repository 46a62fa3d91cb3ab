"""A simulated Envoy: speaks SotW or delta ADS the way a real sidecar does.

It subscribes to CDS and LDS as wildcards, then to EDS for the EDS clusters, to
RDS for the route configurations its listeners name, and to SDS for the secrets
their TLS transport sockets name (all parsed from the real protos), keeps what it
accepted, and ACKs every response, or NACKs those its ``nack`` callback gives a
reason for.  Used by the ADS tests and by the 1,000-sidecar
benchmark, so it stores only light records of what it received.

Times (``Received.at``, ``acked``) are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds
from envoy.type.v3 import semantic_version_pb2
from google.rpc import code_pb2, status_pb2

from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    TYPE_ORDER,
    WILDCARD_TYPES,
    Snapshot,
)
from core.sidecar_auth import METADATA_KEY, SCHEME

_HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_TLS_CONTEXTS = {
    "type.googleapis.com/" + m.DESCRIPTOR.full_name: m
    for m in (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext)
}
# The types the sidecar subscribes to by name, and the types whose resources name them.
_PARENTS = {ENDPOINT: (CLUSTER,), ROUTE: (LISTENER,), SECRET: (CLUSTER, LISTENER)}


@dataclass(frozen=True, slots=True)
class Received:
    """One response, as the sidecar saw it (before deciding to ACK or NACK)."""

    type_url: str
    version: str  # version_info (SotW) or system_version_info (delta)
    nonce: str
    names: tuple[str, ...]  # resources carried
    removed: tuple[str, ...]  # delta only
    at: float


NackPolicy = Callable[[Received], str | None]  # returns the error message to NACK with, or None to ACK


def expected_acks(snapshot: Snapshot) -> dict[str, str]:
    """The versions a sidecar ends up ACKing for ``snapshot``: EDS/RDS only if it has any of them."""
    return {t: snapshot.version(t) for t in TYPE_ORDER if t in WILDCARD_TYPES or snapshot.resources(t)}


class SimulatedEnvoy:
    """One sidecar's ADS client.  Create it inside the event loop; ``start()``/``close()`` or
    ``async with``.  Pass ``channel`` to share one connection among many simulated sidecars.
    ``token`` is the sidecar's xDS credential, sent as Envoy sends it (initial metadata,
    core/sidecar_auth.py); None sends none, as an impostor would."""

    def __init__(
        self,
        node_id: str,
        target: str,
        protocol: Literal["delta", "sotw"] = "delta",
        *,
        nack: NackPolicy | None = None,
        channel: grpc.aio.Channel | None = None,
        token: str | None = None,
    ):
        self.node_id, self.protocol, self.nack = node_id, protocol, nack
        self._metadata = ((METADATA_KEY, SCHEME + token),) if token is not None else None
        self._own_channel = channel is None
        self._channel = grpc.aio.insecure_channel(target) if channel is None else channel
        self.received: list[Received] = []
        self.acked: dict[str, tuple[str, float]] = {}  # type -> (version, when)
        self.resources: dict[str, dict[str, bytes]] = {t: {} for t in TYPE_ORDER}  # what it holds, by name
        self.stream_error: Exception | None = None  # why the last stream ended, unless disconnect() ended it
        self._versions: dict[str, dict[str, str]] = {t: {} for t in self.resources}  # delta resource versions
        self._subscribed: dict[str, set[str]] = {t: set() for t in _PARENTS}
        # What each held cluster/listener needs: parent type -> name -> child type -> names.
        self._needs: dict[str, dict[str, dict[str, set[str]]]] = {CLUSTER: {}, LISTENER: {}}
        self._nonces: dict[str, str] = {}  # SotW: latest nonce per type
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._node_sent = False
        self._streaming = False
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> SimulatedEnvoy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the ADS stream and subscribe, declaring what it already holds (as Envoy does on reconnect)."""
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        open_stream = stub.DeltaAggregatedResources if self.protocol == "delta" else stub.StreamAggregatedResources
        self._call = open_stream(metadata=self._metadata)
        self._node_sent = False
        self._nonces.clear()
        self.stream_error = None
        self._streaming = True
        for type_url in (CLUSTER, LISTENER):
            await self._subscribe(type_url, set(), initial=True)
        for type_url, names in self._subscribed.items():
            if names:
                await self._subscribe(type_url, names, initial=True)
        self._reader = asyncio.create_task(self._read())

    async def disconnect(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.wait([self._reader])
        self._call = self._reader = None

    async def reconnect(self) -> None:
        await self.disconnect()
        await self.start()

    async def close(self) -> None:
        await self.disconnect()
        if self._own_channel:
            await self._channel.close()

    # --- waiting -------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds (re-checked after every response); ConnectionError if
        the stream ends first."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate() or not self._streaming), timeout)
        if not predicate():
            raise ConnectionError(f"{self.node_id}: ADS stream ended") from self.stream_error

    async def wait_acked(self, versions: Mapping[str, str], timeout: float = 5.0) -> float:
        """Wait until every type in ``versions`` has ACKed that version and holds every name it
        subscribes to (a SotW EDS ACK may precede the answer to new names); returns when the
        last of those ACKs was sent."""
        await self.wait_for(lambda: all(self._settled(t, v) for t, v in versions.items()), timeout)
        return max((self.acked[t][1] for t in versions), default=time.monotonic())

    def _settled(self, type_url: str, version: str) -> bool:
        wanted = self._subscribed.get(type_url, set())
        return self.acked.get(type_url, ("",))[0] == version and wanted <= self.resources[type_url].keys()

    # --- the protocol ------------------------------------------------------------

    async def _read(self) -> None:
        assert self._call is not None
        try:
            async for resp in self._call:
                await self._on_response(resp)
        except Exception as exc:  # the server ended the stream, or this client broke
            if not (isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.CANCELLED):
                self.stream_error = exc
        finally:
            self._streaming = False
            async with self._changed:
                self._changed.notify_all()

    async def _on_response(self, resp: xds.DiscoveryResponse | xds.DeltaDiscoveryResponse) -> None:
        type_url = resp.type_url
        now = time.monotonic()
        if isinstance(resp, xds.DeltaDiscoveryResponse):
            bodies = {r.name: r.resource.value for r in resp.resources}
            removed = tuple(resp.removed_resources)
            got = Received(type_url, resp.system_version_info, resp.nonce, tuple(bodies), removed, now)
        else:
            bodies = {_name(type_url, a.value): a.value for a in resp.resources}
            got = Received(type_url, resp.version_info, resp.nonce, tuple(bodies), (), now)
            self._nonces[type_url] = resp.nonce
        self.received.append(got)
        reason = self.nack(got) if self.nack is not None else None
        if reason is not None:
            error = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=reason)
            await self._write(type_url, response_nonce=resp.nonce, error_detail=error)
        else:
            self._apply(resp, bodies)
            await self._write(type_url, response_nonce=resp.nonce)
            self.acked[type_url] = (got.version, time.monotonic())
            await self._follow(type_url)
        async with self._changed:
            self._changed.notify_all()

    def _apply(self, resp: xds.DiscoveryResponse | xds.DeltaDiscoveryResponse, bodies: dict[str, bytes]) -> None:
        held = self.resources[resp.type_url]
        if isinstance(resp, xds.DeltaDiscoveryResponse):
            versions = self._versions[resp.type_url]
            versions.update((r.name, r.version) for r in resp.resources)
            for name in resp.removed_resources:
                held.pop(name, None)
                versions.pop(name, None)
        elif resp.type_url in WILDCARD_TYPES:
            held.clear()  # a SotW CDS/LDS response is the complete set
        held.update(bodies)

    async def _follow(self, accepted: str) -> None:
        """After accepting clusters/listeners, (un)subscribe the endpoints, routes and secrets they name."""
        if accepted not in self._needs:
            return
        self._needs[accepted] = {name: _needs(accepted, body) for name, body in self.resources[accepted].items()}
        for child, parents in _PARENTS.items():
            if accepted in parents:
                names = {n for p in parents for needs in self._needs[p].values() for n in needs[child]}
                if names != self._subscribed[child]:
                    await self._subscribe(child, names)

    async def _subscribe(self, type_url: str, names: set[str], initial: bool = False) -> None:
        old = self._subscribed.get(type_url, set())
        if type_url in self._subscribed:
            self._subscribed[type_url] = names
            for gone in old - names:
                self.resources[type_url].pop(gone, None)
                self._versions[type_url].pop(gone, None)
        if self.protocol == "delta":
            fresh = names if initial else names - old
            await self._write(
                type_url,
                resource_names_subscribe=sorted(fresh),
                resource_names_unsubscribe=sorted(old - names),
                initial_resource_versions=self._versions[type_url] if initial else {},
            )
        else:
            await self._write(type_url, response_nonce=self._nonces.get(type_url, ""))

    async def _write(self, type_url: str, **fields: object) -> None:
        """Send one request; SotW requests also carry the type's last ACKed version and names."""
        if not self._node_sent:  # Envoy sends its node on the first message only
            fields["node"] = self._node()
            self._node_sent = True
        assert self._call is not None
        if self.protocol == "delta":
            await self._call.write(xds.DeltaDiscoveryRequest(type_url=type_url, **fields))
        else:
            fields.setdefault("resource_names", sorted(self._subscribed.get(type_url, ())))
            version = self.acked.get(type_url, ("",))[0]
            await self._call.write(xds.DiscoveryRequest(type_url=type_url, version_info=version, **fields))

    def _node(self) -> base_pb2.Node:
        return base_pb2.Node(
            id=self.node_id,
            cluster="greymesh",
            user_agent_name="envoy",
            user_agent_build_version=base_pb2.BuildVersion(
                version=semantic_version_pb2.SemanticVersion(major_number=1, minor_number=40, patch=0)
            ),
        )


# --- reading the resources ---------------------------------------------------------


def _name(type_url: str, body: bytes) -> str:
    if type_url == CLUSTER:
        return cluster_pb2.Cluster.FromString(body).name
    if type_url == ENDPOINT:
        return endpoint_pb2.ClusterLoadAssignment.FromString(body).cluster_name
    if type_url == LISTENER:
        return listener_pb2.Listener.FromString(body).name
    if type_url == SECRET:
        return secret_pb2.Secret.FromString(body).name
    return route_pb2.RouteConfiguration.FromString(body).name


def _needs(parent: str, body: bytes) -> dict[str, set[str]]:
    """What an accepted cluster (EDS, SDS names) or listener (RDS, SDS names) makes the sidecar subscribe to."""
    if parent == CLUSTER:
        c = cluster_pb2.Cluster.FromString(body)
        eds = c.WhichOneof("cluster_discovery_type") == "type" and c.type == cluster_pb2.Cluster.EDS
        return {ENDPOINT: {c.eds_cluster_config.service_name or c.name} if eds else set(),
                SECRET: _secret_names([c.transport_socket])}
    listener = listener_pb2.Listener.FromString(body)
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    routes = set()
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url == _HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                if hcm.HasField("rds"):
                    routes.add(hcm.rds.route_config_name)
    return {ROUTE: routes, SECRET: _secret_names([chain.transport_socket for chain in chains])}


def _secret_names(sockets: list[base_pb2.TransportSocket]) -> set[str]:
    """SDS secrets that TLS transport sockets present or validate with (an unset socket has none)."""
    names = set()
    for socket in sockets:
        if (kind := _TLS_CONTEXTS.get(socket.typed_config.type_url)) is None:
            continue
        common = kind.FromString(socket.typed_config.value).common_tls_context
        configs = [*common.tls_certificate_sds_secret_configs, common.validation_context_sds_secret_config,
                   common.combined_validation_context.validation_context_sds_secret_config]
        names |= {c.name for c in configs if c.name}
    return names
