"""Steady background traffic for the demo mesh, so the console and detectors have something to see.

Open loop at a fixed rate: a request is sent every 1/rps seconds whether or not the
previous one finished (a small thread pool absorbs slow answers).  It writes a running
tally of outcomes to a JSON file that `greymesh status` reads.  The front door is TLS: the
load generator verifies it against the PEM it is given (``--ca``), as any client would.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Lock

from core.datadir import write_atomic
from core.endpoints import entrypoint_tls


def run(url: str, rps: float, tally_path: Path, ca: Path | None, timeout_s: float = 5.0) -> None:
    counts: Counter[str] = Counter()
    lock = Lock()

    def one() -> None:
        try:
            # Read for every request (~1 ms): a root rotation replaces the bundle under us.
            context = entrypoint_tls(ca) if ca else None
            with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:
                outcome = str(resp.status)
        except urllib.error.HTTPError as exc:
            outcome = str(exc.code)
        except OSError as exc:
            outcome = type(exc).__name__
        with lock:
            counts[outcome] += 1

    interval = 1.0 / rps
    next_send = time.monotonic()
    last_write = 0.0
    with ThreadPoolExecutor(max_workers=16) as pool:
        while True:
            pool.submit(one)
            next_send += interval
            now = time.monotonic()
            if now - last_write >= 1.0:
                with lock:
                    snapshot = dict(counts)
                write_atomic(tally_path, json.dumps({"url": url, "rps": rps, "outcomes": snapshot, "at": time.time()}))
                last_write = now
            time.sleep(max(0.0, next_send - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    """`python -m greymesh.demo.loadgen`: steady demo load at the front door (a workload of the runtime)."""
    p = argparse.ArgumentParser(prog="python -m greymesh.demo.loadgen", description="Send steady demo load.")
    p.add_argument("--url", required=True)
    p.add_argument("--rps", type=float, required=True)
    p.add_argument("--tally", type=Path, required=True, help="where the outcome counts are written every second")
    p.add_argument("--ca", type=Path, help="the PEM an https url's certificate must chain to")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args.url, args.rps, args.tally, args.ca)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
