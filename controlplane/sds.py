"""Sidecar mTLS over SDS: the two secrets every sidecar holds, and the TLS sockets that use them.

Each sidecar's snapshot carries two SDS secrets, delivered over ADS like every
other resource (no key or certificate files reach Envoy):

* ``svid``: its own certificate chain and private key (:func:`svid_secret`);
* ``trust_bundle``: the mesh roots it verifies peers against (:func:`bundle_secret`).

The inbound listener terminates mTLS with :func:`downstream_tls` (any SVID of the
trust domain may connect; authorization is the policy layer's job), and every
outbound cluster originates it with :func:`upstream_tls` (only the callee's exact
SPIFFE ID is accepted as the server).  Re-issuing an SVID is just a new ``svid``
secret in the node's next snapshot: Envoy swaps certificates for new handshakes
and leaves established connections alone.
"""

from __future__ import annotations

import functools

from cryptography import x509
from envoy_data_plane.envoy.config.core.v3 import (
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    TransportSocket,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    CommonTlsContextCombinedCertificateValidationContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    TlsParameters,
    TlsParametersTlsProtocol,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any

from controlplane.identity import Svid, check_trust_domain, parse_spiffe_id, trust_domain_of
from controlplane.xds.snapshot import SECRET, Resource

__all__ = ["BUNDLE_SECRET", "INGRESS_SECRET", "SECRET", "SVID_SECRET", "bundle_secret", "downstream_tls",
           "ingress_secret", "ingress_tls", "svid_secret", "upstream_tls"]

SVID_SECRET = "svid"
BUNDLE_SECRET = "trust_bundle"
INGRESS_SECRET = "ingress_cert"  # the ingress's certificate when the user gives one (mesh.yaml ingress.tls)
TLS_SOCKET = "envoy.transport_sockets.tls"

_ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
# Both ends are our own Envoys: no reason to offer anything older than TLS 1.3
# (Envoy's client default would otherwise cap upstream connections at 1.2).
_TLS_1_3 = TlsParameters(
    tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_3,
    tls_maximum_protocol_version=TlsParametersTlsProtocol.TLSv1_3,
)


# Snapshots are rebuilt on every change, but an SVID only every half-life: serializing
# (~0.2 ms, mostly envoy-data-plane's validation) once per SVID keeps a 1,000-sidecar
# rebuild from paying it a thousand times.
@functools.lru_cache(maxsize=16_384)
def svid_secret(svid: Svid) -> Resource:
    """The sidecar's own certificate chain and key, as SDS secret ``svid``."""
    certificate = TlsCertificate(
        certificate_chain=DataSource(inline_bytes=svid.chain_pem), private_key=DataSource(inline_bytes=svid.key_pem)
    )
    return _secret(Secret(name=SVID_SECRET, tls_certificate=certificate))


def bundle_secret(bundle_pem: bytes, trust_domain: str) -> Resource:
    """The roots of ``trust_domain`` peers are verified against, as SDS secret ``trust_bundle``.

    ValueError unless every certificate in ``bundle_pem`` is a root of that trust
    domain: a bundle from the wrong CA directory would otherwise cut the mesh off
    (or trust a stranger) only once Envoy applies it.
    """
    check_trust_domain(trust_domain)
    for root in x509.load_pem_x509_certificates(bundle_pem):  # ValueError if there are none
        if trust_domain_of(root) != trust_domain:
            raise ValueError(f"trust bundle holds {root.subject.rfc4514_string()}, not a root of {trust_domain!r}")
    return _secret(Secret(name=BUNDLE_SECRET, validation_context=CertificateValidationContext(
        trusted_ca=DataSource(inline_bytes=bundle_pem))))


def downstream_tls(trust_domain: str) -> TransportSocket:
    """Transport socket of the inbound listener: mTLS, any SVID of ``trust_domain`` as the client."""
    check_trust_domain(trust_domain)
    context = DownstreamTlsContext(
        common_tls_context=_common_tls(StringMatcher(prefix=f"spiffe://{trust_domain}/")),
        require_client_certificate=True,
    )
    return TransportSocket(name=TLS_SOCKET, typed_config=Any.pack(context))


def upstream_tls(callee_spiffe_id: str) -> TransportSocket:
    """Transport socket of an outbound cluster: mTLS, and the server must be exactly ``callee_spiffe_id``.

    SNI names the callee as ``<service>.<namespace>.<trust-domain>`` (SPIFFE IDs are
    not host names); it is informational, as the inbound listener has one filter chain.
    """
    trust_domain, namespace, service = parse_spiffe_id(callee_spiffe_id)
    context = UpstreamTlsContext(
        common_tls_context=_common_tls(StringMatcher(exact=callee_spiffe_id)),
        sni=f"{service}.{namespace}.{trust_domain}",
    )
    return TransportSocket(name=TLS_SOCKET, typed_config=Any.pack(context))


def _common_tls(peer: StringMatcher) -> CommonTlsContext:
    """Present ``svid``; accept a peer chaining to ``trust_bundle`` whose URI SAN matches ``peer``."""
    return CommonTlsContext(
        tls_params=_TLS_1_3,
        tls_certificate_sds_secret_configs=[SdsSecretConfig(name=SVID_SECRET, sds_config=_ADS)],
        # The SAN check is static config; the roots come (and rotate) over SDS.
        combined_validation_context=CommonTlsContextCombinedCertificateValidationContext(
            default_validation_context=CertificateValidationContext(
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=peer)
                ]
            ),
            validation_context_sds_secret_config=SdsSecretConfig(name=BUNDLE_SECRET, sds_config=_ADS),
        ),
    )


def _secret(secret: Secret) -> Resource:
    return Resource(name=secret.name, type_url=SECRET, body=bytes(secret))


# --- the ingress: TLS for clients outside the mesh ---------------------------------

# Clients of the front door are browsers, curl and SDKs, not our Envoys: TLS 1.2 and 1.3.
_TLS_1_2_UP = TlsParameters(
    tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_2,
    tls_maximum_protocol_version=TlsParametersTlsProtocol.TLSv1_3,
)


def ingress_secret(chain_pem: bytes, key_pem: bytes) -> Resource:
    """A certificate the user gave for the ingress, as SDS secret ``ingress_cert``."""
    certificate = TlsCertificate(certificate_chain=DataSource(inline_bytes=chain_pem),
                                 private_key=DataSource(inline_bytes=key_pem))
    return _secret(Secret(name=INGRESS_SECRET, tls_certificate=certificate))


def ingress_tls(secret_name: str) -> TransportSocket:
    """Transport socket of the ingress listener: server-side TLS with SDS secret ``secret_name``
    (``svid``, whose certificate then also names the ingress's hosts, or ``ingress_cert``).
    No client certificate: end users prove who they are with a JWT."""
    context = DownstreamTlsContext(common_tls_context=CommonTlsContext(
        tls_params=_TLS_1_2_UP,
        tls_certificate_sds_secret_configs=[SdsSecretConfig(name=secret_name, sds_config=_ADS)],
        alpn_protocols=["h2", "http/1.1"],
    ))
    return TransportSocket(name=TLS_SOCKET, typed_config=Any.pack(context))
