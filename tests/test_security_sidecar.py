"""Sidecars prove who they are before they get anything (issue 12; docs/security.md, "Sidecar identity").

The attacks, each against the real server: an impostor ADS client for another node (no
credential, a forged one, another node's), its ACKs toward `greymesh ca rotate`'s wait,
a sidecar naming another service's secret in SDS, forged access-log (ALS) streams, idle
ALS streams against the collector's threads, direct calls to the authz bridge, and on a
running demo mesh: the same impostors against the real control plane and collector, the
tokens kept off argv and out of Envoy's admin API.

The unit tests run in-process servers on loopback (grpc.aio ADS with the real snapshots
of the demo spec, the real collector and bridge); the mesh tests are e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds

from controlplane import authz
from controlplane.daemon import ControlPlane, RotationError
from controlplane.identity import CertificateAuthority
from controlplane.meshspec import parse_spec
from controlplane.placement import Placement, SidecarPorts
from controlplane.translate import Identities, build_snapshots, service_identity
from controlplane.xds.ads import start_ads_server
from controlplane.xds.snapshot import CLUSTER, LISTENER, SECRET, TYPE_ORDER, Snapshot
from core.credentials import new_token
from core.datadir import DataDir
from core.sidecar_auth import METADATA_KEY, SCHEME, SidecarIdentity, SidecarKey, SidecarTokens
from tapstream.collector import METHOD, SERVICE, Collector, serve
from tests.support.adsclient import SimulatedEnvoy, expected_acks
from tests.support.mesh import DEMO_SPEC, Mesh, get, running_mesh, wait_for

SPEC = parse_spec(DEMO_SPEC.read_text(), source=str(DEMO_SPEC))
PAYMENTS, ORDERS = "payments-v1-1", "orders-1"
PAYMENTS_ID = service_identity(SPEC, SPEC.service("payments"))
ORDERS_ID = service_identity(SPEC, SPEC.service("orders"))


def who(node: str) -> SidecarIdentity:
    return SidecarIdentity(node, next(s.name for s in SPEC.services for i in s.instances if i.name == node))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, SCHEME + token),)


def demo_snapshots(ca_dir: Path, key: SidecarKey) -> dict[str, Snapshot]:
    """The real snapshots of the demo spec (SVIDs from a real CA), as the control plane builds them."""
    names = [i.name for s in SPEC.services for i in s.instances]
    sidecars = {n: SidecarPorts(app=21000 + 5 * k, inbound=21001 + 5 * k, outbound=21002 + 5 * k,
                                ingress=21003 + 5 * k, admin=21004 + 5 * k) for k, n in enumerate(names)}
    placement = Placement("127.0.0.1", sidecars, authz=20998, taps=(20999,))
    ca = CertificateAuthority.load_or_create(ca_dir, SPEC.identity.trust_domain)
    svids = {i.name: ca.issue(service_identity(SPEC, s), timedelta(hours=1)) for s in SPEC.services
             for i in s.instances}
    return build_snapshots(SPEC, placement, Identities(svids, ca.trust_bundle_pem()), key)


def svid_spiffe_id(body: bytes) -> str:
    secret = secret_pb2.Secret.FromString(body)
    cert = x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)[0]


# --- ADS: an in-process control plane with the demo's snapshots ----------------------------------


@contextlib.asynccontextmanager
async def plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, str]]:
    """A ControlPlane (its cache, node status and sidecar key) serving ADS on loopback, holding
    the demo's snapshots; yields it and the ADS target."""
    cp = ControlPlane(DataDir(tmp_path / "data").create())
    for node, snapshot in demo_snapshots(tmp_path / "ca", cp.sidecar_key).items():
        cp.cache.set_snapshot(node, snapshot)
    server = await start_ads_server(cp.cache, cp.nodes, "127.0.0.1", 0, cp.sidecar_key.tokens("xds"))
    try:
        yield cp, f"127.0.0.1:{server.port}"
    finally:
        await server.stop(None)


