"""The tap store: where the Kafka sink writes tap events and where the roll-ups, the
anomaly detector and ``greymesh taps query`` read them.  Two backends, one interface:

    chdb                       embedded ClickHouse (chdb) in the data dir: the default,
                               nothing to run; one process at a time owns its path
    chdb:///abs/path           the same, at that path
    clickhouse://[user@]host:port/db[?secure=1[&ca_certs=/abs/ca.pem]]
                               a ClickHouse server (port 9000, or 9440 with TLS; db
                               "greymesh" by default), for a store that several
                               processes share.  Its password is never in the URL:
                               open_store(url, password=...) takes it, read by the
                               caller from a 0600 file (core/credentials.py)

    store = open_store(url, data_dir=data_dir)
    store.migrate()                                  # at start; idempotent
    store.insert(table_for("l7"), NAMES["l7"] + ("kpartition", "koffset"), rows)

Tables and views are defined in audit/migrations.py.  All SQL is ClickHouse SQL that
Debian's ClickHouse 18.16 and chdb's ClickHouse 26.x both run.  User SQL (``greymesh taps query``, the sink's ``/query``) runs in a sandbox the engine
enforces: :meth:`Store.sandboxed` (see there).  Parameters in
:meth:`Store.query` are ``%(name)s`` placeholders rendered here as SQL literals, the same
for both backends (18.16 has no server-side query parameters); a literal ``%`` in SQL
with parameters is written ``%%``.
"""

from __future__ import annotations

import abc
import datetime as dt
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Self

from audit import migrations
from audit.migrations import table_for

__all__ = ["ChdbStore", "ClickHouseStore", "QueryLimits", "Store", "StoreError", "check_url", "open_store",
           "redacted", "table_for"]

DEFAULT_DATABASE = "greymesh"
DEFAULT_PORT = 9000
DEFAULT_SECURE_PORT = 9440  # ClickHouse's native protocol over TLS
ACCEPTED = ("'chdb' (embedded, in the data dir; the default), 'chdb:///absolute/path' (embedded, there) or "
            "'clickhouse://[user@]host[:port][/database][?secure=1[&ca_certs=/absolute/ca.pem]]' (a server; "
            "port 9000, or 9440 with secure=1; database greymesh)")
PASSWORD_ENV = "GREYMESH_STORE_PASSWORD"  # `greymesh up` reads a server store's password from it
PASSWORD_ADVICE = ("put the password in a file only you can read (chmod 600) and pass --store-password-file FILE, "
                   f"or set {PASSWORD_ENV}; a password in the URL would show in `ps`, shell history and "
                   "runtime.json")
_TRUE = frozenset({"1", "true", "yes"})
READONLY_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JSON_ROW = json.JSONEncoder(ensure_ascii=False).encode  # UTF-8 as is: less to write and parse
# clickhouse-driver logs every failed connection with a traceback; with no handler of the
# application's, Python would print that to stderr next to the StoreError that says it.
logging.getLogger("clickhouse_driver").addHandler(logging.NullHandler())


class StoreError(Exception):
    """A store operation failed; the message says what, on which store URL, and what to do."""


@dataclass(frozen=True)
class QueryLimits:
    """What one user statement may spend; the engine stops it past any of these."""

    max_execution_time_s: int = 10
    max_result_rows: int = 100_000
    max_memory_bytes: int = 1 << 30

    def settings(self) -> dict[str, int | str]:
        """The engine settings of the sandbox, in the order they must be applied: readonly
        last, because once it is 1 no setting may change any more (not even by the
        statement's own SETTINGS clause, nor by a subquery's)."""
        return {"max_execution_time": self.max_execution_time_s, "max_result_rows": self.max_result_rows,
                "result_overflow_mode": "throw", "max_memory_usage": self.max_memory_bytes, "readonly": 1}


def open_store(url: str | None, *, data_dir: Path, password: str = "",
               limits: QueryLimits = QueryLimits()) -> Store:
    """The store ``url`` names (None: the embedded default under ``data_dir``); ``password``
    is a server's (never part of the URL); ``limits`` bound every user statement."""
    return _opener(url, data_dir, password, limits)()


