"""The import graph of the installed packages, read from their source with `ast`.

The layering (README, "How the code is laid out"), lowest first:

    kernels    pallas_kernels
    core       config, cache, attention, model, selection (and errors)
    decoding   speculative, autoregressive and what they share
    tools      loading, convert, eval, train, cli, demo, data, testing
    api        the `specattn_jax` package itself, which re-exports the public names

A module may import its own layer or lower ones, never a higher one. Within the core, the model
and the selectors do not import each other: a selector hands the model data (an
`AttentionPlan`), and the model runs whatever function the plan carries. Imports of the project
are made at module level, so the graph below is the whole graph: an import tucked into a
function would hide a circle from Python until the function runs, and from this test.

Edges follow Python's semantics: importing `a.b.c` first imports the packages `a` and `a.b`,
except those the importing module already sits in (they are initialised before it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "specattn_jax")

LAYERS = ("kernels", "core", "decoding", "tools", "api")
# Module name (or package prefix, matching the package and everything in it) -> layer.
LAYER_OF = {
    "pallas_kernels": "kernels",
    "specattn_jax.errors": "core",
    "specattn_jax.config": "core",
    "specattn_jax.cache": "core",
    "specattn_jax.attention": "core",
    "specattn_jax.model": "core",
    "specattn_jax.selection": "core",
    "specattn_jax.progress": "core",
    "specattn_jax.sampling": "decoding",
    "specattn_jax.acceptance": "decoding",
    "specattn_jax.decoding": "decoding",
    "specattn_jax.layer_map": "decoding",
    "specattn_jax.sharding": "decoding",
    "specattn_jax.speculative": "decoding",
    "specattn_jax.stopping": "decoding",
    "specattn_jax.autoregressive": "decoding",
    "specattn_jax.loading": "tools",
    "specattn_jax.convert": "tools",
    "specattn_jax.eval": "tools",
    "specattn_jax.train": "tools",
    "specattn_jax.distill": "tools",
    "specattn_jax.tokenizer_training": "tools",
    "specattn_jax.data": "tools",
    "specattn_jax.demo": "tools",
    "specattn_jax.cli": "tools",
    "specattn_jax.chat": "tools",
    "specattn_jax.testing": "tools",
    "specattn_jax": "api",
}
# Same-layer pairs that must stay apart: (importer prefix, imported prefix).
APART = (
    ("specattn_jax.selection", "specattn_jax.model"),
    ("specattn_jax.model", "specattn_jax.selection"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(name: str) -> str | None:
    matches = [prefix for prefix in LAYER_OF if _within(name, prefix)]
    return LAYER_OF[max(matches, key=len)] if matches else None


def _imported_modules(node: ast.AST, modules: set[str]) -> list[str]:
    """The project modules one import statement names (resolving `from pkg import module`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    assert not node.level, f"relative import of {node.module!r}: the project imports absolutely"
    found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
    return found or ([node.module] if node.module in modules else [])


def _with_packages(target: str, importer: str, modules: set[str]) -> list[str]:
    """`target` and the packages above it that importing it initialises."""
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in chain if m in modules and not _within(importer, m)]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> project modules it imports, [(module, line, target) of imports made inside
    a function or class body])."""
    sources = _sources()
    modules = set(sources)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    nested = []
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported_modules(node, modules):
                graph[name].update(_with_packages(target, name, modules))
                if id(node) not in top_level:
                    nested.append((name, node.lineno, target))
    return graph, nested


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    unplaced = sorted(name for name in graph[0] if _layer(name) is None)
    assert not unplaced, f"give these modules a layer in LAYER_OF: {unplaced}"


def test_no_import_of_the_project_inside_a_function(graph):
    _, nested = graph
    assert not nested, "import at module level (a nested import hides circles): " + ", ".join(
        f"{module}:{line} imports {target}" for module, line, target in nested
    )


def test_the_import_graph_has_no_circle(graph):
    cycle = find_cycle(graph[0])
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer(graph):
    upward = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in sorted(graph[0].items())
        for target in sorted(targets)
        if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module))
    ]
    assert not upward, "\n".join(upward)


def test_the_model_and_the_selectors_stay_apart(graph):
    crossings = [
        f"{module} imports {target}"
        for module, targets in sorted(graph[0].items())
        for target in sorted(targets)
        for importer, imported in APART
        if _within(module, importer) and _within(target, imported)
    ]
    assert not crossings, "\n".join(crossings)


def test_the_checks_see_circles_and_packages():
    """The finder reports a planted circle, and the graph builder sees through packages."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph, _ = import_graph()
    # `from specattn_jax.cache import KVCache` inside the kernels would initialise the package,
    # which imports everything: importing a package's module imports the package.
    assert "specattn_jax" in _with_packages("specattn_jax.cache", "pallas_kernels", set(graph))
