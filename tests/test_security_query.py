"""The query sandbox (issue 12): user SQL cannot read or write a file outside the store,
reach the network, change a setting or outrun its limits, on chdb and on a real
ClickHouse server (18.16).

Every attack calls ``Store.sandboxed`` directly, past the pre-check that only words the
error messages (``check_readonly``): what refuses here is the engine (readonly=1 and
the limits of the sandbox's connection), or on chdb the engine's own parser.
"""

from __future__ import annotations

import http.server
import os
import random
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.store import ChdbStore, ClickHouseStore, QueryLimits, Store, StoreError, check_url, open_store, redacted
from core import credentials
from core.datadir import DataDir
from greymesh.runtime import local, workloads
from tests.support.clickhouse import TEST_LIMITS, ClickHouseServer
from tests.support.net import free_port

SLACK_S = 3.0  # past the time limit: the engine's own check interval, a busy 2-core box


@pytest.fixture
def canary(tmp_path: Path) -> tuple[Path, str]:
    """A secret file outside the store, as the CA key is: its content must never come back."""
    secret = f"CANARY-{secrets.token_hex(16)}"
    path = tmp_path / "ca.key"
    path.write_text(secret + "\n")
    return path, secret


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that notes every request: url() and friends must never reach it."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"1\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/x.csv", hits
    server.shutdown()


def refused(store: Store, sql: str, *secret: str) -> str:
    """The StoreError ``sql`` raises in the sandbox (fails if it answers); no secret in it."""
    with pytest.raises(StoreError) as err:
        store.sandboxed(sql)
    message = str(err.value)
    for s in secret:
        assert s not in message
    return message


def files_under(*roots: Path, skip: Path | None = None) -> dict[Path, float]:
    out: dict[Path, float] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if skip is not None and Path(dirpath).resolve().is_relative_to(skip.resolve()):
                dirnames.clear()
                continue
            for name in filenames:
                p = Path(dirpath) / name
                out[p] = p.stat().st_mtime_ns
    return out


def store_dir(store: Store) -> Path | None:
    return store.path if isinstance(store, ChdbStore) else None


# --- reading files -------------------------------------------------------------------------

def test_the_file_function_reads_no_file(limited_store: Store, canary: tuple[Path, str]) -> None:
    path, secret = canary
    # chdb: refused by the gate (local mode checks no path); 18.16 has no file() function.
    refused(limited_store, f"SELECT file('{path}')", secret)
    refused(limited_store, f"SELECT length(file('{path}', '')) > 0", secret)


@pytest.mark.parametrize("shape", [
    "SELECT * FROM {tf}",
    "SELECT * FROM (SELECT * FROM {tf})",
    "SELECT 'a' AS x UNION ALL SELECT * FROM {tf}",
    "WITH (SELECT count() FROM {tf}) AS n SELECT n",  # the CTE form 18.16 knows too
    "SELECT 1 WHERE 'x' IN (SELECT * FROM {tf})",
])
def test_table_functions_reach_no_file_and_no_network(limited_store: Store, canary: tuple[Path, str],
                                                      listener: tuple[str, list[str]], shape: str,
                                                      clickhouse_server: ClickHouseServer) -> None:
    path, secret = canary
    url, hits = listener
    for tf in (f"file('{path}', 'TSV', 'x String')", f"url('{url}', 'TSV', 'x String')",
               f"remote('127.0.0.1:{clickhouse_server.port}', system.one)",
               f"cluster('test_shard_localhost', system.one)"):
        message = refused(limited_store, shape.format(tf=tf), secret)
        assert "readonly" in message or "reads files or the network" in message, message
    assert hits == []


# --- writing files -------------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["", " APPEND", " TRUNCATE"])
def test_into_outfile_writes_no_file(limited_store: Store, tmp_path: Path, tail: str) -> None:
    new, existing = tmp_path / "new.txt", tmp_path / "existing.txt"
    existing.write_text("untouched\n")
    for target in (new, existing):
        if tail == " TRUNCATE" and limited_store.__class__ is ClickHouseStore:
            continue  # 18.16 has no TRUNCATE: a syntax error, nothing to see
        try:
            limited_store.sandboxed(f"SELECT 'pwned' INTO OUTFILE '{target}'{tail}")
        except StoreError as exc:  # chdb refuses; a server answers the rows and writes nothing
            assert "INTO OUTFILE" in str(exc) or "Syntax error" in str(exc), exc
    assert not new.exists()
    assert existing.read_text() == "untouched\n"


def test_a_dollar_quoted_string_hides_nothing(limited_store: Store, tmp_path: Path) -> None:
    # The old tokenizer read $$'$$ as the start of a quoted string and let this through.
    target = tmp_path / "x.txt"
    message = refused(limited_store, f"SELECT 'x' WHERE $$'$$ != '' INTO OUTFILE '{target}'")
    assert "INTO OUTFILE" in message or "Syntax error" in message  # 18.16 has no $$ strings at all
    assert not target.exists()