def check_url(url: str) -> None:
    """Raise StoreError unless ``url`` is a store URL open_store accepts; connects to nothing."""
    _opener(url, Path("."), "", QueryLimits())


def redacted(url: str) -> str:
    """``url`` as it may be shown: a password in it (an old runtime.json's) as ***."""
    return _without_password(url)


def _opener(url: str | None, data_dir: Path, password: str, limits: QueryLimits) -> Callable[[], Store]:
    if url is None or url == "chdb":
        return lambda: ChdbStore(Path(data_dir) / "store", limits=limits)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "chdb" and not parts.netloc and parts.path.startswith("/") and not parts.query:
        return lambda: ChdbStore(Path(parts.path), limits=limits)
    if parts.scheme == "clickhouse" and parts.password is not None:
        raise StoreError(f"store URL {_without_password(url)!r} holds a password: {PASSWORD_ADVICE}")
    options = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme == "clickhouse" and parts.hostname and set(options) <= {"secure", "ca_certs"} \
            and (options.get("ca_certs") or "/").startswith("/"):
        secure = options.get("secure", "").lower() in _TRUE or "ca_certs" in options
        try:
            port = parts.port or (DEFAULT_SECURE_PORT if secure else DEFAULT_PORT)
        except ValueError:
            port = 0
        database = parts.path.strip("/") or DEFAULT_DATABASE
        if port and _IDENTIFIER.match(database):
            return lambda: ClickHouseStore(parts.hostname, port, database,
                                           user=urllib.parse.unquote(parts.username or "default"),
                                           password=password, secure=secure, ca_certs=options.get("ca_certs"),
                                           limits=limits)
    shown = _without_password(url)
    raise StoreError(f"unusable store URL {shown!r}: expected {ACCEPTED}")


