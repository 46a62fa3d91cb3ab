"""A real OPA, started the way the runtime starts it (greymesh/runtime/opa.py): token
authentication, the system authorization bundle, the policy bundle, decision logs to an
in-process receiver that requires OPA's token.  One per test; always stopped."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from controlplane.policy import OpaApi
from core import credentials
from core.datadir import DataDir
from core.installs import opa_binary
from core.jsonhttp import CLI, Credential, http_ok
from greymesh.runtime import opa
from greymesh.runtime.workloads import DECISIONLOG_TOKEN
from tapstream.decisionlog import OPA, DecisionLogReceiver, Sink, receiver_access
from tests.support.net import free_port

START_TIMEOUT_S = 20.0


@dataclass
class RunningOpa:
    url: str
    dd: DataDir  # where its tokens, config and bundles are (greymesh.runtime.opa.files)
    files: opa.OpaFiles
    admin: OpaApi  # the control plane's token: what push, diff, eval and the data sync use
    bridge_token: str  # the ext_authz bridge's
    receiver: DecisionLogReceiver
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextlib.contextmanager
def running_opa(root: Path, sink: Sink) -> Iterator[RunningOpa]:
    """OPA on a free loopback port with its files under the data dir ``root``, reporting
    decisions to a receiver that hands them to ``sink``."""
    binary = opa_binary()
    assert binary.exists(), f"no OPA at {binary}: run deploy/install.sh"
    dd = DataDir(root)
    dl_token = dd.secret(DECISIONLOG_TOKEN)
    credentials.issue(dl_token)
    credentials.issue(dd.api_token)
    access = receiver_access(Credential.load(OPA, dl_token), Credential.load(CLI, dd.api_token))
    receiver = DecisionLogReceiver(sink, access).start()
    files = opa.prepare(dd, receiver.url, dl_token)
    log_path = root / "opa.log"
    url = f"http://127.0.0.1:{free_port()}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(opa.opa_argv(binary, url.removeprefix("http://"), files), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not http_ok(f"{url}/health", timeout_s=1):
            if proc.poll() is not None:
                raise AssertionError(f"OPA exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"OPA did not answer within {START_TIMEOUT_S}s: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield RunningOpa(url, dd, files, OpaApi.with_token_file(url, files.admin_token),
                         credentials.read(files.bridge_token), receiver, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        receiver.stop()
