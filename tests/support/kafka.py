"""A real single-node Kafka broker (KRaft) for tests, in a temporary directory."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from core.kafka import wait_ready
from greymesh.runtime import kafka as broker
from tests.support.net import free_port

READY_TIMEOUT = 90.0


class Broker:
    """One broker JVM on a run directory; start() may be called again after kill()."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port, self.controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.config = broker.write_config(run_dir, port=self.port, controller_port=self.controller_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = run_dir / "broker.log"

    def start(self) -> float:
        """Start the JVM and wait until it serves; returns the seconds that took."""
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(broker.broker_argv(self.config), cwd=self.run_dir,
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.bootstrap, timeout=READY_TIMEOUT)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- broker log ---\n{self.log.read_text()[-4000:]}") from exc
        assert self.proc.poll() is None, self.log.read_text()[-4000:]
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean shutdown, the log is recovered on restart
            self.proc.wait(timeout=30)
