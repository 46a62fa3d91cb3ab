"""Drive a real local mesh from tests: the `greymesh` CLI, its status, and traffic through it."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core import credentials
from core.datadir import DataDir
from core.endpoints import entrypoint_tls

ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "deploy" / "demo" / "mesh.yaml"


@dataclass
class Reply:
    status: int  # 0: no HTTP answer at all
    body: dict | str

    def subsets_seen(self, service: str) -> set[str]:
        """Subsets of `service` anywhere in the nested answer."""
        return self._seen(service, "subset")

    def instances_seen(self, service: str) -> set[str]:
        """Instances of `service` anywhere in the nested answer."""
        return self._seen(service, "instance")

    def _seen(self, service: str, key: str) -> set[str]:
        found: set[str] = set()

        def walk(doc: object) -> None:
            if isinstance(doc, dict):
                if doc.get("service") == service and key in doc:
                    found.add(doc[key])
                for v in doc.values():
                    walk(v)
            elif isinstance(doc, list):
                for v in doc:
                    walk(v)

        walk(self.body)
        return found


# The PEM each front door's certificate chains to, by "https://host:port", recorded when a
# test reads Mesh.entrypoint: get(mesh.entrypoint) verifies TLS as any client would.
_ENTRYPOINT_CAS: dict[str, str] = {}


def tls_context(url: str) -> ssl.SSLContext | None:
    """The client TLS context for a front door's url (None for other urls).  Read for every
    request: a root rotation replaces the bundle under a running test."""
    parts = urllib.parse.urlsplit(url)
    ca = _ENTRYPOINT_CAS.get(f"{parts.scheme}://{parts.netloc}")
    return entrypoint_tls(ca) if ca else None


def get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Reply:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout, context=tls_context(url)) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except OSError as exc:
        return Reply(0, f"{type(exc).__name__}: {exc}")
    try:
        return Reply(status, json.loads(raw))
    except ValueError:
        return Reply(status, raw.decode("utf-8", "replace"))


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll until pred() holds; return the seconds it took, or fail naming `what`."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


@dataclass
class Traffic:
    """Steady requests on a background thread, every reply kept with its send time."""

    url: str
    interval_s: float = 0.02
    replies: list[tuple[float, Reply]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            self.replies.append((sent, get(self.url)))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - sent)))

    def failures(self) -> list[Reply]:
        return [r for _, r in self.replies if r.status != 200]


class Mesh:
    """One running demo mesh in its own data dir."""

    def __init__(self, data_dir: Path, spec_path: Path, xds_api: str, up_args: tuple[str, ...] = ("--rps", "2")):
        self.data_dir = data_dir
        self.spec_path = spec_path
        self.xds_api = xds_api
        self.up_args = up_args
        self.baseline = yaml.safe_load(DEMO_SPEC.read_text())
        self.applies = 0
        self.last_applied: Path | None = None

    def cli(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "greymesh.cli", *args, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"greymesh {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self) -> None:
        self.cli("up", str(self.spec_path), "--xds-api", self.xds_api, *self.up_args)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json", check=False).stdout)

    @property
    def entrypoint(self) -> str:
        """The front door (https), from the data dir (a data dir keeps its ports: no CLI call
        per request); get() and Traffic trust its certificate from here on."""
        doc = json.loads((self.data_dir / "runtime.json").read_text())
        parts = urllib.parse.urlsplit(doc["entrypoint"])
        _ENTRYPOINT_CAS[f"{parts.scheme}://{parts.netloc}"] = doc["entrypoint_ca"]
        return doc["entrypoint"]

    def spec(self) -> dict:
        """A fresh, mutable copy of the baseline spec."""
        return copy.deepcopy(self.baseline)

    def write_spec(self, doc: dict, path: Path | None = None) -> Path:
        path = path or self.spec_path
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, path)
        return path

    def apply(self, doc: dict) -> subprocess.CompletedProcess:
        """`greymesh apply` of doc, written to a file of its own: the applied file becomes the
        watched one, and rewriting a watched file in place would let the watch apply it first."""
        self.applies += 1
        self.last_applied = self.write_spec(doc, self.data_dir.parent / f"candidate-{self.applies}.yaml")
        return self.cli("apply", str(self.last_applied), check=False)

    def nodes(self) -> dict:
        return self.status().get("controlplane", {}).get("nodes", {})

    def all_in_sync(self) -> bool:
        nodes = self.nodes()
        return bool(nodes) and all(n.get("in_sync") and n.get("connected") for n in nodes.values())

    def envoy_stat(self, node: str, stat: str) -> int:
        return envoy_stat(self.placement()["sidecars"][node]["admin"], stat)

    def placement(self) -> dict:
        return json.loads((self.data_dir / "placement.json").read_text())

    def ports(self) -> dict[str, int]:
        return json.loads((self.data_dir / "runtime.json").read_text())["ports"]

    def api_token(self) -> str:
        """The token `up` created for the CLI: what every greymesh API asks of its caller."""
        return credentials.read(DataDir(self.data_dir).api_token)

    def stats(self) -> dict:
        """The tap service's counters (collector, producer, decisions)."""
        return self.api(f"http://127.0.0.1:{self.ports()['taps.http']}/stats")

    def sink_stats(self) -> dict:
        return self.api(f"http://127.0.0.1:{self.ports()['sink.http']}/stats")

    def query(self, sql: str) -> list[dict]:
        """Rows of a read-only query against the tap store, through the sink's API
        (what `greymesh taps query` uses)."""
        doc = self.api(f"http://127.0.0.1:{self.ports()['sink.http']}/query", {"sql": sql}, timeout=30)
        return [dict(zip(doc["columns"], row)) for row in doc["rows"]]

    def api(self, url: str, body: dict | None = None, timeout: float = 10) -> dict:
        """A greymesh API's JSON answer, asked as the CLI asks (its token; a body as JSON)."""
        headers = {"Authorization": f"Bearer {self.api_token()}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())


def envoy_stat(admin_port: int, name: str) -> int:
    """One counter from an Envoy's admin API (0 if Envoy does not have it yet)."""
    query = urllib.parse.urlencode({"filter": f"^{re.escape(name)}$"})
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?{query}", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    return 0


@contextlib.contextmanager
def running_mesh(work: Path, doc: dict, xds_api: str, up_args: tuple[str, ...] = ("--rps", "2")) -> Iterator[Mesh]:
    """A mesh started from `doc` in `work` (its baseline spec), stopped on exit whatever happens."""
    spec = work / "mesh.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    mesh = Mesh(work / "data", spec, xds_api, up_args)
    mesh.baseline = copy.deepcopy(doc)
    try:
        mesh.up()
        yield mesh
    finally:
        mesh.cli("down", check=False)


def payments_route(doc: dict) -> dict:
    return doc["services"]["payments"]["routes"][0]
