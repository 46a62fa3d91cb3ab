"""The files of one mesh: every component finds its own and the others' here.

All state of a local mesh lives under one data dir (``--data-dir``, default
``~/.local/state/greymesh/mesh``).  Who writes what:

    applied.yaml         the spec that runs: the last one the control plane accepted
    spec-source          the path of the spec file the control plane watches (`up FILE`/`apply FILE`)
    mesh.yaml            a copy of the demo spec, watched when `up` was given no file
    placement.json       where every instance listens (runtime; control plane reads it)
    runtime.json         ports, entrypoint, Kafka and store addresses (runtime; core.endpoints reads it)
    workloads.json       the table of workloads to run (runtime; the supervisor reads it)
    scale.json           instance counts `greymesh scale` set, by service/subset (runtime)
    supervisor.json      what runs: pid, state, restarts, last exit per workload (supervisor)
    applies.jsonl        every spec offered to the control plane, with its outcome (and every override set/cleared)
    overrides.json       the overrides the control plane merges over the spec (controlplane/overrides.py)
    policy-journal.jsonl every policy push, refused ones too
    policy/active/       the modules of the last successful push (restored into a restarted OPA)
    models/              the anomaly detector's registry
    secrets/             tokens and passwords, 0600 each (core/credentials.py); a workload
                         is given the path of its own, never the value
    logs/<workload>.log  each workload's output
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError

# What every greymesh process creates is its user's alone: files 0600, directories 0700.
# The CLI and the supervisor set it; workloads inherit it.
PRIVATE_UMASK = 0o077


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("GREYMESH_DATA_DIR") or Path(state) / "greymesh" / "mesh")


@dataclass(frozen=True)
class DataDir:
    """The files of one local mesh."""

    root: Path

    def create(self) -> DataDir:
        """Make the data dir, or make an existing one private (0700: logs, keys, Kafka's data
        and the store are nobody else's business).  A shared directory (sticky, like /tmp,
        or another user's) is refused rather than taken over."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.root.stat()
        if st.st_uid != os.getuid() or st.st_mode & stat.S_ISVTX:
            raise InputError(f"data dir {self.root}: a shared directory (mode {stat.S_IMODE(st.st_mode):04o}, "
                             f"owner uid {st.st_uid}); choose a directory of your own with --data-dir or "
                             "GREYMESH_DATA_DIR")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.root, 0o700)
        return self

    @property
    def spec(self) -> Path:
        """The accepted mesh spec, owned by the control plane (never edited by hand)."""
        return self.root / "applied.yaml"

    @property
    def spec_source(self) -> Path:
        """One line: the spec file the control plane watches (what `up FILE`/`apply FILE` named last)."""
        return self.root / "spec-source"

    @property
    def placement(self) -> Path:
        return self.root / "placement.json"

    @property
    def state(self) -> Path:
        return self.root / "runtime.json"

    @property
    def workloads(self) -> Path:
        return self.root / "workloads.json"

    @property
    def supervisor(self) -> Path:
        return self.root / "supervisor.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def loadgen_tally(self) -> Path:
        return self.root / "loadgen.json"

    @property
    def models(self) -> Path:
        """The anomaly detector's model registry (ml/registry.py)."""
        return self.root / "models"

    @property
    def scorer_stats(self) -> Path:
        return self.root / "scorer.json"

    @property
    def actions_state(self) -> Path:
        """The actions stage's SQLite state (decisions, alerts, outbox, Kafka offsets; 0600)."""
        return self.root / "actions" / "state.db"

    @property
    def applies_journal(self) -> Path:
        return self.root / "applies.jsonl"

    @property
    def overrides(self) -> Path:
        """The overrides merged over the spec (0600; written only by the control plane)."""
        return self.root / "overrides.json"

    @property
    def policy_journal(self) -> Path:
        return self.root / "policy-journal.jsonl"

    @property
    def active_policy(self) -> Path:
        """A copy of the modules of the last successful push, so a restarted OPA gets them back."""
        return self.root / "policy" / "active"

    @property
    def secrets(self) -> Path:
        """Tokens and passwords (0700 dir, 0600 files), one file each: core/credentials.py."""
        return self.root / "secrets"

    def secret(self, name: str) -> Path:
        """The file of one secret, e.g. ``api.token`` (the token of greymesh's HTTP APIs)."""
        return self.secrets / name

    @property
    def api_token(self) -> Path:
        """The bearer token every greymesh HTTP API requires; the CLI reads it from here."""
        return self.secret("api.token")

    def bootstrap(self, node_id: str) -> Path:
        return self.root / "envoy" / f"{node_id}.json"

    def log(self, workload: str) -> Path:
        return self.logs / f"{workload.replace(':', '-').replace('/', '-')}.log"


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace path's content in one step: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
