"""Workload identity: the mesh's own certificate authority, issuing SPIFFE X.509 SVIDs.

Every sidecar proves who it is with a short-lived certificate whose only name is its
SPIFFE ID, ``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``, signed directly by
the mesh root (no intermediates).  The control plane issues them in memory and hands
them to Envoy over SDS (``controlplane/sds.py``), so no key file ever reaches a sidecar.

The CA directory (mode 0700) holds:

* ``ca.key``     the signing root's private key (mode 0600, written atomically);
* ``ca.crt``     the signing root's certificate (a copy for people and ``openssl``);
* ``bundle.pem`` every root peers must trust: the signing root, plus roots being
                 rotated out (see :meth:`CertificateAuthority.rotate_root` and docs/identity.md).

The signing root is the bundle entry whose public key matches ``ca.key``, so every
file can be replaced on its own and an interrupted rotation always loads.  Not
thread-safe: the control plane calls it from its event loop only.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
BUNDLE_FILE = "bundle.pem"

# Certificates start this much before they are issued, so a peer whose clock is a
# little behind does not see them as not yet valid.  Not part of an SVID's lifetime.
CLOCK_SKEW = timedelta(seconds=30)
ROOT_LIFETIME = timedelta(days=3650)

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_RULE = "a lowercase DNS label: a-z, 0-9 and '-', at most 63, not starting or ending with '-'"
_TRUST_DOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*")
_SPIFFE_ID = re.compile(r"spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)")


class CAError(Exception):
    """The CA directory cannot be used as it is; the message says what to do about it."""


# --- SPIFFE IDs ----------------------------------------------------------------


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """The SPIFFE ID of a service's workloads; ValueError naming the bad part."""
    check_trust_domain(trust_domain)
    for what, value in (("namespace", namespace), ("service", service)):
        _check(value, _LABEL, what, _LABEL_RULE)
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def check_trust_domain(trust_domain: str) -> None:
    """ValueError unless ``trust_domain`` is a valid trust domain name."""
    _check(trust_domain, _TRUST_DOMAIN, "trust domain", "dot-separated lowercase DNS labels, e.g. 'greymesh.local'")


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """(trust domain, namespace, service) of a mesh SPIFFE ID; ValueError if it is not one."""
    m = _SPIFFE_ID.fullmatch(uri)
    if m is None:
        raise ValueError(f"{uri!r} is not a mesh SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service>)")
    parts = m["td"], m["ns"], m["sa"]
    spiffe_id(*parts)  # validates each part
    return parts


def trust_domain_of(root: x509.Certificate) -> str | None:
    """The trust domain a mesh root names in its URI SAN (``spiffe://<trust-domain>``), if any."""
    try:
        uris = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return None
    return next((u.removeprefix("spiffe://") for u in uris if u.startswith("spiffe://")), None)


def _check(value: str, pattern: re.Pattern[str], what: str, rule: str) -> None:
    if not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: expected {rule}")


# --- SVIDs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Svid:
    """An X.509 SVID and its private key, as PEM."""

    spiffe_id: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)  # never in a repr, so never in a log line
    # What the workload presents: the leaf, then any intermediates (none: the root signs leaves).
    chain_pem: bytes = field(repr=False)
    not_before: datetime  # as in the certificate: CLOCK_SKEW before issued_at
    not_after: datetime
    issued_at: datetime
    hosts: tuple[str, ...] = ()  # DNS names / IP addresses it also names (the entrypoint's: its ingress)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def needs_renewal(svid: Svid, now: datetime, fraction: float = 0.5) -> bool:
    """Whether ``fraction`` of the SVID's lifetime has passed (re-issue at half-life by default).

    Renewing well before expiry leaves the rest of the lifetime to deliver the new
    certificate, even across a control-plane restart or a slow push.
    """
    return now >= svid.issued_at + (svid.not_after - svid.issued_at) * fraction


# --- the certificate authority ---------------------------------------------------


