"""A demo microservice: answers HTTP, calls its dependencies through its sidecar.

A request to ``/``, ``/anything[/...]`` or ``/admin[/...]`` is answered with who served
it (service, instance, subset), the path it received (after the sidecars normalized it:
what the policy decided on) and, nested, the answers of every service it calls, so a
single response shows the whole path it took through the mesh; any other path is a 404,
as a real API's would be.  ``/admin`` stands for an API the ingress policy guards
(policies/ingress.rego).  Dependencies are called through the sidecar's outbound listener
with the callee's name as Host, exactly as a meshed app would.

Knobs make a service misbehave on purpose, for the anomaly detector's fault scenarios
(greymesh/scenarios.py): ``<data dir>/knobs/<service>.json`` holds any of ``latency_ms``
(added before answering), ``error_ratio`` (share of requests answered 503) and
``response_bytes`` (padding added to each answer).  ``<service>.<subset>.json`` does the
same for one subset (a bad canary) and, while it exists, wins over the service's file.
Every instance re-reads its files at most once a second, so a change applies without a
restart.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

from core import jsonhttp

log = logging.getLogger("greymesh.demo")

# Headers a service forwards to its callees so one request keeps one identity end to end.
PROPAGATED = ("x-request-id", "traceparent")
API_PATHS = ("/", "/anything", "/admin")  # and anything below /anything/ and /admin/


def knobs_path(data_dir: Path, service: str, subset: str | None = None) -> Path:
    """Where a service's knobs live (written by the fault scenarios, read by every instance),
    or with ``subset`` those of that subset's instances only."""
    return data_dir / "knobs" / (f"{service}.{subset}.json" if subset else f"{service}.json")


@dataclass(frozen=True)
class Knobs:
    latency_ms: float = 0.0
    error_ratio: float = 0.0
    response_bytes: int = 0


class _KnobFile:
    """A knobs file, re-read when its mtime changes, looked at most once a second.

    A file that is absent means no knobs; one that does not parse keeps the knobs in
    force and is logged once, so a half-written edit never takes a service down."""

    def __init__(self, path: Path | None):
        self.path = path
        self.knobs = Knobs()
        self.present = False  # the file exists (its knobs apply, even all-zero ones)
        self._checked = 0.0
        self._mtime: float | None = None
        self._lock = threading.Lock()

    def get(self) -> Knobs:
        now = time.monotonic()
        if self.path is None or now - self._checked < 1.0:
            return self.knobs
        with self._lock:
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime
            except FileNotFoundError:
                self.knobs, self._mtime, self.present = Knobs(), None, False
                return self.knobs
            self.present = True
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    doc = json.loads(self.path.read_text(encoding="utf-8"))
                    self.knobs = Knobs(latency_ms=float(doc.get("latency_ms", 0)),
                                       error_ratio=float(doc.get("error_ratio", 0)),
                                       response_bytes=int(doc.get("response_bytes", 0)))
                    log.info("knobs from %s: %s", self.path, self.knobs)
                except (OSError, ValueError, TypeError, AttributeError) as exc:
                    log.warning("%s: not valid knobs (%s); keeping %s", self.path, exc, self.knobs)
            return self.knobs


@dataclass(frozen=True)
class ServiceConfig:
    service: str
    instance: str
    subset: str
    port: int
    egress_port: int  # the sidecar's outbound listener on loopback
    calls: tuple[str, ...]
    call_timeout_s: float = 5.0
    knobs: tuple[Path, ...] = ()  # see knobs_path(): the first file that exists applies


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
    knob_files = [_KnobFile(path) for path in cfg.knobs]

    class Handler(jsonhttp.JsonHandler):
        log = log

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path not in API_PATHS and not path.startswith(("/anything/", "/admin/")):
                self.send_json(404, {"service": cfg.service, "error": f"no such path: {path}"})
                return
            knobs = next((k for f in knob_files if (k := f.get()) and f.present), Knobs())
            if knobs.latency_ms > 0:
                time.sleep(knobs.latency_ms / 1000)
            if knobs.error_ratio > 0 and random.random() < knobs.error_ratio:
                self.send_json(503, {"service": cfg.service, "error": "injected by knobs"})
                return
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
                    **({"padding": "x" * knobs.response_bytes} if knobs.response_bytes > 0 else {}),
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


def main(argv: list[str] | None = None) -> int:
    """`python -m greymesh.demo.service`: one demo service instance (a workload of the runtime)."""
    p = argparse.ArgumentParser(prog="python -m greymesh.demo.service", description="Run one demo service instance.")
    p.add_argument("--data-dir", type=Path, required=True)
    for flag in ("--service", "--instance", "--subset"):
        p.add_argument(flag, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--egress-port", type=int, required=True)
    p.add_argument("--calls", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    calls = tuple(c for c in args.calls.split(",") if c)
    try:
        serve(ServiceConfig(args.service, args.instance, args.subset, args.port, args.egress_port, calls,
                            knobs=(knobs_path(args.data_dir, args.service, args.subset),
                                   knobs_path(args.data_dir, args.service))))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
