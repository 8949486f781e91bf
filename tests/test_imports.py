"""The project's modules import each other without a circle, and the configuration is the lowest floor.

Imports are read from the source (every `import optimizer_recipes...` / `from optimizer_recipes... import`, at the top of a module or
inside a function; `if TYPE_CHECKING:` blocks are type hints only and left out).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "recipes"


def module_name(path: Path) -> str:
    """recipes/core/run/loop.py -> optimizer_recipes.core.run.loop (the folder is installed under the package's name)."""
    parts = ("optimizer_recipes", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optimizer_recipes"):
            for alias in node.names:  # `from optimizer_recipes.core.data import embedded` imports the module optimizer_recipes.core.data.embedded
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (PACKAGE / (candidate.split(".", 1)[1].replace(".", "/") + ".py")).is_file()
                          else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("optimizer_recipes")}
    return found - {"optimizer_recipes", "optimizer_recipes.core"}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): project_imports(p) for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, on_path = set(), []

    def visit(node):
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert "optimizer_recipes.core.run.loop" in graph and graph["optimizer_recipes.core.run.loop"]  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_configuration_imports_nothing_that_reads_it():
    assert import_graph()["optimizer_recipes.core.run.config"] <= {"optimizer_recipes.core.run.launch_setup"}


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_package_named_recipes_on_the_path_does_not_shadow_the_project(tmp_path):
    """torchtune's wheel installs a top-level `recipes` whose __init__ raises; ahead of everything on the path, a
    recipe still runs as its script, and finds the other recipes (its registry): the importable package is
    `optimizer_recipes` (pyproject.toml's package-dir). One launch: a knob of another recipe, whose one-line refusal
    names the recipe that reads it."""
    import subprocess
    import sys

    from tests.conftest import offline_env

    stand_in = tmp_path / "site" / "recipes"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('raise ModuleNotFoundError("The torchtune recipes directory isn\'t a '
                                          'package and you should not import anything from here")\n')
    env = offline_env(PYTHONPATH=str(stand_in.parent))
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "adamw.py"), "--loss_scale", "64"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("adamw: error: --loss_scale has no effect on adamw; it is read by adalomo. Drop "
                                   "the flag or pick that recipe")
    probe = subprocess.run([sys.executable, "-c", "import recipes"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert "torchtune recipes directory" in probe.stderr  # the stand-in was first on the path
