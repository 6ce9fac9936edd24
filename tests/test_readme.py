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


def test_readme_states_the_demo_settings_that_configs_demo_yaml_holds():
    import yaml

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    paragraph = readme.split("`sdsbridge train configs/demo.yaml` trains", 1)[1].split("\n\n", 1)[0]
    steps = demo["train"]["steps"]
    assert int(re.search(r"for ([\d,]+) steps", paragraph).group(1).replace(",", "")) == steps
    first, switch, last = re.search(r"hash grid at (\d+) px,\s+from step ([\d,]+) (\d+) px", paragraph).groups()
    switch_step, first_px, last_px, _ = demo["render"]["resolution"]
    assert (int(first), int(switch.replace(",", "")), int(last)) == (first_px, switch_step, last_px)
    share = int(re.search(r"the last (\d+)% of the steps", paragraph).group(1))
    assert share == round(100 * (steps - demo["guidance"]["stage2_start_step"]) / steps)
    assert int(re.search(r"the mesh \((\d+)³ grid\)", paragraph).group(1)) == demo["export"]["resolution"]
    frames, size, panels = re.search(r"\((\d+) frames at (\d+) px, ([a-z |]+)\)", paragraph).groups()
    export = demo["export"]
    assert (int(frames), int(size), panels) == (export["video_frames"], export["video_resolution"],
                                                " | ".join(export["video_modes"]))
    elsewhere = readme.replace(paragraph, "")
    assert "whole demo command" not in elsewhere.lower(), "the demo's time is stated in one place only"