class Raw:
    """A bare ADS stream (delta or SotW) that says whatever an attacker wants."""

    def __init__(self, target: str, protocol: str, metadata: tuple[tuple[str, str], ...] | None):
        self.protocol = protocol
        self.channel = grpc.aio.insecure_channel(target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        open_stream = stub.DeltaAggregatedResources if protocol == "delta" else stub.StreamAggregatedResources
        self.call = open_stream(metadata=metadata)
        self.responses: list[xds.DiscoveryResponse | xds.DeltaDiscoveryResponse] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for resp in self.call:
                self.responses.append(resp)

    async def send(self, **fields: object) -> None:
        kind = xds.DeltaDiscoveryRequest if self.protocol == "delta" else xds.DiscoveryRequest
        await asyncio.sleep(0)  # let the reader see the end of a stream the server closed
        if self.call.done():
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the server may have closed it
            await self.call.write(kind(**fields))

    async def ask_everything(self, node: str) -> None:
        """Subscribe to every type, naming secrets outright, then ACK guessed nonces."""
        names = ["*", "svid", "trust_bundle", "orders", ORDERS, ORDERS_ID, f"{ORDERS}/svid"]
        for i, type_url in enumerate(TYPE_ORDER):
            fields: dict[str, object] = {"type_url": type_url}
            if i == 0:
                fields["node"] = base_pb2.Node(id=node, cluster=who(node).service)
            if self.protocol == "delta":
                fields["resource_names_subscribe"] = names
            else:
                fields["resource_names"] = names
            await self.send(**fields)
            if i == 0:
                # A refused stream ends now: writing on while its status arrives would race it
                # in the client (grpc then reports INTERNAL instead of the server's status).
                await asyncio.wait([self.reader], timeout=0.3)
        for nonce in range(1, 8):  # ACKs of responses it never got
            for type_url in TYPE_ORDER:
                await self.send(type_url=type_url, response_nonce=str(nonce))

    async def code(self) -> grpc.StatusCode:
        return await asyncio.wait_for(self.call.code(), 5)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.wait([self.reader])
        await self.channel.close()


async def impostor(target: str, protocol: str, node: str, token: str | None) -> Raw:
    raw = Raw(target, protocol, bearer(token) if token is not None else None)
    await raw.ask_everything(node)
    return raw


PROTOCOLS = pytest.mark.parametrize("protocol", ["delta", "sotw"])


@pytest.mark.unit
@PROTOCOLS
@pytest.mark.asyncio
async def test_an_impostor_ads_client_gets_no_resource_and_no_secret(protocol: str, tmp_path: Path) -> None:
    async with plane(tmp_path) as (cp, target):
        other_mesh = SidecarKey(new_token()).tokens("xds").mint(who(PAYMENTS))
        wrong_purpose = cp.sidecar_key.tokens("als").mint(who(PAYMENTS))
        for token in (None, "", "gm1.garbage", other_mesh, wrong_purpose, other_mesh[:-2] + "AA"):
            raw = await impostor(target, protocol, PAYMENTS, token)
            try:
                assert await raw.code() == grpc.StatusCode.UNAUTHENTICATED, token
                assert raw.responses == []  # nothing at all: no resource, no secret, no version
            finally:
                await raw.close()
        assert cp.nodes.node(PAYMENTS) is None  # never connected, never seen, never ACKed


@pytest.mark.unit
@PROTOCOLS
@pytest.mark.asyncio
async def test_a_credential_for_one_node_cannot_ask_as_another(protocol: str, tmp_path: Path) -> None:
    async with plane(tmp_path) as (cp, target):
        orders_token = cp.sidecar_key.tokens("xds").mint(who(ORDERS))
        raw = await impostor(target, protocol, PAYMENTS, orders_token)
        try:
            assert await raw.code() == grpc.StatusCode.PERMISSION_DENIED
            assert raw.responses == []
        finally:
            await raw.close()
        # Honest first, then switching node mid-stream: the stream ends there.
        raw = Raw(target, protocol, bearer(orders_token))
        try:
            await raw.send(node=base_pb2.Node(id=ORDERS), type_url=CLUSTER)
            await wait_until(lambda: len(raw.responses) == 1)
            await raw.send(node=base_pb2.Node(id=PAYMENTS), type_url=SECRET,
                           **({"resource_names_subscribe": ["svid"]} if protocol == "delta"
                              else {"resource_names": ["svid"]}))
            assert await raw.code() == grpc.StatusCode.PERMISSION_DENIED
            assert [r.type_url for r in raw.responses] == [CLUSTER]
        finally:
            await raw.close()
        assert cp.nodes.node(PAYMENTS) is None


@pytest.mark.unit
@PROTOCOLS
@pytest.mark.asyncio
async def test_an_impostors_acks_do_not_count_toward_the_rotation_wait(protocol: str, tmp_path: Path) -> None:
    async with plane(tmp_path) as (cp, target):
        # Every node but payments-v1-1 is a real (simulated) sidecar that ACKs its snapshot.
        honest = [SimulatedEnvoy(n, target, protocol, token=cp.sidecar_key.tokens("xds").mint(who(n)))  # type: ignore[arg-type]
                  for n in cp.cache.node_ids() if n != PAYMENTS]
        try:
            for env in honest:
                await env.start()
            for env in honest:
                await env.wait_acked(expected_acks(cp.cache.snapshot(env.node_id)))
            raws = [await impostor(target, protocol, PAYMENTS, token)
                    for token in (None, cp.sidecar_key.tokens("xds").mint(who(ORDERS)))]
            # The very wait `greymesh ca rotate` does between its steps: it must name the
            # impostor's node as not having ACKed.
            with pytest.raises(RotationError, match=PAYMENTS):
                await cp._all_acked(1.0, "the demo snapshots")
            for raw in raws:
                await raw.close()
            # The real payments-v1-1 ACKs: now the wait ends.
            real = SimulatedEnvoy(PAYMENTS, target, protocol, token=cp.sidecar_key.tokens("xds").mint(who(PAYMENTS)))  # type: ignore[arg-type]
            honest.append(real)
            await real.start()
            await cp._all_acked(5.0, "the demo snapshots")
        finally:
            for env in honest:
                await env.close()


@pytest.mark.unit
@PROTOCOLS
@pytest.mark.asyncio
async def test_a_sidecar_cannot_get_another_services_svid_by_naming_it(protocol: str, tmp_path: Path) -> None:
    async with plane(tmp_path) as (cp, target):
        raw = Raw(target, protocol, bearer(cp.sidecar_key.tokens("xds").mint(who(PAYMENTS))))
        try:
            await raw.ask_everything(PAYMENTS)
            await wait_until(lambda: any(r.type_url == SECRET for r in raw.responses))
            await asyncio.sleep(0.3)  # anything else it would be sent
            bodies = [(r.resource.value if protocol == "delta" else r.value) for resp in raw.responses
                      if resp.type_url == SECRET for r in resp.resources]
            secrets = {secret_pb2.Secret.FromString(b).name: b for b in bodies}
            assert set(secrets) == {"svid", "trust_bundle"}  # nothing under the names of orders
            assert svid_spiffe_id(secrets["svid"]) == PAYMENTS_ID != ORDERS_ID
        finally:
            await raw.close()


@pytest.mark.unit
def test_every_snapshot_holds_only_its_own_services_svid_and_its_own_credentials(tmp_path: Path) -> None:
    key = SidecarKey(new_token())
    for node, snapshot in demo_snapshots(tmp_path / "ca", key).items():
        svids = [r.body for r in snapshot.resources(SECRET).values() if secret_pb2.Secret.FromString(r.body)
                 .HasField("tls_certificate") and r.name == "svid"]
        assert len(svids) == 1 and svid_spiffe_id(svids[0]) == service_identity(SPEC, SPEC.service(who(node).service))
        # Its listeners carry its own ALS and authz tokens, and no other node's.
        listeners = b"".join(r.body for r in snapshot.resources(LISTENER).values())
        for other in (n for n in (PAYMENTS, ORDERS) if n != node):
            assert key.tokens("als").mint(who(other)).encode() not in listeners
        assert key.tokens("als").mint(who(node)).encode() in listeners
        assert key.tokens("authz").mint(who(node)).encode() in listeners
        assert key.tokens("xds").mint(who(node)).encode() not in listeners  # xDS tokens live in bootstraps only


# --- ALS: the real collector in process ------------------------------------------------------------


class Keep:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, list[dict]]] = []
        self.lock = threading.Lock()

    def send(self, topic: str, key: str, value: bytes, events: int = 1) -> None:
        with self.lock:
            self.records.append((topic, key, json.loads(value)))

    def events(self) -> list[dict]:
        with self.lock:
            return [e for _, _, batch in self.records for e in batch]


