"""The package's import structure: no cycles, argparse only in the CLI, nothing imports the CLI.

Every module under src/hgad is parsed (not imported), and every ``import`` statement counts, function-local
and ``TYPE_CHECKING`` ones included: a cycle hidden inside a function still ties two modules together.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hgad

SRC = Path(hgad.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ["hgad", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module (hgad's or not) that module ``name`` imports anywhere in its body."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from hgad import training` imports the module hgad.training
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: {m for m in _imports(name) if m in MODULES and m != name} for name in MODULES}


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_argparse_only_in_the_cli():
    offenders = [n for n in MODULES if not n.startswith("hgad.cli") and "argparse" in _imports(n)]
    assert offenders == []


def test_library_never_imports_the_cli():
    offenders = {n: sorted(m for m in GRAPH[n] if m.startswith("hgad.cli"))
                 for n in MODULES if not n.startswith("hgad.cli") and n != "hgad.__main__"}
    assert {n: m for n, m in offenders.items() if m} == {}


def test_no_private_names_across_modules():
    # `from hgad.x import _y` ties a module to another's internals; shared helpers are public
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hgad"):
                offenders += [f"{name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_graph_sees_function_local_imports():
    # the checks above are only as good as the parser: a lazy import inside a function must count
    assert "hgad.checkpoint" in GRAPH["hgad.cli.common"]
    assert "hgad.evaluation" in GRAPH["hgad.cli.test"]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["export", "--help"], ["test"],
                                  ["train", "--no-such-flag"], ["predict", "RUN", "x.png", "--batch-size", "0"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = ("import sys\nfrom hgad.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    exit_code, torch_loaded = out.splitlines()[-1].split()
    assert exit_code in ("0", "2")
    assert torch_loaded == "False"


def _defined(tree: ast.Module, qualname: str) -> bool:
    """Whether ``qualname`` (``f``, ``C`` or ``C.m``) is defined at the top of ``tree`` (or in its class)."""
    scope: list[ast.stmt] = tree.body
    for part in qualname.split("."):
        found = None
        for node in scope:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == part:
                found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def test_method_code_map_points_at_real_code():
    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    section = text[text.index("## Code map"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| concept")]
    entries = [e for row in rows for e in re.findall(r"`([\w/]+\.py):([\w.]+)`", row)]
    assert len(entries) > 40 and all(re.search(r"`[\w/]+\.py:", row) for row in rows)
    missing = [f"{path}:{name}" for path, name in entries
               if not (SRC / path).is_file() or not _defined(ast.parse((SRC / path).read_text()), name)]
    assert missing == []
