"""A single ClickHouse server for the tests and local use, run from its own directory.

greymesh's default tap store is embedded (chdb, audit/store.py) and needs no server;
a server is for a store that several processes share, or that outlives one sink.
deploy/install.sh installs Debian's ``clickhouse-server`` (18.16), whose packaged
service cannot be started here, so this module runs the binary itself with a config
of its own: it listens on 127.0.0.1 only, and everything it owns (data, temporary
files, logs, the preprocessed config) lives under one run directory.

    config = write_config(run_dir, tcp_port=9000, http_port=8123)
    proc = subprocess.Popen(server_argv(config), cwd=run_dir)
    wait_ready("127.0.0.1", 9000, timeout=30)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

from core.wait import wait_until

# Debian installs the server in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_SERVER = Path("/usr/sbin/clickhouse-server")
INSTALL = "apt-get install clickhouse-server"

# Caches sized for a dev box (the packaged defaults are 5 GiB of marks and 8 GiB of
# uncompressed blocks); no interserver port, since nothing replicates.  user_files is an
# empty directory nothing writes to: the only place the server's file() may read, were a
# user statement ever let past readonly=1 (audit/store.py, Store.sandboxed).
CONFIG = """\
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{dir}/log/clickhouse-server.log</log>
        <errorlog>{dir}/log/clickhouse-server.err.log</errorlog>
        <size>10M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>64</max_concurrent_queries>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
# One passwordless user, reachable from loopback only.  User statements run with the
# sandbox's settings sent with each query (audit/store.py, QueryLimits: the limits, then
# readonly=1, after which the statement can change no setting); the readonly profile
# says the same for a user an operator dedicates to queries.
USERS = """\
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
        </default>
        <readonly>
            <readonly>1</readonly>
        </readonly>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def server_binary() -> Path:
    """The ``clickhouse-server`` executable: $GREYMESH_CLICKHOUSE_SERVER if set, else the
    one on PATH, else Debian's /usr/sbin one; FileNotFoundError (saying what installs
    it) when there is none."""
    if override := os.environ.get("GREYMESH_CLICKHOUSE_SERVER"):
        return Path(override)
    if found := shutil.which("clickhouse-server"):
        return Path(found)
    if SBIN_SERVER.exists():
        return SBIN_SERVER
    raise FileNotFoundError(f"'clickhouse-server' is not installed: run deploy/install.sh (or `{INSTALL}`)")


def write_config(dir: Path, *, tcp_port: int, http_port: int) -> Path:
    """Write ``dir/config.xml`` and ``dir/users.xml`` for a server listening on
    127.0.0.1 only (native protocol on ``tcp_port``, HTTP on ``http_port``), with its
    data, temporary files and logs under ``dir``. Returns the path of config.xml."""
    dir = Path(dir).resolve()
    for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
        (dir / sub).mkdir(parents=True, exist_ok=True)
    config = dir / "config.xml"
    config.write_text(CONFIG.format(dir=escape(str(dir)), tcp_port=int(tcp_port), http_port=int(http_port)))
    (dir / "users.xml").write_text(USERS)
    return config


def server_argv(config: Path) -> list[str]:
    """The command line that runs the server for ``config`` in the foreground (it
    logs to the files the config names; run it with the config's directory as cwd)."""
    return [str(server_binary()), f"--config-file={Path(config).resolve()}"]


def wait_ready(host: str, port: int, timeout: float) -> float:
    """Wait until the server at ``host:port`` answers ``SELECT 1`` over the native
    protocol; returns the seconds waited, raises TimeoutError after ``timeout``."""
    from clickhouse_driver import Client  # imported here so the module loads without it

    def answers() -> str | None:
        client = Client(host, port=port, connect_timeout=2, send_receive_timeout=5)
        try:
            return None if client.execute("SELECT 1") == [(1,)] else "SELECT 1 did not answer 1"
        except Exception as exc:  # noqa: BLE001 (refused while it starts, ...)
            return repr(exc)
        finally:
            client.disconnect()

    return wait_until(answers, timeout, f"ClickHouse at {host}:{port}", interval_s=0.1)
