"""Overrides: typed changes the control plane merges over the mesh spec, never edits of it.

The actions stage (or an operator) asks the control plane, through its admin API, to
change one service's traffic policy for a while: the weights of its split, its routes'
timeout and retry attempts, its outlier detection (:class:`core.contracts.Override`, at
most one per service).  :func:`merge` lays them over the placed spec; every snapshot the
control plane builds is built from that merge, so an override reaches the callers'
sidecars exactly like a spec edit, and mesh.yaml is never touched.  They persist in
``<data dir>/overrides.json`` (0600), so a restarted control plane serves them again.

What an override does to its service (:func:`merge`):

- ``weights`` replaces the split of every route that splits over exactly the subsets it
  names (a route-less service's catch-all route counts); refused if none does.
- ``timeout_s`` and ``retry_attempts`` replace those of every route.
- ``outlier_consecutive_5xx`` / ``outlier_max_ejection_percent`` may only tighten
  outlier detection (eject after fewer errors, eject a larger share); a value looser
  than the spec's is refused.

**The rule on apply.**  When a new spec is applied (and when the placement changes), an
override is kept while its service still exists with the subsets it names and the
merged spec is valid.  An apply that changes that service's own routes or outlier
detection (compared to the spec declared before it) clears its override: the operator's
edit wins.  Each clear is journaled (applies.jsonl, outcome ``override-cleared``) with
its reason; the apply itself is never refused because of an override.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from controlplane.meshspec import MeshSpec, OutlierDetection, RetryPolicy, Route, Service
from controlplane.placement import Placement
from controlplane.translate import default_route
from core.contracts import Override, ServiceRouting
from core.datadir import write_atomic
from core.specread import Problem, SpecError

SOURCE = "<overrides>"  # what a refused override's errors cite
FILE_VERSION = 1


@dataclass(frozen=True)
class OverrideSet:
    """The overrides in force, one per service, and the file they persist in.  Immutable:
    :meth:`put` and :meth:`without` return a new set, which :meth:`save` writes."""

    path: Path
    overrides: tuple[Override, ...] = ()  # sorted by service

    @classmethod
    def load(cls, path: Path) -> OverrideSet:
        """The set saved at ``path`` (empty when there is none); ValueError naming the file and
        the entry when it cannot be read."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the overrides ({exc.strerror})") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        entries = doc.get("overrides") if isinstance(doc, dict) and doc.get("version") == FILE_VERSION else None
        if not isinstance(entries, list):
            raise ValueError(f'{path}: expected {{"version": {FILE_VERSION}, "overrides": [...]}}')
        found: dict[str, Override] = {}
        for i, entry in enumerate(entries):
            try:
                override = Override.from_json(entry)
            except ValueError as exc:
                raise ValueError(f"{path}: overrides[{i}]: {exc}") from None
            if override.service in found:
                raise ValueError(f"{path}: overrides[{i}]: a second override of {override.service}")
            found[override.service] = override
        return cls(path, tuple(sorted(found.values(), key=lambda o: o.service)))

    def save(self) -> None:
        doc = {"version": FILE_VERSION, "overrides": [o.to_json() for o in self.overrides]}
        write_atomic(self.path, json.dumps(doc, indent=2) + "\n")

    def get(self, service: str) -> Override | None:
        return next((o for o in self.overrides if o.service == service), None)

    def put(self, override: Override) -> OverrideSet:
        """This set with ``override`` in place of its service's."""
        others = [o for o in self.overrides if o.service != override.service]
        return replace(self, overrides=tuple(sorted([*others, override], key=lambda o: o.service)))

    def without(self, service: str) -> OverrideSet:
        return replace(self, overrides=tuple(o for o in self.overrides if o.service != service))

    def __iter__(self) -> Iterator[Override]:
        return iter(self.overrides)

    def __len__(self) -> int:
        return len(self.overrides)


@dataclass(frozen=True)
class Cleared:
    """An override an apply (or a placement change) dropped, and why."""

    override: Override
    reason: str


def merge(spec: MeshSpec, overrides: Iterable[Override]) -> MeshSpec:
    """``spec`` with ``overrides`` laid over its services (the module docstring says how).

    SpecError (source ``<overrides>``) naming ``overrides.<service>.<field>`` for every
    override that cannot apply: an unknown service or subset, weights that do not sum to
    100 or match no route's subsets, a value out of bounds or looser than the spec's."""
    by_service = {o.service: o for o in overrides}
    problems: list[Problem] = []
    names = [s.name for s in spec.services]
    for name in sorted(by_service.keys() - set(names)):
        problems.append(Problem(f"overrides.{name}", f"mesh {spec.name} has no service {name}; "
                                                     f"its services: {', '.join(names)}"))
    services = tuple(_merged(s, by_service[s.name], problems) if s.name in by_service else s for s in spec.services)
    if problems:
        raise SpecError(SOURCE, problems)
    return replace(spec, services=services)


