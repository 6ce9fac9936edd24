"""Score-distillation gradients against their formulas, computed by hand from raw prior predictions."""

import dataclasses

import pytest
import torch

from sdsbridge.config import Config, GuidanceConfig, PriorConfig
from sdsbridge.guidance import (current_stage, distill, guidance_config_for_image, guidance_gradient, guidance_step,
                                injected_loss, max_step_percent, sample_timesteps, timestep_range, weight)
from sdsbridge.priors import load_prior
from sdsbridge.prompts import PromptEmbeddings

LABELS = ["front", "back"]


@pytest.fixture(scope="module")
def prior(tiny_sd_dir):
    return load_prior(PriorConfig(model=str(tiny_sd_dir)), "cpu")


@pytest.fixture(scope="module")
def conditions(prior):
    cfg = GuidanceConfig(target_modifier="sharp")
    bridge = PromptEmbeddings(prior, "a red torus", cfg, "bridge").conditions(LABELS)
    nfsd = PromptEmbeddings(prior, "a red torus", cfg, "nfsd").conditions(LABELS)
    return {**bridge, "negative": nfsd["negative"]}


def raw_eps(prior, latents, t, noise, cond):
    """The prior's own prediction for one condition, in a separate call."""
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    return prior.predict_noise(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, cond)


def fixed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)


def assert_close(actual, expected):
    scale = expected.abs().max()
    assert scale > 0 and (actual - expected).abs().max() <= 1e-4 * scale


def test_sds_gradient_is_cfg_minus_noise(prior, conditions):
    latents, noise = fixed_inputs()
    t = torch.tensor([100, 700])
    cfg = GuidanceConfig(guidance_scale=7.5)
    grad = guidance_gradient(prior, latents, t, noise, conditions, "sds", 1, cfg)
    e_c, e_u = (raw_eps(prior, latents, t, noise, conditions[r]) for r in ("cond", "uncond"))
    assert not torch.allclose(e_c, e_u)
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert_close(grad, w * (e_u + 7.5 * (e_c - e_u) - noise))
    # the bridge's stage one is SDS with CFG
    assert torch.equal(guidance_gradient(prior, latents, t, noise, conditions, "bridge", 1, cfg), grad)


def test_bridge_stage_two_has_no_noise_term(prior, conditions):
    latents, noise = fixed_inputs()
    t = torch.tensor([300, 50])
    for weighting, scale in (("uniform", 1.0), ("sds", 40.0)):
        cfg = GuidanceConfig(stage2_scale=scale, stage2_weighting=weighting)
        grad = guidance_gradient(prior, latents, t, noise, conditions, "bridge", 2, cfg)
        e_t, e_s = (raw_eps(prior, latents, t, noise, conditions[r]) for r in ("target", "source"))
        assert not torch.allclose(e_t, e_s)
        w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1) if weighting == "sds" else 1.0
        assert_close(grad, w * scale * (e_t - e_s))


def test_nfsd_gradient_in_both_timestep_branches(prior, conditions):
    latents, noise = fixed_inputs()
    t = torch.tensor([150, 600])  # below and above 200
    cfg = GuidanceConfig(guidance_scale=7.5)
    grad = guidance_gradient(prior, latents, t, noise, conditions, "nfsd", 1, cfg)
    e_c, e_u, e_n = (raw_eps(prior, latents, t, noise, conditions[r]) for r in ("cond", "uncond", "negative"))
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert_close(grad[:1], w[:1] * (7.5 * (e_c - e_u) + e_u)[:1])
    assert_close(grad[1:], w[1:] * (7.5 * (e_c - e_u) + e_u - e_n)[1:])


def test_distill_injects_gradient_over_batch(prior, conditions):
    cfg = GuidanceConfig(guidance_scale=7.5)
    latents = fixed_inputs()[0].requires_grad_(True)
    result = distill(prior, latents, conditions, "sds", 0, cfg, generator=torch.Generator().manual_seed(3))
    result.loss.backward()
    # replay the sampling: t first, then noise, from the same generator
    g = torch.Generator().manual_seed(3)
    t = sample_timesteps(2, 0, cfg, 1, 1000, g)
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(result.t, t) and result.stage == 1
    grad = guidance_gradient(prior, latents.detach(), t, noise, conditions, "sds", 1, cfg)
    assert torch.allclose(latents.grad, grad / 2, atol=1e-6)
    assert result.grad_norm.item() == pytest.approx(float(grad.norm()), rel=1e-5)
    assert result.loss.item() == pytest.approx(0.5 * grad.square().sum().item() / 2, rel=1e-5)


