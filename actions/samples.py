"""Per-subset samples of a service's traffic as its callers saw it: what the canary judge compares.

Every caller's sidecar taps each request it sends (``tap_l7``, direction ``outbound``) and
names the Envoy cluster it routed it to, one per subset of the callee
(:func:`core.contracts.outbound_cluster`).  So the requests one subset answered in a time
range, and how each went, are one query away, from the same windows the detector scored.

At most :data:`SAMPLE_CAP` requests per subset are read, picked by a hash of the event id
(a fixed pseudo-random sample, not the first rows stored): the tests need a few thousand
to be decisive, and a busy service must not make a judgement read millions of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.contracts import NAME_RULE, RESET_FLAGS, outbound_cluster
from core.storeclient import StoreClient, StoreError, sql_string

SAMPLE_CAP = 5000  # requests per subset per judgement


@dataclass(frozen=True)
class SubsetSample:
    """Requests one subset answered: their latencies, how many, how many failed (5xx or a reset)."""

    subset: str
    latencies_ms: np.ndarray
    requests: int
    errors: int


class SampleSource(Protocol):
    def samples(self, service: str, subsets: Sequence[str], start_s: int, end_s: int) -> list[SubsetSample]:
        """One sample per subset, in ``subsets``' order, of the requests to ``service`` that
        started in ``[start_s, end_s)``; StoreError when the store cannot answer."""


def sample_sql(service: str, subsets: Sequence[str], start_s: int, end_s: int, cap: int = SAMPLE_CAP) -> str:
    """The query of :class:`StoreSamples`.  Names are checked against the mesh's name rule and
    quoted, numbers are ints: nothing else reaches the SQL.  ValueError names a bad value."""
    for what, name in (("service", service), *(("subset", s) for s in subsets)):
        if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
            raise ValueError(f"{what} {name!r} is not a mesh name (a DNS label); no samples are read for it")
    if not subsets:
        raise ValueError(f"{service}: no subsets to sample")
    for what, number in (("start_s", start_s), ("end_s", end_s), ("cap", cap)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"{what} must be a non-negative int, not {number!r}")
    clusters = ", ".join(sql_string(outbound_cluster(service, s)) for s in subsets)
    # ts (whole seconds of time_us) is in the table's sort key and partitions: it prunes the scan.
    return ("SELECT upstream_cluster, duration_us, status, response_flags FROM tap_l7 "
            f"WHERE direction = 'outbound' AND upstream_cluster IN ({clusters}) "
            f"AND ts >= toDateTime({start_s}) AND ts < toDateTime({end_s}) "
            f"AND time_us >= {start_s * 1_000_000} AND time_us < {end_s * 1_000_000} "
            f"ORDER BY cityHash64(event_id) LIMIT {cap} BY upstream_cluster")


def failed(status: int, response_flags: str) -> bool:
    """A 5xx answer, or a stream reset (core.contracts.RESET_FLAGS), as the store's roll-up counts them."""
    return status >= 500 or any(flag in RESET_FLAGS for flag in response_flags.split(","))


class StoreSamples:
    """Samples read through the sink's read-only query API (core/storeclient.py)."""

    def __init__(self, client: StoreClient, cap: int = SAMPLE_CAP):
        self.client = client
        self.cap = cap

    def samples(self, service: str, subsets: Sequence[str], start_s: int, end_s: int) -> list[SubsetSample]:
        _, rows = self.client.query(sample_sql(service, subsets, start_s, end_s, self.cap))
        by_cluster: dict[str, tuple[list[float], list[bool]]] = {outbound_cluster(service, s): ([], [])
                                                                 for s in subsets}
        try:
            for cluster, duration_us, status, flags in rows:
                latencies, errors = by_cluster[cluster]
                latencies.append(int(duration_us) / 1000.0)
                errors.append(failed(int(status), str(flags)))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the store answered the samples of {service} with an unexpected row: {exc!r}") \
                from None
        found = []
        for subset in subsets:
            latencies, errors = by_cluster[outbound_cluster(service, subset)]
            found.append(SubsetSample(subset, np.asarray(latencies, dtype=float), len(latencies), sum(errors)))
        return found
