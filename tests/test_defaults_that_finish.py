"""Defaults that finish on a CPU (issue 17): the 2D mode on the reference prior at the prior's own
resolution, turntable sizes that fit the device, a missing model reported before anything is created, and
no third-party chatter on a Stable Diffusion command."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

import sdsbridge.training.loop as train_module
from sdsbridge.config.loader import load_config
from sdsbridge.outputs.export.video import turntable_size
from sdsbridge.training.image2d import run_image

from cli_helpers import run_cli


def test_image_on_the_reference_prior_uses_its_own_resolution(tmp_path):
    base = ["prompt=a red torus", "prior.kind=reference", "prior.resolution=16", "prior.views_per_label=4",
            "method=sds", "image.steps=2", "image.video_every=0"]
    config = load_config(None, base)
    assert config.image.resolution is None
    result = run_image(config, tmp_path / "own", "cpu", [0], progress=False)
    assert iio.imread(result.images[0]).shape == (16, 16, 3)
    result = run_image(load_config(None, [*base, "image.resolution=8"]), tmp_path / "set", "cpu", [0], progress=False)
    assert iio.imread(result.images[0]).shape == (8, 8, 3)


def test_turntable_size_fits_the_device_unless_set(caplog):
    with caplog.at_level(logging.INFO, logger="sdsbridge"):
        assert turntable_size(None, None, torch.device("cpu")) == (60, 256)
    assert "60 frames at 256 px" in caplog.text and "CPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdsbridge"):
        assert turntable_size(30, 128, torch.device("cpu")) == (30, 128)
    assert caplog.text == ""
    assert turntable_size(None, 64, torch.device("cuda")) == (120, 64)


@pytest.fixture
def no_scene(monkeypatch):
    """Building a scene fails the test: preflight errors must come first."""
    monkeypatch.setattr(train_module, "build_scene", lambda *a, **k: pytest.fail("a scene was built"))


@pytest.mark.parametrize("command", ["train", "image"])
def test_missing_local_model_fails_before_a_run_directory_or_scene(tmp_path, capsys, no_scene, command):
    runs = tmp_path / "runs"
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text("prompt: a cat\n")
    code, _, err = run_cli([command, prompt, f"log.runs_dir={runs}", f"prior.model={tmp_path / 'no-model'}",
                            "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: prior.model") and err.count("\n") == 1
    assert "does not exist" in err
    assert not runs.exists()


def test_uncached_hub_id_offline_fails_before_a_run_directory(tmp_path, capsys, monkeypatch, no_scene):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    runs = tmp_path / "runs"
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text("prompt: a cat\n")
    code, _, err = run_cli(["train", prompt, f"log.runs_dir={runs}", "prior.model=nobody-here/no-such-model",
                            "--device", "cpu"], capsys)
    first, *hints = err.splitlines()
    assert code == 2 and first.startswith("error: ") and all(line.startswith("  - ") for line in hints)  # README
    assert "nobody-here/no-such-model" in first and "HF_HUB_OFFLINE" in first and "sd2-community" in hints[0]
    assert not runs.exists()


def test_stable_diffusion_command_prints_no_third_party_noise(tmp_path, tiny_sd_dir):
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text("prompt: a cat\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    run = subprocess.run([sys.executable, "-m", "sdsbridge", "image", str(prompt), f"prior.model={tiny_sd_dir}",
                          "method=sds", "image.steps=1", "image.video_every=0", "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "images:" in run.stdout
    for noise in ("torchvision", "Loading pipeline components", "Loading weights", "kept in float32"):
        assert noise not in run.stderr, run.stderr


def test_train_logs_each_line_once(tmp_path):
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    run = subprocess.run([sys.executable, "-m", "sdsbridge", "train", str(demo), "train.steps=2", "export.mesh=false",
                          "export.video_frames=2", "export.video_resolution=16", "prior.views_per_label=4",
                          "prior.nearest_views=2", f"log.runs_dir={tmp_path}", "--device", "cpu", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # the export builds the scene again: its backend and sampler lines are not repeated
    assert run.stderr.count("renderer: PyTorch occupancy-grid sampler") == 1, run.stderr
    assert run.stderr.count("hash grid backend") == 1, run.stderr
