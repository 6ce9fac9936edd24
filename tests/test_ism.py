"""Interval Score Matching (distill/methods/ism.py): the official interval annealing and DDIM arithmetic, its
gradient against an independent per-image re-implementation of the authors' loop, and 2D and 3D runs (with
resume) on the reference prior like every other method."""

import pytest
import torch

from sdsbridge.config.loader import load_config
from sdsbridge.distill.methods import METHODS, make_method
from sdsbridge.distill.methods.ism import ISM, ISMSettings, ddim_step, interval
from sdsbridge.priors.reference import ReferencePrior
from sdsbridge.scene.cameras import CameraConfig, sample_cameras
from sdsbridge.training.checkpoint import load_checkpoint

from cli_helpers import TINY, prompt_file, run_cli

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_ism_is_registered_with_the_authors_defaults():
    assert METHODS["ism"] is ISM
    config = load_config(None, ["prompt=a red torus", "method=ism", "prior.kind=reference"])
    s = config.guidance
    assert isinstance(s, ISMSettings)
    assert (s.guidance_scale, s.delta_t, s.delta_t_start, s.delta_s, s.inversion_steps, s.grad_scale) == (7.5, 80, 100, 200, 5, 0.1)
    assert s.inversion_guidance_scale == 1.0 and s.negative_prompt == "" and s.cfg_on_target is False
    assert s.max_step_percent == [0, 0.98, 0.5, 1500] and s.min_step_percent == 0.02


def test_the_interval_anneals_over_the_warm_up_and_truncates_as_the_official_int():
    s = ISMSettings()
    assert [interval(step, s) for step in (0, 750, 1499, 1500, 9000)] == [100, 90, 80, 80, 80]
    assert interval(1, ISMSettings(delta_t=50, delta_t_start=100, delta_t_warmup_steps=3)) == 83  # int(83.33)


def test_ddim_steps_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    a, b = torch.tensor([0.9]).view(-1, 1, 1, 1), torch.tensor([0.3]).view(-1, 1, 1, 1)
    assert torch.allclose(ddim_step(ddim_step(x, eps, a, b), eps, b, a), x, atol=1e-5)
    assert torch.equal(ddim_step(x, eps, a, a), ddim_step(x, eps, a, a))


def official_gradient(prior, x0, t, noise, cond, negative, empty, cameras, s: ISMSettings, delta_t):
    """The authors' train_step for one image, written out as their loop is (break at s, one UNet call per stride)."""
    abar = prior.alphas_cumprod

    def eps(x, step, condition, camera):
        return prior.predict_noise(x, torch.tensor([step]), condition, camera)

    def inversion_eps(x, step):
        e = eps(x, step, empty, cameras)
        if s.inversion_guidance_scale > 1:
            e = e + s.inversion_guidance_scale * (eps(x, step, negative, cameras) - e)
        return e

    t = int(t)
    prev = max(t - delta_t, 0)
    x = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * noise
    cur = 0
    for _ in range(s.inversion_steps):
        if cur == prev:
            break
        nxt = min(cur + s.delta_s, prev)
        e = inversion_eps(x, cur)
        x = ((x - (1 - abar[cur]).sqrt() * e) / abar[cur].sqrt()) * abar[nxt].sqrt() + (1 - abar[nxt]).sqrt() * e
        cur = nxt
    e_s = inversion_eps(x, prev)
    x_t = ((x - (1 - abar[prev]).sqrt() * e_s) / abar[prev].sqrt()) * abar[t].sqrt() + (1 - abar[t]).sqrt() * e_s
    e_neg, e_y = eps(x_t, t, negative, cameras), eps(x_t, t, cond, cameras)
    guided = e_neg + s.guidance_scale * (e_y - e_neg)
    w = ((1 - abar[t]) / abar[t]) ** 0.5
    return s.grad_scale * (w * (guided - e_s))


@pytest.mark.parametrize("options", [{}, {"inversion_guidance_scale": 2.0, "negative_prompt": "blurry",
                                          "delta_s": 150, "inversion_steps": 3}], ids=["defaults", "reverse-guidance"])
def test_gradient_equals_the_authors_loop_image_by_image(options):
    prior = ReferencePrior(resolution=8, views_per_label=4, nearest_views=3)
    method = make_method("ism", {"view_dependent": False, **options}, prior)
    texts = method.role_texts("a red torus")
    assert texts == {"cond": "a red torus", "uncond": method.settings.negative_prompt, "inverse": ""}
    prompts = method.prompt_embeddings("a red torus")
    cameras = sample_cameras(CameraConfig(), 3)
    conditions = prompts.conditions(cameras.labels, cameras.azimuth)
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([730, 40, 301])  # s = 630 (4 strides, the last one short), 0 (no stride), 201
    method.delta_t = interval(0, method.settings)
    grad = method.gradient(latents, t, noise, conditions, 1, cameras)
    for n in range(3):
        expected = official_gradient(prior, latents[n:n + 1], t[n], noise[n:n + 1], conditions["cond"][n:n + 1],
                                     conditions["uncond"][n:n + 1], conditions["inverse"][n:n + 1], cameras[n:n + 1],
                                     method.settings, method.delta_t)
        assert torch.allclose(grad[n:n + 1], expected, rtol=1e-4, atol=1e-6 * expected.abs().max()), n
    assert grad.abs().max() > 0


def test_3d_run_resumes_bit_exactly_on_the_reference_prior(tmp_path, capsys):
    args = ["train", prompt_file(tmp_path), "method=ism", "log.checkpoint_every=2", "export.mesh=false",
            "export.video=false", "export.report=false", *TINY]
    code, _, err = run_cli([*args, "train.steps=4", "--run-dir", tmp_path / "whole"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "train.steps=2", "--run-dir", tmp_path / "half"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", "--resume", tmp_path / "half", "train.steps=4", "--device", "cpu", "--no-progress"],
                           capsys)
    assert code == 0, err
    whole, resumed = (load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("whole", "half"))
    assert whole["step"] == resumed["step"] == 4
    for name, value in whole["field"].items():
        assert torch.equal(value, resumed["field"][name]), name


def test_2d_image_runs_on_the_reference_prior(tmp_path, capsys):
    code, _, err = run_cli(["image", prompt_file(tmp_path), "method=ism", "prior.kind=reference", "prior.resolution=16",
                            "prior.views_per_label=8", "image.resolution=8", "image.steps=3", "image.video_every=0",
                            "--out", tmp_path / "out", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "seed-0.png").is_file()
