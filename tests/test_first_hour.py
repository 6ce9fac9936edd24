"""What a new user meets in the first hour (issue 19): version and help, image-mode hints and warnings,
`config check` failing where `train` would, command-aware suggestions for mistyped keys."""

import pytest

from sdsbridge import __version__
from sdsbridge.config.schema import ImageConfig
from sdsbridge.training.image2d import too_few_steps

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


def test_a_prior_that_fails_to_load_leaves_nothing_and_says_what_to_do(tmp_path, capsys, monkeypatch, caplog):
    """The first run of a new user: no weights reachable. One error line, hints under it (other ids, offline
    use, the CPU demo), and no run directory or runs folder left behind."""
    import sdsbridge.training.loop as train_module
    from sdsbridge.common.errors import UserError
    from sdsbridge.priors.hub import model_hints

    def unreachable(*args, **kwargs):
        raise UserError("prior.model: model id 'x/y' is not in the local cache and could not be downloaded: the "
                        "Hugging Face hub is unreachable (no network?)", hints=model_hints("x/y"))

    monkeypatch.setattr(train_module, "load_prior", unreachable)
    runs = tmp_path / "runs"
    code, out, err = run_cli(["train", str(prompt_file(tmp_path)), f"log.runs_dir={runs}", "--device", "cpu",
                              "scene.n_levels=4", "scene.log2_hashmap_size=12"], capsys)
    assert code == 2 and "unreachable" in one_error_line(err)
    hints = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(hints) == 3 and "configs/demo.yaml" in hints[2] and "HF_HUB_OFFLINE=1" in hints[1]
    assert not runs.exists()
