"""JSON Web Tokens for tests of the ingress: an RS256 signing key, its JWKS, and tokens.

Minted with ``cryptography`` alone (RFC 7515/7518): the mesh verifies tokens in Envoy,
so greymesh itself needs no JWT library.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass
class Signer:
    """One RS256 key: its public JWKS, and tokens it signs."""

    kid: str
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537,
                                                                                     key_size=2048))

    def jwks(self) -> dict:
        pub = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                          "n": _int(pub.n), "e": _int(pub.e)}]}

    def token(self, claims: dict, *, lifetime_s: float = 300) -> str:
        """A token with ``claims``, ``iat`` now and ``exp`` after ``lifetime_s`` (negative: expired)."""
        now = int(time.time())
        body = {"iat": now, "exp": now + int(lifetime_s), **claims}
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"