class Store(abc.ABC):
    """A ClickHouse database holding the tap tables (see audit/migrations.py)."""

    url: str  # for display; never contains a password
    database: str

    def __init__(self, limits: QueryLimits) -> None:
        self._migrate_lock = threading.Lock()
        self.limits = limits
        # User statements run one at a time on a connection of their own, never under the
        # lock of the sink's inserts; a caller waits at most one statement's time for it.
        self._sandbox_lock = threading.Lock()

    def migrate(self) -> list[int]:
        """Create the database if missing and apply the pending migrations in order;
        returns the versions applied by this call ([] when up to date).

        A migration is recorded only after all its statements succeeded, and every
        statement is IF NOT EXISTS, so one interrupted by a crash runs again cleanly.
        Two processes migrating one server at once would both run the (idempotent)
        statements and both record the version, which the ledger folds into one row;
        the sink avoids even that by migrating once, at start."""
        db = self.database
        with self._migrate_lock:
            self._create_database()
            self._execute(migrations.ledger(db), what="create the migrations ledger")
            done = {v for (v,) in self.query(f"SELECT DISTINCT version FROM {db}.{migrations.LEDGER}")}
            applied = []
            for m in migrations.MIGRATIONS:
                if m.version in done:
                    continue
                for sql in m.statements(db):
                    self._execute(sql, what=f"apply migration {m.version} ({m.name})")
                self.insert(migrations.LEDGER, ("version", "name"), [(m.version, m.name)])
                applied.append(m.version)
            return applied

    @abc.abstractmethod
    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert ``rows`` (values in ``columns`` order) into ``table`` with one INSERT
        statement: all rows or none, up to ClickHouse's max_insert_block_size (about a
        million rows).  StoreError on any failure."""

    @abc.abstractmethod
    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run trusted internal SQL (DDL too), with ``%(name)s`` parameters; the rows."""

    def query_readonly(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one user statement (SELECT, WITH, SHOW, DESCRIBE or EXISTS) in the sandbox;
        (column names, rows).  :func:`check_readonly` first, for a clear message on what
        is plainly not allowed; the defence is :meth:`sandboxed`."""
        return self.sandboxed(check_readonly(sql, self.url))

    def sandboxed(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run the user statement ``sql`` as it is, where the engine refuses what could reach
        beyond the store; (column names, rows), or StoreError saying what was refused.

        On a connection (chdb: a session) of its own, with :attr:`limits` set and then
        readonly=1: no write, DDL, SET or table function that reads files or the network
        (file, url, remote, s3, executable, mysql, ...), no setting changed by the
        statement, and the engine stops it past the time, result-row and memory limits.
        A server also answers INTO OUTFILE on the client side only (nothing is written)
        and allows one statement per query.  chdb is the client too (ClickHouse's local
        mode), where no setting governs INTO OUTFILE, several statements or the file()
        function; there the engine's own parser decides: see ChdbStore._gate.
        Waits at most one statement's time for another user statement to finish."""
        if not self._sandbox_lock.acquire(timeout=self.limits.max_execution_time_s + 1):
            raise StoreError(f"the store {self.url} is busy with other queries; try again")
        try:
            return self._sandboxed(sql)
        finally:
            self._sandbox_lock.release()

    def existing_event_ids(self, table: str, partition: int, min_offset: int) -> set[str]:
        """The event_id of every row of ``table`` that came from Kafka ``partition`` at
        ``min_offset`` or later: what a sink replaying from ``min_offset`` after a crash
        has already stored."""
        rows = self.query(f"SELECT event_id FROM {_identifier(table)} "
                          "WHERE kpartition = %(partition)s AND koffset >= %(offset)s",
                          {"partition": int(partition), "offset": int(min_offset)})
        return {event_id for (event_id,) in rows}

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection or the embedded engine; the store is unusable after."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    @abc.abstractmethod
    def _execute(self, sql: str, *, what: str) -> None:
        """Run one statement whose result does not matter; StoreError saying ``what`` failed."""

    def _create_database(self) -> None:
        self._execute(f"CREATE DATABASE IF NOT EXISTS {self.database}", what="create the database")

    @abc.abstractmethod
    def _sandboxed(self, sql: str) -> tuple[list[str], list[tuple]]:
        """:meth:`sandboxed` under its lock."""


class ChdbStore(Store):
    """The embedded store: chdb (ClickHouse 26.x in this process) with its data at ``path``.

    One process owns a path: chdb takes a lock file there, so a second process cannot
    open it (run a ClickHouse server to share a store), and chdb runs one engine per
    process, so this process can have one ChdbStore open at a time (close it before
    opening another path).  The database is created on open, since it costs nothing here.
    """

    def __init__(self, path: Path, database: str = DEFAULT_DATABASE, *, limits: QueryLimits = QueryLimits()) -> None:
        super().__init__(limits)
        from chdb.session import Session  # 0.5 s and 550 MB of engine: load only when used

        self._new_session = Session
        self._sandbox: Any = None  # the user statements' session, opened at the first one
        self._denied_functions: frozenset[str] = frozenset()

        self.path = Path(path).resolve()
        self.database = _identifier(database)
        self.url = f"chdb://{self.path}"
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._session: Any = Session(str(self.path))
        except Exception as exc:
            raise StoreError(
                f"cannot open the embedded store {self.url}: {exc}. A chdb path is owned by one process "
                "(another greymesh sink may hold it) and a process runs one chdb path at a time; "
                "use a ClickHouse server (clickhouse://...) to share a store") from exc
        self._create_database()
        for statement in self._session_setup():
            self._execute(statement, what="set up the session")

    def _session_setup(self) -> list[str]:
        # Plain JSON numbers for 64-bit integers; nan/inf as strings float() reads.
        return [f"USE {self.database}",
                "SET output_format_json_quote_64bit_integers = 0, output_format_json_quote_denormals = 1"]

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        # JSONCompactEachRow: json.dumps escapes every string correctly for ClickHouse's
        # JSON parser, and the engine parses a streamed insert ~3x faster than the same
        # data inlined in the query text (measured: 100k l7 rows, 0.4 s against 1.4 s;
        # with the encoding here, ~115,000 l7 rows/s in all).
        sql = f"INSERT INTO {_identifier(table)} ({', '.join(map(_identifier, columns))})"
        try:
            body = "\n".join(map(_JSON_ROW, rows)).encode()
            with self._session.send_insert(sql, "JSONCompactEachRow") as stream:
                stream.append(body)
                stream.finish()
        except Exception as exc:
            raise StoreError(f"insert of {len(rows)} rows into {table} failed on {self.url}: "
                             f"{_chdb_message(exc)}") from exc

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        return self._json_query(render(sql, params), what="query")[1]

    def close(self) -> None:
        for name in ("_sandbox", "_session"):
            session = getattr(self, name)
            setattr(self, name, None)
            if session is not None:
                session.close()

    def _execute(self, sql: str, *, what: str) -> None:
        self._run(sql, "CSV", what=what)

    def _sandboxed(self, sql: str) -> tuple[list[str], list[tuple]]:
        sandbox = self._open_sandbox()
        try:
            # The engine parses the statement (given as a string literal, so it cannot touch
            # this query) and refuses several statements; what runs is its own rendering of
            # what was checked, so no quoting trick can make the two differ.
            [[statement]] = self._json_query(f"SELECT formatQuerySingleLine({literal(sql)})",
                                             what="parse the query", session=sandbox)[1]
            tree = [line for [line] in self._json_query(f"EXPLAIN AST {statement}", what="parse the query",
                                                         session=sandbox)[1]]
        except StoreError:
            self._close_sandbox()
            raise
        self._gate(tree)
        try:
            return self._json_query(statement, what="read-only query", session=sandbox)
        except StoreError:
            self._close_sandbox()
            raise

    def _close_sandbox(self) -> None:
        # chdb keeps what a failed statement had written and puts it before the next
        # answer of the session: a failed statement's session is not used again.
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            sandbox.close()

    def _open_sandbox(self) -> Any:
        if self._session is None:
            raise StoreError(f"read-only query on {self.url}: the store is closed")
        if self._sandbox is None:
            sandbox = self._new_session(str(self.path))
            settings = ", ".join(f"{name} = {literal(value)}" for name, value in self.limits.settings().items())
            try:
                for statement in (*self._session_setup(), f"SET {settings}"):
                    sandbox.query(statement, "CSV")
                names = sandbox.query("SELECT name FROM system.table_functions", "JSONCompact").bytes()
            except Exception as exc:
                sandbox.close()
                raise StoreError(f"cannot open the query sandbox on {self.url}: {_chdb_message(exc)}") from exc
            # readonly=1 already refuses these table functions; the gate names them first.
            table_functions = {name.lower() for [name] in json.loads(names)["data"]}
            self._denied_functions = frozenset((table_functions - SAFE_TABLE_FUNCTIONS) | FILE_FUNCTIONS)
            self._sandbox = sandbox
        return self._sandbox

    def _gate(self, tree: list[str]) -> None:
        """Refuse, from the engine's own syntax tree (EXPLAIN AST: one node a line, one
        space deeper per level), what ClickHouse's local mode would do outside the
        sandbox's settings: INTO OUTFILE (written by the embedded client), FORMAT and
        SETTINGS on the statement, and functions that read files (file() is not checked
        against user_files_path in local mode).  StoreError naming what was found."""
        root = tree[0].split()[0] if tree else ""
        if not root.startswith(SANDBOX_STATEMENTS):
            raise StoreError(f"refused by the query sandbox ({self.url}): {root or 'an empty statement'} is not "
                             f"a read-only statement ({', '.join(sorted(READONLY_STATEMENTS))})")
        for line in tree[1:]:
            depth = len(line) - len(line.lstrip(" "))
            kind, _, rest = line.strip().partition(" ")
            if depth == 1 and kind == "Literal" and rest.startswith("'"):
                raise StoreError(f"refused by the query sandbox ({self.url}): INTO OUTFILE writes a file")
            if depth == 1 and root == "SelectWithUnionQuery" and kind != "ExpressionList":
                clause = {"Identifier": "FORMAT", "Set": "SETTINGS"}.get(kind, kind)
                raise StoreError(f"refused by the query sandbox ({self.url}): {clause} is not allowed on the "
                                 "statement (greymesh chooses the format; the limits are fixed)")
            name = rest.split(" ", 1)[0].lower()
            if kind == "Function" and name in self._denied_functions:
                raise StoreError(f"refused by the query sandbox ({self.url}): {name}() reads files or the network")

    def _run(self, sql: str, fmt: str, *, what: str, session: Any = None) -> Any:
        session = session or self._session
        if session is None:
            raise StoreError(f"{what} on {self.url}: the store is closed")
        try:
            return session.query(sql, fmt)
        except Exception as exc:
            message = _chdb_message(exc)
            raise StoreError(f"{what} failed on {self.url}: {message}{_limit_hint(message, self.limits)}") from exc

    def _json_query(self, sql: str, *, what: str, session: Any = None) -> tuple[list[str], list[tuple]]:
        raw = self._run(sql, "JSONCompact", what=what, session=session).bytes()
        if not raw.strip():  # DDL and the like answer nothing at all
            return [], []
        try:
            result = json.loads(raw.decode("utf-8", "replace"))
            result["meta"], result["data"]  # noqa: B018 (a JSONCompact answer, not another FORMAT's)
        except (ValueError, TypeError, KeyError):  # a FORMAT of the statement's own
            raise StoreError(f"{what} on {self.url}: the answer is not JSONCompact; leave out FORMAT") from None
        names = [c["name"] for c in result["meta"]]
        convert = [_converter(c["type"]) for c in result["meta"]]
        return names, [tuple(f(v) for f, v in zip(convert, row)) for row in result["data"]]


class ClickHouseStore(Store):
    """A database on a ClickHouse server, over the native protocol (clickhouse-driver).

    Values come back as the driver gives them (DateTime as naive datetimes in the
    server's time zone, as ChdbStore gives them in this host's).
    """

    def __init__(self, host: str, port: int = DEFAULT_PORT, database: str = DEFAULT_DATABASE, *,
                 user: str = "default", password: str = "", connect_timeout: float = 5.0, secure: bool = False,
                 ca_certs: str | None = None, limits: QueryLimits = QueryLimits()) -> None:
        super().__init__(limits)
        from clickhouse_driver import Client

        self.database = _identifier(database)
        netloc = f"{user}@{host}:{port}" if user != "default" else f"{host}:{port}"
        tls = ("?secure=1" + (f"&ca_certs={ca_certs}" if ca_certs else "")) if secure else ""
        self.url = f"clickhouse://{netloc}/{self.database}{tls}"
        options: dict[str, Any] = dict(port=port, user=user, password=password, connect_timeout=connect_timeout,
                                       client_name="greymesh", secure=secure, verify=True)
        if ca_certs:
            options["ca_certs"] = ca_certs
        self._client = Client(host, database=self.database, **options)
        self._admin = Client(host, database="", **options)
        # The user statements' own connection: the sink's inserts never wait for one, and
        # a server that stops answering frees it a little after the time limit.
        self._sandbox = Client(host, database=self.database, send_receive_timeout=limits.max_execution_time_s + 5,
                               **options)

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        sql = f"INSERT INTO {_identifier(table)} ({', '.join(map(_identifier, columns))}) VALUES"
        self._call(self._client, sql, rows, what=f"insert of {len(rows)} rows into {table}")

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        return [tuple(r) for r in self._call(self._client, render(sql, params), what="query")]

    def close(self) -> None:
        self._client.disconnect()
        self._admin.disconnect()
        self._sandbox.disconnect()

    def _execute(self, sql: str, *, what: str) -> None:
        self._call(self._client, sql, what=what)

    def _create_database(self) -> None:
        # The main client names the database in its handshake, which fails while the
        # database does not exist; this one connects to the user's default database.
        self._call(self._admin, f"CREATE DATABASE IF NOT EXISTS {self.database}", what="create the database")

    def _sandboxed(self, sql: str) -> tuple[list[str], list[tuple]]:
        # The driver sends the settings in this order and the server applies them so.
        rows, types = self._call(self._sandbox, sql, with_column_types=True, settings=self.limits.settings(),
                                 what="read-only query")
        return [name for name, _ in types], [tuple(r) for r in rows]

    def _call(self, client: Any, sql: str, params: Any = None, *, what: str, **kwargs: Any) -> Any:
        from clickhouse_driver import errors

        try:
            return client.execute(sql, params, **kwargs)
        except (errors.NetworkError, errors.SocketTimeoutError, OSError, EOFError) as exc:
            client.disconnect()
            raise StoreError(f"{what} failed: cannot reach the ClickHouse server at {self.url} ({exc}); "
                             "check that the server is running and listening there") from exc
        except errors.ServerException as exc:
            hint = " (Store.migrate() creates it)" if exc.code == errors.ErrorCodes.UNKNOWN_DATABASE else ""
            hint = hint or _limit_hint(f"Code: {exc.code}.", self.limits)
            raise StoreError(f"{what} failed on {self.url}: {_server_message(exc)}{hint}") from exc
        except Exception as exc:  # the driver's own errors, and values it cannot encode
            raise StoreError(f"{what} failed on {self.url}: {type(exc).__name__}: {exc}") from exc


# --- user SQL -------------------------------------------------------------------------

# Comments, quoted strings and identifiers (backslash escapes or doubled quotes), words.
# '#' is not taken as a comment (18.16 does not): a ';' after it then counts, so it is
# refused rather than let through.  Anything else is one character.
_TOKENS = re.compile(r"""
    (?P<space>\s+) | (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<quoted>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`
               |\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*) | (?P<other>.)""", re.VERBOSE | re.DOTALL)


def check_readonly(sql: str, url: str = "") -> str:
    """``sql`` without a trailing semicolon if it looks like one read-only statement;
    StoreError saying why not otherwise.  For clear messages only: the defence is
    Store.sandboxed, which runs what passes here."""
    tokens = [(m.lastgroup, m.group(), m.start()) for m in _TOKENS.finditer(sql)
              if m.lastgroup not in ("space", "comment")]
    end = len(sql)
    if tokens and tokens[-1][1] == ";":
        end = tokens.pop()[2]
    where = f" ({url})" if url else ""

    def refuse(why: str) -> StoreError:
        return StoreError(f"refused{where}: {why}; `greymesh taps query` runs one read-only statement "
                          f"({', '.join(sorted(READONLY_STATEMENTS))})")

    if not tokens:
        raise refuse("the query is empty")
    if any(text == ";" for _, text, _ in tokens):
        raise refuse("it holds more than one statement")
    first = tokens[0][1].upper()
    if tokens[0][0] != "word" or first not in READONLY_STATEMENTS:
        raise refuse(f"it is not a read-only statement (it starts with {tokens[0][1]!r})")
    words = [text.upper() for kind, text, _ in tokens if kind == "word"]
    if any(a == "INTO" and b == "OUTFILE" for a, b in zip(words, words[1:])):
        raise refuse("INTO OUTFILE is not allowed in taps query (it writes a file)")
    if "FORMAT" in words:
        raise refuse("FORMAT is chosen by greymesh, not the query")
    return sql[:end]


def render(sql: str, params: Mapping[str, Any] | None) -> str:
    """``sql`` with each ``%(name)s`` replaced by ``params[name]`` as a SQL literal."""
    if not params:
        return sql
    return sql % {name: literal(value) for name, value in params.items()}


def literal(value: Any) -> str:
    """A ClickHouse SQL literal of ``value``: None, bool, int, float, str, date, datetime
    (as 'YYYY-MM-DD hh:mm:ss', which ClickHouse compares with DateTime), or a list/tuple/
    set of those (as a tuple, for IN)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # nan, inf and -inf are ClickHouse literals too
    if isinstance(value, dt.datetime):
        return literal(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, dt.date):
        return literal(value.isoformat())
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple, set, frozenset)):
        if not value:
            raise StoreError("an empty list cannot be a SQL parameter")
        return "(" + ", ".join(map(literal, value)) + ")"
    raise StoreError(f"cannot pass a {type(value).__name__} as a SQL parameter")


# --- the sandbox ----------------------------------------------------------------------

# Root nodes of EXPLAIN AST that a user statement may have (SELECT/WITH, SHOW, DESCRIBE, EXISTS).
SANDBOX_STATEMENTS = ("SelectWithUnionQuery", "SelectIntersectExceptQuery", "ShowTables", "DescribeQuery", "Exists")
# Table functions that read nothing but their arguments or the store's own tables; every
# other one (file, url, remote, s3, executable, mysql, python, ...) is refused.
SAFE_TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "primes", "generateseries",
                                  "generate_series", "generaterandom", "null", "values", "view", "merge", "format"})
# Functions that read a file named by their argument (not table functions).
FILE_FUNCTIONS = frozenset({"file", "catboostevaluate"})
# ClickHouse error codes of the sandbox's limits -> what to do about them.
_LIMIT_HINTS = {
    159: "the query ran longer than {t} s (max_execution_time); narrow it (WHERE time_us > ..., LIMIT)",
    396: "the result has more than {rows} rows (max_result_rows); aggregate or add LIMIT",
    241: "the query needs more than {mib} MiB (max_memory_usage); aggregate less or narrow it",
    164: "taps query is read-only and its limits are fixed",
}


def _limit_hint(message: str, limits: QueryLimits) -> str:
    match = re.search(r"Code:? (\d+)", message)
    hint = _LIMIT_HINTS.get(int(match.group(1))) if match else None
    if hint is None:
        return ""
    return f" ({hint.format(t=limits.max_execution_time_s, rows=limits.max_result_rows, mib=limits.max_memory_bytes >> 20)})"


# --- helpers --------------------------------------------------------------------------

def _identifier(name: str) -> str:
    """``name`` if it is a plain identifier: table and column names are put in SQL as is."""
    if not _IDENTIFIER.match(name):
        raise StoreError(f"{name!r} is not a plain identifier (letters, digits, _)")
    return name


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _chdb_message(exc: BaseException) -> str:
    """chdb's message on one line, without the code prefix it sometimes repeats."""
    text = " ".join(str(exc).split())
    return re.sub(r"^(Code: \d+\. DB::Exception: )\1", r"\1", text) or type(exc).__name__


def _server_message(exc: Exception) -> str:
    """The server's message without the stack trace 18.16 appends to it."""
    text = str(getattr(exc, "message", "") or exc).split("Stack trace:")[0]
    code = getattr(exc, "code", None)
    return (f"Code {code}: " if code else "") + " ".join(text.split()).rstrip(" .") + "."


def _converter(type: str) -> Callable[[Any], Any]:
    """How one JSONCompact value of ClickHouse ``type`` becomes the Python value
    clickhouse-driver would give (ints as int, DateTime as naive datetime, ...)."""
    if type.startswith("Nullable("):
        inner = _converter(type[len("Nullable("):-1])
        return lambda v: None if v is None else inner(v)
    if type.startswith("LowCardinality("):
        return _converter(type[len("LowCardinality("):-1])
    if type.startswith("Array("):
        inner = _converter(type[len("Array("):-1])
        return lambda v: [inner(x) for x in v]
    if re.match(r"U?Int\d+\Z", type):
        return int
    if type.startswith("Float"):
        return float
    if type.startswith("Decimal"):
        return lambda v: Decimal(str(v))
    if type.startswith("DateTime"):
        return dt.datetime.fromisoformat
    if type in ("Date", "Date32"):
        return dt.date.fromisoformat
    if type == "Bool":
        return bool
    return _same


def _same(value: Any) -> Any:
    return value

