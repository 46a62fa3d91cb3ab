"""The tap store's tables, as numbered migrations applied in order at start.

Every SQL statement here runs unchanged on ClickHouse 18.16 (Debian's server) and on
chdb (ClickHouse 26.x), so it avoids what 18.16 lacks: DateTime64, TTL, Map and
LowCardinality.  ``Store.migrate`` (audit/store.py) applies the migrations not yet in
``schema_migrations`` and records each one only after all its statements succeeded;
every statement is idempotent (IF NOT EXISTS), so a migration interrupted by a crash is
simply run again.  A new table or view is a new migration at the end; an applied
migration is never edited, since stores that already recorded it would not see the edit.

Tables (migration 1), built from :data:`core.contracts.COLUMNS`, one per layer:
``tap_l3``, ``tap_l4``, ``tap_l7``, ``tap_audit``; and (migration 3) ``anomalies``, the
ml stage's anomaly events.  Besides the event's own columns each
has ``ts`` (DateTime, the event's second, derived from ``time_us``), and ``kpartition``
and ``koffset``: the Kafka partition and offset the row came from, which the sink uses
to find what it already stored when it replays after a crash.

Roll-up (migration 2): ``service_windows``, the feature table the anomaly detector
reads; one row per (service, window) of the serving side's HTTP requests (tap_l7 rows
with direction inbound or ingress):

    service           String    the service that served the requests
    window            DateTime  start of the 10-second window (ts rounded down)
    requests          UInt64    requests that started in the window
    errors_4xx        UInt64    of them answered 400-499
    errors_5xx        UInt64    of them answered 500-599
    resets            UInt64    of them reset rather than answered (a response flag in
                                core.contracts.RESET_FLAGS)
    latency_p50_ms    Float64   median of duration_us, in milliseconds
    latency_p95_ms    Float64   95th percentile, in milliseconds
    latency_p99_ms    Float64   99th percentile, in milliseconds
    bytes_in          UInt64    sum of request_bytes
    bytes_out         UInt64    sum of response_bytes
    distinct_callers  UInt64    exact count of distinct callers: the peer's SPIFFE ID,
                                or its address when it presented none
    authz_denials     UInt64    requests the authorization policy denied

A materialized view aggregates each insert into tap_l7 into partial states in an
AggregatingMergeTree (``service_windows_state``); ``service_windows`` merges them on
read, so a window fed by several inserts reads the same as one computed from its raw
rows.  The quantiles are ClickHouse's ``quantiles`` (a reservoir of 8192 values, with
linear interpolation): exact up to 8192 requests per service and window, a uniform
sample beyond.  The view only sees rows inserted after it was created; migrations run
before the sink's first insert, so in practice that is every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.contracts import COLUMNS, LAYERS, RESET_FLAGS, ROLLUP_FIELDS, WINDOW_SECONDS, Layer
from core.storeclient import sql_string

TABLES: dict[Layer, str] = {layer: f"tap_{layer}" for layer in LAYERS} | {"anomaly": "anomalies", "action": "actions"}
LEDGER = "schema_migrations"
QUANTILES = (0.5, 0.95, 0.99)


def table_for(layer: Layer) -> str:
    """The store table of a layer's events: tap_l3, tap_l4, tap_l7, tap_audit, anomalies or actions."""
    return TABLES[layer]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: Callable[[str], list[str]]  # database name -> idempotent statements, in order


def ledger(db: str) -> str:
    """The ledger of applied migrations.  A ReplacingMergeTree keyed by version, so two
    processes migrating at once leave one row per version once merged (readers use
    DISTINCT before that)."""
    return (f"CREATE TABLE IF NOT EXISTS {db}.{LEDGER} (version UInt32, name String, "
            "applied_at DateTime DEFAULT now()) ENGINE = ReplacingMergeTree() ORDER BY version")


def _tap_table(db: str, layer: Layer) -> str:
    columns = [f"{name} {type} COMMENT {sql_string(doc)}" for name, type, doc in COLUMNS[layer]] + [
        "ts DateTime DEFAULT toDateTime(intDiv(time_us, 1000000)) COMMENT 'time_us to the second'",
        "kpartition UInt16 COMMENT 'Kafka partition the row came from'",
        "koffset UInt64 COMMENT 'Kafka offset of the record the row came from'",
    ]
    key = "callee" if layer == "audit" else "service"
    return (f"CREATE TABLE IF NOT EXISTS {db}.{table_for(layer)} (\n    " + ",\n    ".join(columns)
            + f"\n) ENGINE = MergeTree() PARTITION BY toYYYYMMDD(ts) ORDER BY ({key}, ts)")


