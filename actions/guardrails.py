"""What may stop the loop's step even when the judge says move: the guardrails.

Checked in this order, the first that applies deciding (:meth:`Guardrails.check`):

    freeze          the whole mesh is frozen (spec ``actions.freeze``, or `greymesh actions freeze`)
    mode            the service's mode is off (the loop does nothing for it)
    hold_down       less than ``hold_down_s`` since the service's last step
    window          the service already stepped in this analysis window
    budget_service  ``budget_per_service_hour`` steps of the service in the last hour (sliding)
    budget_mesh     ``budget_per_mesh_hour`` steps of the whole mesh in the last hour (sliding)
    mode            the service's mode is shadow: the step is recorded as "would have", not made

Shadow is checked last so that "would have" means what mode ``on`` would have done: a
shadowed step is recorded (on a shadow track), so the next one waits out the hold-down and
fits the budget as a real one would.  A real step counts only real steps; a shadowed one
counts both (it asks whether it would have fitted beside what really happened).

Hold-down and the one-step window are measured between analysis windows (the loop passes
the start of the window it judged), so a tick's jitter inside a window never costs a
whole window.  Budgets are measured on the clock.

**Modes and the freeze** come from the spec, unless an operator set them with the CLI
(`greymesh actions mode|freeze|unfreeze`): the latest instruction wins.  A CLI setting is
stored with the spec's value it replaced, and lapses when the spec's value changes.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from core.contracts import WINDOW_SECONDS
from core.loopspec import MODES, ActionsSpec, Mode

HOUR_S = 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS loop_steps (service TEXT NOT NULL, at REAL NOT NULL, window INTEGER NOT NULL,
                                       shadow INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS loop_steps_at ON loop_steps (at);
CREATE TABLE IF NOT EXISTS loop_modes (service TEXT PRIMARY KEY, mode TEXT NOT NULL, spec_mode TEXT NOT NULL,
                                       by TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS loop_freeze (id INTEGER PRIMARY KEY CHECK (id = 1), frozen INTEGER NOT NULL,
                                        spec_frozen INTEGER NOT NULL, by TEXT NOT NULL, at REAL NOT NULL);
"""


@dataclass(frozen=True)
class Check:
    """A guardrail's answer.  ``guardrail`` names the one that applied ("" when allowed;
    "mode" with allowed False on a shadowed step); ``figures`` are the numbers it read."""

    allowed: bool
    guardrail: str
    detail: str
    figures: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "guardrail": self.guardrail, "detail": self.detail, **dict(self.figures)}


@dataclass(frozen=True)
class Setting:
    """A mode or the freeze as an operator set it."""

    value: str
    by: str
    at: float


