"""The house holds: a ground floor, stages on it, a top floor nothing imports, no cycles.

Every module's imports are read from its source (AST, nothing is executed), function-local
ones included, and checked against the layers of docs/ARCHITECTURE.md:

    top floor     greymesh                      may import everything below; imported by nothing
    stages        controlplane, tapstream,      import only the ground floor; they talk to
                  audit, ml, actions, dashboard each other through Kafka, the store and APIs
    ground floor  core                          imports no stage and not the top floor

and no two files may import each other, directly or round a circle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUND = "core"
STAGES = ("controlplane", "tapstream", "audit", "ml", "actions", "dashboard")
TOP = "greymesh"
PACKAGES = (GROUND, *STAGES, TOP)


@dataclass(frozen=True)
class Import:
    file: Path  # relative to the root
    line: int
    source: str  # the importing module, dotted
    target: str  # the imported project module, dotted (the most specific one that exists)


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else ():
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(root: Path) -> list[Import]:
    known = modules(root)
    out = []
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                wanted = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            targets = {_resolve(w, known) for w in wanted} - {None, name}
            # `from pkg import mod` names both pkg and pkg.mod: keep the most specific.
            targets = {t for t in targets if not any(o != t and o.startswith(t + ".") for o in targets)}
            out += [Import(path.relative_to(root), node.lineno, name, t) for t in sorted(targets)]
    return out


def _resolve(dotted: str, known: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def _floor(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path) -> list[str]:
    """Every broken rule as `file:line: rule: detail`."""
    found = []
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for imp in imports(root):
        src, dst = _floor(imp.source), _floor(imp.target)
        at = f"{imp.file}:{imp.line}"
        if dst == TOP and src != TOP:
            found.append(f"{at}: nothing imports the top floor: {imp.source} imports {imp.target}")
        elif src == GROUND and dst != GROUND:
            found.append(f"{at}: the ground floor imports no stage: {imp.source} imports {imp.target}")
        elif src in STAGES and dst in STAGES and src != dst:
            found.append(f"{at}: a stage imports only the ground floor: {imp.source} ({src}) imports "
                         f"{imp.target} ({dst}); talk through a topic, a table or an API in core/")
        edges.setdefault(imp.source, set()).add(imp.target)
        where.setdefault((imp.source, imp.target), imp)
    for cycle in _cycles(edges):
        first = where[(cycle[0], cycle[1])]
        found.append(f"{first.file}:{first.line}: no import cycles: {' -> '.join(cycle)}")
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_path_in(sorted(g), edges) for g in groups]


def _path_in(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A closed path through the group, from its first module back to it."""
    members, start = set(group), group[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(edges[path[-1]] & members)
        back = start if start in nxt else None
        step = back or next((n for n in nxt if n not in seen), None)
        if step is None or step == start:
            return [*path, start]
        path.append(step)
        seen.add(step)


def test_the_house_keeps_its_layers_and_has_no_import_cycles():
    assert violations(ROOT) == []


def test_every_package_of_the_house_is_read():
    read = {_floor(m) for m in modules(ROOT)}
    assert {GROUND, TOP, "controlplane", "tapstream", "audit", "ml"} <= read
    assert len(imports(ROOT)) > 100  # the real import graph, not an empty walk


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_each_rule_is_reported_with_file_line_and_rule(tmp_path: Path):
    _write(tmp_path, {
        "core/__init__.py": "",
        "core/base.py": "import os\n\n\ndef f():\n    from ml import model  # a function-local import counts too\n",
        "ml/__init__.py": "",
        "ml/model.py": "from audit.store import Store\n",
        "audit/__init__.py": "",
        "audit/store.py": "from greymesh import cli\n\nStore = 1\n",
        "greymesh/__init__.py": "",
        "greymesh/cli.py": "from greymesh.runtime import up\n",
        "greymesh/runtime.py": "from . import cli\n\nup = 1\n",
    })
    found = violations(tmp_path)
    assert "core/base.py:5: the ground floor imports no stage: core.base imports ml.model" in found
    assert any(v.startswith("ml/model.py:1: a stage imports only the ground floor: ml.model (ml) imports "
                            "audit.store (audit)") for v in found)
    assert "audit/store.py:1: nothing imports the top floor: audit.store imports greymesh.cli" in found
    assert "greymesh/cli.py:1: no import cycles: greymesh.cli -> greymesh.runtime -> greymesh.cli" in found
    assert len(found) == 4, found
