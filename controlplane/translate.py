"""Mesh spec + placement -> one Envoy xDS snapshot per sidecar.

Every instance gets a sidecar whose node id is the instance name.  Its resources:

* listener ``inbound``: other sidecars call the workload here; routes to ``inbound|app``.
* listener ``outbound``: the workload calls the services it declared in ``calls`` here,
  by Host header (``http://orders/...``); routed by RDS route config ``outbound``.
* listener ``ingress`` (entrypoint service only): the mesh's front door.  TLS (the
  sidecar's SVID, which then also names the ingress's hosts, or the user's certificate),
  an optional JWT check (jwt_authn with the spec's JWKS) and ext_authz, whose check carries
  the context extension ``greymesh.hop: ingress`` and the verified JWT claims.
* cluster ``inbound|app`` (static: the local workload) and one EDS cluster
  ``outbound|<service>|<subset>`` per subset of every called service, each filled by a
  ClusterLoadAssignment listing the inbound listeners of that subset's sidecars.

Caller-side policy (splits, timeouts, retries, faults, circuit breakers, outlier
detection) lives on the caller's sidecar, as in Istio, so a sidecar's snapshot only
depends on its own service and the services it calls: changing payments' routes
re-pushes orders' sidecars and nobody else.

Resources are built with envoy-data-plane's typed messages and serialized once here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterEdsClusterConfig,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog, AccessLogFilter, HeaderFilter
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HealthCheck,
    HealthCheckTcpHealthCheck,
    Http2ProtocolOptions,
    SocketAddress,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
    TcpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.common.fault.v3 import FaultDelay
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import CheckSettings, ExtAuthz, ExtAuthzPerRoute
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.fault.v3 import FaultAbort, HttpFault
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
    Rds,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType, Percent
from envoy_data_plane.google.protobuf import Any, Empty

import betterproto2

from controlplane import meshspec as ms
from controlplane.identity import Svid, spiffe_id
from controlplane.placement import Placement, SidecarPorts
from controlplane.sds import (
    INGRESS_SECRET,
    SVID_SECRET,
    bundle_secret,
    downstream_tls,
    ingress_secret,
    ingress_tls,
    svid_secret,
    upstream_tls,
)
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, Snapshot
from core.contracts import outbound_cluster
from core.sidecar_auth import METADATA_KEY, SCHEME, SidecarIdentity, SidecarKey

APP_CLUSTER = "inbound|app"
AUTHZ_CLUSTER = "greymesh_authz"
TAPS_CLUSTER = "greymesh_taps"
# Headers whose values the l7 tap reads (tapstream.schema.trace_id).
TRACE_HEADERS = ("traceparent", "x-b3-traceid")
FAIL_OPEN_HEADER = "x-envoy-auth-failure-mode-allowed"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "ingress"
# jwt_authn puts a verified token's claims in its dynamic metadata under this key; ext_authz
# hands that namespace to the bridge, which puts it in OPA's input (policies/README.md).
JWT_PAYLOAD_KEY = "jwt_payload"
# ext_authz context extensions the ingress's checks carry (the bridge passes them to OPA as
# input.attributes.context_extensions): which hop decides, and the service behind it.
HOP_EXTENSION = "greymesh.hop"
SERVICE_EXTENSION = "greymesh.service"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
OUTBOUND_ROUTES = "outbound"
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"

_ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


@dataclass(frozen=True)
class Identities:
    """Every sidecar's SVID and the mesh's trust bundle: with these, sidecars talk mTLS only."""

    svids: Mapping[str, Svid]  # by node id
    bundle_pem: bytes


def service_identity(spec: ms.MeshSpec, svc: ms.Service) -> str:
    return spiffe_id(spec.identity.trust_domain, svc.namespace, svc.name)


def build_snapshots(
    spec: ms.MeshSpec, placement: Placement, identities: Identities | None = None,
    sidecar_key: SidecarKey | None = None,
) -> dict[str, Snapshot]:
    """One snapshot per instance (node id = instance name) of the whole mesh.

    With ``identities``, every inbound listener requires a client SVID of the trust
    domain and every outbound cluster requires the callee's exact SPIFFE ID.  With
    ``sidecar_key``, every sidecar presents its own credential to the tap collectors and
    the authz bridge (without it, they refuse it).
    """
    host = placement.host
    trust_domain = spec.identity.trust_domain if identities else None
    ingress_secrets = [ingress_secret(spec.ingress.tls.chain_pem, spec.ingress.tls.key_pem)] if spec.ingress.tls else []
    bundle = [bundle_secret(identities.bundle_pem, trust_domain)] if identities else []
    snapshots: dict[str, Snapshot] = {}
    for svc in spec.services:
        called = tuple(spec.service(name) for name in svc.calls)
        shared = [_outbound_routes(called), *bundle]  # identical for every instance of svc
        for callee in called:
            endpoints = tuple(
                (subset, tuple(placement.ports(i.name).inbound for i in callee.instances
                               if i.subset == subset and placement.ports(i.name).serving))
                for subset in callee.subsets
            )
            server_id = service_identity(spec, callee) if identities else None
            shared.extend(_callee_resources(callee, host, endpoints, server_id))
        for inst in svc.instances:
            entrypoint = svc.name == spec.entrypoint
            local = _Local(
                host=host,
                ports=placement.ports(inst.name),
                ingress=_ingress(spec, identities is not None) if entrypoint else None,
                authz_port=placement.authz,
                taps_ports=tuple(placement.taps),
                credentials=_credentials(sidecar_key, SidecarIdentity(inst.name, svc.name)),
                fail_open=svc.fail_open,
                trust_domain=trust_domain,
            )
            own = [svid_secret(identities.svids[inst.name])] if identities else []
            if entrypoint:
                own.extend(ingress_secrets)
            snapshots[inst.name] = Snapshot([*_local_resources(local), *own, *shared])
    return snapshots


@dataclass(frozen=True)
class _Local:
    """What a sidecar's own listeners and clusters depend on (a memo key)."""

    host: str
    ports: SidecarPorts
    ingress: _Ingress | None  # the entrypoint's sidecar gets the ingress listener
    authz_port: int | None  # the authorization bridge; None: no ext_authz
    taps_ports: tuple[int, ...]  # the host's tap collectors; (): no access log taps
    fail_open: bool  # allow when the bridge cannot answer
    credentials: _Credentials  # what the sidecar presents to the tap collectors and the bridge
    trust_domain: str | None  # inbound requires mTLS from this trust domain; None: plaintext


