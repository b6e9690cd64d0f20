"""The shape of the package, checked on its source (ast): import direction, a pure core, module size.

`layering_problems` reads every module of a package and lists what breaks the rules of DESIGN.md:
- no import cycle between atssdet modules (every import counts, also one inside a function, except
  imports under ``if TYPE_CHECKING:``, which never run);
- the core (``ops``, ``modeling``, ``assign``, ``criterion``, ``postprocess``, ``structures``) imports no
  OpenCV, file or process IO, drawing, data or application module, and calls no ``open``;
- no module over 450 lines.
The last tests plant each kind of violation in a scratch package and show the checker reports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

MAX_LINES = 450
CORE = ("ops", "modeling", "assign", "criterion", "postprocess", "structures")
# What the core may import: the tensor stack, typing helpers, and the core itself plus the config.
CORE_ALLOWED_EXTERNAL = frozenset(
    {"__future__", "collections", "dataclasses", "enum", "functools", "itertools", "math", "typing",
     "numpy", "torch", "torchvision"}
)  # fmt: skip
CORE_ALLOWED_INTERNAL = (*CORE, "config")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import that can run (``TYPE_CHECKING`` blocks skipped)."""
    found: list[tuple[str, int]] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from pkg import submodule` imports the submodule too
            found.extend((f"{target}.{alias.name}", node.lineno) for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _top(module: str, package: str) -> str:
    """``atssdet.ops.boxes`` -> ``ops``; ``atssdet`` -> ``""``."""
    rest = module[len(package) + 1 :] if module.startswith(package + ".") else ""
    return rest.split(".")[0]


def layering_problems(root: Path, package: str = "atssdet") -> list[str]:
    modules = _modules(root, package)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(root)}: {lines} lines (more than {MAX_LINES})")
        tree = ast.parse(source, filename=str(path))
        internal: set[str] = set()
        for target, line in _imports(tree, name, is_package):
            if target == package or target.startswith(package + "."):
                # the deepest module the import names (a `from m import function` names m)
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name and target in modules:
                    internal.add(target)
            where = f"{path.relative_to(root)}:{line}"
            if _top(name, package) in CORE:
                if target.startswith(package + "."):
                    if _top(target, package) not in CORE_ALLOWED_INTERNAL:
                        problems.append(f"{where}: core module {name} imports application module {target}")
                elif target.split(".")[0] not in CORE_ALLOWED_EXTERNAL and target != package:
                    top = target.split(".")[0]
                    problems.append(f"{where}: core module {name} imports {top} (IO, drawing or other)")
        if _top(name, package) in CORE:
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                    problems.append(
                        f"{path.relative_to(root)}:{node.lineno}: core module {name} opens a file"
                    )
        # a package's __init__ is imported by its submodules: edges from it would make false cycles
        graph[name] = {t for t in internal if not (is_package and t.startswith(name + "."))}
    cycle = _find_cycle(graph)
    if cycle is not None:
        problems.append("import cycle: " + " -> ".join(cycle))
    return list(dict.fromkeys(problems))  # `from m import a, b` reports m once


def test_atssdet_layering_holds():
    assert layering_problems(REPO_ROOT) == []


# ------------------------------------------------------------------ the checker can fail


def _scratch_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"pkg/__init__.py": "", "pkg/ops/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_clean_scratch_package_passes(tmp_path):
    root = _scratch_package(
        tmp_path,
        {
            "pkg/ops/boxes.py": "import math\nimport torch\n",
            "pkg/app.py": "import json\nfrom pkg.ops import boxes\n",
            "pkg/late.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import app\n",
        },
    )
    assert layering_problems(root, "pkg") == []


def test_planted_cycle_is_reported(tmp_path):
    root = _scratch_package(
        tmp_path,
        {"pkg/a.py": "from pkg import b\n", "pkg/b.py": "def f():\n    from pkg.a import g\n"},
    )
    assert layering_problems(root, "pkg") == ["import cycle: pkg.a -> pkg.b -> pkg.a"]


def test_planted_core_io_and_application_imports_are_reported(tmp_path):
    root = _scratch_package(
        tmp_path,
        {
            "pkg/ops/draw.py": "import cv2\nfrom pkg import app\n\ndef f():\n    return open('x')\n",
            "pkg/app.py": "",
        },
    )
    problems = layering_problems(root, "pkg")
    assert any("imports cv2" in p for p in problems), problems
    assert any("imports application module pkg.app" in p for p in problems), problems
    assert any("opens a file" in p for p in problems), problems


def test_planted_long_module_is_reported(tmp_path):
    root = _scratch_package(tmp_path, {"pkg/big.py": "x = 1\n" * (MAX_LINES + 1)})
    assert layering_problems(root, "pkg") == [f"pkg/big.py: {MAX_LINES + 1} lines (more than {MAX_LINES})"]
