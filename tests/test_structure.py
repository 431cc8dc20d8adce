"""The package's shape: no import cycle, and method names compared nowhere outside ``methods/``.

Both read the source (``ast``), so they hold for imports inside functions too (the cycle this
guards against, ``__main__ -> train -> evaluate -> __main__``, went through one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from diffora_lab.methods import method_names

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffora_lab"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in the file, functions included).

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module (else of
    ``pkg``); importing ``pkg.sub`` counts as ``pkg.sub`` only, not its parent package.
    """
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(module_files())
    assert "diffora_lab.train" in graph and graph["diffora_lab.train"], "graph not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    # The checker itself can fail: a package with a -> b -> c -> a (one import inside a function).
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("def f():\n    from pkg.a import thing\n")
    graph = import_graph(module_files(pkg))
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(module_files(pkg))) is None


def string_constants(path: Path) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


@pytest.mark.parametrize("name", method_names())
def test_method_names_appear_only_in_methods_package(name):
    methods_dir = PACKAGE / "methods"
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in module_files().values()
        if methods_dir not in path.parents and name in string_constants(path)
    )
    assert not users, f"method name {name!r} written as a string in {users}: ask the registry"
    # ... while the method's own file does name it (so the scan reads real constants).
    assert any(name in string_constants(p) for p in methods_dir.glob("*.py"))


# ----------------------------------------------------------------------------- size limits

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def oversized(root: Path = PACKAGE) -> list[str]:
    """Files over ``MAX_FILE_LINES`` lines and functions over ``MAX_FUNCTION_LINES`` (issue 21)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(root.parent)
        if len(source.splitlines()) > MAX_FILE_LINES:
            found.append(f"{where}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_file_or_function_is_too_long_to_read():
    assert oversized() == []


def test_the_size_check_finds_a_long_function_and_file(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (package / "long.py").write_text(f"def long():\n{body}\n" + "\n" * MAX_FILE_LINES)
    (package / "short.py").write_text("def short():\n    return 1\n")
    assert oversized(package) == [
        f"pkg/long.py: {MAX_FUNCTION_LINES + 1 + MAX_FILE_LINES} lines",
        "pkg/long.py:1 long: 61 lines",
    ]
