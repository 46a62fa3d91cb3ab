"""The ADS server on a real grpc.aio server (127.0.0.1, port 0) against simulated Envoys, SotW and delta."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rt
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from controlplane.xds.ads import start_ads_server
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, Resource, Snapshot
from controlplane.xds.status import NodeStatus, TypeStatus
from core.credentials import new_token
from core.sidecar_auth import METADATA_KEY, SCHEME, SidecarIdentity, SidecarKey
from tests.support.adsclient import Received, SimulatedEnvoy, expected_acks

PROTOCOLS = pytest.mark.parametrize("protocol", ["sotw", "delta"])
QUIET_S = 0.4  # how long "nothing arrives" is watched for
# The async tests run on pytest-asyncio (@pytest.mark.asyncio): a fresh event loop each,
# bounded in time by tests/conftest.py (ASYNC_TEST_TIMEOUT_S).


# --- synthetic snapshots from real protos ----------------------------------------------

_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)


def _address(port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))


def _res(type_url: str, name: str, msg: Message) -> Resource:
    return Resource(name, type_url, msg.SerializeToString())


def build(
    endpoints: Mapping[str, Sequence[int]],
    *,
    connect_timeout_s: int = 1,
    listener_port: int = 15001,
    route_to: str | None = None,
) -> Snapshot:
    """A sidecar: a static ``local`` cluster, an EDS cluster + endpoints per entry of ``endpoints``,
    and an ``outbound`` listener whose RDS routes go to ``route_to`` (default: the first cluster)."""
    one_s, timeout = duration_pb2.Duration(seconds=1), duration_pb2.Duration(seconds=connect_timeout_s)
    local = cluster_pb2.Cluster(name="local", type=cluster_pb2.Cluster.STATIC, connect_timeout=one_s)
    out = [_res(CLUSTER, "local", local)]
    for name, ports in endpoints.items():
        eds = cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ADS)
        out.append(_res(CLUSTER, name, cluster_pb2.Cluster(
            name=name, type=cluster_pb2.Cluster.EDS, eds_cluster_config=eds, connect_timeout=timeout)))
        hosts = [ep.LbEndpoint(endpoint=ep.Endpoint(address=_address(p))) for p in ports]
        out.append(_res(ENDPOINT, name, endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name, endpoints=[ep.LocalityLbEndpoints(lb_endpoints=hosts)])))
    hcm = any_pb2.Any()
    hcm.Pack(hcm_pb2.HttpConnectionManager(
        stat_prefix="outbound", rds=hcm_pb2.Rds(config_source=_ADS, route_config_name="outbound")))
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=hcm)]
    )
    listener = listener_pb2.Listener(name="outbound", address=_address(listener_port), filter_chains=[chain])
    action = rt.RouteAction(cluster=route_to or next(iter(endpoints), "local"))
    host = rt.VirtualHost(name="all", domains=["*"], routes=[rt.Route(match=rt.RouteMatch(prefix="/"), route=action)])
    routes = route_pb2.RouteConfiguration(name="outbound", virtual_hosts=[host])
    return Snapshot([*out, _res(LISTENER, "outbound", listener), _res(ROUTE, "outbound", routes)])


V1 = build({"a": [8001]})


# --- harness -----------------------------------------------------------------------------

XDS = SidecarKey(new_token()).tokens("xds")  # the sidecars' credentials (tests/test_security_sidecar.py tries impostors)


def credential(node_id: str) -> str:
    return XDS.mint(SidecarIdentity(node_id, "svc"))


@dataclass
class Plane:
    cache: SnapshotCache
    status: NodeStatus
    target: str

    def types(self, node_id: str) -> dict[str, TypeStatus]:
        rec = self.status.node(node_id)
        return rec.types if rec else {}

    def connected(self, node_id: str) -> int:
        rec = self.status.node(node_id)
        return rec.connected if rec else 0


@contextlib.asynccontextmanager
async def control_plane() -> AsyncIterator[Plane]:
    cache, status = SnapshotCache(), NodeStatus()
    server = await start_ads_server(cache, status, "127.0.0.1", 0, XDS)
    try:
        yield Plane(cache, status, f"127.0.0.1:{server.port}")
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def synced(
    plane: Plane, node_id: str, protocol: str, snapshot: Snapshot = V1, **kw: object
) -> AsyncIterator[SimulatedEnvoy]:
    """A sidecar that has ACKed ``snapshot``, as both it and the server see it."""
    plane.cache.set_snapshot(node_id, snapshot)
    async with SimulatedEnvoy(node_id, plane.target, protocol, token=credential(node_id), **kw) as env:  # type: ignore[arg-type]
        await env.wait_acked(expected_acks(snapshot))
        await eventually(lambda: plane.status.synced_at(node_id, snapshot) is not None)
        yield env


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def quiet(env: SimulatedEnvoy, seconds: float = QUIET_S) -> None:
    """Assert that nothing reaches ``env`` for ``seconds``."""
    seen = len(env.received)
    await asyncio.sleep(seconds)
    assert env.received[seen:] == []


def types_of(received: Sequence[Received]) -> list[str]:
    return [r.type_url for r in received]


class RawStream:
    """A bare ADS stream, for requests a well-behaved sidecar never sends."""

    def __init__(self, target: str, protocol: str):
        self.protocol = protocol
        self._channel = grpc.aio.insecure_channel(target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        open_stream = stub.DeltaAggregatedResources if protocol == "delta" else stub.StreamAggregatedResources
        self.call = open_stream(metadata=((METADATA_KEY, SCHEME + credential(NODE.id)),))
        self._responses: asyncio.Queue[xds.DiscoveryResponse | xds.DeltaDiscoveryResponse] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for resp in self.call:
                self._responses.put_nowait(resp)

    async def send(self, **fields: object) -> None:
        kind = xds.DeltaDiscoveryRequest if self.protocol == "delta" else xds.DiscoveryRequest
        await self.call.write(kind(**fields))

    async def recv(self, timeout: float = 2.0) -> xds.DiscoveryResponse | xds.DeltaDiscoveryResponse:
        return await asyncio.wait_for(self._responses.get(), timeout)

    async def quiet(self, seconds: float = QUIET_S) -> None:
        await asyncio.sleep(seconds)
        assert self._responses.empty()

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.wait([self._reader])
        await self._channel.close()


NODE = base_pb2.Node(id="raw")


def cla_names(resp: xds.DiscoveryResponse) -> list[str]:
    return [endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name for a in resp.resources]


# --- the cache ---------------------------------------------------------------------------


def test_cache_wakes_only_the_changed_node_and_only_on_change() -> None:
    cache = SnapshotCache()
    woken: list[str] = []
    cache.watch("a", lambda: woken.append("a"))
    stop_b = cache.watch("b", lambda: woken.append("b"))
    assert cache.snapshot("a") is None
    assert cache.set_snapshot("a", V1) is True
    assert cache.set_snapshot("a", build({"a": [8001]})) is False  # equal content, new object
    assert woken == ["a"]
    stop_b()
    assert cache.set_snapshot("b", V1) is True
    assert woken == ["a"]
    assert sorted(cache.node_ids()) == ["a", "b"] and cache.snapshots()["b"] is V1
    cache.clear("a")
    assert cache.snapshot("a") is None and cache.node_ids() == ["b"]


# --- both protocols ------------------------------------------------------------------------


@PROTOCOLS
@pytest.mark.asyncio
async def test_initial_push_waits_for_a_snapshot_then_delivers_everything(protocol: str) -> None:
    async with control_plane() as plane, SimulatedEnvoy("n1", plane.target, protocol,  # type: ignore[arg-type]
                                                        token=credential("n1")) as env:
        await eventually(lambda: plane.connected("n1") == 1)
        await quiet(env)  # no snapshot yet: the stream waits for one
        assert plane.cache.set_snapshot("n1", V1)
        await env.wait_acked(expected_acks(V1))
        for t in TYPE_ORDER:
            assert list(env.resources[t].items()) == [(n, r.body) for n, r in V1.resources(t).items()]
        order = types_of(env.received)
        assert order.index(CLUSTER) < order.index(ENDPOINT) and order.index(LISTENER) < order.index(ROUTE)
        await eventually(lambda: plane.status.synced_at("n1", V1) is not None)
        rec = plane.status.node("n1")
        assert rec is not None and (rec.protocol, rec.envoy_version, rec.pushes) == (protocol, "1.40.0", 4)
        await quiet(env)  # every response was ACKed: nothing is pushed again
        assert rec.pushes == 4


@PROTOCOLS
@pytest.mark.asyncio
async def test_update_pushes_changed_types_in_make_before_break_order(protocol: str) -> None:
    async with control_plane() as plane, synced(plane, "n1", protocol) as env:
        seen = len(env.received)
        v2 = build({"a": [8002]}, connect_timeout_s=2, listener_port=15002, route_to="local")
        assert plane.cache.set_snapshot("n1", v2)
        await env.wait_acked(expected_acks(v2))
        assert types_of(env.received[seen:]) == [CLUSTER, ENDPOINT, LISTENER, ROUTE]


@PROTOCOLS
@pytest.mark.asyncio
async def test_nack_is_recorded_not_resent_and_cleared_by_a_newer_ack(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="greymesh.xds")
    v2, v3 = build({"a": [8001]}, listener_port=15002), build({"a": [8001]}, listener_port=15003)
    bad = v2.version(LISTENER)

    def reject(r: Received) -> str | None:
        return "port 15002 is taken" if r.type_url == LISTENER and r.version == bad else None

    async with control_plane() as plane, synced(plane, "n1", protocol, nack=reject) as env:
        plane.cache.set_snapshot("n1", v2)
        await eventually(lambda: LISTENER in plane.types("n1") and plane.types("n1")[LISTENER].nack is not None)
        nack = plane.types("n1")[LISTENER].nack
        assert nack is not None and (nack.version, nack.message) == (bad, "port 15002 is taken")
        assert "n1" in caplog.text and "port 15002 is taken" in caplog.text
        assert env.acked[LISTENER][0] == V1.version(LISTENER)
        assert plane.status.synced_at("n1", v2) is None
        await quiet(env, 0.5)  # the rejected version is not sent again
        assert types_of(env.received).count(LISTENER) == 2

        plane.cache.set_snapshot("n1", v3)
        await env.wait_acked(expected_acks(v3))
        await eventually(lambda: plane.status.synced_at("n1", v3) is not None)
        assert plane.types("n1")[LISTENER].nack is None


@PROTOCOLS
@pytest.mark.asyncio
async def test_identical_snapshot_wakes_nobody(protocol: str) -> None:
    async with control_plane() as plane, synced(plane, "n1", protocol) as env:
        rec = plane.status.node("n1")
        assert rec is not None
        pushes = rec.pushes
        assert plane.cache.set_snapshot("n1", build({"a": [8001]})) is False
        await quiet(env)
        assert rec.pushes == pushes


@PROTOCOLS
@pytest.mark.asyncio
async def test_update_reaches_only_its_node(protocol: str) -> None:
    async with control_plane() as plane, synced(plane, "a", protocol) as a, synced(plane, "b", protocol) as b:
        seen_b = len(b.received)
        v2 = build({"a": [8002]})
        plane.cache.set_snapshot("a", v2)
        await a.wait_acked(expected_acks(v2))
        await quiet(b)
        assert len(b.received) == seen_b


@PROTOCOLS
@pytest.mark.asyncio
async def test_changed_clusters_get_their_unchanged_endpoints_again(protocol: str) -> None:
    # Envoy keeps a rebuilt cluster warming until its ClusterLoadAssignment arrives again.
    v1 = build({"a": [1], "b": [2]})
    async with control_plane() as plane, synced(plane, "n1", protocol, v1) as env:
        seen = len(env.received)
        v2 = build({"a": [1], "b": [2]}, connect_timeout_s=2)
        assert v2.version(ENDPOINT) == v1.version(ENDPOINT)
        plane.cache.set_snapshot("n1", v2)
        await env.wait_for(lambda: types_of(env.received[seen:]) == [CLUSTER, ENDPOINT])
        assert env.received[-1].names == ("a", "b")
        await quiet(env)


@PROTOCOLS
@pytest.mark.asyncio
async def test_endpoint_subscriptions_follow_clusters(protocol: str) -> None:
    async with control_plane() as plane, synced(plane, "n1", protocol) as env:
        grown = build({"a": [8001], "b": [9001]})
        plane.cache.set_snapshot("n1", grown)
        await env.wait_acked(expected_acks(grown))
        assert env.resources[ENDPOINT].keys() == {"a", "b"}
        # The new name was answered: by SotW with the full list, by delta with just "b".
        last_eds = [r for r in env.received if r.type_url == ENDPOINT][-1]
        assert last_eds.names == (("a", "b") if protocol == "sotw" else ("b",))

        shrunk = build({"b": [9001]})
        plane.cache.set_snapshot("n1", shrunk)
        await env.wait_acked(expected_acks(shrunk))
        await eventually(lambda: plane.status.synced_at("n1", shrunk) is not None)
        assert env.resources[ENDPOINT].keys() == {"b"}


@PROTOCOLS
@pytest.mark.asyncio
async def test_node_without_endpoints_is_in_sync_without_subscribing_eds(protocol: str) -> None:
    async with control_plane() as plane, synced(plane, "n1", protocol, build({})) as env:
        assert ENDPOINT not in plane.types("n1") and not env.resources[ENDPOINT]
        assert plane.status.acked_everywhere(plane.cache.snapshots())


@PROTOCOLS
@pytest.mark.asyncio
async def test_status_tracks_rollout_and_is_json(protocol: str) -> None:
    async with control_plane() as plane, synced(plane, "n1", protocol):
        assert plane.status.acked_everywhere(plane.cache.snapshots())
        v2 = build({"a": [8002]})
        plane.cache.set_snapshot("n1", v2)
        assert plane.status.lagging(plane.cache.snapshots()) == ["n1"]
        await eventually(lambda: plane.status.acked_everywhere(plane.cache.snapshots()))
        node = json.loads(json.dumps(plane.status.status(plane.cache.snapshots())))["n1"]
        assert (node["in_sync"], node["connected"], node["protocol"]) == (True, 1, protocol)
        assert node["types"][ENDPOINT]["acked_version"] == v2.version(ENDPOINT)


@PROTOCOLS
@pytest.mark.asyncio
async def test_disconnect_is_clean(protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with control_plane() as plane:
        baseline = len(asyncio.all_tasks())
        async with synced(plane, "n1", protocol):
            assert plane.connected("n1") == 1
        await eventually(lambda: plane.connected("n1") == 0)
        await eventually(lambda: len(asyncio.all_tasks()) <= baseline)
        assert not plane.cache._watchers  # the stream stopped watching its node
        plane.cache.set_snapshot("n1", build({"a": [8002]}))  # nobody listens any more
        await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@PROTOCOLS
@pytest.mark.asyncio
async def test_bad_streams_do_not_take_the_server_down(protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cds = {"resource_names_subscribe": []} if protocol == "delta" else {"resource_names": []}
    async with control_plane() as plane:
        plane.cache.set_snapshot("raw", V1)
        anonymous, bogus = RawStream(plane.target, protocol), RawStream(plane.target, protocol)
        try:
            await anonymous.send(type_url=CLUSTER, **cds)
            assert await asyncio.wait_for(anonymous.call.code(), 2) == grpc.StatusCode.INVALID_ARGUMENT
            assert "no node.id" in caplog.text

            await bogus.send(node=NODE, type_url="type.googleapis.com/envoy.bogus.v3.Thing", **cds)
            await bogus.quiet()
            assert "envoy.bogus.v3.Thing" in caplog.text
            await bogus.send(type_url=CLUSTER, **cds)  # the stream still serves real types
            assert (await bogus.recv()).type_url == CLUSTER
        finally:
            await anonymous.close()
            await bogus.close()
        async with synced(plane, "n1", protocol):  # and other sidecars are served as usual
            pass
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- SotW only ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sotw_ignores_requests_with_a_stale_nonce() -> None:
    async with control_plane() as plane:
        plane.cache.set_snapshot("raw", build({"a": [1], "b": [2]}))
        raw = RawStream(plane.target, "sotw")
        try:
            await raw.send(node=NODE, type_url=ENDPOINT, resource_names=["a"])
            first = await raw.recv()
            await raw.send(type_url=ENDPOINT, resource_names=["a"], version_info=first.version_info,
                           response_nonce=first.nonce)
            plane.cache.set_snapshot("raw", build({"a": [11], "b": [2]}))
            second = await raw.recv()
            assert second.nonce != first.nonce
            # Written before the client saw `second`: superseded, so ignored.
            await raw.send(type_url=ENDPOINT, resource_names=["a", "b"], version_info=first.version_info,
                           response_nonce=first.nonce)
            await raw.quiet()
            await raw.send(type_url=ENDPOINT, resource_names=["a", "b"], version_info=second.version_info,
                           response_nonce=second.nonce)
            assert cla_names(await raw.recv()) == ["a", "b"]
        finally:
            await raw.close()


@pytest.mark.asyncio
async def test_sotw_ack_asking_for_new_names_does_not_count_as_in_sync() -> None:
    async with control_plane() as plane:
        v1, v2 = build({"a": [1]}), build({"a": [11], "b": [2]})
        plane.cache.set_snapshot("raw", v1)
        raw = RawStream(plane.target, "sotw")
        try:
            await raw.send(node=NODE, type_url=ENDPOINT, resource_names=["a"])
            first = await raw.recv()
            await raw.send(type_url=ENDPOINT, resource_names=["a"], version_info=first.version_info,
                           response_nonce=first.nonce)
            await eventually(lambda: plane.types("raw")[ENDPOINT].acked_version == v1.version(ENDPOINT))
            plane.cache.set_snapshot("raw", v2)
            second = await raw.recv()
            # Accepts v2 of "a" but now also needs "b": v2 is not fully held yet.
            await raw.send(type_url=ENDPOINT, resource_names=["a", "b"], version_info=second.version_info,
                           response_nonce=second.nonce)
            third = await raw.recv()
            assert cla_names(third) == ["a", "b"] and third.version_info == v2.version(ENDPOINT)
            assert plane.types("raw")[ENDPOINT].acked_version == v1.version(ENDPOINT)
            await raw.send(type_url=ENDPOINT, resource_names=["a", "b"], version_info=third.version_info,
                           response_nonce=third.nonce)
            await eventually(lambda: plane.types("raw")[ENDPOINT].acked_version == v2.version(ENDPOINT))
        finally:
            await raw.close()


# --- delta only -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_delta_answers_a_fresh_wildcard_subscription_even_when_empty() -> None:
    # A starting Envoy waits for its first CDS/LDS response before it finishes initialising.
    async with control_plane() as plane:
        plane.cache.set_snapshot("raw", Snapshot([]))
        raw = RawStream(plane.target, "delta")
        try:
            await raw.send(node=NODE, type_url=LISTENER)
            empty = await raw.recv()
            assert (empty.type_url, list(empty.resources)) == (LISTENER, [])
            await raw.send(type_url=LISTENER, response_nonce=empty.nonce)
            await raw.quiet()
        finally:
            await raw.close()


@pytest.mark.asyncio
async def test_delta_sends_only_changed_resources_and_removals() -> None:
    async with control_plane() as plane, synced(plane, "n1", "delta", build({"a": [1], "b": [2], "c": [3]})) as env:
        seen = len(env.received)
        plane.cache.set_snapshot("n1", build({"a": [11], "c": [3]}))  # a's endpoints changed; b gone
        await env.wait_for(lambda: ENDPOINT in types_of(env.received[seen:]))
        cds, eds = env.received[seen:seen + 2]
        assert (cds.type_url, cds.names, cds.removed) == (CLUSTER, (), ("b",))
        assert (eds.type_url, eds.names, eds.removed) == (ENDPOINT, ("a",), ("b",))
        await quiet(env)  # unsubscribing "b" needs no answer
        assert env.resources[CLUSTER].keys() == {"local", "a", "c"} and env.resources[ENDPOINT].keys() == {"a", "c"}


@pytest.mark.asyncio
async def test_delta_reconnect_gets_only_what_changed_meanwhile() -> None:
    async with control_plane() as plane, synced(plane, "n1", "delta") as env:
        seen = len(env.received)
        await env.reconnect()  # declares the versions it holds: all current
        await eventually(lambda: plane.connected("n1") == 1)
        await quiet(env)
        assert plane.status.synced_at("n1", V1) is not None

        await env.disconnect()
        v2 = build({"a": [8001]}, connect_timeout_s=3)
        plane.cache.set_snapshot("n1", v2)
        await env.start()
        await env.wait_for(lambda: len(env.received) >= seen + 2)
        await quiet(env)
        # Only the changed cluster, and (re-warming it) its unchanged endpoints.
        assert [(r.type_url, r.names) for r in env.received[seen:]] == [(CLUSTER, ("a",)), (ENDPOINT, ("a",))]
        await eventually(lambda: plane.status.synced_at("n1", v2) is not None)


@pytest.mark.asyncio
async def test_delta_honours_subscriptions_sent_with_a_stale_nonce() -> None:
    async with control_plane() as plane:
        plane.cache.set_snapshot("raw", build({"a": [1], "b": [2]}))
        raw = RawStream(plane.target, "delta")
        try:
            await raw.send(node=NODE, type_url=ENDPOINT, resource_names_subscribe=["a"])
            first = await raw.recv()
            await raw.send(type_url=ENDPOINT, response_nonce=first.nonce)
            plane.cache.set_snapshot("raw", build({"a": [11], "b": [2]}))
            assert [r.name for r in (await raw.recv()).resources] == ["a"]
            await raw.send(type_url=ENDPOINT, resource_names_subscribe=["b"], response_nonce=first.nonce)
            assert [r.name for r in (await raw.recv()).resources] == ["b"]
        finally:
            await raw.close()


@pytest.mark.asyncio
async def test_delta_answers_every_explicit_subscription() -> None:
    async with control_plane() as plane:
        plane.cache.set_snapshot("raw", V1)
        raw = RawStream(plane.target, "delta")
        try:
            await raw.send(node=NODE, type_url=ENDPOINT, resource_names_subscribe=["a", "ghost"])
            first = await raw.recv()
            assert ([r.name for r in first.resources], list(first.removed_resources)) == (["a"], ["ghost"])
            await raw.send(type_url=ENDPOINT, response_nonce=first.nonce)
            await raw.quiet()
            # Envoy may re-subscribe a name it should hold: it must get it again.
            await raw.send(type_url=ENDPOINT, resource_names_subscribe=["a"])
            assert [r.name for r in (await raw.recv()).resources] == ["a"]
        finally:
            await raw.close()
