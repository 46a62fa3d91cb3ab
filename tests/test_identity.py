"""The mesh CA: its files, the SVIDs it issues (checked by OpenSSL, not just by ourselves), root rotation."""

from __future__ import annotations

import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.identity import (
    BUNDLE_FILE,
    CERT_FILE,
    CLOCK_SKEW,
    KEY_FILE,
    CAError,
    CertificateAuthority,
    Svid,
    needs_renewal,
    parse_spiffe_id,
    spiffe_id,
)
from tests.support import tls

TD = "greymesh.test"
ORDERS = spiffe_id(TD, "shop", "orders")
PAYMENTS = spiffe_id(TD, "shop", "payments")
HOUR = timedelta(hours=1)
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", TD)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def handshake(tmp_path: Path, server: Svid, client: Svid, bundle: bytes) -> tuple[tls.PeerCert, tls.PeerCert]:
    """A real TLS 1.3 handshake in memory, each side verifying the other against ``bundle`` with
    OpenSSL (chain, validity, EKU, name constraints); returns (server's view of the client, client's
    view of the server)."""
    wires = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]  # (incoming, outgoing) of each end
    ends = [
        tls.context(bundle, svid, tmp_path / "tls", server=is_server).wrap_bio(*wire, server_side=is_server)
        for svid, is_server, wire in ((server, True, wires[0]), (client, False, wires[1]))
    ]
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate(ends):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        wires[0][0].write(wires[1][1].read())
        wires[1][0].write(wires[0][1].read())
        if all(done):
            break
    assert all(done), "handshake did not finish"
    client_seen, server_seen = ends[0].getpeercert(), ends[1].getpeercert()
    assert client_seen and server_seen
    return client_seen, server_seen


# --- SPIFFE IDs -----------------------------------------------------------------------------


def test_spiffe_id_is_built_from_validated_parts() -> None:
    assert spiffe_id("prod.example.com", "shop", "orders") == "spiffe://prod.example.com/ns/shop/sa/orders"
    assert parse_spiffe_id("spiffe://prod.example.com/ns/shop/sa/orders") == ("prod.example.com", "shop", "orders")
    for args, part in [((TD, "shop", "Orders"), "service 'Orders'"), ((TD, "a/b", "x"), "namespace 'a/b'"),
                       ((TD, "shop", "-x"), "service '-x'"), (("Bad_TD", "shop", "x"), "trust domain 'Bad_TD'"),
                       ((TD, "", "x"), "namespace ''"), ((TD, "shop", "x" * 64), "service 'xxx")]:
        with pytest.raises(ValueError, match=f"invalid {part}"):
            spiffe_id(*args)
    for uri in ["spiffe://greymesh.test/orders", "https://greymesh.test/ns/a/sa/b",
                "spiffe://greymesh.test/ns/A/sa/b"]:
        with pytest.raises(ValueError):
            parse_spiffe_id(uri)


# --- the CA's files -------------------------------------------------------------------------


