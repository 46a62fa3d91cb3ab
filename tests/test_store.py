"""The tap store (audit/store.py) on both backends: embedded chdb (ClickHouse 26.x) and a
real Debian ClickHouse 18.16 server, through the same tests."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from audit import migrations
from audit.store import ChdbStore, ClickHouseStore, Store, StoreError, open_store, table_for
from greymesh import doctor
from core.contracts import COLUMNS, LAYERS, NAMES, RESET_FLAGS, Layer
from tests.support.clickhouse import ClickHouseServer
from tests.support.net import free_port

T0_S = 1_764_400_000  # a multiple of 10: windows start here
PROVENANCE = ("kpartition", "koffset")
ALL_VERSIONS = [m.version for m in migrations.MIGRATIONS]
# Strings that break naive escaping in one text format or another.
TRICKY = ("plain", "quote ' and \" and \\ backslash", "tab\tand\nnewline", "unicode é ✓ 😀", "",
          "%(x)s {x:String} %", "\\N NULL \\' \\\\'")


def event(layer: Layer, i: int, **fields: Any) -> dict[str, Any]:
    """A schema-shaped event of ``layer`` (keys exactly NAMES[layer]), distinct per ``i``;
    every fifth has the largest value of each unsigned column but time_us."""
    ev: dict[str, Any] = {}
    for name, type, _ in COLUMNS[layer]:
        if type.startswith("UInt"):
            top = 2 ** int(type[4:]) - 1
            ev[name] = top if i % 5 == 1 else (i * 7919 + len(name)) % top
        elif type == "Float64":
            ev[name] = (-1.5e300, 0.1 + 0.2, float(i) / 3)[i % 3]
        else:
            ev[name] = f"{name}-{i}-{TRICKY[i % len(TRICKY)]}"
    ev.update(v=1, event_id=f"{layer}-{i:06d}", time_us=(T0_S + i) * 1_000_000 + i)
    ev.update(fields)
    assert tuple(ev) == NAMES[layer]
    return ev


def insert_events(store: Store, layer: Layer, events: list[dict[str, Any]], partition: int, first_offset: int) -> None:
    store.insert(table_for(layer), NAMES[layer] + PROVENANCE,
                 [[ev[n] for n in NAMES[layer]] + [partition, first_offset + k] for k, ev in enumerate(events)])


def test_migrations_apply_once_and_are_idempotent(empty_store: Store) -> None:
    assert empty_store.migrate() == ALL_VERSIONS == [1, 2, 3, 4]
    assert empty_store.migrate() == []
    assert empty_store.query("SELECT version, name FROM schema_migrations ORDER BY version") == [
        (1, "tap tables"), (2, "service_windows roll-up"), (3, "anomalies"),
        (4, "actions (the actions stage's decisions)")]
    tables = {name for (name,) in empty_store.query(
        "SELECT name FROM system.tables WHERE database = %(db)s", {"db": empty_store.database})}
    assert tables >= {*map(table_for, LAYERS), "service_windows", "service_windows_state", "service_windows_mv"}
    # The tap tables are the schema's columns, in order, with the schema's types.
    for layer in LAYERS:
        described = empty_store.query(f"DESCRIBE TABLE {table_for(layer)}")
        assert [row[:2] for row in described] == [c[:2] for c in COLUMNS[layer]] + [
            ("ts", "DateTime"), ("kpartition", "UInt16"), ("koffset", "UInt64")]
    columns = [row[0] for row in empty_store.query("DESCRIBE TABLE service_windows")]
    assert columns == list(migrations.ROLLUP_COLUMNS)


def test_a_migration_interrupted_by_a_crash_is_applied_again(empty_store: Store) -> None:
    # As if a first start died after two statements of migration 1: nothing is recorded.
    empty_store._create_database()
    for sql in migrations.MIGRATIONS[0].statements(empty_store.database)[:2]:
        empty_store.query(sql)
    assert empty_store.migrate() == ALL_VERSIONS  # migration 1 again, from its start
    assert empty_store.query("SELECT count() FROM tap_l7") == [(0,)]


@pytest.mark.parametrize("layer", LAYERS)
def test_inserted_events_read_back_with_the_same_values_and_types(store: Store, layer: Layer) -> None:
    events = [event(layer, i) for i in range(40)]
    insert_events(store, layer, events, partition=2, first_offset=100)
    names = NAMES[layer]
    rows = store.query(f"SELECT {', '.join(names)}, kpartition, koffset, ts "
                       f"FROM {table_for(layer)} ORDER BY event_id")
    assert len(rows) == len(events)
    for k, (ev, row) in enumerate(zip(events, rows)):
        # DateTime reads as a naive datetime in the engine's (here: this host's) time zone.
        ts = dt.datetime.fromtimestamp(ev["time_us"] // 1_000_000)
        expected = tuple(ev[n] for n in names) + (2, 100 + k, ts)
        assert row == expected
        assert [type(v) for v in row] == [type(v) for v in expected], row


def test_query_parameters_are_rendered_as_literals_that_survive_any_string(store: Store) -> None:
    params = {f"s{i}": text for i, text in enumerate(TRICKY)} | {"n": 2**64 - 1, "ids": ("a", "b'c")}
    sql = "SELECT " + ", ".join(f"%(s{i})s" for i in range(len(TRICKY))) + ", %(n)s, 'b''c' IN %(ids)s, 'x' IN %(ids)s"
    assert store.query(sql, params) == [(*TRICKY, 2**64 - 1, 1, 0)]


def test_an_insert_with_one_bad_row_writes_nothing(store: Store) -> None:
    rows = [[ev[n] for n in NAMES["l4"]] + [0, k] for k, ev in enumerate(event("l4", i) for i in range(50))]
    rows[37][NAMES["l4"].index("bytes_in")] = "not a number"
    with pytest.raises(StoreError, match=r"insert of 50 rows into tap_l4 failed on (chdb|clickhouse)://"):
        store.insert(table_for("l4"), NAMES["l4"] + PROVENANCE, rows)
    assert store.query("SELECT count() FROM tap_l4") == [(0,)]


def test_an_embedded_store_keeps_its_tables_and_rows_when_reopened(tmp_path: Path) -> None:
    with ChdbStore(tmp_path / "store") as st:
        assert st.migrate() == ALL_VERSIONS
        insert_events(st, "audit", [event("audit", i) for i in range(3)], partition=1, first_offset=7)
    with open_store(f"chdb://{tmp_path / 'store'}", data_dir=tmp_path / "unused") as st:
        assert st.migrate() == []
        assert st.existing_event_ids(table_for("audit"), 1, 8) == {"audit-000001", "audit-000002"}


def test_existing_event_ids_are_exactly_those_at_or_after_the_offset_in_that_partition(store: Store) -> None:
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for p in range(3):
        evs = [event("l7", p * 100 + i) for i in range(20)]
        insert_events(store, "l7", evs[:12], partition=p, first_offset=0)  # two inserts each
        insert_events(store, "l7", evs[12:], partition=p, first_offset=12)
        by_partition[p] = evs
    table = table_for("l7")
    assert store.existing_event_ids(table, 1, 15) == {ev["event_id"] for ev in by_partition[1][15:]}
    assert store.existing_event_ids(table, 0, 0) == {ev["event_id"] for ev in by_partition[0]}
    assert store.existing_event_ids(table, 2, 19) == {by_partition[2][19]["event_id"]}
    assert store.existing_event_ids(table, 2, 20) == set()
    assert store.existing_event_ids(table, 7, 0) == set()
    assert store.existing_event_ids(table_for("l4"), 1, 0) == set()


def _ch_quantile(values: list[int], level: float) -> float:
    """ClickHouse's ``quantiles`` below its reservoir size: linear interpolation."""
    a = sorted(values)
    index = level * (len(a) - 1)
    lo = int(index)
    hi = min(lo + 1, len(a) - 1)
    return a[lo] + (index - lo) * (a[hi] - a[lo])


