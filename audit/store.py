"""The tap store: where the Kafka sink writes tap events and where the roll-ups, the
anomaly detector and ``greymesh taps query`` read them.  Two backends, one interface:

    chdb                       embedded ClickHouse (chdb) in the data dir: the default,
                               nothing to run; one process at a time owns its path
    chdb:///abs/path           the same, at that path
    clickhouse://host:port/db  a ClickHouse server (port 9000, db "greymesh" by
                               default), for a store that several processes share

    store = open_store(url, data_dir=data_dir)
    store.migrate()                                  # at start; idempotent
    store.insert(table_for("l7"), NAMES["l7"] + ("kpartition", "koffset"), rows)

Tables and views are defined in audit/migrations.py.  All SQL is ClickHouse SQL that
Debian's ClickHouse 18.16 and chdb's ClickHouse 26.x both run.  Parameters in
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
from decimal import Decimal
from pathlib import Path
from typing import Any, Self

from audit import migrations
from audit.migrations import table_for

__all__ = ["ChdbStore", "ClickHouseStore", "Store", "StoreError", "check_url", "open_store", "table_for"]

DEFAULT_DATABASE = "greymesh"
DEFAULT_PORT = 9000
ACCEPTED = ("'chdb' (embedded, in the data dir; the default), 'chdb:///absolute/path' (embedded, there) or "
            "'clickhouse://[user[:password]@]host[:port][/database]' (a server; port 9000, database greymesh)")
READONLY_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JSON_ROW = json.JSONEncoder(ensure_ascii=False).encode  # UTF-8 as is: less to write and parse
# clickhouse-driver logs every failed connection with a traceback; with no handler of the
# application's, Python would print that to stderr next to the StoreError that says it.
logging.getLogger("clickhouse_driver").addHandler(logging.NullHandler())


class StoreError(Exception):
    """A store operation failed; the message says what, on which store URL, and what to do."""


def open_store(url: str | None, *, data_dir: Path) -> Store:
    """The store ``url`` names (None: the embedded default under ``data_dir``)."""
    return _opener(url, data_dir)()


def check_url(url: str) -> None:
    """Raise StoreError unless ``url`` is a store URL open_store accepts; connects to nothing."""
    _opener(url, Path("."))


def _opener(url: str | None, data_dir: Path) -> Callable[[], Store]:
    if url is None or url == "chdb":
        return lambda: ChdbStore(Path(data_dir) / "store")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "chdb" and not parts.netloc and parts.path.startswith("/") and not parts.query:
        return lambda: ChdbStore(Path(parts.path))
    if parts.scheme == "clickhouse" and parts.hostname and not parts.query:
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            port = 0
        database = parts.path.strip("/") or DEFAULT_DATABASE
        if port and _IDENTIFIER.match(database):
            return lambda: ClickHouseStore(parts.hostname, port, database,
                                           user=urllib.parse.unquote(parts.username or "default"),
                                           password=urllib.parse.unquote(parts.password or ""))
    shown = _without_password(url)
    raise StoreError(f"unusable store URL {shown!r}: expected {ACCEPTED}")


class Store(abc.ABC):
    """A ClickHouse database holding the tap tables (see audit/migrations.py)."""

    url: str  # for display; never contains a password
    database: str

    def __init__(self) -> None:
        self._migrate_lock = threading.Lock()

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
        """Run one user statement (SELECT, WITH, SHOW, DESCRIBE or EXISTS) with ClickHouse's
        readonly=1 setting; (column names, rows).  Anything else, several statements,
        INTO OUTFILE (which writes files even under readonly) and FORMAT (the output
        format is ours to choose) are refused with StoreError before they reach the
        engine."""
        return self._select_readonly(check_readonly(sql, self.url))

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
    def _select_readonly(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run an already checked user statement with readonly=1."""