def _merged(svc: Service, override: Override, problems: list[Problem]) -> Service:
    at = f"overrides.{svc.name}"
    try:  # an Override built in process skipped from_json's checks: the same rules here
        Override.from_json(override.to_json())
    except ValueError as exc:
        problems.append(Problem(at, str(exc)))
        return svc
    asked = (override.weights, override.timeout_s, override.retry_attempts, override.outlier_consecutive_5xx,
             override.outlier_max_ejection_percent)
    if all(value in (None, ()) for value in asked):
        problems.append(Problem(at, "changes nothing: give weights, timeout_s, retry_attempts, "
                                    "outlier_consecutive_5xx or outlier_max_ejection_percent"))
        return svc
    routes = svc.routes
    if override.weights or override.timeout_s is not None or override.retry_attempts is not None:
        routes = routes or (default_route(svc),)  # what translate gives a route-less service
    if override.weights:
        routes = _reweighted(svc, routes, dict(override.weights), f"{at}.weights", problems)
    if override.timeout_s is not None:
        routes = tuple(replace(r, timeout_s=override.timeout_s) for r in routes)
    if override.retry_attempts is not None:
        routes = tuple(replace(r, retries=replace(r.retries or RetryPolicy(), attempts=override.retry_attempts))
                       for r in routes)
    return replace(svc, routes=routes, outlier_detection=_tightened(svc, override, at, problems))


def _reweighted(svc: Service, routes: tuple[Route, ...], weights: dict[str, int], at: str,
                problems: list[Problem]) -> tuple[Route, ...]:
    unknown = [s for s in weights if s not in svc.subsets]
    if unknown:
        problems.append(Problem(f"{at}.{unknown[0]}", f"{svc.name} has no instance in subset '{unknown[0]}'; "
                                                      f"its subsets: {', '.join(svc.subsets)}"))
        return routes
    matching = [r.name for r in routes if {s for s, _ in r.split} == weights.keys()]
    if not matching:
        splits = "; ".join(f"{r.name} over {', '.join(s for s, _ in r.split)}" for r in routes)
        problems.append(Problem(at, f"no route of {svc.name} splits over exactly {', '.join(sorted(weights))} "
                                    f"(its routes: {splits}): name the subsets of the split to change"))
        return routes
    return tuple(replace(r, split=tuple((s, weights[s]) for s, _ in r.split)) if r.name in matching else r
                 for r in routes)


def _tightened(svc: Service, override: Override, at: str, problems: list[Problem]) -> OutlierDetection | None:
    errors, share = override.outlier_consecutive_5xx, override.outlier_max_ejection_percent
    declared = svc.outlier_detection
    if errors is None and share is None:
        return declared
    if declared is not None and errors is not None and errors > declared.consecutive_5xx:
        problems.append(Problem(f"{at}.outlier_consecutive_5xx",
                                f"{errors} would loosen the spec's {declared.consecutive_5xx}: an override only "
                                "tightens outlier detection"))
    if declared is not None and share is not None and share < declared.max_ejection_percent:
        problems.append(Problem(f"{at}.outlier_max_ejection_percent",
                                f"{share} would loosen the spec's {declared.max_ejection_percent}: an override "
                                "only tightens outlier detection"))
    base = declared or OutlierDetection()  # none declared: every value tightens
    return replace(base, consecutive_5xx=base.consecutive_5xx if errors is None else errors,
                   max_ejection_percent=base.max_ejection_percent if share is None else share)


def reconcile(overrides: OverrideSet, previous: MeshSpec | None, declared: MeshSpec,
              placed: MeshSpec) -> tuple[OverrideSet, list[Cleared]]:
    """The overrides kept over a newly applied spec, and those cleared (the rule in the module
    docstring).  ``previous`` is the spec declared before (None at start-up: nothing to
    compare), ``declared`` the new one, ``placed`` the new one with the placed instances."""
    kept, cleared = overrides, []
    services = {s.name for s in placed.services}
    for override in overrides:
        name = override.service
        if name not in services:
            reason = f"service {name} is no longer in the spec"
        elif previous is not None and _own(previous, name) != _own(declared, name):
            reason = f"the apply changed {name}'s routes or outlier detection: the operator's edit wins"
        else:
            try:
                merge(placed, [override])
                continue
            except SpecError as exc:
                reason = f"it no longer fits the spec: {'; '.join(p.message for p in exc.problems)}"
        kept = kept.without(name)
        cleared.append(Cleared(override, reason))
    return kept, cleared


def _own(spec: MeshSpec, service: str) -> tuple[tuple[Route, ...], OutlierDetection | None] | None:
    """What of ``service`` an override changes, as ``spec`` declares it (None: no such service)."""
    try:
        svc = spec.service(service)
    except KeyError:
        return None
    return svc.routes, svc.outlier_detection


def routing(spec: MeshSpec, placement: Placement, overrides: OverrideSet) -> list[ServiceRouting]:
    """Per service: its split as declared and in force, its serving instances per subset, its
    callers and override (the loop shifts weights of those with two subsets or more, and
    scales any).  ``spec`` is the placed spec; ``overrides`` must merge over it (they always
    do in force)."""
    merged = merge(spec, overrides)
    out = []
    for svc, effective in zip(spec.services, merged.services, strict=True):
        routes = svc.routes or (default_route(svc),)
        serving = {s: 0 for s in svc.subsets}
        for inst in svc.instances:
            ports = placement.sidecars.get(inst.name)
            serving[inst.subset] += ports is not None and ports.serving
        out.append(ServiceRouting(
            service=svc.name, subsets=svc.subsets, instances=tuple(serving.items()),
            callers=tuple(c.name for c in spec.callers_of(svc.name)), declared=routes[0].split,
            effective=(effective.routes or (default_route(effective),))[0].split, override=overrides.get(svc.name)))
    return out
