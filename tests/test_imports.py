"""No import cycles inside the `fastbackup` package, read from its source.

A cycle works only while its modules happen to be imported in one order and
breaks when a refactor changes that order. Lazy (in-function) and
`if TYPE_CHECKING:` imports hide a cycle from the interpreter until the
function runs or a type checker follows it, so they count here too. The
source is parsed, not imported: importing would run only one order and pull
in Keras.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

# module -> module it imports -> (file, line) of each import statement.
Graph = dict[str, dict[str, list[tuple[Path, int]]]]

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fastbackup"


def _bound_names(tree: ast.Module) -> set[str]:
    """Returns the names a module binds outside its functions and classes."""
    names: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)  # Its body binds names in another scope.
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return names


def import_graph(package_dir: Path, package_name: str) -> Graph:
    """Reads which modules of a package import which, from the source.

    Args:
        package_dir: The package's directory (the one holding `__init__.py`).
        package_name: The package's importable name.

    Returns:
        Every module of the package (`__init__.py` is the package itself),
        mapped to the package's modules it imports anywhere in its file, each
        with the file and line of every statement that imports it.
    """
    files: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join((package_name, *parts))] = path
    trees = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in files.items()}
    graph: Graph = {module: {} for module in files}
    for module, tree in trees.items():
        # Relative imports start from the package holding the module.
        package = module.split(".")[: None if files[module].name == "__init__.py" else -1]
        for node in ast.walk(tree):  # Walks function bodies and if blocks too.
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    keep = len(package) - node.level + 1
                    if keep < 1:
                        continue  # Beyond the top package: an ImportError anyway.
                    base = ".".join(package[:keep] + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in files:
                        targets.append(f"{base}.{alias.name}")
                    elif base in files and (
                        files[base].name != "__init__.py"
                        or alias.name == "*"
                        or alias.name in _bound_names(trees[base])
                    ):
                        targets.append(base)
                    # Else a submodule without Python source (the compiled
                    # `_native`): it imports nothing back, so it adds no edge.
            for target in dict.fromkeys(targets):  # Once per statement.
                # Only the named module: the parents Python imports first are
                # implicit, or a submodule would always "cycle" with its package.
                if target in files:
                    graph[module].setdefault(target, []).append((files[module], node.lineno))
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """Lists every elementary cycle of an import graph once.

    Args:
        graph: What `import_graph` returns.

    Returns:
        Each cycle as its modules in import order, starting from its least
        name: `[a, b]` is a -> b -> a, `[a]` a module importing itself.
    """
    reach: dict[str, set[str]] = {}
    for start in graph:
        reach[start], todo = set(), [start]
        while todo:
            new = set(graph[todo.pop()]) - reach[start]
            reach[start] |= new
            todo.extend(new)
    cycles: list[list[str]] = []
    for start in sorted(graph):
        # Later modules only, so each cycle is found once, from its least
        # module; and only those that lead back to it, to keep the search small.
        allowed = {m for m in reach[start] if m > start and start in reach[m]}
        paths = [[start]]
        while paths:
            path = paths.pop()
            for nxt in graph[path[-1]]:
                if nxt == start:
                    cycles.append(path)
                elif nxt in allowed and nxt not in path:
                    paths.append([*path, nxt])
    return sorted(cycles)


def describe(graph: Graph, cycles: list[list[str]], root: Path) -> str:
    """Shows each cycle as `a -> b -> a` and where each of its edges is made."""
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join([*cycle, cycle[0]]))
        for a, b in zip(cycle, [*cycle[1:], cycle[0]]):
            where = ", ".join(f"{p.relative_to(root)}:{n}" for p, n in graph[a][b])
            lines.append(f"    {a} -> {b}: {where}")
    return "\n".join(lines)


def test_no_import_cycles() -> None:
    graph = import_graph(PACKAGE_DIR, "fastbackup")
    # A wrong directory would find no modules, hence no cycles, and pass.
    assert "fastbackup" in graph and "fastbackup.format" in graph, sorted(graph)
    cycles = find_cycles(graph)
    assert not cycles, (
        f"{len(cycles)} import cycle(s) in fastbackup; break each at one of"
        f" its imports:\n{describe(graph, cycles, PACKAGE_DIR.parent)}"
    )


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())


def test_detector_reports_lazy_type_checking_and_relative_cycles(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "class Error(Exception): ...\n",
        "pkg/storage.py": """
            from pkg.errors import Error

            def open_remote():
                from pkg import remote
                return remote
        """,
        "pkg/remote.py": "from pkg.storage import open_remote\n",
        "pkg/types/__init__.py": "",
        "pkg/types/snapshot.py": """
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from .format import Reader
        """,
        "pkg/types/format.py": "from .. import errors\nfrom . import snapshot\n",
    })
    graph = import_graph(tmp_path / "pkg", "pkg")
    cycles = find_cycles(graph)
    assert cycles == [["pkg.remote", "pkg.storage"], ["pkg.types.format", "pkg.types.snapshot"]]
    assert set(graph["pkg.types.format"]) == {"pkg.errors", "pkg.types.snapshot"}
    text = describe(graph, cycles, tmp_path)
    assert "pkg.remote -> pkg.storage -> pkg.remote\n" in text
    assert "pkg.storage -> pkg.remote: pkg/storage.py:4\n" in text
    assert "pkg.types.snapshot -> pkg.types.format: pkg/types/snapshot.py:4" in text


def test_detector_sibling_via_parent_package_is_no_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {
        # The package imports `a`, and `a` names its sibling through the
        # package: that imports `b`, not the half-run `__init__`.
        "flat/__init__.py": "from flat import a\nfrom flat.b import helper\n",
        "flat/a.py": "from flat import b\nfrom flat import _native\n",
        "flat/b.py": "def helper(): ...\n",
    })
    graph = import_graph(tmp_path / "flat", "flat")
    init = tmp_path / "flat/__init__.py"
    assert graph == {
        "flat": {"flat.a": [(init, 1)], "flat.b": [(init, 2)]},
        "flat.a": {"flat.b": [(tmp_path / "flat/a.py", 1)]},
        "flat.b": {},
    }
    assert find_cycles(graph) == []