def test_new_ca_is_private_on_disk_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    finally:
        os.umask(old)
    d = tmp_path / "ca"
    assert mode(d) == 0o700 and mode(d / KEY_FILE) == 0o600
    assert sorted(p.name for p in d.iterdir()) == [BUNDLE_FILE, CERT_FILE, KEY_FILE]  # no temp files left
    root = ca.root
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    assert (d / CERT_FILE).read_bytes() == (d / BUNDLE_FILE).read_bytes() == root_pem
    key = serialization.load_pem_private_key((d / KEY_FILE).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    ext = root.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    assert root.subject == root.issuer


def test_loading_refuses_a_key_or_directory_others_can_read(ca: CertificateAuthority) -> None:
    key = ca.directory / KEY_FILE
    key.chmod(0o644)
    with pytest.raises(CAError, match=f"{key} has mode 0644.*chmod 600 {key}"):
        CertificateAuthority.load_or_create(ca.directory, TD)
    key.chmod(0o600)
    ca.directory.chmod(0o755)
    with pytest.raises(CAError, match=f"chmod 700 {ca.directory}"):
        CertificateAuthority.load_or_create(ca.directory, TD)


def test_reloading_keeps_the_same_root_and_files(ca: CertificateAuthority) -> None:
    files = {p.name: p.read_bytes() for p in ca.directory.iterdir()}
    again = CertificateAuthority.load_or_create(ca.directory, TD)
    assert again.root == ca.root and again.trust_bundle_pem() == ca.trust_bundle_pem()
    assert {p.name: p.read_bytes() for p in ca.directory.iterdir()} == files
    again.issue(ORDERS, HOUR).certificate.verify_directly_issued_by(ca.root)  # same key, too


def test_an_incomplete_or_foreign_ca_is_refused_not_regenerated(ca: CertificateAuthority) -> None:
    key = (ca.directory / KEY_FILE).read_bytes()
    with pytest.raises(CAError, match="for trust domain 'greymesh.test', not 'other.test'"):
        CertificateAuthority.load_or_create(ca.directory, "other.test")
    (ca.directory / BUNDLE_FILE).unlink()
    with pytest.raises(CAError, match=f"{ca.directory / BUNDLE_FILE} is missing"):
        CertificateAuthority.load_or_create(ca.directory, TD)
    assert (ca.directory / KEY_FILE).read_bytes() == key


# --- SVIDs ----------------------------------------------------------------------------------


def test_svid_carries_exactly_its_spiffe_id_and_both_ekus(ca: CertificateAuthority) -> None:
    svid = ca.issue(ORDERS, HOUR)
    cert = svid.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(ORDERS)]
    assert cert.subject == x509.Name([])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(svid.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key()
    assert svid.chain_pem == svid.cert_pem  # no intermediates
    assert "PRIVATE" not in repr(svid)


def test_svids_verify_against_the_bundle_in_a_real_handshake(ca: CertificateAuthority, tmp_path: Path) -> None:
    client_seen, server_seen = handshake(tmp_path, ca.issue(ORDERS, HOUR), ca.issue(PAYMENTS, HOUR),
                                         ca.trust_bundle_pem())
    assert (tls.uri_sans(client_seen), tls.uri_sans(server_seen)) == ([PAYMENTS], [ORDERS])


def test_the_root_can_only_vouch_for_its_trust_domain(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside this CA's trust domain"):
        ca.issue("spiffe://evil.test/ns/shop/sa/orders", HOUR)
    # Even a leaf signed with the CA key itself fails: OpenSSL enforces the root's name constraint.
    forged = _forge(ca, "spiffe://evil.test/ns/shop/sa/orders")
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        handshake(tmp_path, ca.issue(ORDERS, HOUR), forged, ca.trust_bundle_pem())


def _forge(ca: CertificateAuthority, uri: str) -> Svid:
    """A leaf for ``uri`` signed with the CA's key, bypassing ``issue``'s checks."""
    root_key = serialization.load_pem_private_key((ca.directory / KEY_FILE).read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(datetime.now(UTC) - HOUR).not_valid_after(datetime.now(UTC) + HOUR)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(root_key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Svid(uri, pem, key_pem, pem, cert.not_valid_before_utc, cert.not_valid_after_utc, datetime.now(UTC))


def test_lifetime_is_honoured_and_renewal_comes_at_half_life(ca: CertificateAuthority) -> None:
    svid = ca.issue(ORDERS, timedelta(seconds=4), now=NOW)
    assert (svid.not_before, svid.not_after, svid.issued_at) == (NOW - CLOCK_SKEW, NOW + timedelta(seconds=4), NOW)
    assert svid.certificate.not_valid_after_utc == NOW + timedelta(seconds=4)
    assert not needs_renewal(svid, NOW + timedelta(seconds=1.99))
    assert needs_renewal(svid, NOW + timedelta(seconds=2))
    assert not needs_renewal(svid, NOW + timedelta(seconds=2), fraction=0.75)
    assert needs_renewal(svid, NOW + timedelta(seconds=3), fraction=0.75)
    with pytest.raises(ValueError, match="positive"):
        ca.issue(ORDERS, timedelta(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.issue(ORDERS, HOUR, now=datetime(2026, 11, 29))


# --- root rotation ---------------------------------------------------------------------------


def test_rotation_keeps_old_leaves_verifiable_until_the_old_root_is_retired(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    old_root, old_leaf = ca.root, ca.issue(ORDERS, HOUR)
    new_root = ca.rotate_root()
    new_leaf = ca.issue(PAYMENTS, HOUR)
    assert ca.roots == (new_root, old_root)
    new_leaf.certificate.verify_directly_issued_by(new_root)
    # Mid-rotation, a peer on the new root and one still on the old root accept each other.
    handshake(tmp_path, new_leaf, old_leaf, ca.trust_bundle_pem())
    handshake(tmp_path, old_leaf, new_leaf, ca.trust_bundle_pem())
    reloaded = CertificateAuthority.load_or_create(ca.directory, TD)
    assert reloaded.roots == (new_root, old_root)
    assert (ca.directory / CERT_FILE).read_bytes() == new_root.public_bytes(serialization.Encoding.PEM)

    assert ca.retire_roots([old_leaf, new_leaf]) == ()  # still in use
    assert ca.retire_roots([new_leaf, ca.issue(ORDERS, HOUR)]) == (old_root,)
    assert CertificateAuthority.load_or_create(ca.directory, TD).roots == (new_root,)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(tmp_path, new_leaf, old_leaf, ca.trust_bundle_pem())


def test_an_interrupted_rotation_still_loads(ca: CertificateAuthority) -> None:
    old_crt = (ca.directory / CERT_FILE).read_bytes()
    new_root = ca.rotate_root()
    (ca.directory / CERT_FILE).write_bytes(old_crt)  # as if it crashed before the last write
    reloaded = CertificateAuthority.load_or_create(ca.directory, TD)
    assert reloaded.root == new_root
    assert (ca.directory / CERT_FILE).read_bytes() == new_root.public_bytes(serialization.Encoding.PEM)