# envoy-data-plane (betterproto2 0.9.1) re-creates a pydantic validator for every
# message it serializes (~0.3 ms each), so building 1,000 sidecars from scratch on every
# mesh.yaml change would take tens of seconds.  Resources are pure functions of small
# hashable inputs, so they are memoized across builds: a change re-serializes only
# what it touches, and the many sidecars sharing a callee share its resources.
_memo = functools.lru_cache(maxsize=16_384)


def _resource(type_url: str, name: str, msg: betterproto2.Message) -> Resource:
    return Resource(name=name, type_url=type_url, body=bytes(msg))


@_memo
def _local_resources(local: _Local) -> tuple[Resource, ...]:
    """The sidecar's own listeners, the cluster of its workload and of the authz bridge."""
    authz = None if local.authz_port is None else _Authz(local.fail_open, local.credentials.authz)
    taps = _Taps(local.credentials.als) if local.taps_ports else None

    def listener(name: str, port: int, authz: _Authz | None, trust_domain: str | None) -> Resource:
        return _resource(LISTENER, name, _listener(name, local.host, port, authz, trust_domain, taps, None))

    out = [
        _resource(CLUSTER, APP_CLUSTER, _static_cluster(APP_CLUSTER, local.host, local.ports.app)),
        listener("inbound", local.ports.inbound, authz, local.trust_domain),
        listener("outbound", local.ports.outbound, None, None),
    ]
    if local.ingress is not None:
        # Traffic from outside has no mesh identity; its end user's is a JWT (jwt_authn), and
        # the policy decides on it like on every other hop.
        out.append(_resource(LISTENER, "ingress", _listener(
            "ingress", local.host, local.ports.ingress, authz, None, taps, local.ingress)))
    if local.authz_port is not None:
        out.append(_resource(CLUSTER, AUTHZ_CLUSTER, _static_cluster(AUTHZ_CLUSTER, local.host, local.authz_port, http2=True)))
    if local.taps_ports:
        out.append(_resource(CLUSTER, TAPS_CLUSTER, _taps_cluster(local.host, local.taps_ports)))
    return tuple(out)