# --- statements and settings ---------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "INSERT INTO tap_l7 (event_id) VALUES ('forged')",
    "INSERT INTO tap_l7 (event_id) SELECT 'forged'",
    "CREATE TABLE forged (x UInt8) ENGINE = Memory",
    "DROP TABLE tap_l7",
    "ALTER TABLE tap_l7 DELETE WHERE 1",
    "TRUNCATE TABLE tap_l7",
    "SET readonly = 0",
    "SELECT 1; DROP TABLE tap_l7",
    "SELECT 1; INSERT INTO tap_l7 (event_id) VALUES ('forged')",
])
def test_no_write_no_ddl_no_second_statement(limited_store: Store, sql: str) -> None:
    refused(limited_store, sql)
    assert limited_store.query("SELECT count() FROM tap_l7") == [(0,)]
    assert limited_store.query("EXISTS TABLE forged") == [(0,)]


def test_chdb_engine_itself_refuses_writes_past_the_gate(tmp_path: Path) -> None:
    # The gate refuses these first on chdb; the sandbox session's readonly=1 would too.
    st = ChdbStore(tmp_path / "chdb", limits=TEST_LIMITS)
    st.migrate()
    sandbox = st._open_sandbox()
    for sql in ("INSERT INTO tap_l7 (event_id) VALUES ('forged')", "DROP TABLE tap_l7", "SET readonly = 0",
                "SELECT * FROM file('/etc/hostname', 'LineAsString')"):
        with pytest.raises(StoreError, match="readonly"):
            st._json_query(sql, what="bypass", session=sandbox)
        sandbox = st._open_sandbox()
    assert st.query("SELECT count() FROM tap_l7") == [(0,)]
    st.close()


@pytest.mark.parametrize("sql", [
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT count() FROM system.numbers SETTINGS max_execution_time = 0",
    "SELECT number FROM system.numbers LIMIT 5000 SETTINGS max_result_rows = 0",
    "SELECT * FROM (SELECT count() FROM system.numbers SETTINGS max_execution_time = 0, readonly = 0)",
    "SELECT * FROM (SELECT number FROM system.numbers LIMIT 5000 SETTINGS max_result_rows = 0)",
])
def test_the_statement_changes_no_setting(limited_store: Store, sql: str) -> None:
    t0 = time.monotonic()
    refused(limited_store, sql)
    assert time.monotonic() - t0 < TEST_LIMITS.max_execution_time_s + SLACK_S


# --- limits --------------------------------------------------------------------------------

def test_the_time_limit_stops_a_long_query(limited_store: Store) -> None:
    t0 = time.monotonic()
    message = refused(limited_store, "SELECT count() FROM (SELECT number FROM system.numbers LIMIT 1000000000000)")
    assert time.monotonic() - t0 < TEST_LIMITS.max_execution_time_s + SLACK_S
    assert "max_execution_time" in message and "2 s" in message, message
    assert limited_store.sandboxed("SELECT 1") == (["1"], [(1,)])  # the sandbox serves the next one


def test_the_row_limit_refuses_a_large_result(limited_store: Store) -> None:
    message = refused(limited_store, "SELECT number FROM system.numbers LIMIT 5000")
    assert "max_result_rows" in message and "1000 rows" in message, message
    assert len(limited_store.sandboxed("SELECT number FROM system.numbers LIMIT 1000")[1]) == 1000


def test_the_memory_limit_stops_a_greedy_query(limited_store: Store) -> None:
    message = refused(limited_store,
                      "SELECT length(groupArray(number)) FROM (SELECT number FROM system.numbers LIMIT 100000000)")
    assert "max_memory_usage" in message, message


def test_a_long_query_does_not_hold_up_inserts(limited_store: Store) -> None:
    done = threading.Event()

    def slow() -> None:
        with pytest.raises(StoreError):
            limited_store.sandboxed("SELECT count() FROM (SELECT number FROM system.numbers LIMIT 1000000000000)")
        done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    limited_store.insert("tap_l7", ["event_id"], [["during"]])
    waited = time.monotonic() - t0
    thread.join(TEST_LIMITS.max_execution_time_s + SLACK_S)
    assert done.is_set()
    assert waited < 1.0, f"an insert waited {waited:.1f} s for a user query"


# --- fuzz ----------------------------------------------------------------------------------

