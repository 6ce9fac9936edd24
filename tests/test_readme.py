"""README's architecture block names modules that exist, and every module of the package is named there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sdsbridge"


def architecture_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1]
    return section.split("```text", 1)[1].split("```", 1)[0]


def test_architecture_is_six_lines_naming_real_modules():
    block = architecture_block()
    assert len(block.strip().splitlines()) == 6
    named = set(re.findall(r"[\w/]+\.py|\b[\w/]+/(?=\s|$|:)", block))
    for name in named:
        assert (PACKAGE / name).exists(), f"README names {name}, which sdsbridge/ does not have"


def test_every_module_that_does_a_step_of_the_flow_is_named():
    named = set(re.findall(r"[\w/]+\.py|\b[\w/]+/", architecture_block()))
    layers = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"cli/"}
    assert {layer for layer in layers if not any(name.startswith(layer) for name in named)} == set()
    assert {p.name for p in PACKAGE.glob("*.py")} == {"__init__.py", "__main__.py"}  # every module in a layer


def test_every_subpackage_is_installed():
    # pyproject lists packages by name, and README installs with `pip install .` (not editable): a subpackage
    # missing from the list is missing from every user's install while tests from the checkout still pass.
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    subpackages = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert subpackages - listed == set()
