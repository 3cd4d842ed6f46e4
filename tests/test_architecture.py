# SPDX-License-Identifier: AGPL-3.0-or-later
"""The whiteboard (docs/architecture.md) checked against the code: no room imports what it must never import, no
module imports another module's private name, and no imports go round in a cycle. Reads the sources; runs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed names of the repository's folders (pyproject's package-dir).
PACKAGES = {"sharedllm": ROOT / "sharedllm", "sharedllm.scheduler_plugins": ROOT / "scheduler_plugins",
            "sharedllm.cli": ROOT / "cli"}

DASK = ("dask", "distributed")
ENGINE = ("sharedllm.engine",)
CLIENT = ("sharedllm.client", "sharedllm.replicas", "sharedllm.local")
SCHEDULER = ("sharedllm.scheduler_plugins", "sharedllm.scheduler")
SERVER = ("sharedllm.openai_server",)
CLI = ("sharedllm.cli",)
MACHINE = ("sharedllm.machine", "sharedllm.worker")
OUTSIDE = ("bench", "tests")

# room (module prefixes) -> what it must never import (module prefixes); the table of docs/architecture.md.
NEVER: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("sharedllm.errors", "sharedllm.effects", "sharedllm.options", "sharedllm.userwire", "sharedllm.netlab"),
     DASK + ENGINE + CLIENT + SCHEDULER + SERVER + CLI + MACHINE + ("sharedllm.relay", "sharedllm.gguf")),
    (("sharedllm.ggml", "sharedllm.rpc_server", "sharedllm.resources", "sharedllm.dataplane",
      "sharedllm.tensor_cache", "sharedllm.views"), DASK + CLIENT + SCHEDULER + SERVER + CLI + ENGINE),
    (("sharedllm.machine.state",), DASK + CLIENT + SCHEDULER + SERVER + CLI + ENGINE
     + ("sharedllm.machine.server", "sharedllm.machine.agent", "sharedllm.machine.actor")),
    (("sharedllm.machine.server", "sharedllm.machine.relay", "sharedllm.machine.cache"), DASK),
    (("sharedllm.gguf", "sharedllm.models", "sharedllm.download", "sharedllm.sources", "sharedllm.gguf_remote",
      "sharedllm.placement"), DASK + ENGINE + CLIENT + SCHEDULER + SERVER + CLI + MACHINE),
    (("sharedllm.relay",), DASK + ENGINE + CLIENT + SCHEDULER + SERVER + CLI),
    (ENGINE, DASK + CLIENT + SCHEDULER + SERVER + CLI + MACHINE),
    (MACHINE, CLIENT + SCHEDULER + SERVER + CLI),
    (("sharedllm.scheduler_plugins",), CLIENT + ENGINE + SERVER + CLI),
    # The plugin's rooms that take no Dask (plugin.py and registry.py do), the users and the user port.
    ((*(f"sharedllm.scheduler_plugins.mesh.{m}" for m in ("actors", "admin", "data", "guard", "operations",
                                                           "persistence", "planning", "records", "sessions")),
      "sharedllm.scheduler_plugins.users", "sharedllm.scheduler_plugins.userport"),
     DASK + CLIENT + ENGINE + SERVER + CLI),
    (("sharedllm.client", "sharedllm.replicas", "sharedllm.tool_calls"), SCHEDULER + SERVER + CLI),
    (("sharedllm.client.userport",), DASK + SCHEDULER + SERVER + CLI),
    (SERVER, SCHEDULER + CLI),
    (CLI, SCHEDULER),
    (("sharedllm",), OUTSIDE),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root)
            if pkg == "sharedllm" and rel.parts[0] in ("scheduler_plugins", "cli"):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The repository module ``name`` is (or lies in), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class _Imports(ast.NodeVisitor):
    """Every import of a module (at any depth, except under ``if TYPE_CHECKING``) and every use of a private name
    of another module: ``from m import _x`` and ``m._x`` for a module ``m`` it imported."""

    def __init__(self, module: str):
        self.module = module
        self.imports: list[tuple[str, int]] = []
        self.private: list[tuple[str, int]] = []
        self.aliases: dict[str, str] = {}  # local name -> repository module

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.imports.append((a.name, node.lineno))
            if a.asname and (mod := _resolve(a.name)) == a.name:
                self.aliases[a.asname] = mod

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return
        for a in node.names:
            full = f"{node.module}.{a.name}"
            if full in MODULES:
                self.imports.append((full, node.lineno))
                self.aliases[a.asname or a.name] = full
            else:
                self.imports.append((node.module, node.lineno))
            theirs = _resolve(node.module)
            if (a.name.startswith("_") and not a.name.startswith("__") and theirs
                    and theirs != self.module and node.module.startswith("sharedllm")):
                self.private.append((f"{node.module}.{a.name}", node.lineno))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if (isinstance(node.value, ast.Name) and (mod := self.aliases.get(node.value.id))
                and node.attr.startswith("_") and not node.attr.startswith("__") and mod != self.module):
            self.private.append((f"{mod}.{node.attr}", node.lineno))
        self.generic_visit(node)


def _scan(module: str, path: Path) -> _Imports:
    v = _Imports(module)
    v.visit(ast.parse(path.read_text(), str(path)))
    return v


SCANS = {m: _scan(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize(("room", "never"), NEVER, ids=[",".join(r) for r, _ in NEVER])
def test_no_room_imports_what_it_must_never_import(room, never):
    bad = []
    for module, scan in SCANS.items():
        if not _within(module, room):
            continue
        for name, line in scan.imports:
            if _within(name, never) and not _within(name, room):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} imports {name}")
    assert not bad, "imports the whiteboard (docs/architecture.md) forbids:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_name():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: {name}" for m, scan in SCANS.items()
           for name, line in scan.private]
    assert not bad, "private names used across modules (make them public, named for what they are):\n" + \
        "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    graph = {m: {t for name, _ in scan.imports if (t := _resolve(name)) and t != m and t in MODULES}
             for m, scan in SCANS.items()}
    # A package's __init__ re-exports its modules; a module importing its own package's names is no cycle of rooms.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
    assert not _cycles(graph), "import cycles:\n" + "\n".join(" <-> ".join(c) for c in _cycles(graph))


def test_the_checks_catch_what_they_must(tmp_path):
    """The scan sees a private import, a module attribute, a forbidden import and a cycle."""
    src = ("from sharedllm.engine.framing import _secret\nimport sharedllm.relay.wire as wire\n"
           "x = wire._frame\nif TYPE_CHECKING:\n    import distributed\nelse:\n    import dask\n")
    path = tmp_path / "m.py"
    path.write_text(src)
    scan = _scan("sharedllm.placement", path)
    assert [n for n, _ in scan.private] == ["sharedllm.engine.framing._secret", "sharedllm.relay.wire._frame"]
    names = [n for n, _ in scan.imports]
    assert "dask" in names and "distributed" not in names  # TYPE_CHECKING imports are for type checkers only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
