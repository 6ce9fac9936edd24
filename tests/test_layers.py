"""The package's layers: a module imports only modules of its own layer or lower ones, and no two modules
import each other, directly or around a cycle (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdsbridge"
LAYERS = ["common", "scene", "priors", "distill", "config", "training", "outputs", "view", "sweep", "cli"]
"""Low to high. Components (scene, priors, methods) own their settings; config/ composes them into a Config."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """sdsbridge modules ``path`` imports (``from sdsbridge.a import b`` counts as sdsbridge.a.b where that
    is a module, else as sdsbridge.a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sdsbridge")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sdsbridge"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = any((PACKAGE.parent / (sub.replace(".", "/") + suffix)).exists()
                                for suffix in (".py", "/__init__.py"))
                found.add(sub if is_module else node.module)
    return found


MODULES = {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0  # the package root holds only __version__
    if parts[1] == "__main__":
        return len(LAYERS)  # ``python -m sdsbridge`` sits on top
    if parts[1] == "testing":
        return -1  # fixtures: checked separately
    return LAYERS.index(parts[1])


def test_every_subpackage_is_a_layer():
    assert {module.split(".")[1] for module in MODULES if module.count(".")} <= set(LAYERS) | {"testing", "__main__"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) >= 0))
def test_imports_go_down(module):
    upward = sorted(other for other in MODULES[module] if layer_of(other) > layer_of(module))
    assert not upward, f"{module} ({LAYERS[layer_of(module)] if layer_of(module) < len(LAYERS) else 'root'}) imports higher layers: {upward}"


def test_runtime_code_never_imports_the_test_fixtures():
    users = sorted(m for m, imports in MODULES.items() if layer_of(m) >= 0 and any(".testing" in i for i in imports))
    assert users == []


def test_no_import_cycles():
    def visit(module, stack):
        for other in sorted(MODULES.get(module, ())):
            if other == module or other not in MODULES:
                continue
            if other in stack:
                raise AssertionError(" -> ".join(stack[stack.index(other):] + [other]))
            visit(other, stack + [other])

    package_inits = {m for m in MODULES if (PACKAGE.parent / (m.replace(".", "/") + "/__init__.py")).exists()}
    for module in sorted(set(MODULES) - package_inits):
        visit(module, [module])


def test_every_package_folder_has_its_init_file():
    """A folder of modules without ``__init__.py`` still imports from a checkout (as a namespace package), so
    only a fresh clone shows that the file was never committed (a ``.gitignore`` rule once hid one)."""
    folders = {path.parent for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").is_file()) == []
