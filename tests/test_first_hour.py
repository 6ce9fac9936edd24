"""What a new user meets in the first hour (issue 19): version and help, image-mode hints and warnings,
`config check` failing where `train` would, command-aware suggestions for mistyped keys."""

import pytest

from sdsbridge import __version__
from sdsbridge.config import ImageConfig
from sdsbridge.image2d import too_few_steps

from cli_helpers import one_error_line, prompt_file, run_cli


def test_version(capsys):
    code, out, err = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"sdsbridge {__version__}"


@pytest.mark.parametrize("command", [[], ["train"], ["image"], ["video"], ["export"]])
def test_help_shows_flags_without_a_type(command, capsys):
    code, out, err = run_cli([*command, "--help"], capsys)
    assert code == 0 and "<bool>" not in out and "--help" in out


def test_image_help_example_uses_image_keys(capsys):
    code, out, err = run_cli(["image", "--help"], capsys)
    assert "image.steps" in out and "train.steps" not in out and "--no-progress" in out


def test_image_rejects_3d_keys_with_a_hint(tmp_path, capsys):
    code, out, err = run_cli(["image", str(prompt_file(tmp_path)), "prior.kind=reference", "train.steps=5",
                              f"--out={tmp_path / 'out'}"], capsys)
    message = one_error_line(err)
    assert code == 2 and "train.steps" in message and "image." in message
    assert not (tmp_path / "out").exists()


def test_mistyped_keys_get_the_commands_own_suggestion(tmp_path, capsys):
    path = str(prompt_file(tmp_path))
    code, out, err = run_cli(["config", "check", path, "guidance_scale=50"], capsys)
    assert code == 2 and "did you mean 'guidance.guidance_scale'" in one_error_line(err)
    code, out, err = run_cli(["image", path, "guidance_scale=50", f"--out={tmp_path / 'out'}"], capsys)
    assert code == 2 and "did you mean 'image.guidance_scale'" in one_error_line(err)


def test_config_check_fails_where_train_would(tmp_path, capsys):
    path = str(prompt_file(tmp_path, "prompt: a purple giraffe\n"))
    code, out, err = run_cli(["config", "check", path, "prior.kind=reference"], capsys)
    assert code == 2 and "names no built-in shape" in one_error_line(err)
    runs = tmp_path / "runs"
    code, out, err = run_cli(["train", path, "prior.kind=reference", f"log.runs_dir={runs}"], capsys)
    assert code == 2 and "names no built-in shape" in one_error_line(err) and not runs.exists()
    code, out, err = run_cli(["config", "check", path, f"prior.model={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and "prior.model" in one_error_line(err)
    code, out, err = run_cli(["config", "check", str(prompt_file(tmp_path)), "prior.kind=reference"], capsys)
    assert code == 0 and out.startswith("OK")


def test_too_few_image_steps_warn():
    assert too_few_steps(ImageConfig()) is None  # 1000 steps: ~190 below t = 0.2 T
    message = too_few_steps(ImageConfig(steps=30))
    assert "image.steps=30" in message and "noisy" in message
    assert too_few_steps(ImageConfig(steps=30, max_step_percent=0.2)) is None  # every step is at low t
