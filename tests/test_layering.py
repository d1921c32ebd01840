r"""The layering of fastbnf's modules: no import circles, and imports go down the layers.

The import graph is read from the sources (:mod:`ast`), every import counted wherever it is:
at module level, inside functions, under ``TYPE_CHECKING``. ``from package import name``
counts the module ``package.name`` where there is one, else ``package``.
"""

import ast

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fastbnf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    r"""Returns, for every module of fastbnf, the modules of fastbnf it imports."""

    modules = _modules()
    graph = {}

    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    edges.add(child if child in modules else source)

        graph[name] = {m for m in edges if m in modules and m != name}

    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    r"""Returns the strongly connected components of more than one module (Tarjan's)."""

    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    return found


def _is_model_part(module: str) -> bool:
    return module.startswith(
        ("fastbnf.model", "fastbnf.optim", "fastbnf.bayesian", "fastbnf.checkpointing")
    )


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()

    assert "fastbnf.model.bayesian_model" in graph["fastbnf.model"]  # from . import-ed name
    assert "fastbnf.model.checkpointing" in graph["fastbnf.model.bayesian_model"]  # a module
    assert "fastbnf.model.slots" in graph["fastbnf.model.checkpointing"]


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circles_through_the_model_optim_and_checkpointing():
    found = [c for c in circles(import_graph()) if any(map(_is_model_part, c))]

    assert found == [], f"import circles: {found}"


def test_no_import_circles_anywhere():
    found = circles(import_graph())

    assert found == [], f"import circles: {found}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_layers_import_downwards():
    r"""model -> ops -> reference | _backend (docs/design.md's picture): the op library is a
    leaf; the ops never reach the model or the optimizer; the pure-PyTorch twins reach no op
    and no model, only the AdamW maths of the optimizer (a leaf of it)."""

    graph = import_graph()
    assert graph["fastbnf.ops.library"] == set()
    assert graph["fastbnf.optim.adamw"] <= {"fastbnf._compat", "fastbnf._flat", "fastbnf._backend"}

    def above(modules, layers, allowed=("fastbnf.optim.adamw",)):
        return sorted(m for m in modules if m.startswith(layers) and m not in allowed)

    upper = ("fastbnf.model", "fastbnf.optim", "fastbnf.bayesian", "fastbnf.checkpointing")
    for module in [m for m in graph if m.startswith("fastbnf.ops")]:
        assert above(reachable(graph, module), upper) == [], module

    for module in ("fastbnf.reference", "fastbnf._backend"):
        lower = reachable(graph, module) - {"fastbnf.ops.library"}
        assert above(lower, ("fastbnf.ops", *upper)) == [], module