@_memo
def _outbound_routes(called: tuple[ms.Service, ...]) -> Resource:
    config = RouteConfiguration(name=OUTBOUND_ROUTES, virtual_hosts=[_virtual_host(c) for c in called])
    return _resource(ROUTE, OUTBOUND_ROUTES, config)


@_memo
def _callee_resources(
    callee: ms.Service, host: str, endpoints: tuple[tuple[str, tuple[int, ...]], ...], server_id: str | None
) -> tuple[Resource, ...]:
    """What a caller needs to reach ``callee``: an EDS cluster and its endpoints per subset.

    With ``server_id``, connections are mTLS and the callee must present that SPIFFE ID.
    """
    out = []
    for subset, ports in endpoints:
        name = outbound_cluster(callee.name, subset)
        cluster = _eds_cluster(name, callee)
        if server_id is not None:
            cluster.transport_socket = upstream_tls(server_id)
        out.append(_resource(CLUSTER, name, cluster))
        out.append(_resource(ENDPOINT, name, _load_assignment(name, host, ports)))
    return tuple(out)


# --- listeners -----------------------------------------------------------------


@dataclass(frozen=True)
class _Authz:
    fail_open: bool
    token: str | None  # the sidecar's credential for the bridge


@dataclass(frozen=True)
class _Taps:
    token: str | None  # the sidecar's credential for the tap collectors


@dataclass(frozen=True)
class _Credentials:
    """A sidecar's bearer tokens for the gRPC services it calls (core/sidecar_auth.py).  They are
    per node, so every sidecar's listeners are its own; only its own ADS stream carries them."""

    als: str | None
    authz: str | None


def _credentials(key: SidecarKey | None, who: SidecarIdentity) -> _Credentials:
    if key is None:  # a mesh without credentials: the collectors and the bridge refuse these sidecars
        return _Credentials(None, None)
    return _Credentials(key.tokens("als").mint(who), key.tokens("authz").mint(who))


def _grpc_service(cluster: str, token: str | None, timeout: timedelta | None = None) -> GrpcService:
    """A call to one of greymesh's gRPC services, presenting the sidecar's ``token`` as initial metadata."""
    service = GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=cluster), timeout=timeout)
    if token is not None:
        service.initial_metadata = [HeaderValue(key=METADATA_KEY, value=SCHEME + token)]
    return service


@dataclass(frozen=True)
class _Ingress:
    """What the ingress listener depends on (a memo key)."""

    service: str  # the entrypoint, named to the policy as the hop's service
    certificate: str | None  # the SDS secret it presents; None: plaintext (a mesh without a CA)
    jwt: ms.IngressJwt | None


def _ingress(spec: ms.MeshSpec, has_identities: bool) -> _Ingress:
    """The user's certificate if the spec gives one, else the sidecar's SVID (issued with the
    ingress's host names by the control plane); plaintext only in a mesh without a CA."""
    certificate = INGRESS_SECRET if spec.ingress.tls else SVID_SECRET if has_identities else None
    return _Ingress(service=spec.entrypoint, certificate=certificate, jwt=spec.ingress.jwt)


def _listener(
    name: str, host: str, port: int, authz: _Authz | None, trust_domain: str | None, taps: _Taps | None,
    ingress: _Ingress | None,
) -> Listener:
    hcm = _http_connection_manager(name, authz, taps, ingress)
    chain = FilterChain(filters=[Filter(name=HCM_FILTER, typed_config=hcm)])
    if trust_domain is not None:
        chain.transport_socket = downstream_tls(trust_domain)
    elif ingress is not None and ingress.certificate is not None:
        chain.transport_socket = ingress_tls(ingress.certificate)
    listener = Listener(name=name, address=_address(host, port), filter_chains=[chain])
    if taps is not None:  # one l3/l4 tap per downstream connection, when it closes
        listener.access_log = [
            AccessLog(name="envoy.access_loggers.tcp_grpc",
                      typed_config=Any.pack(TcpGrpcAccessLogConfig(common_config=_tap_stream(name, taps))))
        ]
    return listener


