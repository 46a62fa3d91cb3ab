"""The one JSON-over-HTTP server base and client of greymesh's loopback APIs.

Standard-library http.server is enough for loopback admin traffic and demo workloads;
this adds JSON replies, keep-alive with TCP_NODELAY and logging through `logging`.

Every greymesh API (the control plane's admin API, the sink's, the tap service's) is an
:class:`ApiHandler` served with an :class:`Access`: before a handler method runs, the
request must name this server in ``Host`` (DNS rebinding), carry no foreign ``Origin``
or cross-site ``Sec-Fetch-Site`` (a browser page), present a bearer token one of the
API's holders was given (compared in constant time), and announce a body the API takes:
a ``Content-Length`` within the API's bound and ``Content-Type: application/json`` (a
cross-site ``text/plain`` POST needs no CORS preflight; JSON does, and is never
granted).  A refused request is answered with a JSON error and its body is never read.
``GET /healthz`` answers ``{"ok": true}`` and nothing else, without a token, so the
supervisor can probe it.  Demo applications use the plain :class:`JsonHandler` (their
sidecar authenticates and authorizes their callers).

The client side (:func:`call`, :func:`get`, :func:`http_ok`) sends a token when given
one and turns every failure into :class:`ApiError` (the peer answered an error, with its
message) or :class:`Unreachable` (nobody answered), so no command prints a raw urllib
traceback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType

from core import credentials
from core.errors import GreymeshError

JSON_TYPE = "application/json"
HEALTH_PATH = "/healthz"  # open to anyone on loopback; says nothing but that the server answers
CLI = "cli"  # the principal holding the data dir's api token: the CLI (and the runtime it runs)
ACTIONS = "actions"  # the actions stage: asks the control plane for overrides, reads the store
IDLE_TIMEOUT_S = 30.0  # a connection that sends nothing this long is dropped (a slow body holds no thread)
_DIGITS = re.compile(r"[0-9]{1,19}")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: sidecars and clients reuse connections
    # Headers and body go out as two writes; with Nagle on, the second waits for the
    # peer's delayed ACK (~40 ms on Linux) on every response.
    disable_nagle_algorithm = True
    log = logging.getLogger("greymesh.http")

    def send_json(self, status: int, doc: object, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        self.log.debug("%s " + format, self.address_string(), *args)


# --- who may call an API --------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """One holder of an API: who it is (``principal``, e.g. "cli") and the token it presents."""

    principal: str
    token: str = field(repr=False)

    @classmethod
    def load(cls, principal: str, path: Path) -> Credential:
        """The holder whose token is the secret file at ``path`` (credentials.CredentialError if
        it is missing or open to other users)."""
        return cls(principal, credentials.read(path))


@dataclass(frozen=True)
class Access:
    """Who may call one API and what a request may carry.

    ``only`` restricts paths to some principals (e.g. ``{"/logs": {"opa"}}``); any other
    path is open to every holder.  A body must be at most ``max_body_bytes``, of type
    application/json, in one of ``encodings`` ("identity": not encoded)."""

    holders: tuple[Credential, ...]
    max_body_bytes: int
    only: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    encodings: frozenset[str] = frozenset({"identity"})

    def __post_init__(self) -> None:
        if not self.holders:
            raise ValueError("an API needs at least one holder: nobody could call it")
        known = {h.principal for h in self.holders}
        for path, principals in self.only.items():
            if unknown := set(principals) - known:
                raise ValueError(f"{path}: {sorted(unknown)} hold no credential of this API")

    def principal(self, authorization: str | None) -> str | None:
        """The principal whose token ``Authorization: Bearer <token>`` presents; None if none does.
        Every holder's token is compared (in constant time), so the time says nothing of which matched."""
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = None
        for holder in self.holders:
            if credentials.matches(presented.strip(), holder.token):
                found = holder.principal
        return found


