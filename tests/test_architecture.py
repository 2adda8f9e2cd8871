"""The package's layering: no import cycle among retro_peft's modules, and the stages import in any order."""

import ast
import subprocess
import sys
from itertools import permutations
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    """{module: the retro_peft modules it imports}, imports at any depth (a function-local import to dodge a
    cycle is still one); importing a.b.c runs a/__init__ and a/b/__init__ first, so those count too."""
    modules = {}
    for path in (SRC / "retro_peft").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets.update([base] + [f"{base}.{a.name}" for a in node.names])
        found = {resolve(t) for t in targets if t.startswith("retro_peft")} - {None, name}
        for target in list(found):  # the parents of an imported module run first
            parent = target.rpartition(".")[0]
            while parent:
                if parent != name and not name.startswith(parent + "."):
                    found.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), less a package and its own
    submodules alone (an __init__ that re-exports them is not a cycle)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in found if not all(x == c[0] or x.startswith(c[0] + ".") for x in c[1:])]


def test_the_methods_the_cli_offers_are_the_adapter_methods():
    from retro_peft.adapters import METHODS
    from retro_peft.choices import PEFT_METHODS

    assert tuple(METHODS) == PEFT_METHODS  # choices.PeftMethod is what argparse and the server accept


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.x"}, "a": set()}) == [["a.x", "a.y"]]


def test_the_graph_sees_the_layers():
    graph = import_graph()
    assert "retro_peft.generation.prompt" in graph["retro_peft.kvcache.layout"]
    assert not any(m.startswith("retro_peft.kvcache") for m in graph["retro_peft.generation.runner"])


@pytest.mark.parametrize("order", list(permutations(["retro_peft.kvcache", "retro_peft.generation",
                                                      "retro_peft.adapters"])))
def test_stages_import_in_any_order(order):
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_cli_parser_imports_no_torch():
    # `retro-peft --help` and `domain list` must start in a fraction of a second: torch costs seconds.
    code = "import sys, retro_peft.cli; retro_peft.cli.build_parser(); assert 'torch' not in sys.modules, " \
           "sorted(m for m in sys.modules if m.startswith('retro_peft'))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