@functools.cache
def _http_connection_manager(listener: str, authz: _Authz | None, taps: _Taps | None,
                             ingress: _Ingress | None) -> Any:
    """HTTP handling of a listener: ``outbound`` routes over RDS, the others to the local app.

    With ``authz``, every request is checked by the authorization bridge first; with
    ``taps``, every request is reported to the tap collector (the l7 tap).  The ``ingress``
    listener verifies JWTs first when the spec asks for it.

    One canonical path for every decision: before routing, jwt_authn, ext_authz and the
    app see it, the path is normalized (dot-segments resolved, ``//`` merged), and a path
    with an escaped slash or backslash (``%2F``, ``%5C``) is refused with 400.  Refused
    rather than unescaped: a ``%2F`` is data in one segment to some apps and a separator
    to others, so no rewrite keeps one meaning for the policy and the app, and a redirect
    would turn a POST into a GET for many clients.
    """
    filters = [HttpFilter(name=FAULT_FILTER, typed_config=Any.pack(HttpFault()))]
    if ingress is not None and ingress.jwt is not None:
        filters.append(HttpFilter(name=JWT_FILTER, typed_config=Any.pack(_jwt_authn(ingress.jwt))))
    if authz is not None:
        jwt = ingress is not None and ingress.jwt is not None
        filters.append(HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=Any.pack(_ext_authz(authz, jwt))))
    filters.append(HttpFilter(name=ROUTER_FILTER, typed_config=Any.pack(Router())))
    hcm = HttpConnectionManager(
        stat_prefix=listener,
        # Callers address services as http://orders or http://orders:8080; match on the name.
        strip_any_host_port=True,
        # Policies match path prefixes: /charge/../admin must reach them as /admin.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        http_filters=filters,
        access_log=[_fail_open_log(listener)] if authz is not None and authz.fail_open else [],
    )
    if taps is not None:
        hcm.access_log.append(AccessLog(
            name="envoy.access_loggers.http_grpc",
            typed_config=Any.pack(HttpGrpcAccessLogConfig(
                common_config=_tap_stream(listener, taps), additional_request_headers_to_log=list(TRACE_HEADERS),
            )),
        ))
    if listener == "outbound":
        hcm.rds = Rds(config_source=_ADS, route_config_name=OUTBOUND_ROUTES)
    else:
        hcm.route_config = _app_routes(listener, ingress)
    return Any.pack(hcm)


def _ext_authz(authz: _Authz, jwt: bool) -> ExtAuthz:
    """The check of every request; with ``jwt``, it carries jwt_authn's metadata (the claims)."""
    return ExtAuthz(
        grpc_service=_grpc_service(AUTHZ_CLUSTER, authz.token, timedelta(milliseconds=500)),
        transport_api_version=ApiVersion.V3,
        # Fail closed unless the service opted in; an allowed-on-failure request is marked
        # with x-envoy-auth-failure-mode-allowed, which the access log below records.
        failure_mode_allow=authz.fail_open,
        failure_mode_allow_header_add=authz.fail_open,
        metadata_context_namespaces=[JWT_FILTER] if jwt else [],
    )


def _jwt_authn(jwt: ms.IngressJwt) -> JwtAuthentication:
    """Bearer tokens (``Authorization: Bearer``) signed by a key of the spec's JWKS, from its
    issuer, for one of its audiences, not expired.  A bad token is refused (401) here; a
    missing one too, unless the spec says ``required: false``.  The verified claims go to
    the dynamic metadata ext_authz forwards; the token itself is forwarded to the app."""
    provider = JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        local_jwks=DataSource(inline_string=jwt.jwks),
        require_expiration=True,
        forward=True,
        payload_in_metadata=JWT_PAYLOAD_KEY,
        clock_skew_seconds=30,
    )
    verified = JwtRequirement(provider_name=JWT_PROVIDER)
    requires = verified if jwt.required else JwtRequirement(requires_any=JwtRequirementOrList(
        requirements=[verified, JwtRequirement(allow_missing=Empty())]))
    return JwtAuthentication(providers={JWT_PROVIDER: provider},
                             rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=requires)])


