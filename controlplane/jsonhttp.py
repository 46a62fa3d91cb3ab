"""The small HTTP/JSON server base shared by the control plane's admin API and the demo services.

Standard-library http.server is enough for loopback admin traffic and demo workloads;
this adds JSON replies, keep-alive with TCP_NODELAY and logging through `logging`.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
