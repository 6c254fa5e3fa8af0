"""The package layering of docs/architecture.md, checked on the source: every ``import`` of a
modmoe module (absolute or relative, at module level or inside a function; not the
``if TYPE_CHECKING:`` ones, which never run) is an edge between two packages.

Config sections (``modmoe/<package>/config.py``, and ``modmoe/model_config.py``, the model's
section, which lives outside the model package so that package stays free of pydantic) belong
to the config layer with ``modmoe.config``, ``config_base``, ``config_yaml``, ``config_json`` and
``errors``: they import nothing but that layer and leaf modules, so the job config can compose
every package's section without depending on the
package itself. A leaf module imports nothing of modmoe (the routing rules, the Slurm time
syntax): it can be in no cycle, so it counts as a node of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "modmoe"
CONFIG_LAYER = "config"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The package a module belongs to: ``modmoe.train.loop`` -> ``train``; config sections and
    the top-level config modules -> the config layer."""
    parts = module.split(".")
    if len(parts) == 1:
        return "modmoe"
    if (
        parts[1] in ("config", "config_base", "config_yaml", "config_json", "errors", "model_config")
        or parts[-1] == "config"
    ):
        return CONFIG_LAYER
    return parts[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every modmoe import in the package."""
    found = []
    modules = {_module_name(p) for p in PACKAGE_ROOT.rglob("*.py")}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import submodule`` depends on the submodule, not on the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found += [(module, t) for t in targets if t == "modmoe" or t.startswith("modmoe.")]
    return found


def leaf_modules() -> set[str]:
    importers = {source for source, _ in imports()}
    return {_module_name(p) for p in PACKAGE_ROOT.rglob("*.py")} - importers


def package_graph() -> dict[str, set[str]]:
    leaves = leaf_modules()
    graph: dict[str, set[str]] = {}
    for source, target in imports():
        a, b = _unit(source), target if target in leaves else _unit(target)
        if a != b:
            graph.setdefault(a, set()).add(b)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_scan_sees_known_imports():
    """Guards the scanner itself: edges that exist must be found."""
    graph = package_graph()
    assert "model" in graph["train"] and "parallel" in graph["train"]
    assert "modmoe.model.args" in graph[CONFIG_LAYER]  # model_config.py converts into ModelArgs
    assert "modmoe.model.args" in leaf_modules() and "modmoe.model_config" not in leaf_modules()


def test_model_and_parallel_import_nothing_from_train_or_above():
    above = ("modmoe.train", "modmoe.engines", "modmoe.cli", "modmoe.export", "modmoe.inference", "modmoe.launch")
    for source, target in imports():
        if source.startswith(("modmoe.model", "modmoe.parallel")):
            assert not target.startswith(above), (source, target)


def test_the_model_package_imports_only_itself():
    """The export copies the model package's files; they reach each other by relative imports
    and nothing else of modmoe (no pydantic config, no parallelism)."""
    for source, target in imports():
        if source.startswith("modmoe.model.") or source == "modmoe.model":
            assert target.startswith("modmoe.model.") or target == "modmoe.model", (source, target)
    for path in (PACKAGE_ROOT / "model").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pydantic" not in text and "from pydantic" not in text, path.name


def test_sweep_drives_training_only_through_the_command_line():
    for source, target in imports():
        if source.startswith("modmoe.sweep"):
            assert not target.startswith(("modmoe.train", "modmoe.engines", "modmoe.parallel")), (source, target)


def test_config_sections_import_only_the_config_layer_and_leaf_modules():
    leaves = leaf_modules()
    for source, target in imports():
        if _unit(source) == CONFIG_LAYER and source != "modmoe.config":
            assert _unit(target) == CONFIG_LAYER or target in leaves, (source, target)


def test_no_import_cycle_between_packages():
    cycle = _cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_test_modules_have_unique_basenames():
    # tests/ has no __init__.py files: pytest imports each test module by its basename, so two
    # files of the same name anywhere under tests/ stop the whole collection.
    names = [p.name for p in (PACKAGE_ROOT.parent / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
