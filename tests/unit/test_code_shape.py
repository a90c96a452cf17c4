"""The layout rules the code keeps (docs/ARCHITECTURE.md), read from the source with `ast`, no imports run:

- no import circles among the modules of `sora_model/` and `pipelines/` (function-level imports count: a lazy
  import hides a circle from Python, not from the reader);
- no function longer than a screen (FUNCTION_LINES, decorators and docstring included), and no module longer than
  one sitting's reading (MODULE_LINES: the aim is under ~500, the guard leaves that aim a little room);
- `sora_model` never imports Ray, DeepSpeed or torch.distributed (parallelism is applied from `pipelines/`);
- one form for the whole tree: `ruff format` at the line length in pyproject.toml, and `ruff check` clean (E501
  included: strings and comments the formatter cannot split are wrapped by hand).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sora_model", "pipelines")
FUNCTION_LINES = 60
MODULE_LINES = 520


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of ours that one import statement of `module` names (a `from package import submodule` names the
    submodule, a `from module import name` the module)."""
    known = modules()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")[: -1 if known[module].name != "__init__.py" else None]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    ours = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            ours.append(name)
    return ours


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in modules().items():
        nodes = ast.walk(ast.parse(path.read_text()))
        graph[name] = {m for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for m in imported(name, n)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter = counter + 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = counter = counter + 1
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50, "the module walk found too few modules"
    found = circles(graph)
    lines = [" <-> ".join(c) + "  (" + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")" for c in found]
    assert not found, "import circles (move what both need to the lower module):\n" + "\n".join(lines)


def test_functions_fit_a_screen():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > FUNCTION_LINES:
                    long.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)"
                    )
    assert not long, f"functions over {FUNCTION_LINES} lines (split them by concern):\n" + "\n".join(long)


def test_modules_fit_a_sitting():
    long = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > MODULE_LINES
    ]
    assert not long, f"modules over {MODULE_LINES} lines (split them along a seam, one idea each):\n" + "\n".join(long)


def test_sora_model_never_imports_distributed_code():
    banned = ("ray", "deepspeed", "torch.distributed")
    offenders = []
    for name, path in modules().items():
        if not name.startswith("sora_model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
    assert not offenders, offenders


def test_one_form_for_the_whole_tree():
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    for args in (["format", "--check"], ["check"]):
        out = subprocess.run([ruff, *args, "."], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"ruff {' '.join(args)} (run it to fix or see where):\n{out.stdout[-3000:]}"