def test_service_windows_match_a_recomputation_from_the_raw_rows(store: Store) -> None:
    rng = random.Random(7)
    events = []
    for i in range(600):
        events.append(event(
            "l7", i,
            time_us=(T0_S + rng.randrange(60)) * 1_000_000 + rng.randrange(1_000_000),
            service=rng.choice(["cart", "payments", "search"]),
            direction=rng.choice(["inbound", "ingress", "outbound"]),
            status=rng.choice([200, 200, 201, 302, 404, 429, 500, 503, 0]),
            response_flags=rng.choice(["", "", "URX", "UF,URX", "DC", "UAEX", "LR", "RL"]),
            duration_us=rng.randrange(100, 2_000_000),
            request_bytes=rng.randrange(50_000), response_bytes=rng.randrange(500_000),
            peer=rng.choice(["", "", "spiffe://mesh.local/ns/demo/sa/frontend", "spiffe://mesh.local/ns/demo/sa/cart"]),
            src_addr=rng.choice(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            authz=rng.choice(["allow", "allow", "deny", ""]),
        ))
    for k in range(4):  # four inserts, each touching most windows: their states must merge
        insert_events(store, "l7", events[k * 150:(k + 1) * 150], partition=0, first_offset=k * 150)

    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        if ev["direction"] in ("inbound", "ingress"):
            groups[ev["service"], ev["time_us"] // 10_000_000 * 10].append(ev)
    assert len(groups) == 18 and min(map(len, groups.values())) > 5  # 3 services x 6 windows

    rows = store.query("SELECT service, toUInt32(window), requests, errors_4xx, errors_5xx, resets, "
                       "latency_p50_ms, latency_p95_ms, latency_p99_ms, bytes_in, bytes_out, distinct_callers, "
                       "authz_denials FROM service_windows ORDER BY service, window")
    assert [r[:2] for r in rows] == sorted(groups)
    for row in rows:
        evs = groups[row[0], row[1]]
        durations = [ev["duration_us"] for ev in evs]
        expected = (
            len(evs),
            sum(400 <= ev["status"] < 500 for ev in evs),
            sum(500 <= ev["status"] < 600 for ev in evs),
            sum(bool(RESET_FLAGS & set(ev["response_flags"].split(","))) for ev in evs),
            *(pytest.approx(_ch_quantile(durations, q) / 1000, rel=1e-9) for q in migrations.QUANTILES),
            sum(ev["request_bytes"] for ev in evs),
            sum(ev["response_bytes"] for ev in evs),
            len({ev["peer"] or ev["src_addr"] for ev in evs}),
            sum(ev["authz"] == "deny" for ev in evs),
        )
        assert row[2:] == expected, row[:2]


@pytest.mark.parametrize("sql", [
    "INSERT INTO tap_l7 (event_id) VALUES ('x')",
    "DROP TABLE tap_l7",
    "ALTER TABLE tap_l7 DELETE WHERE 1",
    "SELECT 1; DROP TABLE tap_l7",
    "SELECT 1;\nSELECT 2;",
    "select event_id from tap_l7 into outfile '/tmp/greymesh-taps.txt'",
    "SELECT 1 FORMAT CSV",
    "  -- nothing but a comment\n",
])
def test_query_readonly_refuses_anything_but_one_read_only_statement(store: Store, sql: str) -> None:
    insert_events(store, "l7", [event("l7", 1)], partition=0, first_offset=0)
    with pytest.raises(StoreError, match=r"^refused \(.*\): .*one read-only statement"):
        store.query_readonly(sql)
    assert store.query("SELECT count() FROM tap_l7") == [(1,)]


def test_query_readonly_runs_with_the_engines_readonly_setting(store: Store) -> None:
    # Passes the statement check; only the engine's readonly=1 refuses to lift it.
    with pytest.raises(StoreError, match="readonly"):
        store.query_readonly("SELECT 1 SETTINGS readonly = 0")


def test_query_readonly_answers_a_select(store: Store) -> None:
    evs = [event("l7", i, service=s) for i, s in enumerate(["cart", "search", "cart"])]
    insert_events(store, "l7", evs, partition=0, first_offset=0)
    assert store.query_readonly(
        "-- per service\nSELECT service, count() AS n, max(koffset) AS last, ';' AS semi\n"
        "FROM tap_l7 GROUP BY service ORDER BY service; -- done"
    ) == (["service", "n", "last", "semi"], [("cart", 2, 2, ";"), ("search", 1, 1, ";")])
    names, rows = store.query_readonly("SHOW TABLES")
    assert names == ["name"] and ("tap_audit",) in rows


@pytest.mark.parametrize("url", [
    "postgres://localhost/greymesh", "chdb", "chdb://relative/path", "chdb:///abs?x=1", "clickhouse://",
    "clickhouse://host:port/db", "clickhouse://host:9000/bad-name", "clickhouse://u@host:99999/db",
])
def test_open_store_rejects_a_bad_url_with_the_accepted_forms(url: str, tmp_path: Path) -> None:
    if url == "chdb":  # the one good URL of the list: the default, under the data dir
        st = open_store(url, data_dir=tmp_path)
        assert isinstance(st, ChdbStore) and st.url == f"chdb://{tmp_path / 'store'}"
        st.close()
        return
    with pytest.raises(StoreError) as err:
        open_store(url, data_dir=tmp_path)
    message = str(err.value)
    assert url in message
    assert "chdb:///absolute/path" in message and "clickhouse://" in message


def test_open_store_reads_a_server_url_and_never_shows_its_password(tmp_path: Path) -> None:
    # A password in the URL is refused: tests/test_security_query.py.
    st = open_store("clickhouse://audit@db.example:9100/taps", data_dir=tmp_path, password="pa@ss")
    assert isinstance(st, ClickHouseStore)
    assert st.url == "clickhouse://audit@db.example:9100/taps" and st.database == "taps"
    st.close()  # nothing was connected: the driver connects on first use
    assert open_store("clickhouse://127.0.0.1", data_dir=tmp_path).url == "clickhouse://127.0.0.1:9000/greymesh"


def test_a_server_nobody_listens_on_raises_store_error() -> None:
    st = ClickHouseStore("127.0.0.1", free_port(), "greymesh")
    for call in (st.migrate, lambda: st.query("SELECT 1"), lambda: st.query_readonly("SELECT 1"),
                 lambda: st.insert("tap_l7", ["event_id"], [["x"]])):
        with pytest.raises(StoreError, match=r"cannot reach the ClickHouse server at "
                           r"clickhouse://127\.0\.0\.1:\d+/greymesh.*check that the server is running"):
            call()
    st.close()


def test_doctor_reports_the_clickhouse_server(clickhouse_server: ClickHouseServer) -> None:  # noqa: F811
    rows, _ = doctor.report()
    row = next(r for r in rows if r["name"] == "clickhouse")
    st = ClickHouseStore(clickhouse_server.host, clickhouse_server.port, "default")
    [(version,)] = st.query("SELECT version()")
    st.close()
    assert row["installed"] and row["version"] == version, row
    assert Path(row["path"]).name == "clickhouse-server"
