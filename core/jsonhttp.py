"""The one JSON-over-HTTP server base and client of greymesh's loopback APIs.

Standard-library http.server is enough for loopback admin traffic and demo workloads;
this adds JSON replies, keep-alive with TCP_NODELAY and logging through `logging`.
The client side (:func:`call`, :func:`get`, :func:`http_ok`) turns every failure into
:class:`ApiError` (the peer answered an error, with its message) or
:class:`Unreachable` (nobody answered), so no command prints a raw urllib traceback.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from core.errors import GreymeshError


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: sidecars and clients reuse connections
    # Headers and body go out as two writes; with Nagle on, the second waits for the
    # peer's delayed ACK (~40 ms on Linux) on every response.
    disable_nagle_algorithm = True
    log = logging.getLogger("greymesh.http")

    def send_json(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        self.log.debug("%s " + format, self.address_string(), *args)


def serve(handler: type[JsonHandler], host: str, port: int) -> ThreadingHTTPServer:
    """A threaded server whose handler threads never block process exit."""
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


def call(url: str, body: bytes | dict | None = None, *, headers: dict[str, str] | None = None,
         timeout_s: float = 30.0, method: str | None = None) -> dict:
    """One request; the JSON answer.  A dict body is sent as JSON.  An error status raises
    ApiError with the API's messages (its ``errors`` list or ``error`` string)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json"} if isinstance(body, dict) else {}
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


def get(url: str, timeout_s: float = 5.0) -> dict:
    return call(url, timeout_s=timeout_s)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when url answers 200 (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False