def _tap_stream(listener: str, taps: _Taps) -> CommonGrpcAccessLogConfig:
    """The gRPC access log stream to the tap collector, named after the listener (the
    collector reads the direction from it; the node and service from the sidecar's
    credential).  Envoy buffers entries and flushes every second or 16 KiB, so one
    message carries many entries."""
    return CommonGrpcAccessLogConfig(
        log_name=listener,
        grpc_service=_grpc_service(TAPS_CLUSTER, taps.token),
        transport_api_version=ApiVersion.V3,
        buffer_flush_interval=timedelta(seconds=1),
    )


def _fail_open_log(listener: str) -> AccessLog:
    """One line in the sidecar's log for every request let through because authz failed."""
    line = (f"greymesh fail-open {listener}: %START_TIME% %DOWNSTREAM_PEER_URI_SAN% "
            "%REQ(:METHOD)% %REQ(:PATH)% -> %RESPONSE_CODE% id=%REQ(X-REQUEST-ID)%\n")
    return AccessLog(
        name="envoy.access_loggers.stdout",
        filter=AccessLogFilter(
            header_filter=HeaderFilter(header=HeaderMatcher(name=FAIL_OPEN_HEADER, present_match=True))
        ),
        typed_config=Any.pack(
            StdoutAccessLog(log_format=SubstitutionFormatString(text_format_source=DataSource(inline_string=line)))
        ),
    )


def _app_routes(name: str, ingress: _Ingress | None) -> RouteConfiguration:
    """Everything arriving at an inbound/ingress listener goes to the local workload.

    The ingress's checks say so to the policy (context extensions), so Rego tells a request
    from outside the mesh from a call between services."""
    host = VirtualHost(
        name="app",
        domains=["*"],
        routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=APP_CLUSTER))],
    )
    if ingress is not None:
        extensions = {HOP_EXTENSION: "ingress", SERVICE_EXTENSION: ingress.service}
        host.typed_per_filter_config = {
            EXT_AUTHZ_FILTER: Any.pack(ExtAuthzPerRoute(check_settings=CheckSettings(context_extensions=extensions)))
        }
    return RouteConfiguration(name=name, virtual_hosts=[host])


# --- outbound routes -----------------------------------------------------------


def _virtual_host(callee: ms.Service) -> VirtualHost:
    routes = callee.routes or (default_route(callee),)
    return VirtualHost(name=callee.name, domains=[callee.name], routes=[_route(callee, r) for r in routes])


