"""The package's structure: no import cycles in kvfactory/, and a cache that reads only the method contract.

The import graph is read from the source with ``ast``: every ``import`` / ``from ... import`` statement counts,
wherever it is (module level, inside a function, under ``TYPE_CHECKING``), since a lazy import only hides a cycle.
``from package import name`` counts as an import of ``package.name`` when that is a module. Two graphs must be
acyclic: the modules, and the components (each subpackage such as ``kvfactory.methods`` and each top-level module
such as ``kvfactory.cache`` as one node), which is what keeps ``storage`` and ``quant``, or ``architectures`` and
``patching``, from importing each other through different files.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvfactory"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` names its package)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def component(module: str) -> str:
    """``kvfactory.storage.dense`` -> ``kvfactory.storage``; ``kvfactory.cache`` -> itself."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvfactory.patching import PatchHandle\n"
              "def f():\n    from kvfactory import quant\n    from . import dense\n")
    path = tmp_path / "x.py"
    path.write_text(source)
    modules = {name: path for name in ("kvfactory.patching", "kvfactory.quant", "kvfactory.storage.dense")}
    assert imports_of("kvfactory.storage.x", path, modules) == {
        "kvfactory.patching", "kvfactory.quant", "kvfactory.storage.dense"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_in_a_circle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "kvfactory.cache" in graph["kvfactory.patching"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_component_imports_itself_in_a_circle() -> None:
    components: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        components.setdefault(component(module), set()).update(
            component(t) for t in targets if component(t) != component(module))
    cycle = find_cycle(components)
    assert cycle is None, " -> ".join(cycle or [])


# every concrete store, storage factory and method class of the package
CONCRETE_TYPES = (
    "DenseStore", "QuantizedStore", "RaggedStore", "QuantizedRaggedStore", "DenseStorage", "QuantizedStorage",
    "SnapKV", "PyramidKV", "H2O", "L2Norm", "CAM", "AdaKV", "AdaPyramidKV", "HeadKV", "HeadwiseCompressor",
    "WindowedCompressor", "BudgetedCompressor", "StreamingLLM", "FullKV", "RandomSelection", "MemoryBudget",
)


@pytest.mark.parametrize("type_name", CONCRETE_TYPES)
def test_cache_reads_only_the_method_and_store_contracts(type_name: str) -> None:
    tree = ast.parse((PACKAGE / "cache.py").read_text(encoding="utf-8"))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert type_name not in names


def test_cache_neither_tests_types_nor_probes_the_method() -> None:
    source = (PACKAGE / "cache.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    type_tests = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("isinstance", "hasattr", "getattr")]
    # the one isinstance left is cache_nbytes telling a CompressedCache from transformers' caches and tuples
    assert all(ast.unparse(node.args[1]) in ("CompressedCache", "DynamicCache", "(tuple, list)", "torch.Tensor")
               for node in type_tests if isinstance(node.func, ast.Name) and node.func.id == "isinstance")
    assert not [node for node in type_tests if node.func.id in ("hasattr", "getattr")]
    assert "type: ignore" not in source