class Refused(Exception):
    """A request an API does not serve: its status and a message that names no secret."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ApiServer(ThreadingHTTPServer):
    """The server of one greymesh API; its handlers read ``access``."""

    daemon_threads = True  # handler threads never block process exit

    def __init__(self, address: tuple[str, int], handler: type[ApiHandler], access: Access):
        self.access = access
        super().__init__(address, handler)

    def names(self) -> frozenset[str]:
        """The ``Host`` values that mean this server: its address and port (and localhost's,
        when bound to loopback)."""
        host, port = self.server_address[:2]
        literal = f"[{host}]" if ":" in host else host
        names = {f"{literal}:{port}"}
        if ipaddress.ip_address(host).is_loopback:
            names.add(f"localhost:{port}")
        return frozenset(n.lower() for n in names)


class ApiHandler(JsonHandler):
    """The base of every greymesh API: requests are checked (see the module docstring)
    before ``do_<METHOD>`` runs.  A handler reads its body with :meth:`read_body` and
    knows its caller as ``self.principal``."""

    timeout = IDLE_TIMEOUT_S
    server: ApiServer
    principal: str = ""
    _length = 0

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False  # http.server answered the malformed request itself
        try:
            self._admit()
        except Refused as exc:
            self.log.warning("refused %s %s from %s: %d %s", self.command, self.path.split("?", 1)[0],
                             self.client_address[0], exc.status, exc)
            self.close_connection = True  # any body stays unread: the stream cannot be reused
            extra = {"Connection": "close"}
            if exc.status == 401:
                extra["WWW-Authenticate"] = 'Bearer realm="greymesh"'
            self.send_json(exc.status, {"error": str(exc)}, extra)
            return False
        if self.path == HEALTH_PATH and self.command == "GET":
            self.send_json(200, {"ok": True})
            return False  # answered: no handler method runs
        return True

    def _admit(self) -> None:
        access, headers = self.server.access, self.headers
        self.principal = ""  # one handler serves every request of a keep-alive connection
        host = (headers.get("Host") or "").strip().lower()
        if host not in self.server.names():
            raise Refused(421, f"Host {host or '(none)'!r} is not this server; greymesh APIs answer "
                               f"{' or '.join(sorted(self.server.names()))} only")
        origin = headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{host}":
            raise Refused(403, f"cross-origin request from {origin!r} refused: greymesh APIs serve no web page")
        site = (headers.get("Sec-Fetch-Site") or "none").strip().lower()
        if site not in ("same-origin", "none"):
            raise Refused(403, f"{site} request refused (Sec-Fetch-Site): greymesh APIs serve no web page")
        if self.path == HEALTH_PATH and self.command == "GET":
            self._length = self._content_length()
            return
        # Who before what: a caller without a credential learns nothing of paths or bounds.
        principal = access.principal(headers.get("Authorization"))
        if principal is None:
            raise Refused(401, "this API requires its credential (Authorization: Bearer <token>); "
                               "the greymesh CLI sends the one `greymesh up` created")
        allowed = access.only.get(self.path.split("?", 1)[0])
        if allowed is not None and principal not in allowed:
            raise Refused(403, f"{principal} may not call {self.path.split('?', 1)[0]}")
        self.principal = principal
        self._length = self._content_length()
        if self._length:
            media = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if media != JSON_TYPE:
                raise Refused(415, f"Content-Type {media or '(none)'!r}: send {JSON_TYPE}")
            encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in access.encodings:
                raise Refused(415, f"Content-Encoding {encoding!r}: this API takes "
                                   f"{', '.join(sorted(access.encodings))}")

    def _content_length(self) -> int:
        """The announced body length, checked against the API's bound; Refused otherwise."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise Refused(411, "chunked bodies are not taken: send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            if self.command in _BODY_METHODS:
                raise Refused(411, "Content-Length required")
            return 0
        if len(values) > 1 or not _DIGITS.fullmatch(values[0].strip()):
            raise Refused(400, f"Content-Length {', '.join(values)!r} is not one non-negative number")
        length = int(values[0])
        if length and self.command not in _BODY_METHODS:
            raise Refused(400, f"{self.command} takes no body")
        if length > self.server.access.max_body_bytes:
            raise Refused(413, f"a body of {length} bytes; this API takes at most "
                               f"{self.server.access.max_body_bytes}")
        return length

    def read_body(self) -> bytes:
        """The request's body: exactly the Content-Length that was checked, read once."""
        length, self._length = self._length, 0
        return self.rfile.read(length) if length else b""


def serve(handler: type[JsonHandler], host: str, port: int, access: Access | None = None) -> ThreadingHTTPServer:
    """A threaded server whose handler threads never block process exit.  An API
    (an ApiHandler) must be given its ``access``; a demo application's handler none."""
    if issubclass(handler, ApiHandler):
        if access is None:
            raise TypeError(f"{handler.__name__} is an API: serve it with its Access")
        return ApiServer((host, port), handler, access)
    if access is not None:
        raise TypeError(f"{handler.__name__} is not an ApiHandler: it would not check {access!r}")
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


# --- client -------------------------------------------------------------------------


class ApiError(GreymeshError):
    """The API answered with an error status; ``errors`` are its own messages."""

    def __init__(self, url: str, status: int, errors: list[str]):
        super().__init__("\n".join(errors) or f"{url} answered {status}")
        self.url, self.status, self.errors = url, status, errors


class Unreachable(GreymeshError):
    """Nothing answered at the URL (not running, or not listening yet)."""


def call(url: str, body: bytes | dict | None = None, *, token: str | None = None,
         headers: dict[str, str] | None = None, timeout_s: float = 30.0, method: str | None = None) -> dict:
    """One request; the JSON answer.  A dict body is sent as JSON; ``token`` as
    ``Authorization: Bearer``.  An error status raises ApiError with the API's messages
    (its ``errors`` list or ``error`` string)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if data is None and method in _BODY_METHODS:
        data = b""  # so urllib sends Content-Length: 0, which every API wants on a POST
    hdrs = {"Content-Type": JSON_TYPE} if isinstance(body, dict) else {}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read() or b"{}")
        except ValueError:
            doc = {}
        errors = doc.get("errors") or ([doc["error"]] if doc.get("error") else [])
        raise ApiError(url, exc.code, [str(e) for e in errors] or [f"{url} answered {exc.code} {exc.reason}"]) \
            from None
    except (OSError, ValueError) as exc:
        raise Unreachable(f"{url} is not reachable ({exc})") from None


def get(url: str, timeout_s: float = 5.0, *, token: str | None = None) -> dict:
    return call(url, timeout_s=timeout_s, token=token)


def http_ok(url: str, timeout_s: float = 2.0, context: ssl.SSLContext | None = None) -> bool:
    """True when url answers 200 (a readiness probe; an API's is its open /healthz).
    ``context`` verifies an https url's server (default: the system's roots)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:
            return resp.status == 200
    except OSError:
        return False