def test_injected_loss_gradient_is_grad_over_batch():
    latents = torch.randn(3, 4, 5, 5, requires_grad=True)
    grad = torch.randn(3, 4, 5, 5)
    injected_loss(latents, grad).backward()
    assert torch.allclose(latents.grad, grad / 3, atol=1e-6)


def test_grad_clip_and_nan_handling(prior, conditions, monkeypatch):
    cfg = GuidanceConfig(guidance_scale=100.0, grad_clip=0.01)
    latents = fixed_inputs()[0].requires_grad_(True)
    result = distill(prior, latents, conditions, "sds", 0, cfg, generator=torch.Generator().manual_seed(0))
    result.loss.backward()
    assert latents.grad.abs().max() <= 0.01 / 2 + 1e-6  # (x - sg(x - g)) rounds at the scale of x
    monkeypatch.setattr(prior, "predict_noise", lambda x, t, c, p=None: torch.full_like(x, float("nan")))
    result = distill(prior, latents.detach().requires_grad_(True), conditions, "sds", 0, GuidanceConfig())
    assert torch.isfinite(result.loss) and result.grad_norm.item() == 0.0


def test_stage_is_derived_from_the_step():
    cfg = GuidanceConfig(stage2_start_step=20000)
    assert current_stage("bridge", 19999, cfg) == 1
    assert current_stage("bridge", 20000, cfg) == 2
    assert current_stage("bridge", 23456, cfg) == 2  # e.g. resumed past the switch
    assert current_stage("sds", 23456, cfg) == 1 and current_stage("nfsd", 23456, cfg) == 1


def test_distill_after_resume_is_stage_two(prior, conditions):
    cfg = GuidanceConfig(stage2_start_step=10)
    result = distill(prior, fixed_inputs()[0], conditions, "bridge", 12, cfg)
    assert result.stage == 2


def test_max_timestep_schedule_and_sampled_bounds():
    cfg = GuidanceConfig()  # max_step_percent [5000, 0.98, 0.5, 5001]
    assert max_step_percent(0, cfg, 1) == 0.98 and max_step_percent(4999, cfg, 1) == 0.98
    assert max_step_percent(5001, cfg, 1) == 0.5 and max_step_percent(24000, cfg, 2) == 0.5
    assert timestep_range(0, cfg, 1, 1000) == (20, 980) and timestep_range(6000, cfg, 1, 1000) == (20, 500)
    capped = dataclasses.replace(cfg, stage2_max_step_percent=0.2)
    assert max_step_percent(24000, capped, 2) == 0.2 and max_step_percent(24000, capped, 1) == 0.5
    g = torch.Generator().manual_seed(0)
    for step, stage, cfg_, high in ((0, 1, cfg, 980), (6000, 1, cfg, 500), (24000, 2, capped, 200)):
        t = sample_timesteps(4000, step, cfg_, stage, 1000, g)
        assert t.dtype == torch.long and t.shape == (4000,)
        assert t.min() == 20 and t.max() == high  # both ends are reached with 4000 samples


def test_weights():
    abar = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 999])
    assert torch.allclose(weight(t, abar, "sds"), (1 - abar[t]).view(2, 1, 1, 1))
    assert torch.equal(weight(t, abar, "uniform"), torch.ones(2, 1, 1, 1))


@pytest.mark.parametrize("method,step", [("sds", 0), ("bridge", 0), ("bridge", 30000), ("nfsd", 0)])
def test_guidance_step_on_a_batch_of_two_images(prior, conditions, method, step):
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to 64 inside
    result = guidance_step(prior, images, conditions, method, step, GuidanceConfig(guidance_scale=7.5),
                           camera_positions=torch.randn(2, 3), generator=torch.Generator().manual_seed(1))
    result.loss.backward()
    assert result.t.shape == (2,) and result.stage == (2 if step else 1)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_guidance_config_for_image_mode():
    cfg = Config(prompt="a cat")
    g = guidance_config_for_image(cfg)
    assert (g.guidance_scale, g.stage2_scale, g.stage2_weighting, g.weighting) == (40.0, 40.0, "sds", "sds")
    assert g.stage2_start_step == 500 and g.max_step_percent == 0.98 and g.min_step_percent == 0.02
    assert g.target_modifier == cfg.image.target_modifier and not g.view_dependent
    assert g.source_modifier == cfg.guidance.source_modifier
