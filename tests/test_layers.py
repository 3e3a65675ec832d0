"""The package's layering: lower layers never import higher ones, module-level imports have no cycles, the recipe
layer and the component declarations import no torch, and `ftkit validate` / `ftkit --help` load neither torch nor
transformers. Every import statement counts, those inside functions too: an import deferred to call time is still a
dependency."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "ftkit"

# Layer of each module, lowest first; a module may import its own layer and those below (docs/components.md).
LAYERS = [
    ("errors and component types", ["ftkit.errors", "ftkit.components"]),
    ("declarations (torch-free)", ["ftkit.recipe.schema", "ftkit.adapters", "ftkit.adapters.lora",
                                   "ftkit.adapters.loretta_adp", "ftkit.adapters.loretta_rep",
                                   "ftkit.adapters.loretta_options", "ftkit.optim", "ftkit.optim.config", "ftkit.quant",
                                   "ftkit.quant.bnb_options", "ftkit.task_kinds", "ftkit.data", "ftkit.data.tasks"]),
    ("recipes (torch-free)", ["ftkit.recipe", "ftkit.recipe.load", "ftkit.recipe.checks", "ftkit.recipe.compare",
                              "ftkit.recipe.reference", "ftkit.recipe.architecture"]),
    ("implementations", ["ftkit.*"]),  # every module not named elsewhere
    ("runs", ["ftkit.training", "ftkit.training.*", "ftkit.eval", "ftkit.runs", "ftkit.replay", "ftkit.plot",
              "ftkit.harness"]),
    ("entry points", ["ftkit", "ftkit.cli", "ftkit.__main__", "ftkit.api", "ftkit.hf"]),
]
TORCH_FREE = 3  # layers below this import nothing heavy
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "numpy", "safetensors", "accelerate", "datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for index, (_, names) in enumerate(LAYERS):
        if module in names:
            return index
    for index, (_, names) in enumerate(LAYERS):
        if any(n.endswith(".*") and module.startswith(n[:-1]) and n != "ftkit.*" for n in names):
            return index
    return 3


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules a file imports: in every import statement of it (inside functions and classes too), or only in the
    statements that run when it is imported."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", top_level_only)


def imports_in(source: str, module: str, is_package: bool = False, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:  # `from ftkit import devices` imports the module, `from ftkit.x import y` x
                submodule = f"{base}.{alias.name}" if base else alias.name
                found.add(submodule if submodule in MODULES or not base else base)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` names, with a relative one (`from .x import y`) resolved against `module`."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".")
    package = package if is_package else package[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def own(name: str) -> str | None:
    """The ftkit module an imported name resolves to (a module, or the module that defines the name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_layer_and_imports_none_above_it():
    upward = []
    for module, path in MODULES.items():
        for imported in imports(path):
            target = own(imported) if imported.startswith("ftkit") else None
            if target and layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_declarations_and_recipes_import_nothing_heavy():
    heavy = [f"{module} imports {name}" for module, path in MODULES.items() if layer_of(module) < TORCH_FREE
             for name in imports(path) if name.split(".")[0] in HEAVY]
    assert not heavy, "\n".join(heavy)


def ftkit_imports(path: Path) -> set[str]:
    """The ftkit modules a file imports, at any level."""
    return {own(name) for name in imports(path) if name.startswith("ftkit")} - {None}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# The component packages, lowest first: a format knows nothing of adapters and optimizers, an adapter nothing of
# optimizers. What combines them is the recipe layer (ftkit.recipe.checks), which hands each validator the chosen
# components (ftkit.components.Chosen).
NEVER = [("ftkit.quant", "ftkit.adapters"), ("ftkit.quant", "ftkit.optim"), ("ftkit.adapters", "ftkit.optim")]
REGISTRY_PACKAGES = ("ftkit.quant", "ftkit.adapters", "ftkit.optim")
DECLARATIONS = sorted(m for m in MODULES if layer_of(m) == 1 and any(within(m, p) for p in REGISTRY_PACKAGES))


def test_a_lower_component_package_never_imports_a_higher_one():
    found = [f"{module} imports {target}" for module, path in MODULES.items() for target in ftkit_imports(path)
             for importer, imported in NEVER if within(module, importer) and within(target, imported)]
    assert not found, "\n".join(found)


def test_declarations_import_no_registry_but_the_component_types_and_their_own_declarations():
    """A declaration module imports components.py and the declarations its own registry is made of, never a
    registry (its own package's `__init__` included: the registry imports them, not the other way round)."""
    assert {"ftkit.quant", "ftkit.adapters", "ftkit.optim", "ftkit.optim.config"} <= set(DECLARATIONS)
    found = []
    for module in DECLARATIONS:
        package = next(p for p in REGISTRY_PACKAGES if within(module, p))
        for target in ftkit_imports(MODULES[module]):
            if target not in ("ftkit.components", "ftkit.errors") and not (
                    target in DECLARATIONS and within(target, package) and target != package):
                found.append(f"{module} imports {target}")
    assert not found, "\n".join(found)


def test_imports_inside_functions_and_relative_imports_are_read():
    source = ("import json\n"
              "def check(recipe):\n"
              "    from ftkit.optim import OPTIMIZERS\n"
              "    class Local:\n"
              "        from . import bnb_options\n"
              "    from ..adapters import lora\n")
    assert imports_in(source, "ftkit.quant", is_package=True) == {
        "json", "ftkit.optim", "ftkit.quant.bnb_options", "ftkit.adapters.lora"}
    assert imports_in(source, "ftkit.quant", is_package=True, top_level_only=True) == {"json"}


def test_module_level_imports_have_no_cycles():
    graph = {m: {own(i) for i in imports(p, top_level_only=True) if i.startswith("ftkit") and own(i) != m} - {None}
             for m, p in MODULES.items()}
    visiting, done = set(), set()

    def visit(module, chain):
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(chain + [module])
        visiting.add(module)
        for target in graph.get(module, ()):
            visit(target, chain + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])


PROBE = """
import runpy, sys, json
sys.argv = ["ftkit"] + sys.argv[1:]
code = None
try:
    runpy.run_module("ftkit", run_name="__main__")
except SystemExit as stop:
    code = stop.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft", "bitsandbytes"})
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["validate", str(REPO / "recipes" / "full_ft_sst2.yaml")], ["--help"],
                                  ["validate", "--help"]], ids=["validate", "help", "validate-help"])
def test_validate_and_help_load_no_torch(args):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, done.stderr


@pytest.mark.parametrize("preset, expected", [(None, "10000"), ("777", "777")])
def test_the_command_shortens_openmp_spinning_before_torch_loads_unless_the_user_chose(preset, expected):
    """OpenMP reads GOMP_SPINCOUNT when torch loads it: the command sets it first (a user's value stands)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset:
        env["GOMP_SPINCOUNT"] = preset
    probe = "import os, sys, ftkit.cli; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert done.stdout.split() == [expected, "False"], done.stderr
