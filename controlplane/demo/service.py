"""A demo microservice: answers HTTP, calls its dependencies through its sidecar.

A request to ``/anything`` is answered with who served it (service, instance, subset)
and, nested, the answers of every service it calls, so a single response shows the
whole path it took through the mesh.  Dependencies are called through the sidecar's
outbound listener with the callee's name as Host, exactly as a meshed app would.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from controlplane import jsonhttp

log = logging.getLogger("greymesh.demo")

# Headers a service forwards to its callees so one request keeps one identity end to end.
PROPAGATED = ("x-request-id", "traceparent")


@dataclass(frozen=True)
class ServiceConfig:
    service: str
    instance: str
    subset: str
    port: int
    egress_port: int  # the sidecar's outbound listener on loopback
    calls: tuple[str, ...]
    call_timeout_s: float = 5.0


class _Egress(threading.local):
    """One keep-alive connection per handler thread to the sidecar's outbound listener."""

    def __init__(self, port: int, timeout: float):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, host: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):  # a pooled connection the sidecar closed is retried once, fresh
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", path, headers={"Host": host, **headers})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def make_server(cfg: ServiceConfig) -> ThreadingHTTPServer:
    egress = _Egress(cfg.egress_port, cfg.call_timeout_s)

    class Handler(jsonhttp.JsonHandler):
        log = log

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            forwarded = {h: v for h in PROPAGATED if (v := self.headers.get(h))}
            calls, ok = [], True
            for callee in cfg.calls:
                try:
                    status, body = egress.get(callee, self.path, forwarded)
                    answer = _json_or_text(body)
                except OSError as exc:
                    status, answer = 0, f"{type(exc).__name__}: {exc}"
                ok &= status == 200
                calls.append({"service": callee, "status": status, "response": answer})
            self.send_json(
                200 if ok else 502,
                {
                    "service": cfg.service,
                    "instance": cfg.instance,
                    "subset": cfg.subset,
                    "path": self.path,
                    "request_id": self.headers.get("x-request-id"),
                    "calls": calls,
                },
            )

    return jsonhttp.serve(Handler, "127.0.0.1", cfg.port)


def _json_or_text(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]


def serve(cfg: ServiceConfig) -> None:
    server = make_server(cfg)
    log.info("%s (%s/%s) listening on 127.0.0.1:%d, egress via :%d, calls %s",
             cfg.instance, cfg.service, cfg.subset, cfg.port, cfg.egress_port, list(cfg.calls) or "nothing")
    server.serve_forever()
