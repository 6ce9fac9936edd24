"""`sdsbridge config show|check` and the one-line error contract of the CLI."""

import subprocess
import sys

import pytest
import yaml

from sdsbridge.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_config_show_prints_every_default_section(tmp_path, capsys):
    path = tmp_path / "prompt.yaml"
    path.write_text("prompt: a DSLR photo of a pineapple\n")
    code, out, _ = run_cli(["config", "show", str(path), "train.steps=123"], capsys)
    assert code == 0
    resolved = yaml.safe_load(out)
    for section in ("guidance", "prior", "scene", "cameras", "render", "loss", "train", "log", "export", "image"):
        assert isinstance(resolved[section], dict) and resolved[section]
    assert resolved["train"]["steps"] == 123
    assert resolved["prompt"] == "a DSLR photo of a pineapple"


def test_config_check_ok(tmp_path, capsys):
    path = tmp_path / "prompt.yaml"
    path.write_text("prompt: a cat\nmethod: sds\n")
    code, out, _ = run_cli(["config", "check", str(path)], capsys)
    assert code == 0 and out.startswith("OK")


@pytest.mark.parametrize("text, overrides, fragment", [
    ("prompt: x\ntrain: {steps: [1\n", [], "malformed YAML"),
    ("prompt: x\ntrian: {steps: 1}\n", [], "unknown key 'trian' (did you mean 'train'?)"),
    ("prompt: x\n", ["train.batch_size=two"], "train.batch_size"),
    ("prompt: x\n", ["train.steps=-1"], "train.steps"),
    ("prompt: x\n", ["guidance.min_step_percent=0.98"], "min timestep"),
    ("prompt: x\n", ["render.resolution=-64"], "render.resolution"),
    ("seed: 1\n", [], "unknown key 'seed'"),
    ("train: {steps: 5}\n", [], "prompt: missing"),
])
def test_bad_input_one_line_exit_2_no_traceback(tmp_path, capsys, text, overrides, fragment):
    path = tmp_path / "prompt.yaml"
    path.write_text(text)
    code, out, err = run_cli(["config", "check", str(path), *overrides], capsys)
    assert code == 2
    assert fragment in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err and out == ""


def test_missing_file_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["config", "show", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml: file not found" in err


def test_console_script_help_and_error():
    ok = subprocess.run([sys.executable, "-m", "sdsbridge", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "config" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sdsbridge", "config", "check", "/nonexistent/p.yaml"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: /nonexistent/p.yaml: file not found"
