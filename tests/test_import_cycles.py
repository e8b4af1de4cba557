"""No import cycle among beam_influence's modules: every import statement (module level or inside a function:
a lazy import only hides a cycle) is read with ``ast``, without importing anything."""
import ast
import pathlib

import beam_influence

PACKAGE = pathlib.Path(beam_influence.__file__).parent
ROOT = PACKAGE.parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The beam_influence modules one module's import statements load (``from pkg import sub`` -> pkg.sub,
    ``from pkg import attr`` -> pkg); imports under ``if TYPE_CHECKING:`` are not executed and skipped."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            for a in node.names:
                out.add(f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src)
    return {m for m in out if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(ast.parse(p.read_text(), str(p)), _module_name(p), p.name == "__init__.py",
                                      modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted tuple."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "beam_influence.core.scoring" in graph["beam_influence.core.topk"]
    assert "beam_influence.core.topk" in graph["beam_influence"]
    tree = ast.parse("def f():\n    from beam_influence.core import topk\nfrom .scoring import top_k\n")
    mods = {"beam_influence.core.topk", "beam_influence.core.scoring", "beam_influence.core"}
    assert _imports(tree, "beam_influence.core.x", False, mods) == {"beam_influence.core.topk",
                                                                    "beam_influence.core.scoring"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (a module imports, possibly lazily, one that imports it back): " + "; ".join(
        " <-> ".join(c) for c in found)