class CertificateAuthority:
    """The mesh root(s) of one trust domain, persisted in a private directory."""

    def __init__(self, directory: Path, trust_domain: str, key: ec.EllipticCurvePrivateKey,
                 roots: tuple[x509.Certificate, ...]):
        self.directory, self.trust_domain = directory, trust_domain
        self._key = key
        self._roots = roots  # the signing root first

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        """Load the CA in ``directory``, or create one there if it holds none.

        The directory is the CA's own: a new CA makes it mode 0700.  An existing CA is
        never regenerated: a new root would make every peer reject every SVID the old
        one signed.
        """
        directory = Path(directory)
        check_trust_domain(trust_domain)
        if (directory / KEY_FILE).exists() or (directory / BUNDLE_FILE).exists():
            return cls._load(directory, trust_domain)
        return cls._create(directory, trust_domain)

    @classmethod
    def _create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is subject to the umask, and the directory may have existed
        key = _new_key()
        ca = cls(directory, trust_domain, key, (_root_certificate(key, trust_domain, datetime.now(UTC)),))
        _write(directory / KEY_FILE, _key_pem(key), 0o600)
        _write(directory / CERT_FILE, _pem(ca.root), 0o644)
        _write(directory / BUNDLE_FILE, ca.trust_bundle_pem(), 0o644)  # last: its presence marks a complete CA
        return ca

    @classmethod
    def _load(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        key_path, bundle_path = directory / KEY_FILE, directory / BUNDLE_FILE
        for path in (key_path, bundle_path):
            if not path.exists():
                raise CAError(f"{path} is missing, so the CA in {directory} is incomplete. Restore it from a "
                              f"backup; or, to start a new CA (every sidecar gets new SVIDs), delete {directory}")
        _require_private(directory, "700")
        _require_private(key_path, "600")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            roots = tuple(x509.load_pem_x509_certificates(bundle_path.read_bytes()))
        except ValueError as exc:
            raise CAError(f"cannot read the CA in {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise CAError(f"{key_path} is not an EC P-256 private key")
        signer = next((r for r in roots if _same_key(r.public_key(), key.public_key())), None)
        if signer is None:
            raise CAError(f"no root in {bundle_path} matches {key_path}; restore the pair from a backup")
        if (found := trust_domain_of(signer)) != trust_domain:
            raise CAError(f"the CA in {directory} is for trust domain {found!r}, not {trust_domain!r}; a trust "
                          "domain cannot change in place: use another CA directory (every sidecar gets new SVIDs)")
        ca = cls(directory, trust_domain, key, (signer, *(r for r in roots if r is not signer)))
        if not (directory / CERT_FILE).exists() or (directory / CERT_FILE).read_bytes() != _pem(signer):
            _write(directory / CERT_FILE, _pem(signer), 0o644)  # a rotation was interrupted before this copy
        return ca

    @property
    def root(self) -> x509.Certificate:
        """The root that signs new SVIDs."""
        return self._roots[0]

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """Every trusted root, the signing one first."""
        return self._roots

    def trust_bundle_pem(self) -> bytes:
        """Every currently trusted root, as the PEM peers verify SVIDs against."""
        return b"".join(_pem(r) for r in self._roots)

    def issue(self, spiffe_id: str, lifetime: timedelta, now: datetime | None = None,
              hosts: tuple[str, ...] = ()) -> Svid:
        """A fresh key and certificate for ``spiffe_id``, valid for ``lifetime`` from ``now``.

        ``hosts`` (DNS names, IP addresses) are added to its SANs for clients outside the
        mesh: the entrypoint's sidecar serves its ingress with this certificate.  The root's
        name constraint covers URIs only, so it may vouch for them."""
        trust_domain, _, _ = parse_spiffe_id(spiffe_id)
        if trust_domain != self.trust_domain:
            raise ValueError(f"{spiffe_id} is outside this CA's trust domain {self.trust_domain!r}")
        if lifetime <= timedelta(0):
            raise ValueError(f"an SVID lifetime must be positive, not {lifetime}")
        now = _aware(now)
        key = _new_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # the identity is the URI SAN alone (which is critical, as RFC 5280 asks)
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + lifetime, self.root.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id),
                                                        *map(_host_name, hosts)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_pem = _pem(cert)
        return Svid(spiffe_id=spiffe_id, cert_pem=cert_pem, key_pem=_key_pem(key), chain_pem=cert_pem,
                    not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, issued_at=now,
                    hosts=tuple(hosts))

    def rotate_root(self, now: datetime | None = None) -> x509.Certificate:
        """Start signing with a new root, still trusting the old ones (docs/identity.md: the procedure).

        Peers must hold the new bundle before they see a leaf from the new root, so
        push the bundle everywhere first, then re-issue every SVID, then
        :meth:`retire_roots`.
        """
        key = _new_key()
        root = _root_certificate(key, self.trust_domain, _aware(now))
        self._key, self._roots = key, (root, *self._roots)
        # Bundle first: whatever a crash interrupts, ca.key names a root the bundle holds.
        _write(self.directory / BUNDLE_FILE, self.trust_bundle_pem(), 0o644)
        _write(self.directory / KEY_FILE, _key_pem(key), 0o600)
        _write(self.directory / CERT_FILE, _pem(root), 0o644)
        return root

    def retire_roots(self, in_use: Iterable[Svid]) -> tuple[x509.Certificate, ...]:
        """Stop trusting every old root that signed none of ``in_use``; returns the roots dropped.

        Pass every SVID any sidecar may still present, and only once each sidecar has
        ACKed its re-issued one: a leaf whose root is gone is refused by every peer.
        """
        leaves = [s.certificate for s in in_use]
        keep = [r for r in self._roots if r is self.root or any(_issued_by(leaf, r) for leaf in leaves)]
        dropped = tuple(r for r in self._roots if r not in keep)
        if dropped:
            self._roots = tuple(keep)
            _write(self.directory / BUNDLE_FILE, self.trust_bundle_pem(), 0o644)
        return dropped


# --- certificates ------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _root_certificate(key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime) -> x509.Certificate:
    """A self-signed root that may sign leaves (pathlen 0) only for URIs in ``trust_domain``."""
    serial = x509.random_serial_number()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "greymesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"greymesh root {serial:x}"),  # unique, so paths never confuse roots
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        # An RFC 5280 URI constraint names a host: this root can only vouch for
        # spiffe://<trust_domain>/... (enforced by OpenSSL and BoringSSL, hence Envoy).
        .add_extension(x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                                            excluded_subtrees=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _issued_by(leaf: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_key(a: object, b: ec.EllipticCurvePublicKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return isinstance(a, ec.EllipticCurvePublicKey) and a.public_bytes(*spki) == b.public_bytes(*spki)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    return now


# --- files -------------------------------------------------------------------------


def _require_private(path: Path, fix: str) -> None:
    """Refuse a CA file or directory that group or others can access at all."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CAError(f"{path} has mode {mode:04o}, but the CA's private key must be accessible to its owner "
                      f"only; fix with: chmod {fix} {path}")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically; the file is created with ``mode``, so it is never wider, even briefly."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left over from a crash
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