def _tap_tables(db: str) -> list[str]:
    return [_tap_table(db, layer) for layer in ("l3", "l4", "l7", "audit")]  # as first released


_LEVELS = ", ".join(map(str, QUANTILES))
_RESETS = ", ".join(map(sql_string, sorted(RESET_FLAGS)))
_WINDOW = f"toDateTime(intDiv(toUInt32(ts), {WINDOW_SECONDS}) * {WINDOW_SECONDS})"
# The partial states the materialized view keeps per (service, window): (name, type,
# -State expression over tap_l7).  The three latency columns share one reservoir.
_STATES: tuple[tuple[str, str, str], ...] = (
    ("requests", "AggregateFunction(count)", "countState()"),
    ("errors_4xx", "AggregateFunction(countIf, UInt8)", "countIfState(status >= 400 AND status < 500)"),
    ("errors_5xx", "AggregateFunction(countIf, UInt8)", "countIfState(status >= 500 AND status < 600)"),
    ("resets", "AggregateFunction(countIf, UInt8)",
     f"countIfState(hasAny(splitByChar(',', response_flags), [{_RESETS}]))"),
    ("latency_us", f"AggregateFunction(quantiles({_LEVELS}), UInt64)", f"quantilesState({_LEVELS})(duration_us)"),
    ("bytes_in", "AggregateFunction(sum, UInt64)", "sumState(request_bytes)"),
    ("bytes_out", "AggregateFunction(sum, UInt64)", "sumState(response_bytes)"),
    ("distinct_callers", "AggregateFunction(uniqExact, String)", "uniqExactState(if(peer != '', peer, src_addr))"),
    ("authz_denials", "AggregateFunction(countIf, UInt8)", "countIfState(authz = 'deny')"),
)
# What service_windows shows: (column, -Merge expression).  State columns carry a
# _state suffix so that these output names do not shadow them inside the aggregates.
_VIEW: tuple[tuple[str, str], ...] = (
    ("requests", "countMerge(requests_state)"),
    ("errors_4xx", "countIfMerge(errors_4xx_state)"),
    ("errors_5xx", "countIfMerge(errors_5xx_state)"),
    ("resets", "countIfMerge(resets_state)"),
    *((f"latency_p{round(q * 100)}_ms", f"quantilesMerge({_LEVELS})(latency_us_state)[{i}] / 1000")
      for i, q in enumerate(QUANTILES, 1)),
    ("bytes_in", "sumMerge(bytes_in_state)"),
    ("bytes_out", "sumMerge(bytes_out_state)"),
    ("distinct_callers", "uniqExactMerge(distinct_callers_state)"),
    ("authz_denials", "countIfMerge(authz_denials_state)"),
)
ROLLUP_COLUMNS: tuple[str, ...] = ("service", "window", *(name for name, _ in _VIEW))
# The view is the contract the ml stage reads (core.contracts.ROLLUP_FIELDS): they must agree.
assert ROLLUP_COLUMNS[2:] == ROLLUP_FIELDS, "service_windows and core.contracts.ROLLUP_FIELDS disagree"


def _rollup(db: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.service_windows_state (\n    service String,\n    window DateTime,\n    "
        + ",\n    ".join(f"{name}_state {type}" for name, type, _ in _STATES)
        + "\n) ENGINE = AggregatingMergeTree() PARTITION BY toYYYYMMDD(window) ORDER BY (service, window)",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.service_windows_mv TO {db}.service_windows_state AS\n"
        f"SELECT service, {_WINDOW} AS window,\n    "
        + ",\n    ".join(f"{expr} AS {name}_state" for name, _, expr in _STATES)
        + f"\nFROM {db}.{table_for('l7')}\nWHERE direction IN ('inbound', 'ingress')\nGROUP BY service, window",
        f"CREATE VIEW IF NOT EXISTS {db}.service_windows AS\nSELECT service, window,\n    "
        + ",\n    ".join(f"{merge} AS {name}" for name, merge in _VIEW)
        + f"\nFROM {db}.service_windows_state\nGROUP BY service, window",
    ]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tap tables", _tap_tables),
    Migration(2, "service_windows roll-up", _rollup),
    Migration(3, "anomalies", lambda db: [_tap_table(db, "anomaly")]),
    Migration(4, "actions (the actions stage's decisions)", lambda db: [_tap_table(db, "action")]),
)
