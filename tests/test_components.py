"""Methods and priors as registered components that own their settings: every preset loads into the method's
own settings, keys of other components are dropped with a warning, a checkpoint written before the registries
loads and resumes, capabilities replace kind tests, and the camera object reaches the prior."""

import logging
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from sdsbridge.common.errors import UserError
from sdsbridge.config.loader import config_from_dict, load_config, presets_dir
from sdsbridge.distill.methods import METHODS, Method, MethodSettings
from sdsbridge.distill.methods.bridge import SOURCE_MODIFIER, BridgeSettings
from sdsbridge.distill.methods.nfsd import NFSD_NEGATIVE
from sdsbridge.priors import PRIORS
from sdsbridge.priors.base import PriorSettings
from sdsbridge.priors.reference_prompts import BLUR_PHRASES, GENERIC_PHRASES, SATURATION_PHRASES
from sdsbridge.scene.cameras import CameraConfig, sample_cameras
from sdsbridge.training.checkpoint import load_checkpoint, load_trained_scene

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
OLD_CHECKPOINT = ROOT / "tests" / "data" / "checkpoint-before-registries.ckpt"
"""A 4-step bridge run on the reference prior (tiny scene, stage two from step 2), written by commit f7fd933,
before methods and priors owned their settings: its config holds every method's guidance keys in one section."""


@pytest.mark.parametrize("path", sorted(presets_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_into_its_methods_settings(path):
    config = load_config(path, ["prompt=a red torus"])
    assert type(config.guidance) is METHODS[config.method].Settings
    assert type(config.prior) is PRIORS[config.prior.kind].Settings


def test_every_method_and_prior_is_a_documented_component():
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name and cls.summary
        assert issubclass(cls.Settings, MethodSettings)
        cls.Settings().validate()  # the defaults are valid
    for kind, cls in PRIORS.items():
        assert cls.kind == kind and issubclass(cls.Settings, PriorSettings) and cls.Settings().kind == kind
        assert isinstance(cls.capabilities, frozenset)
        cls.Settings().validate()
    source = (ROOT / "sdsbridge" / "distill" / "methods" / "bridge.py").read_text()
    assert all(f'    {f.name}: ' in source for f in fields(BridgeSettings) if f.name.startswith("stage2"))


def test_keys_of_another_method_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sdsbridge"):
        config = load_config(ROOT / "configs" / "demo.yaml", ["method=sds", "guidance.guidance_scale=30"])
    assert config.guidance.guidance_scale == 30 and not hasattr(config.guidance, "stage2_start_step")
    assert "does not read guidance.stage2_start_step (bridge/bridge-vsd)" in caplog.text
    with pytest.raises(UserError, match=r"unknown key 'guidance.stage2_scael' \(did you mean 'guidance.stage2_scale'"):
        load_config(None, ["prompt=x", "guidance.stage2_scael=2"])
    with pytest.raises(UserError, match="prior.kind: 'dall-e' is not one of reference, stable-diffusion"):
        load_config(None, ["prompt=x", "prior.kind=dall-e"])


def test_a_method_that_needs_adapters_names_the_prior_kinds_that_have_them():
    with pytest.raises(UserError, match=r"^method: vsd needs a prior that has a UNet to put LoRA adapters on "
                                        r"\(prior.kind: stable-diffusion\); prior.kind 'reference' has none$"):
        load_config(None, ["prompt=a red torus", "method=vsd", "prior.kind=reference"])
    with pytest.raises(UserError, match=r"^guidance.perp_neg: true needs a prior that embeds free text"):
        load_config(None, ["prompt=a red torus", "guidance.perp_neg=true", "prior.kind=reference"])


def test_a_checkpoint_from_before_the_registries_loads_and_resumes(tmp_path, capsys):
    checkpoint = load_checkpoint(OLD_CHECKPOINT)
    assert "nfsd_negative" in checkpoint["config"]["guidance"]  # the old flat section
    config = config_from_dict(checkpoint["config"])
    assert type(config.guidance) is BridgeSettings and config.guidance.stage2_start_step == 2
    assert config.guidance.source_modifier == SOURCE_MODIFIER
    scene, _, step = load_trained_scene(OLD_CHECKPOINT, torch.device("cpu"))
    assert step == 4 and scene.density(torch.zeros(1, 3)).shape == (1,)

    run = tmp_path / "pre"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD_CHECKPOINT, run / "checkpoints" / "last.ckpt")
    code, _, err = run_cli(["train", "--resume", run, "train.steps=6", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 6


def test_the_reference_prior_understands_every_phrase_of_the_source_and_negative_prompts():
    phrases = {p.strip() for p in f"{SOURCE_MODIFIER}, {NFSD_NEGATIVE}".split(",")}
    assert phrases == set(GENERIC_PHRASES) | (phrases & set(BLUR_PHRASES + SATURATION_PHRASES))


def test_cameras_index_and_repeat_as_tensors_do():
    cameras = sample_cameras(CameraConfig(), 3)
    picked = cameras[torch.tensor([False, True, True])]
    assert torch.equal(picked.c2w, cameras.c2w[1:]) and picked.labels == cameras.labels[1:]
    assert torch.equal(cameras[1:2].positions, cameras.positions[1:2])
    twice = cameras.repeat(2)
    assert torch.equal(twice.positions, cameras.positions.repeat(2, 1)) and twice.labels == cameras.labels * 2
