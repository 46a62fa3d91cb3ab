"""Python ``ssl`` (OpenSSL) contexts that present an SVID and verify peers against a trust bundle.

Tests use them as an independent TLS peer: to check what the CA issues with a
verifier other than Envoy's, and to talk to sidecars as a mesh member or a stranger.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from controlplane.identity import Svid


def context(bundle_pem: bytes, svid: Svid | None, files: Path, *, server: bool = False) -> ssl.SSLContext:
    """A TLS 1.3 context trusting ``bundle_pem`` and presenting ``svid`` (written under ``files``) if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SVIDs name no host: callers check the peer's URI SAN themselves
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    if svid is not None:
        files.mkdir(parents=True, exist_ok=True)
        stem = files / svid.certificate.serial_number.to_bytes(20).hex()
        cert, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert.write_bytes(svid.chain_pem)
        key.write_bytes(svid.key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx


PeerCert = dict[str, Any]  # a certificate as ``SSLSocket.getpeercert()`` reports it


def uri_sans(peer: PeerCert) -> list[str]:
    """The URI SANs of a peer's certificate."""
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