def als_message(node: str, cluster: str, agent: str) -> bytes:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.node.id, msg.identifier.node.cluster, msg.identifier.log_name = node, cluster, "inbound"
    entry = msg.http_logs.log_entry.add()
    entry.request.path, entry.request.user_agent = "/forged", agent
    entry.common_properties.start_time.GetCurrentTime()
    return msg.SerializeToString()


@contextlib.contextmanager
def collector(**bounds: float) -> Iterator[tuple[Collector, Keep, SidecarKey, grpc.Channel]]:
    """The real collector (its bounds as given) behind a real gRPC server on loopback, publishing to a Keep."""
    key, keep = SidecarKey(new_token()), Keep()
    c = Collector(keep, key.tokens("als"), **bounds)  # type: ignore[arg-type]
    server, port = serve(c, "127.0.0.1", 0, max_streams=int(bounds.get("max_streams_per_node", 4)) * 4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield c, keep, key, channel
    finally:
        channel.close()
        server.stop(None)


def stream_als(channel: grpc.Channel, messages: Iterator[bytes] | list[bytes], token: str | None,
               timeout: float = 10) -> grpc.StatusCode:
    call = channel.stream_unary(f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None)
    try:
        call(iter(messages), metadata=bearer(token) if token is not None else None, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.unit
def test_a_forged_als_stream_is_refused_and_nothing_of_it_is_produced() -> None:
    with collector() as (c, keep, key, channel):
        forged = [als_message(PAYMENTS, "payments", "forged")]
        assert stream_als(channel, forged, None) == grpc.StatusCode.UNAUTHENTICATED
        assert stream_als(channel, forged, key.tokens("xds").mint(who(PAYMENTS))) == grpc.StatusCode.UNAUTHENTICATED
        assert stream_als(channel, forged, SidecarKey(new_token()).tokens("als").mint(who(PAYMENTS))) \
            == grpc.StatusCode.UNAUTHENTICATED
        # orders' own credential, claiming to be payments: refused before anything is published.
        assert stream_als(channel, forged, key.tokens("als").mint(who(ORDERS))) == grpc.StatusCode.PERMISSION_DENIED
        assert keep.records == []
        stats = c.stats.snapshot()
        assert (stats["unauthenticated"], stats["impersonating"], stats["messages"]) == (3, 1, 0)


@pytest.mark.unit
def test_tap_events_are_attributed_to_the_credential_not_to_what_the_stream_claims() -> None:
    with collector() as (c, keep, key, channel):
        # payments-v1-1's credential; its identifier tells the truth about the node but claims
        # to be of service "orders": the events are payments'.
        token = key.tokens("als").mint(who(PAYMENTS))
        assert stream_als(channel, [als_message(PAYMENTS, "orders", "a1")], token) == grpc.StatusCode.OK
        [(_, record_key, [event])] = keep.records
        assert record_key == "payments" and (event["sidecar"], event["service"]) == (PAYMENTS, "payments")


@pytest.mark.unit
def test_idle_als_streams_cannot_starve_real_ones() -> None:
    # 8 threads in all (4 x the cap of 2 streams per node); 20 idle impostors and 5 idle streams of
    # one compromised sidecar would hold every one of them if they were let in.
    with collector(max_streams_per_node=2, first_message_s=3.0, idle_s=3.0) as (c, keep, key, channel):
        stop = threading.Event()

        def idle() -> Iterator[bytes]:
            stop.wait(30)
            yield from ()

        call = channel.stream_unary(f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None)
        try:
            strangers = [call.future(idle()) for _ in range(20)]
            # All end at once, holding no thread: refused unauthenticated, or (while the flood fills
            # the 8 slots for a moment) refused before they are looked at, by the call bound
            # (RESOURCE_EXHAUSTED) or by HTTP/2's stream limit (REFUSED_STREAM: UNAVAILABLE).
            codes = [f.code() for f in strangers]
            assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNAVAILABLE}, [f.details() for f in strangers]
            assert c.stats.snapshot()["unauthenticated"] == codes.count(grpc.StatusCode.UNAUTHENTICATED) > 0
            time.sleep(0.2)  # the server frees their slots just after their status went out
            compromised = key.tokens("als").mint(who(ORDERS))
            own = [call.future(idle(), metadata=bearer(compromised)) for _ in range(5)]
            deadline = time.monotonic() + 2.0  # well before the first-message deadline of the admitted two
            while sum(f.done() for f in own) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = [f for f in own if f.done()]
            assert len(refused) == 3 and {f.code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            # Meanwhile a real sidecar streams, and its events go out.
            t0 = time.monotonic()
            payments = key.tokens("als").mint(who(PAYMENTS))
            assert stream_als(channel, [als_message(PAYMENTS, "payments", "real")], payments) == grpc.StatusCode.OK
            assert time.monotonic() - t0 < 1.0 and [e["user_agent"] for e in keep.events()] == ["real"]
            # The two idle streams that got in are closed once their first message is overdue.
            admitted = [f for f in own if f not in refused]
            assert all(f.code() == grpc.StatusCode.CANCELLED for f in admitted)  # code() waits for the end
            assert c.stats.snapshot()["idle_closed"] == 2
            # The compromised sidecar's slots are free again, for its own streams only.
            assert stream_als(channel, [als_message(ORDERS, "orders", "again")], compromised) == grpc.StatusCode.OK
        finally:
            stop.set()


# --- the authz bridge ---------------------------------------------------------------------------


@pytest.mark.unit
def test_the_authz_bridge_answers_only_sidecars_and_never_asks_opa_for_others() -> None:
    # OPA here is a port nobody listens on: a check that got past authentication would say
    # UNAVAILABLE (no OPA), one stopped before it UNAUTHENTICATED.
    key = SidecarKey(new_token())
    bridge = authz.AuthorizationBridge(authz.OpaClient("127.0.0.1", 9, new_token()), key.tokens("authz"))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    authz_grpc.add_AuthorizationServicer_to_server(bridge, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = authz_grpc.AuthorizationStub(channel)
            request = authz_pb2.CheckRequest()
            request.attributes.request.http.path = "/charge"

            def check(token: str | None) -> grpc.StatusCode:
                try:
                    stub.Check(request, metadata=bearer(token) if token is not None else None, timeout=5)
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            assert check(None) == grpc.StatusCode.UNAUTHENTICATED
            assert check(key.tokens("als").mint(who(PAYMENTS))) == grpc.StatusCode.UNAUTHENTICATED
            assert check(key.tokens("authz").mint(who(PAYMENTS))) == grpc.StatusCode.UNAVAILABLE
    finally:
        grpc_server.stop(None)


@pytest.mark.unit
def test_tokens_name_their_node_and_nothing_else_verifies() -> None:
    key = SidecarKey(new_token())
    xds_tokens = key.tokens("xds")
    token = xds_tokens.mint(who(PAYMENTS))
    assert xds_tokens.identify(token) == who(PAYMENTS)
    parts = token.split(".")
    swapped = ".".join([parts[0], xds_tokens.mint(who(ORDERS)).split(".")[1], *parts[2:]])
    assert xds_tokens.identify(swapped) is None  # the node is signed: it cannot be edited
    assert key.tokens("als").identify(token) is None and SidecarKey(new_token()).tokens("xds").identify(token) is None
    assert xds_tokens.authenticate(bearer(token) * 2) is None  # two credentials: which one? neither
    assert xds_tokens.authenticate(((METADATA_KEY, token),)) is None  # no "Bearer "


@pytest.mark.unit
def test_the_purpose_keys_are_0600_files_and_cannot_mint_xds_tokens(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "data").create()
    key = SidecarKey.issue(dd)
    path = key.hand_out(dd, "als")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(dd.secret("sidecar.key").stat().st_mode) == 0o600
    als = SidecarTokens.load(path, "als")
    assert als.identify(key.tokens("als").mint(who(PAYMENTS))) == who(PAYMENTS)
    # What the collector holds mints ALS tokens only: the ADS server refuses them.
    assert key.tokens("xds").identify(als.mint(who(PAYMENTS))) is None
    assert path.read_text().strip() not in dd.secret("sidecar.key").read_text()


async def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# --- on a running demo mesh ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    with running_mesh(tmp_path_factory.mktemp("sidecar-auth"), doc, "delta", up_args=("--rps", "0")) as m:
        yield m


def bootstrap_token(mesh: Mesh, node: str) -> str:
    boot = json.loads((mesh.data_dir / "envoy" / f"{node}.json").read_text())
    [entry] = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"]
    assert entry["key"] == METADATA_KEY
    return entry["value"].removeprefix(SCHEME)


@pytest.mark.e2e
def test_on_the_mesh_the_tokens_are_in_0600_files_only(mesh: Mesh) -> None:
    tokens = [bootstrap_token(mesh, n) for n in (PAYMENTS, ORDERS)]
    for node in (PAYMENTS, ORDERS):
        assert stat.S_IMODE((mesh.data_dir / "envoy" / f"{node}.json").stat().st_mode) == 0o600
    # Not on any process's argv, not in runtime.json, workloads.json or `greymesh status`.
    exposed = [mesh.cli("status", "--json").stdout, (mesh.data_dir / "runtime.json").read_text(),
               (mesh.data_dir / "workloads.json").read_text()]
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            exposed.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace"))
    for token in tokens:
        assert not any(token in text for text in exposed)
    # Envoy's admin API shows counters, not its configuration (which holds the tokens).
    admin = mesh.placement()["sidecars"][PAYMENTS]["admin"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5)
    assert refused.value.code == 403
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=server.live", timeout=5) as resp:
        assert b"server.live: 1" in resp.read()


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_on_the_mesh_an_impostor_gets_nothing_from_the_control_plane(mesh: Mesh) -> None:
    target = f"127.0.0.1:{mesh.ports()['controlplane.xds']}"
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                        (bootstrap_token(mesh, ORDERS), grpc.StatusCode.PERMISSION_DENIED)):
        raw = await impostor(target, "delta", PAYMENTS, token)
        try:
            assert await raw.code() == code and raw.responses == []
        finally:
            await raw.close()
    # The real sidecars (Envoy, with their bootstrap's credential) have their config and SVIDs.
    assert mesh.all_in_sync()
    assert get(mesh.entrypoint + "anything/after-impostors").status == 200


@pytest.mark.e2e
def test_on_the_mesh_a_forged_als_stream_stores_nothing(mesh: Mesh) -> None:
    before = mesh.stats()["collector"]
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports()['taps.grpc']}") as channel:
        for token in (None, bootstrap_token(mesh, PAYMENTS)):  # none, and an xDS token (not an ALS one)
            assert stream_als(channel, [als_message(PAYMENTS, "payments", "forged-e2e")], token) \
                == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.stats()["collector"]["unauthenticated"] >= before["unauthenticated"] + 2
    # Real traffic after the forgery is stored (by its real sidecars), the forgery is not.
    assert get(mesh.entrypoint + "anything/real-e2e", headers={"User-Agent": "real-e2e"}).status == 200
    wait_for(lambda: mesh.query("SELECT count() AS n FROM tap_l7 WHERE user_agent = 'real-e2e'")[0]["n"] not in
             (0, "0"), 60, "the real request's tap")
    assert int(mesh.query("SELECT count() AS n FROM tap_l7 WHERE user_agent = 'forged-e2e'")[0]["n"]) == 0
    rows = mesh.query("SELECT DISTINCT sidecar, service FROM tap_l7 WHERE user_agent = 'real-e2e' ORDER BY sidecar")
    assert {(r["sidecar"], r["service"]) for r in rows} <= {(i.name, s.name) for s in SPEC.services for i in s.instances}
