"""A real ClickHouse server for tests, and store fixtures over both backends.

tests/conftest.py registers this module as a plugin, so every test module can use:

    def test_x(store: Store): ...      # or clickhouse_server, empty_store

``store`` (and ``empty_store``, the same before migrate()) is parametrized over
["chdb", "clickhouse"]: each test gets a fresh chdb path or a fresh database on the one
session-wide server.  Without clickhouse-server installed the "clickhouse" cases fail,
saying what installs it.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from greymesh.runtime import clickhouse as server
from audit.store import ChdbStore, ClickHouseStore, QueryLimits, Store, StoreError
from tests.support.net import free_port

READY_TIMEOUT = 60.0
# Small enough that a test of each limit takes seconds, large enough for a real query.
TEST_LIMITS = QueryLimits(max_execution_time_s=2, max_result_rows=1_000, max_memory_bytes=100_000_000)
STOP_TIMEOUT = 30.0


class ClickHouseServer:
    """One clickhouse-server on a run directory; start() may be called again after
    stop() or kill() (the data stays)."""

    host = "127.0.0.1"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port, self.http_port = free_port(), free_port()
        self.config = server.write_config(run_dir, tcp_port=self.port, http_port=self.http_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = run_dir / "stdout.log"

    def url(self, database: str) -> str:
        return f"clickhouse://{self.host}:{self.port}/{database}"

    def start(self) -> float:
        """Start the server and wait until it answers; returns the seconds that took."""
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(server.server_argv(self.config), cwd=self.run_dir,
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            server.wait_ready(self.host, self.port, timeout=READY_TIMEOUT)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- server logs ---\n{self.logs()}") from exc
        assert self.proc.poll() is None, self.logs()
        return time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM, then wait for the clean shutdown (SIGKILL if it does not come)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def logs(self) -> str:
        parts = [self.log, *sorted((self.run_dir / "log").glob("*.log"))]
        return "\n".join(f"[{p.name}]\n{p.read_text()[-3000:]}" for p in parts if p.exists())


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """One running server for the whole session."""
    try:
        server.server_binary()
    except FileNotFoundError as exc:  # a missing install step, never a reason to skip
        pytest.fail(f"{exc}: deploy/install.sh installs it", pytrace=False)
    srv = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    srv.start()
    yield srv
    srv.stop()


def _new_store(request: pytest.FixtureRequest, tmp_path: Path, limits: QueryLimits) -> Iterator[Store]:
    if request.param == "chdb":
        st: Store = ChdbStore(tmp_path / "chdb", limits=limits)
        yield st
        st.close()
        return
    srv: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    st = ClickHouseStore(srv.host, srv.port, f"test_{uuid.uuid4().hex[:12]}", limits=limits)
    yield st
    try:
        st.query(f"DROP DATABASE IF EXISTS {st.database}")
    except StoreError:  # never created (a test of failures)
        pass
    st.close()


@pytest.fixture(params=["chdb", "clickhouse"])
def empty_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of each backend with nothing in it yet (not migrated)."""
    yield from _new_store(request, tmp_path, QueryLimits())


@pytest.fixture
def store(empty_store: Store) -> Store:
    """A fresh, migrated store of each backend."""
    empty_store.migrate()
    return empty_store


@pytest.fixture(params=["chdb", "clickhouse"])
def limited_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, migrated store of each backend whose user statements have TEST_LIMITS."""
    for st in _new_store(request, tmp_path, TEST_LIMITS):
        st.migrate()
        yield st