class Guardrails:
    def __init__(self, db: sqlite3.Connection, spec: ActionsSpec):
        self.db = db
        self.spec = spec
        db.executescript(_SCHEMA)

    def update_spec(self, spec: ActionsSpec) -> None:
        self.spec = spec

    # -- modes and the freeze --

    def mode_of(self, service: str) -> Mode:
        row = self.db.execute("SELECT mode, spec_mode FROM loop_modes WHERE service = ?", (service,)).fetchone()
        spec_mode = self.spec.mode_of(service)
        return MODES[MODES.index(row[0])] if row and row[1] == spec_mode else spec_mode

    def set_mode(self, service: str, mode: Mode, by: str, now: float) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        self.db.execute("INSERT OR REPLACE INTO loop_modes VALUES (?, ?, ?, ?, ?)",
                        (service, mode, self.spec.mode_of(service), by, now))

    def mode_settings(self) -> dict[str, Setting]:
        """The modes operators set that are in force (a lapsed one is not listed)."""
        rows = self.db.execute("SELECT service, mode, spec_mode, by, at FROM loop_modes ORDER BY service")
        return {s: Setting(mode, by, at) for s, mode, spec_mode, by, at in rows if spec_mode == self.spec.mode_of(s)}

    def frozen(self) -> Setting | None:
        """The freeze in force (value "spec" when the spec sets it), or None."""
        row = self.db.execute("SELECT frozen, spec_frozen, by, at FROM loop_freeze").fetchone()
        if row and bool(row[1]) == self.spec.freeze:
            return Setting("cli", row[2], row[3]) if row[0] else None
        return Setting("spec", "mesh.yaml", 0.0) if self.spec.freeze else None

    def set_frozen(self, frozen: bool, by: str, now: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO loop_freeze VALUES (1, ?, ?, ?, ?)",
                        (int(frozen), int(self.spec.freeze), by, now))

    # -- steps --

    def check(self, service: str, now: float, window: int) -> Check:
        """May ``service`` step now, in analysis window ``window`` (its start, Unix seconds)?"""
        freeze = self.frozen()
        if freeze is not None:
            by = "actions.freeze in the spec" if freeze.value == "spec" else f"`greymesh actions freeze` by {freeze.by}"
            return Check(False, "freeze", f"the mesh is frozen ({by}): nothing automated changes it")
        mode = self.mode_of(service)
        if mode == "off":
            return Check(False, "mode", f"the mode of {service} is off")
        shadow = mode == "shadow"
        track = "" if shadow else " AND shadow = 0"
        last = self.db.execute(f"SELECT max(window) FROM loop_steps WHERE service = ?{track}", (service,)).fetchone()[0]
        since = None if last is None else window - last
        in_service, in_mesh = (self.db.execute(
            f"SELECT count(*) FROM loop_steps WHERE at > ?{track}{where}", (now - HOUR_S, *args)).fetchone()[0]
            for where, args in ((" AND service = ?", (service,)), ("", ())))
        figures = (("since_last_step_s", -1.0 if since is None else float(since)),
                   ("hold_down_s", self.spec.hold_down_s),
                   ("steps_service_hour", float(in_service)),
                   ("budget_per_service_hour", float(self.spec.budget_per_service_hour)),
                   ("steps_mesh_hour", float(in_mesh)),
                   ("budget_per_mesh_hour", float(self.spec.budget_per_mesh_hour)))
        if since is not None and since < self.spec.hold_down_s:
            return Check(False, "hold_down", f"{service} stepped {since}s ago; the hold-down is "
                                             f"{self.spec.hold_down_s:g}s", figures)
        if since is not None and since < WINDOW_SECONDS:
            return Check(False, "window", f"{service} already stepped in this analysis window", figures)
        if in_service >= self.spec.budget_per_service_hour:
            return Check(False, "budget_service", f"{service} used its budget: {in_service} steps in the last hour "
                                                  f"(at most {self.spec.budget_per_service_hour})", figures)
        if in_mesh >= self.spec.budget_per_mesh_hour:
            return Check(False, "budget_mesh", f"the mesh used its budget: {in_mesh} steps in the last hour "
                                               f"(at most {self.spec.budget_per_mesh_hour})", figures)
        if shadow:
            return Check(False, "mode", f"the mode of {service} is shadow: would have stepped, changed nothing",
                         figures)
        return Check(True, "", "within every guardrail", figures)

    def last_step_window(self, service: str) -> int | None:
        """The analysis window of ``service``'s last step that changed the mesh (not a shadow one)."""
        return self.db.execute("SELECT max(window) FROM loop_steps WHERE service = ? AND shadow = 0",
                               (service,)).fetchone()[0]

    def record(self, service: str, now: float, window: int, shadow: bool) -> None:
        """A step taken (or, ``shadow``, one that would have been); forgets steps older than an hour."""
        self.db.execute("DELETE FROM loop_steps WHERE at <= ?", (now - HOUR_S,))
        self.db.execute("INSERT INTO loop_steps VALUES (?, ?, ?, ?)", (service, now, window, int(shadow)))
