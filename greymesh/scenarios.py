"""Fault scenarios on the real mesh, recorded as labeled windows for training and evaluation.

``greymesh ml record`` (greymesh/ml_cli.py) starts the demo mesh in its own data dir (no demo load
generator), drives open-loop traffic at its front door, and follows a timetable:

    warm-up                     not recorded (Envoy, Kafka and the store settle)
    train                       normal traffic only: the detectors' training data
    for each scenario:          a fault for ``fault_s``, then ``recovery_s`` of normal
    hold-out                    normal traffic only: false alarms are counted here

Normal traffic is Poisson arrivals at a rate that drifts slowly (+-30 % over 10 minutes)
over a handful of API paths, so "normal" is not a flat line.  The faults are real: the
demo services' knobs (greymesh/demo/service.py), Envoy fault injection through
mesh.yaml, a stopped process, and extra traffic.  Each phase is appended to
``phases.jsonl`` as it ends, so a recording cut short keeps what it had; at the end the
roll-ups are read from the store and written, one row per (service, window), to a CSV
with the columns ``service, window, <roll-up fields>, label, scenario, split``.  A window
is labeled 1 when it overlaps a fault and the service is one the fault reaches (the
faulted service and those that call it); ``split`` is ``train`` or ``test``.
"""

from __future__ import annotations

import csv
import http.client
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from core.datadir import DataDir, write_atomic
from core.endpoints import entrypoint_tls
from core.storeclient import StoreClient
from greymesh.demo.service import knobs_path
from greymesh.runtime import local as runtime
from core.contracts import ROLLUP_FIELDS, WINDOW_SECONDS
from ml.windows import SinkWindows

DEMO_SPEC = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "mesh.yaml"
NORMAL_PATHS = ("/", "/anything", "/anything/orders", "/anything/orders/42", "/anything/cart")
SCAN_PATHS = ("/admin", "/.env", "/.git/config", "/wp-login.php", "/api/v1/users", "/backup.zip", "/server-status",
              "/actuator/env", "/console", "/phpmyadmin", "/config.json", "/debug/pprof")
SCANNER_ADDR = "127.0.0.77"  # the recon caller's own loopback address: a new caller at the front door


@dataclass(frozen=True)
class Phase:
    name: str  # "train", "holdout", "recovery" or a scenario's name
    start: float
    end: float
    affected: tuple[str, ...] = ()  # services labeled anomalous during it (empty: normal)


class Traffic:
    """Open-loop Poisson traffic at the front door; the rate and path mix can change live."""

    def __init__(self, url: str, ca: str | None, base_rps: float):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 443
        self.ca = ca  # the PEM the front door's certificate chains to
        self.base_rps = base_rps
        self.multiplier = 1.0
        self.scan_rps = 0.0
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=96)
        self._rng = random.Random(7)
        self._threads = [threading.Thread(target=self._loop, args=(scan,), daemon=True) for scan in (False, True)]
        for t in self._threads:
            t.start()

    def rate(self, scan: bool) -> float:
        if scan:
            return self.scan_rps
        drift = 1 + 0.3 * math.sin(2 * math.pi * time.time() / 600)
        return self.base_rps * drift * self.multiplier

    def _loop(self, scan: bool) -> None:
        while not self._stop.is_set():
            rate = self.rate(scan)
            if rate <= 0:
                time.sleep(0.1)
                continue
            time.sleep(self._rng.expovariate(rate))
            path = self._rng.choice(SCAN_PATHS if scan else NORMAL_PATHS)
            if scan:
                path += f"?probe={self._rng.randrange(10**6)}"
            self._pool.submit(self._one, path, SCANNER_ADDR if scan else None)

    def _one(self, path: str, source: str | None) -> None:
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=10, context=entrypoint_tls(self.ca),
                                           source_address=(source, 0) if source else None)
        try:
            conn.request("GET", path)
            outcome = str(conn.getresponse().status)
        except OSError as exc:
            outcome = type(exc).__name__
        finally:
            conn.close()
        with self._lock:
            self.outcomes[outcome] += 1

    def tally(self) -> dict[str, int]:
        with self._lock:
            return dict(self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Mesh:
    """What a fault needs to reach: the data dir, its working spec copy and the traffic."""

    dd: DataDir
    spec: Path
    traffic: Traffic

    def set_knobs(self, service: str, **knobs: float) -> None:
        path = knobs_path(self.dd.root, service)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(knobs))

    def clear_knobs(self, service: str) -> None:
        knobs_path(self.dd.root, service).unlink(missing_ok=True)

    def set_route_fault(self, service: str, fault: dict | None) -> None:
        doc = yaml.safe_load(self.spec.read_text())
        route = doc["services"][service]["routes"][0]
        if fault is None:
            route.pop("fault", None)
        else:
            route["fault"] = fault
        self.spec.write_text(yaml.safe_dump(doc, sort_keys=False))
        runtime.apply_spec(self.dd, self.spec)

    def signal_app(self, instance: str, sig: signal.Signals) -> None:
        os.kill(runtime.process_pid(self.dd, f"app:{instance}"), sig)


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    affected: tuple[str, ...]  # the faulted service first, then those that call it
    start: Callable[[Mesh], None]
    stop: Callable[[Mesh], None]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("latency", "payments answers 250 ms slower (its knobs)", ("payments", "orders", "frontend"),
             lambda m: m.set_knobs("payments", latency_ms=250), lambda m: m.clear_knobs("payments")),
    Scenario("error_burst", "orders' sidecar aborts 30% of calls to payments with 503 (mesh.yaml fault)",
             ("payments", "orders", "frontend"),
             lambda m: m.set_route_fault("payments", {"abort": {"percent": 30, "http_status": 503}}),
             lambda m: m.set_route_fault("payments", None)),
    Scenario("outage", "inventory's process is stopped (SIGSTOP): it accepts but never answers",
             ("inventory", "orders", "frontend"),
             lambda m: m.signal_app("inventory-1", signal.SIGSTOP),
             lambda m: m.signal_app("inventory-1", signal.SIGCONT)),
    Scenario("spike", "five times the normal request rate", ("frontend", "orders", "payments", "inventory"),
             lambda m: setattr(m.traffic, "multiplier", 5.0), lambda m: setattr(m.traffic, "multiplier", 1.0)),
    Scenario("recon", f"a new caller ({SCANNER_ADDR}) probes many unknown paths at 20 rps", ("frontend",),
             lambda m: setattr(m.traffic, "scan_rps", 20.0), lambda m: setattr(m.traffic, "scan_rps", 0.0)),
    Scenario("exfiltration", "inventory's answers grow by 200 kB each (its knobs)",
             ("inventory", "orders", "frontend"),
             lambda m: m.set_knobs("inventory", response_bytes=200_000), lambda m: m.clear_knobs("inventory")),
)