def default_route(callee: ms.Service) -> ms.Route:
    """Catch-all spreading traffic over subsets in proportion to their instance counts."""
    counts = {s: sum(i.subset == s for i in callee.instances) for s in callee.subsets}
    total = sum(counts.values())
    weights = [(s, 100 * n // total) for s, n in counts.items()]
    first, rest = weights[0], weights[1:]
    weights = [(first[0], 100 - sum(w for _, w in rest)), *rest]  # rounding goes to the first
    return ms.Route(name="default", match=ms.RouteMatch(prefix="/"), split=tuple(weights))


def _route(callee: ms.Service, route: ms.Route) -> Route:
    action = RouteAction(timeout=_td(route.timeout_s), retry_policy=_retry_policy(route.retries))
    live = [(subset, w) for subset, w in route.split if w > 0]
    if len(live) == 1:
        action.cluster = outbound_cluster(callee.name, live[0][0])
    else:
        action.weighted_clusters = WeightedCluster(
            clusters=[
                WeightedClusterClusterWeight(name=outbound_cluster(callee.name, s), weight=w) for s, w in live
            ]
        )
    out = Route(name=route.name, match=_match(route.match), route=action)
    if route.fault is not None:
        out.typed_per_filter_config = {FAULT_FILTER: Any.pack(_fault(route.fault))}
    return out


def _match(m: ms.RouteMatch) -> RouteMatch:
    headers = [HeaderMatcher(name=k, string_match=StringMatcher(exact=v)) for k, v in m.headers]
    if m.regex is not None:
        return RouteMatch(safe_regex=RegexMatcher(regex=m.regex), headers=headers)
    if m.path is not None:
        return RouteMatch(path=m.path, headers=headers)
    return RouteMatch(prefix=m.prefix or "/", headers=headers)


def _retry_policy(r: ms.RetryPolicy | None) -> RetryPolicy | None:
    if r is None:
        return None
    return RetryPolicy(
        retry_on=",".join(r.retry_on), num_retries=r.attempts, per_try_timeout=_td(r.per_try_timeout_s)
    )


def _percent(p: float) -> FractionalPercent:
    # Millionths, so fractional percentages such as 0.5 survive.
    return FractionalPercent(numerator=round(p * 10_000), denominator=FractionalPercentDenominatorType.MILLION)


def _fault(f: ms.Fault) -> HttpFault:
    fault = HttpFault()
    if f.delay is not None:
        fault.delay = FaultDelay(fixed_delay=_td(f.delay.fixed_delay_s), percentage=_percent(f.delay.percent))
    if f.abort is not None:
        fault.abort = FaultAbort(http_status=f.abort.http_status, percentage=_percent(f.abort.percent))
    return fault


# --- clusters and endpoints ----------------------------------------------------


def _eds_cluster(name: str, callee: ms.Service) -> Cluster:
    cb = callee.circuit_breaker
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=_ADS),
        connect_timeout=_td(callee.connect_timeout_s),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=cb.max_connections,
                    max_pending_requests=cb.max_pending_requests,
                    max_requests=cb.max_requests,
                    max_retries=cb.max_retries,
                )
            ]
        ),
    )
    od = callee.outlier_detection
    if od is not None:
        cluster.outlier_detection = OutlierDetection(
            consecutive_5xx=od.consecutive_5xx,
            interval=_td(od.interval_s),
            base_ejection_time=_td(od.base_ejection_time_s),
            max_ejection_percent=od.max_ejection_percent,
        )
    return cluster


def _static_cluster(name: str, host: str, port: int, *, http2: bool = False) -> Cluster:
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        load_assignment=_load_assignment(name, host, (port,)),
    )
    if http2:  # gRPC services
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
        cluster.typed_extension_protocol_options = {HTTP_OPTIONS: Any.pack(options)}
    return cluster


TAPS_CHECK_INTERVAL = timedelta(milliseconds=250)


def _taps_cluster(host: str, ports: tuple[int, ...]) -> Cluster:
    """The host's tap collectors, each health-checked by a TCP connect every 250 ms.

    Envoy's gRPC access logger opens a stream on one host of this cluster and keeps it.  When
    that collector dies, the stream ends and the logger's next flush (within a second) opens a
    new one: the health check must have marked the dead collector unhealthy by then, so the new
    stream goes to a live one.  The panic threshold is 0, so one healthy collector out of two
    takes every new stream (at the default 50 %, Envoy would balance over dead hosts too)."""
    cluster = _static_cluster(TAPS_CLUSTER, host, ports[0], http2=True)
    cluster.load_assignment = _load_assignment(TAPS_CLUSTER, host, ports)
    cluster.health_checks = [HealthCheck(
        timeout=timedelta(milliseconds=200), interval=TAPS_CHECK_INTERVAL, unhealthy_interval=TAPS_CHECK_INTERVAL,
        no_traffic_interval=TAPS_CHECK_INTERVAL, unhealthy_threshold=1, healthy_threshold=1,
        tcp_health_check=HealthCheckTcpHealthCheck(),
    )]
    cluster.common_lb_config = ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0))
    return cluster


def _load_assignment(name: str, host: str, ports: Iterable[int]) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(host, p))) for p in ports])
        ],
    )


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _td(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)
