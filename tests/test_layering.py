"""The package's import graph: layers without cycles, no meshfit import hidden in a function."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"meshfit": "meshfit", "engine": "meshfit.engine", "callbacks": "meshfit.callbacks"}
PACKAGES["strategies"] = "meshfit.strategies"


def modules() -> dict[str, pathlib.Path]:
    """Every meshfit module name -> its file."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: pathlib.Path, known: set[str]) -> tuple[set[str], list[int]]:
    """Module-level meshfit imports (outside `if TYPE_CHECKING:`), and lines of meshfit
    imports inside functions."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[int] = []

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = node.module or ""
        subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
        # `from pkg import submodule` depends on the submodule (its package is its parent)
        return subs if len(subs) == len(node.names) else subs | {base}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found = {t for t in targets(child) if t.split(".")[0] == "meshfit"}
                if found and in_function:
                    nested.append(child.lineno)
                elif not in_function:
                    top.update(t for t in found if t in known)
            fn = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, in_function or fn)

    visit(tree, False)
    return top, nested


def test_no_cycles_and_no_function_level_imports():
    mods = modules()
    graph, hidden = {}, []
    for name, path in mods.items():
        graph[name], nested = imports(path, set(mods))
        hidden += [f"{path.relative_to(ROOT)}:{line}" for line in nested]
    assert not hidden, f"meshfit imports inside functions: {hidden}"

    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == node or dep == "meshfit":
                continue
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                dfs(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [name])


def test_bottom_layers_import_no_callback_or_run():
    """The hook base and the train state sit at the bottom: they import nothing of meshfit;
    the step never imports the run, the loop or a callback."""
    mods = modules()
    for name in ("meshfit.engine.hooks", "meshfit.engine.state", "meshfit.engine.trees"):
        assert imports(mods[name], set(mods))[0] == set(), name
    for name in ("meshfit.engine.step.build", "meshfit.engine.step.plan"):
        deps = imports(mods[name], set(mods))[0]
        bad = [d for d in deps if d.startswith(("meshfit.callbacks", "meshfit.engine.run"))]
        assert not bad, (name, bad)