def _wait(seconds: float, what: str, traffic: Traffic, progress: Callable[[str], None]) -> tuple[float, float]:
    start = time.time()
    end = start + seconds
    next_note = start
    while (now := time.time()) < end:
        if now >= next_note:
            progress(f"  {what}: {int(now - start)}/{int(seconds)} s, answers so far {traffic.tally()}")
            next_note = now + 60
        time.sleep(min(1.0, end - now))
    return start, time.time()


def record(out_dir: Path, *, train_s: float, holdout_s: float, fault_s: float, recovery_s: float,
           warmup_s: float = 60, base_rps: float = 10.0, scenarios: tuple[Scenario, ...] = SCENARIOS,
           store: str | None = None, keep: bool = False, progress: Callable[[str], None] = print) -> Path:
    """Run the timetable on a fresh demo mesh under ``out_dir/mesh``; return the CSV's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dd = DataDir(out_dir / "mesh")
    spec = out_dir / "mesh.yaml"
    shutil.copyfile(DEMO_SPEC, spec)
    phases_path = out_dir / "phases.jsonl"
    phases_path.unlink(missing_ok=True)
    # No automatic first model: training takes both cores for a minute, which would land
    # inside a scenario and be recorded as part of it.
    endpoints = runtime.up(dd, spec, load_rps=0, watch=False, store=store, auto_train_minutes=None, progress=progress)
    traffic = Traffic(endpoints.entrypoint or "", endpoints.entrypoint_ca, base_rps)
    mesh = Mesh(dd, spec, traffic)

    def log_phase(phase: Phase) -> None:
        with phases_path.open("a") as f:
            f.write(json.dumps(asdict(phase)) + "\n")

    try:
        _wait(warmup_s, "warm-up", traffic, progress)
        progress(f"train: {train_s:.0f} s of normal traffic at ~{base_rps} rps")
        log_phase(Phase("train", *_wait(train_s, "train", traffic, progress)))
        for sc in scenarios:
            progress(f"scenario {sc.name}: {sc.what}, for {fault_s:.0f} s")
            sc.start(mesh)
            try:
                start, end = _wait(fault_s, sc.name, traffic, progress)
            finally:
                sc.stop(mesh)
            log_phase(Phase(sc.name, start, end, sc.affected))
            log_phase(Phase("recovery", *_wait(recovery_s, f"recovery after {sc.name}", traffic, progress)))
        progress(f"hold-out: {holdout_s:.0f} s of normal traffic")
        log_phase(Phase("holdout", *_wait(holdout_s, "hold-out", traffic, progress)))
        time.sleep(2 * WINDOW_SECONDS)  # let the last windows reach the store
        return export(dd, phases_path, out_dir / "recording.csv", progress)
    finally:
        traffic.stop()
        if not keep:
            runtime.down(dd, progress=progress)


def load_phases(path: Path) -> list[Phase]:
    return [Phase(**{**d, "affected": tuple(d["affected"])}) for d in map(json.loads, path.read_text().splitlines())]


def export(dd: DataDir, phases_path: Path, out: Path, progress: Callable[[str], None] = print) -> Path:
    """Write the recorded windows with their labels (see the module docstring) to ``out``."""
    phases = load_phases(phases_path)
    train_end = next(p.end for p in phases if p.name == "train")
    source = SinkWindows(StoreClient.of_mesh(dd))
    first = int(phases[0].start) // WINDOW_SECONDS * WINDOW_SECONDS
    last = int(phases[-1].end) // WINDOW_SECONDS * WINDOW_SECONDS  # the window still open at the end is left out
    rows = 0
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["service", "window", *ROLLUP_FIELDS, "label", "scenario", "split"])
        for win in source.fetch(first, last):
            label, scenario = 0, ""
            for p in phases:
                if p.affected and win.window < p.end and win.window + WINDOW_SECONDS > p.start:
                    scenario = p.name
                    label = int(win.service in p.affected)
            split = "train" if win.window + WINDOW_SECONDS <= train_end else "test"
            w.writerow([win.service, win.window, *(win.values[k] for k in ROLLUP_FIELDS), label, scenario, split])
            rows += 1
    progress(f"wrote {rows} windows to {out}")
    return out
