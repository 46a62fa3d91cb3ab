"""Sidecar credentials: how a sidecar proves which node it is to xDS, the tap collector and the authz bridge.

Every sidecar presents a bearer token as gRPC metadata (``authorization: Bearer <token>``,
sent by Envoy as the ``initial_metadata`` of its xDS, access-log and ext_authz calls).
A token names the node and its service and is signed with HMAC-SHA256 under a key of
one *purpose*; each purpose key is derived from the mesh's root sidecar key:

    sidecar.key            root (0600): the control plane and the runtime, which mint every token
    sidecar-als.key        HMAC(root, "als"): the tap collectors, which can check ALS tokens only
    sidecar-authz.key      HMAC(root, "authz"): the authz bridge, likewise for ext_authz

so a collector (or a bridge) that is broken into cannot mint an xDS token and fetch a
sidecar's private key.  A token is bound to one node: whoever holds it *is* that node to
the purpose's server, so it lives only in 0600 files (the node's bootstrap) and in the
node's own xDS resources.  On Kubernetes the same :class:`Authenticator` interface is
implemented by a TokenReview of the pod's projected service-account token (docs/security.md).

    key = SidecarKey.issue(dd)                                  # root, at up
    token = key.tokens("xds").mint(SidecarIdentity("orders-1", "orders"))
    who = SidecarTokens.load(path, "als").authenticate(context.invocation_metadata())
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from core import credentials
from core.datadir import DataDir

Purpose = Literal["xds", "als", "authz"]
PURPOSES: tuple[Purpose, ...] = ("xds", "als", "authz")
METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
SCHEME = "Bearer "
ROOT_SECRET = "sidecar.key"
_VERSION = "gm1"
_MAC_BYTES = 32


def purpose_secret(purpose: Purpose) -> str:
    """The secret file name (under the data dir's secrets/) of one purpose's key."""
    return f"sidecar-{purpose}.key"


@dataclass(frozen=True)
class SidecarIdentity:
    """Who a credential proves a sidecar is: its node id (the instance) and its service."""

    node: str
    service: str


class Authenticator(Protocol):
    """Turns a call's gRPC metadata into the sidecar it proves, or None (no or a bad credential)."""

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> SidecarIdentity | None: ...


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SidecarTokens:
    """Mints and checks the tokens of one purpose (an :class:`Authenticator`)."""

    def __init__(self, key: bytes, purpose: Purpose):
        if purpose not in PURPOSES:
            raise ValueError(f"unknown sidecar credential purpose {purpose!r}; one of {', '.join(PURPOSES)}")
        self._key, self.purpose = key, purpose
        # The authz bridge checks a token on every request: a verified token costs a lookup
        # (~0.5 us) instead of an HMAC (~14 us).  Bounded, so random tokens only evict.
        self.identify = functools.lru_cache(maxsize=4096)(self._identify)

    @classmethod
    def load(cls, path: Path, purpose: Purpose) -> SidecarTokens:
        """The purpose key held in ``path`` (hex, 0600); CredentialError naming the file if it is unusable."""
        text = credentials.read(path)
        try:
            return cls(bytes.fromhex(text), purpose)
        except ValueError:
            raise credentials.CredentialError(
                f"{path}: not a sidecar {purpose} key (hex expected); remove it and run `greymesh up` again") from None

    def mint(self, who: SidecarIdentity) -> str:
        payload = f"{_b64(who.node.encode())}.{_b64(who.service.encode())}"
        return f"{_VERSION}.{payload}.{_b64(self._mac(payload))}"

    def metadata(self, who: SidecarIdentity) -> tuple[str, str]:
        """The (key, value) a sidecar sends as gRPC initial metadata."""
        return METADATA_KEY, SCHEME + self.mint(who)

    def _identify(self, token: str) -> SidecarIdentity | None:
        """The sidecar ``token`` names, if it was minted with this purpose's key; None otherwise."""
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            return None
        payload = f"{parts[1]}.{parts[2]}"
        try:
            mac = _unb64(parts[3])
            node, service = _unb64(parts[1]).decode(), _unb64(parts[2]).decode()
        except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        if not hmac.compare_digest(mac, self._mac(payload)) or not node or not service:
            return None
        return SidecarIdentity(node, service)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> SidecarIdentity | None:
        """The sidecar proven by the call's ``authorization: Bearer`` metadata; None when it is
        missing, repeated, malformed or not signed with this purpose's key."""
        values = [v for k, v in (metadata or ()) if k.lower() == METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith(SCHEME):
            return None
        return self.identify(values[0][len(SCHEME):].strip())

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, f"{_VERSION}.{payload}".encode(), hashlib.sha256).digest()[:_MAC_BYTES]


class SidecarKey:
    """The mesh's root sidecar key: derives every purpose's key (held by the control plane and the runtime)."""

    def __init__(self, root: str):
        self._root = root.encode()

    @classmethod
    def issue(cls, dd: DataDir) -> SidecarKey:
        """The root key of ``dd``'s mesh, created (0600) on first use."""
        return cls(credentials.issue(dd.secret(ROOT_SECRET)))

    def purpose_key(self, purpose: Purpose) -> bytes:
        return hmac.new(self._root, f"greymesh sidecar credential {purpose}".encode(), hashlib.sha256).digest()

    def tokens(self, purpose: Purpose) -> SidecarTokens:
        return SidecarTokens(self.purpose_key(purpose), purpose)

    def hand_out(self, dd: DataDir, purpose: Purpose) -> Path:
        """Write the purpose key to its own 0600 secret file (for the server that checks that
        purpose's tokens) and return the file's path; replaced if the root changed."""
        path = dd.secret(purpose_secret(purpose))
        value = self.purpose_key(purpose).hex()
        if path.exists() and credentials.matches(credentials.read(path), value):
            return path
        fresh = path.with_name(path.name + ".new")
        fresh.unlink(missing_ok=True)
        credentials.issue(fresh, value)
        os.replace(fresh, path)
        return path