class ChdbStore(Store):
    """The embedded store: chdb (ClickHouse 26.x in this process) with its data at ``path``.

    One process owns a path: chdb takes a lock file there, so a second process cannot
    open it (run a ClickHouse server to share a store), and chdb runs one engine per
    process, so this process can have one ChdbStore open at a time (close it before
    opening another path).  The database is created on open, since it costs nothing here.
    """

    def __init__(self, path: Path, database: str = DEFAULT_DATABASE) -> None:
        super().__init__()
        from chdb.session import Session  # 0.5 s and 550 MB of engine: load only when used

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
        self._execute(f"USE {self.database}", what="use the database")
        # Plain JSON numbers for 64-bit integers; nan/inf as strings float() reads.
        self._execute("SET output_format_json_quote_64bit_integers = 0, output_format_json_quote_denormals = 1",
                      what="set the output format")

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
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def _execute(self, sql: str, *, what: str) -> None:
        self._run(sql, "CSV", what=what)

    def _select_readonly(self, sql: str) -> tuple[list[str], list[tuple]]:
        # A SETTINGS clause of its own; the newline ends a trailing -- comment.
        return self._json_query(f"{sql}\nSETTINGS readonly = 1", what="read-only query")

    def _run(self, sql: str, fmt: str, *, what: str) -> Any:
        if self._session is None:
            raise StoreError(f"{what} on {self.url}: the store is closed")
        try:
            return self._session.query(sql, fmt)
        except Exception as exc:
            raise StoreError(f"{what} failed on {self.url}: {_chdb_message(exc)}") from exc

    def _json_query(self, sql: str, *, what: str) -> tuple[list[str], list[tuple]]:
        raw = self._run(sql, "JSONCompact", what=what).bytes()
        if not raw.strip():  # DDL and the like answer nothing at all
            return [], []
        result = json.loads(raw.decode("utf-8", "replace"))
        names = [c["name"] for c in result["meta"]]
        convert = [_converter(c["type"]) for c in result["meta"]]
        return names, [tuple(f(v) for f, v in zip(convert, row)) for row in result["data"]]


class ClickHouseStore(Store):
    """A database on a ClickHouse server, over the native protocol (clickhouse-driver).

    Values come back as the driver gives them (DateTime as naive datetimes in the
    server's time zone, as ChdbStore gives them in this host's).
    """

    def __init__(self, host: str, port: int = DEFAULT_PORT, database: str = DEFAULT_DATABASE, *,
                 user: str = "default", password: str = "", connect_timeout: float = 5.0) -> None:
        super().__init__()
        from clickhouse_driver import Client

        self.database = _identifier(database)
        netloc = f"{user}@{host}:{port}" if user != "default" else f"{host}:{port}"
        self.url = f"clickhouse://{netloc}/{self.database}"
        options = dict(port=port, user=user, password=password, connect_timeout=connect_timeout,
                       client_name="greymesh")
        self._client = Client(host, database=self.database, **options)
        self._admin = Client(host, database="", **options)

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

    def _execute(self, sql: str, *, what: str) -> None:
        self._call(self._client, sql, what=what)

    def _create_database(self) -> None:
        # The main client names the database in its handshake, which fails while the
        # database does not exist; this one connects to the user's default database.
        self._call(self._admin, f"CREATE DATABASE IF NOT EXISTS {self.database}", what="create the database")

    def _select_readonly(self, sql: str) -> tuple[list[str], list[tuple]]:
        rows, types = self._call(self._client, sql, with_column_types=True, settings={"readonly": 1},
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
            raise StoreError(f"{what} failed on {self.url}: {_server_message(exc)}{hint}") from exc
        except Exception as exc:  # the driver's own errors, and values it cannot encode
            raise StoreError(f"{what} failed on {self.url}: {type(exc).__name__}: {exc}") from exc


# --- user SQL -------------------------------------------------------------------------

# Comments, quoted strings and identifiers (backslash escapes or doubled quotes), words.
# '#' is not taken as a comment (18.16 does not): a ';' after it then counts, so it is
# refused rather than let through.  Anything else is one character.
_TOKENS = re.compile(r"""
    (?P<space>\s+) | (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<quoted>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*) | (?P<other>.)""", re.VERBOSE | re.DOTALL)


def check_readonly(sql: str, url: str = "") -> str:
    """``sql`` without a trailing semicolon if it is one read-only statement; StoreError
    saying why not otherwise."""
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
        raise refuse("INTO OUTFILE writes a file")
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

