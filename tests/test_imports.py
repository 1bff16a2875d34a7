"""The import direction of docs/design.md, read from the source (ast), function-level imports
included: no arrow against the table, no torch under envs/, and no cycle between the files of one
package (a cycle hidden behind a function-level import is still a cycle). Imports under
`if TYPE_CHECKING:` never run and are not counted."""
import ast
import re
import sys

from conftest import REPO

# Which of our packages each may import (docs/design.md, "Packages"): arrows point down only.
MAY_IMPORT = {
    "launch": {"algos", "rollout", "agents", "envs"},
    "bench": {"algos", "rollout", "agents", "envs"},
    "algos": {"rollout", "agents", "envs"},
    "rollout": {"agents", "envs"},
    "agents": set(),
    "envs": set(),
}
OURS = set(MAY_IMPORT)
# Libraries a package must never import, even lazily.
FORBIDDEN = {"envs": {"torch", "transformers", "ray", "deepspeed", "vllm"}, "agents": {"ray", "deepspeed"}}


def _modules() -> dict[str, ast.Module]:
    """module name -> parsed source, for every .py file of ours."""
    files = [REPO / "launch.py", *sorted((REPO / "bench").glob("*.py"))]
    files += [f for pkg in ("algos", "rollout", "agents", "envs") for f in sorted((REPO / pkg).rglob("*.py"))]
    out = {}
    for f in files:
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (ast.parse(f.read_text(), str(f)), parts[-1] == "__init__")
    return out


def _imports(name: str, tree: ast.Module, is_package: bool, known: set[str]) -> set[str]:
    """The modules `name` imports anywhere in its file (absolute names; a `from X import Y` that
    names a submodule counts as importing X.Y)."""
    found = set()
    for node in _walk_run_time(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{alias.name}" for alias in node.names} & known
            found |= subs or {target}
    return found


def _walk_run_time(tree: ast.AST):
    """ast.walk, without the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _graph():
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, tree, pkg, known) for name, (tree, pkg) in modules.items()}


def test_every_import_follows_the_table():
    wrong = []
    for name, imported in _graph().items():
        package = name.split(".")[0]
        for target in imported:
            top = target.split(".")[0]
            if top in OURS and top != package and top not in MAY_IMPORT[package]:
                wrong.append(f"{name} -> {target}")
            if top in FORBIDDEN.get(package, ()):
                wrong.append(f"{name} -> {target} (never under {package}/)")
    assert not wrong, "imports against docs/design.md's table:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_the_files_of_a_package():
    graph = _graph()
    edges = {m: {t for t in ts if t in graph and t != m and t.split(".")[0] == m.split(".")[0]}
             for m, ts in graph.items()}
    # Tarjan's strongly connected components: any with more than one file is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_table_here_is_the_one_in_the_design_doc():
    text = (REPO / "docs" / "design.md").read_text()
    for package, allowed in MAY_IMPORT.items():
        if package == "bench":
            continue
        row = re.search(rf"^\| `{package}(?:/|\.py)` \|.*\| (.*) \|$", text, re.M)
        assert row, f"docs/design.md has no row for {package}"
        listed = set(re.findall(r"`(\w+)`", row.group(1))) & OURS
        assert listed == allowed, (package, listed, allowed)


def test_the_checker_sees_function_level_and_relative_imports():
    tree = ast.parse("from .demos import x\ndef f():\n    from ..base import y\n    import torch\n"
                     "if TYPE_CHECKING:\n    import ray\n")
    found = _imports("envs.countdown.problems", tree, False, {"envs.countdown.demos", "envs.base"})
    assert found == {"envs.countdown.demos", "envs.base", "torch"}
