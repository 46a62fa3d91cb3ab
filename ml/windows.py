"""Reading the per-service 10-second roll-ups (``service_windows``) the detectors learn from.

The ml stage reads the store only through the one store client (core/storeclient.py:
the sink's read-only ``/query`` API), so it works the same on chdb and on a ClickHouse
server.  Windows come back oldest first as :class:`Window` rows, their ``window`` as
Unix seconds (the start of the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.contracts import ROLLUP_FIELDS, WINDOW_SECONDS
from core.storeclient import StoreClient, sql_string

LATENESS_S = 5.0  # a window is read this long after it ends: Envoy flushes logs every 1 s, the sink every 0.5 s


def closed_until(now: float, lateness_s: float = LATENESS_S) -> int:
    """The start of the first window that is not yet complete in the store at ``now``:
    every window before it has ended and had ``lateness_s`` for its logs to arrive."""
    return int(now - lateness_s) // WINDOW_SECONDS * WINDOW_SECONDS


@dataclass(frozen=True)
class Window:
    service: str
    window: int  # Unix seconds, start of the 10 s window
    values: dict[str, float]  # ROLLUP_FIELDS -> value


class WindowSource(Protocol):
    def fetch(self, since: int, until: int, services: list[str] | None = None) -> list[Window]: ...


class SinkWindows:
    """``service_windows`` through ``store`` (a client of the sink's API, with its reader's token)."""

    def __init__(self, store: StoreClient):
        self.store = store

    def fetch(self, since: int, until: int, services: list[str] | None = None) -> list[Window]:
        """Windows that start in [since, until), every service unless ``services`` is given.
        core.storeclient.StoreError when the store cannot be read."""
        where = f"window >= toDateTime({int(since)}) AND window < toDateTime({int(until)})"
        if services:
            names = ", ".join(map(sql_string, services))
            where += f" AND service IN ({names})"
        sql = (f"SELECT service, toUInt32(window) AS w, {', '.join(ROLLUP_FIELDS)} FROM service_windows "
               f"WHERE {where} ORDER BY w, service")
        _, rows = self.store.query(sql)
        return [Window(service=r[0], window=int(r[1]), values=dict(zip(ROLLUP_FIELDS, map(float, r[2:]))))
                for r in rows]
