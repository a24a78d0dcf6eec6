"""The house's import rules, read from the source (every import statement, lazy ones inside
functions included): no import cycle between modules, each part imports only the parts below it,
and no module imports a private (_-prefixed) name or module of another part. The package's own
private helpers at its root (``obcompress._locks``, ``obcompress._progress``) are the exception:
leaves that import nothing of obcompress, for every part to use."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "obcompress"

# What each part of the package may import (parts of obcompress; a part imports its own modules
# freely). A part not listed here is held to the cycle and privacy rules only.
ALLOWED = {
    "checks": set(),
    "files": set(),
    "timing": set(),
    "geometry": {"checks"},
    "solvers": {"checks", "files"},  # files: the fused kernel's build at first use
    "recipe": {"checks", "solvers"},
    "model": {"checks", "recipe", "solvers"},
    "formats": {"checks", "files", "geometry", "timing", "model", "recipe", "solvers"},
    "executor": {"solvers"},
    "jobs": {"recipe", "solvers"},
    "api": {"checks", "executor", "jobs", "model", "recipe", "solvers"},
    "search": {"api", "checks", "executor", "files", "formats", "geometry", "jobs", "model", "recipe", "solvers",
               "timing"},
    "zoo": {"checks", "files"},
    # the demo is a user of the library: the public API only (see the privacy rule), never the CLI
    "demo": {"api", "checks", "formats", "model", "recipe", "solvers", "zoo"},
}
# Known exceptions, each with the work that removes it.
PENDING_PRIVATE = set()


def _modules():
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        mods[name] = p
    return mods


def _imports(mods):
    """(module, imported module, imported names) for every import of an obcompress module."""
    out = []
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [a.name for a in node.names]
                # "from pkg import module" imports the module
                for n in names:
                    if f"{target}.{n}" in mods:
                        out.append((m, f"{target}.{n}", []))
                if target in mods:
                    out.append((m, target, [n for n in names if f"{target}.{n}" not in mods]))
            elif isinstance(node, ast.Import):
                out += [(m, a.name, []) for a in node.names if a.name in mods]
    return [(a, b, n) for a, b, n in out if a != b]


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _root_helper(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 2 and parts[1].startswith("_") and not parts[1].startswith("__")


def test_no_import_cycles():
    mods = _modules()
    graph = {m: set() for m in mods}
    for a, b, _ in _imports(mods):
        # A package importing its own submodules (its __init__) is not a cycle with them.
        if not b.startswith(a + ".") and not a.startswith(b + "."):
            graph[a].add(b)
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_parts_import_only_the_parts_below_them():
    imports = _imports(_modules())
    wrong = sorted({f"{a} imports {b}" for a, b, _ in imports
                    if _part(a) in ALLOWED and _part(b) and _part(b) != _part(a) and not _root_helper(b)
                    and _part(b) not in ALLOWED[_part(a)]})
    assert wrong == []
    # the root helpers are leaves
    assert sorted(f"{a} imports {b}" for a, b, _ in imports if _root_helper(a) and _part(b) != _part(a)) == []


def test_no_private_name_is_imported_from_another_part():
    wrong = []
    for a, b, names in _imports(_modules()):
        if _part(a) == _part(b) or _root_helper(b):
            continue
        private_module = any(p.startswith("_") and not p.startswith("__") for p in b.split(".")[1:])
        private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private_module or private_names:
            wrong.append(f"{a}: from {b} import {', '.join(names) or '(module)'}")
    assert sorted(set(wrong) - PENDING_PRIVATE) == []


def test_the_tool_and_this_test_agree_on_the_graph():
    # A sanity check of the walk itself: imports known to exist are found.
    found = {(a, b) for a, b, _ in _imports(_modules())}
    assert ("obcompress.api", "obcompress.solvers") in found
    assert ("obcompress.formats.onnx_export", "obcompress.formats.onnx_graph") in found