FRAGMENTS = [
    "SELECT 1", "SELECT file('{canary}')", "SELECT * FROM file('{canary}', 'TSV', 'x String')",
    "INTO OUTFILE '{out}'", "INTO OUTFILE '{out}' APPEND", "INTO OUTFILE 'relative.txt'", "INTO OUTFILE '{canary}' TRUNCATE", "FORMAT CSV",
    "SETTINGS readonly = 0", "SETTINGS max_execution_time = 0", ";", "; SELECT 2", "UNION ALL",
    "WITH (SELECT file('{canary}')) AS x SELECT x", "(SELECT * FROM url('{url}', 'TSV', 'x String'))",
    "$$'$$", "'", "\\'", "--", "/*", "*/", "\n", "`", "\"", "SELECT * FROM (", ")", "INSERT INTO tap_l7 (event_id)",
    "VALUES ('f')", "DROP TABLE tap_l7", "CREATE TABLE f (x UInt8) ENGINE = Log", "SELECT 'x' WHERE 1 =",
    "SELECT * FROM remote('127.0.0.1', system.one)", "SELECT * FROM executable('cat {canary}', 'TSV', 'x String')",
    "SELECT * FROM input('x String')", "SHOW TABLES", "DESCRIBE tap_l7", "EXISTS tap_l7", "FROM tap_l7",
    "SELECT * FROM s3('{url}')", "SELECT * FROM mysql('127.0.0.1:1', 'd', 't', 'u', 'p')",
    "SELECT * FROM sqlite('{canary}', 't')", "SELECT * FROM jdbc('x', 'y')", "SELECT * FROM hdfs('hdfs://127.0.0.1:1/x')",
]


def test_fuzz_no_file_outside_the_store_is_read_or_created(limited_store: Store, canary: tuple[Path, str],
                                                           listener: tuple[str, list[str]], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, secret = canary
    url, hits = listener
    out = tmp_path / "fuzz-out.txt"
    monkeypatch.chdir(tmp_path)  # a relative INTO OUTFILE would land here (chdb writes from this process)
    before = files_under(tmp_path, skip=store_dir(limited_store))
    rng = random.Random(12)  # seeded: a failure is reproduced by running the test again
    answered = 0
    for _ in range(150):
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 5))]
        sql = " ".join(parts).format(canary=path, out=out, url=url)
        try:
            result = limited_store.sandboxed(sql)
        except StoreError as exc:
            assert secret not in str(exc), sql
            continue
        answered += 1
        assert secret not in repr(result), sql
    after = files_under(tmp_path, skip=store_dir(limited_store))
    assert after == before, f"files created or changed: {sorted(set(after.items()) ^ set(before.items()))}"
    assert path.read_text().strip() == secret and hits == []
    assert answered > 0  # the generator also makes statements the sandbox runs


# --- the server's password and TLS ---------------------------------------------------------

def test_a_password_in_the_store_url_is_refused_with_what_to_do_instead() -> None:
    with pytest.raises(StoreError) as err:
        check_url("clickhouse://audit:s3cret@db.example:9000/taps")
    message = str(err.value)
    assert "s3cret" not in message and "clickhouse://audit:***@db.example:9000/taps" in message
    assert "--store-password-file" in message and "GREYMESH_STORE_PASSWORD" in message


def test_tls_options_and_the_password_travel_outside_the_url(tmp_path: Path) -> None:
    st = open_store("clickhouse://audit@db.example/taps?secure=1&ca_certs=/etc/ssl/ca.pem", data_dir=tmp_path,
                    password="s3cret")
    assert isinstance(st, ClickHouseStore)
    assert st.url == "clickhouse://audit@db.example:9440/taps?secure=1&ca_certs=/etc/ssl/ca.pem"
    assert "s3cret" not in st.url and "s3cret" not in repr(st)
    st.close()
    for bad in ("clickhouse://h/db?secure=1&ca_certs=relative.pem", "clickhouse://h/db?password=x"):
        with pytest.raises(StoreError, match="unusable store URL"):
            check_url(bad)


def test_the_password_reaches_the_server(clickhouse_server: ClickHouseServer, tmp_path: Path) -> None:
    # The test server's default user has no password: a wrong one is refused, so it was sent.
    url = f"clickhouse://{clickhouse_server.host}:{clickhouse_server.port}/default"
    with open_store(url, data_dir=tmp_path, limits=QueryLimits()) as st:
        assert st.sandboxed("SELECT 1") == (["1"], [(1,)])
    with open_store(url, data_dir=tmp_path, password="wrong") as st:
        with pytest.raises(StoreError, match="(?i)password|authentication"):
            st.sandboxed("SELECT 1")


def test_up_keeps_the_store_password_in_a_private_secret_only(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "mesh")
    dd.create()
    local._keep_store_password(dd, "clickhouse://audit@db.example/taps", "s3cret")
    secret = dd.secret(workloads.STORE_PASSWORD)
    assert credentials.read(secret) == "s3cret" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    local._keep_store_password(dd, None, None)  # a later `up` that says nothing keeps it
    assert secret.exists()
    local._keep_store_password(dd, "chdb", None)  # another store without a password drops it
    assert not secret.exists()
    assert redacted("clickhouse://a:s3cret@h/db") == "clickhouse://a:***@h/db"  # an old runtime.json, in status
