"""The loop's sample query (actions/samples.py) on both store backends: chdb and a real
ClickHouse 18.16 server, through the sandbox the sink runs every reader's SQL in."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from actions.samples import StoreSamples
from audit import store as audit_store
from audit.store import Store, table_for
from core.contracts import NAMES, outbound_cluster
from core.storeclient import StoreError

T0_S = 1_764_400_000


class SinkQuery:
    """What the sink's ``POST /query`` does with a reader's SQL, and how StoreClient reports a refusal."""

    def __init__(self, store: Store):
        self.store = store
        self.queries: list[str] = []

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        self.queries.append(sql)
        try:
            columns, rows = self.store.query_readonly(sql)
        except audit_store.StoreError as exc:
            raise StoreError(f"the store refused the query at http://127.0.0.1/query: {exc}") from None
        return columns, [list(r) for r in rows]


def l7(i: int, *, cluster: str, at_s: float, duration_ms: float, status: int = 200, flags: str = "-",
       direction: str = "outbound") -> list[Any]:
    ev = {name: "" for name in NAMES["l7"]}
    ev.update(v=1, event_id=f"e{i:06d}", time_us=int(at_s * 1_000_000), sidecar="orders-1", service="orders",
              direction=direction, status=status, response_flags=flags, duration_us=int(duration_ms * 1000),
              request_bytes=100, response_bytes=200, upstream_cluster=cluster, src_port=1, dst_port=2)
    return [ev[n] for n in NAMES["l7"]] + [0, i]


def test_samples_per_subset_of_the_callers_requests_in_the_range(store: Store) -> None:
    v1, v2 = outbound_cluster("payments", "v1"), outbound_cluster("payments", "v2")
    rows = []
    for i in range(60):  # in [T0, T0+30): v1 fast and fine, v2 slow with 5xx and resets
        rows.append(l7(i, cluster=v1, at_s=T0_S + i / 2, duration_ms=20 + i % 5))
        reset = i % 10 == 1
        rows.append(l7(1000 + i, cluster=v2, at_s=T0_S + i / 2, duration_ms=80 + i % 5,
                       status=503 if i % 10 == 0 else 0 if reset else 200, flags="UF,URX" if reset else "-"))
    rows += [l7(2000, cluster=v1, at_s=T0_S - 0.000001, duration_ms=9999),  # before the range
             l7(2001, cluster=v1, at_s=T0_S + 30, duration_ms=9999),  # at its end: excluded
             l7(2002, cluster=v1, at_s=T0_S + 1, duration_ms=9999, direction="inbound"),  # the callee's own view
             l7(2003, cluster=outbound_cluster("payments", "v3"), at_s=T0_S + 1, duration_ms=9999),
             l7(2004, cluster=outbound_cluster("orders", "v1"), at_s=T0_S + 1, duration_ms=9999)]
    store.insert(table_for("l7"), NAMES["l7"] + ("kpartition", "koffset"), rows)
    client = SinkQuery(store)
    got = StoreSamples(client).samples("payments", ["v1", "v2"], T0_S, T0_S + 30)  # type: ignore[arg-type]
    assert [(s.subset, s.requests, s.errors) for s in got] == [("v1", 60, 0), ("v2", 60, 12)]
    assert sorted(got[0].latencies_ms) == sorted(20.0 + i % 5 for i in range(60))
    assert float(np.median(got[1].latencies_ms)) == 82.0
    # At most `cap` per subset.
    capped = StoreSamples(client, cap=10).samples("payments", ["v1", "v2"], T0_S, T0_S + 30)  # type: ignore[arg-type]
    assert [s.requests for s in capped] == [10, 10]
    # A subset with no requests is an empty sample, not a missing one.
    empty = StoreSamples(client).samples("payments", ["v9"], T0_S, T0_S + 30)  # type: ignore[arg-type]
    assert [(s.subset, s.requests, s.latencies_ms.size) for s in empty] == [("v9", 0, 0)]


def test_a_store_without_the_table_is_a_store_error(empty_store: Store) -> None:
    with pytest.raises(StoreError, match="refused the query"):
        StoreSamples(SinkQuery(empty_store)).samples("payments", ["v1"], T0_S, T0_S + 30)  # type: ignore[arg-type]
