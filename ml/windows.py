"""Reading the per-service 10-second roll-ups (``service_windows``) the detectors learn from.

The ml stage reads the store only through the sink's loopback ``POST /query`` API
(audit/sink.py): an embedded chdb store belongs to the sink's process, and a ClickHouse
server answers the same SQL, so one client serves both.  Windows come back oldest first
as :class:`Window` rows, their ``window`` as Unix seconds (the start of the window).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

# The roll-up's numeric columns, in the order features.py derives its vector from.
ROLLUP_FIELDS: tuple[str, ...] = (
    "requests", "errors_4xx", "errors_5xx", "resets", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "bytes_in", "bytes_out", "distinct_callers", "authz_denials",
)
WINDOW_SECONDS = 10
LATENESS_S = 5.0  # a window is read this long after it ends: Envoy flushes logs every 1 s, the sink every 0.5 s


def closed_until(now: float, lateness_s: float = LATENESS_S) -> int:
    """The start of the first window that is not yet complete in the store at ``now``:
    every window before it has ended and had ``lateness_s`` for its logs to arrive."""
    return int(now - lateness_s) // WINDOW_SECONDS * WINDOW_SECONDS


def sql_string(text: str) -> str:
    """A ClickHouse string literal of ``text`` (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class WindowSourceError(Exception):
    """The store could not be read; the message says where and what to do."""


@dataclass(frozen=True)
class Window:
    service: str
    window: int  # Unix seconds, start of the 10 s window
    values: dict[str, float]  # ROLLUP_FIELDS -> value


class WindowSource(Protocol):
    def fetch(self, since: int, until: int, services: list[str] | None = None) -> list[Window]: ...


class SinkWindows:
    """``service_windows`` through a sink's ``/query`` API at ``base_url`` (http://host:port)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def fetch(self, since: int, until: int, services: list[str] | None = None) -> list[Window]:
        """Windows that start in [since, until), every service unless ``services`` is given."""
        where = f"window >= toDateTime({int(since)}) AND window < toDateTime({int(until)})"
        if services:
            names = ", ".join(map(sql_string, services))
            where += f" AND service IN ({names})"
        sql = (f"SELECT service, toUInt32(window) AS w, {', '.join(ROLLUP_FIELDS)} FROM service_windows "
               f"WHERE {where} ORDER BY w, service")
        columns, rows = self.query(sql)
        return [Window(service=r[0], window=int(r[1]), values=dict(zip(ROLLUP_FIELDS, map(float, r[2:]))))
                for r in rows]

    def query(self, sql: str) -> tuple[list[str], list[list]]:
        req = urllib.request.Request(self.base_url + "/query", data=json.dumps({"sql": sql}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("error", str(exc))
            raise WindowSourceError(f"the store refused the query at {req.full_url}: {detail}") from None
        except OSError as exc:
            raise WindowSourceError(f"the sink at {req.full_url} is not reachable ({exc}); is the mesh up "
                                    "(`greymesh status`)?") from None
        return doc["columns"], doc["rows"]
