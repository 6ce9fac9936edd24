"""The methods' gradients against their formulas, computed by hand from raw prior predictions; timestep
ranges, stages, injection, clipping; the method contract (roles, parameters, state)."""


import pytest
import torch

from sdsbridge.common.errors import UserError

from sdsbridge.config.schema import METHODS, Config
from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.distill.formulas import injected_loss, sample_timesteps, timestep_range, weight
from sdsbridge.training.image2d import image_guidance_config
from sdsbridge.distill.methods import Method, make_method
from sdsbridge.distill.methods.bridge import Bridge
from sdsbridge.distill.methods.nfsd import NFSD
from sdsbridge.distill.methods.sds import SDS
from sdsbridge.distill.methods.vsd import VSD, BridgeVSD
from sdsbridge.priors import load_prior
from sdsbridge.distill.prompts import PromptEmbeddings

LABELS = ["front", "back"]


@pytest.fixture(scope="module")
def prior(tiny_sd_dir):
    return load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu")


@pytest.fixture(scope="module")
def conditions(prior):
    cfg = dict(target_modifier="sharp")
    bridge = PromptEmbeddings(prior, Bridge(cfg, prior).role_texts("a red torus")).conditions(LABELS)
    nfsd = PromptEmbeddings(prior, NFSD(cfg, prior).role_texts("a red torus")).conditions(LABELS)
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


def test_factory_builds_every_configured_method(prior):
    for name in METHODS:
        method = make_method(name, dict(), prior)
        assert isinstance(method, Method) and method.name == name
    assert {type(make_method(n, dict(), prior)) for n in METHODS} >= {SDS, Bridge, NFSD, VSD, BridgeVSD}
    assert all(type(make_method(n, None, prior)) is METHODS[n] for n in METHODS)
    with pytest.raises(UserError, match="method: 'dds' is not one of bridge, bridge-vsd, "):
        make_method("dds", dict(), prior)


def test_each_method_names_its_prompt_roles(prior):
    roles = {name: tuple(make_method(name, dict(), prior).role_texts("a cat"))
             for name in ("sds", "bridge", "nfsd", "vsd", "bridge-vsd")}
    assert roles == {"sds": ("cond", "uncond"), "bridge": ("cond", "uncond", "target", "source"),
                     "nfsd": ("cond", "uncond", "negative"), "vsd": ("cond", "uncond", "lora"),
                     "bridge-vsd": ("cond", "uncond", "target", "lora")}


def test_sds_gradient_is_cfg_minus_noise(prior, conditions):
    latents, noise = fixed_inputs()
    t = torch.tensor([100, 700])
    cfg = dict(guidance_scale=7.5)
    grad = SDS(cfg, prior).gradient(latents, t, noise, conditions, 1)
    e_c, e_u = (raw_eps(prior, latents, t, noise, conditions[r]) for r in ("cond", "uncond"))
    assert not torch.allclose(e_c, e_u)
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert_close(grad, w * (e_u + 7.5 * (e_c - e_u) - noise))
    # the bridge's stage one is SDS with CFG
    assert torch.equal(Bridge(cfg, prior).gradient(latents, t, noise, conditions, 1), grad)


def test_bridge_stage_two_has_no_noise_term(prior, conditions):
    latents, noise = fixed_inputs()
    t = torch.tensor([300, 50])
    for weighting, scale in (("uniform", 1.0), ("sds", 40.0)):
        cfg = dict(stage2_scale=scale, stage2_weighting=weighting)
        grad = Bridge(cfg, prior).gradient(latents, t, noise, conditions, 2)
        e_t, e_s = (raw_eps(prior, latents, t, noise, conditions[r]) for r in ("target", "source"))
        assert not torch.allclose(e_t, e_s)
        w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1) if weighting == "sds" else 1.0
        assert_close(grad, w * scale * (e_t - e_s))


def test_nfsd_gradient_in_both_timestep_branches(prior, conditions):
    latents, noise = fixed_inputs()
    t = torch.tensor([150, 600])  # below and above 200
    grad = NFSD(dict(guidance_scale=7.5), prior).gradient(latents, t, noise, conditions, 1)
    e_c, e_u, e_n = (raw_eps(prior, latents, t, noise, conditions[r]) for r in ("cond", "uncond", "negative"))
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert_close(grad[:1], w[:1] * (7.5 * (e_c - e_u) + e_u)[:1])
    assert_close(grad[1:], w[1:] * (7.5 * (e_c - e_u) + e_u - e_n)[1:])


def test_missing_roles_are_named(prior, conditions):
    latents, noise = fixed_inputs()
    with pytest.raises(KeyError, match="lack roles"):
        NFSD(dict(), prior).gradient(latents, torch.tensor([1, 2]), noise, {"cond": conditions["cond"]}, 1)


def test_distill_injects_gradient_over_batch(prior, conditions):
    cfg = dict(guidance_scale=7.5)
    method = SDS(cfg, prior)
    latents = fixed_inputs()[0].requires_grad_(True)
    result = method.distill(latents, conditions, 0, generator=torch.Generator().manual_seed(3))
    result.loss.backward()
    # replay the sampling: t first, then noise, from the same generator
    g = torch.Generator().manual_seed(3)
    t = sample_timesteps(2, 20, 980, g)
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(result.t, t) and result.stage == 1 and result.extra_losses == {}
    grad = method.gradient(latents.detach(), t, noise, conditions, 1)
    assert torch.allclose(latents.grad, grad / 2, atol=1e-6)
    assert result.grad_norm.item() == pytest.approx(float(grad.norm()), rel=1e-5)
    assert result.loss.item() == pytest.approx(0.5 * grad.square().sum().item() / 2, rel=1e-5)


def test_injected_loss_gradient_is_grad_over_batch():
    latents = torch.randn(3, 4, 5, 5, requires_grad=True)
    grad = torch.randn(3, 4, 5, 5)
    injected_loss(latents, grad).backward()
    assert torch.allclose(latents.grad, grad / 3, atol=1e-6)


def test_grad_clip_and_nan_handling(prior, conditions, monkeypatch):
    latents = fixed_inputs()[0].requires_grad_(True)
    result = SDS(dict(guidance_scale=100.0, grad_clip=0.01), prior).distill(
        latents, conditions, 0, generator=torch.Generator().manual_seed(0))
    result.loss.backward()
    assert latents.grad.abs().max() <= 0.01 / 2 + 1e-6  # (x - sg(x - g)) rounds at the scale of x
    real = prior.predict_noise

    def half_nan(x, t, c, p=None):  # NaN in the left half of every prediction
        eps = real(x, t, c, p)
        return torch.where(torch.arange(eps.shape[-1]) < eps.shape[-1] // 2, float("nan"), eps)

    monkeypatch.setattr(prior, "predict_noise", half_nan)
    result = SDS(dict(), prior).distill(latents.detach().requires_grad_(True), conditions, 0)
    assert torch.isfinite(result.loss) and bool(result.guidance_finite)  # the NaNs became 0, the rest is learnt
    assert 0.0 < result.grad_norm.item()
    # NaN everywhere (an overflowing scale): nothing to learn, so the loss is NaN and the trainer skips the step
    monkeypatch.setattr(prior, "predict_noise", lambda x, t, c, p=None: torch.full_like(x, float("nan")))
    fresh = latents.detach().requires_grad_(True)
    result = SDS(dict(), prior).distill(fresh, conditions, 0)
    assert torch.isnan(result.loss) and not bool(result.guidance_finite) and result.grad_norm.item() == 0.0
    result.loss.backward()
    assert torch.isfinite(fresh.grad).all()


def test_stage_is_derived_from_the_step(prior):
    bridge = Bridge(dict(stage2_start_step=20000), prior)
    assert bridge.stage(19999) == 1 and bridge.stage(20000) == 2
    assert bridge.stage(23456) == 2  # e.g. resumed past the switch
    assert SDS(None, prior).stage(23456) == 1 and NFSD(None, prior).stage(23456) == 1
    assert Bridge.stage_starts(bridge.settings) == (20000,) and SDS.stage_starts(SDS.Settings()) == ()


def test_distill_after_resume_is_stage_two(prior, conditions):
    result = Bridge(dict(stage2_start_step=10), prior).distill(fixed_inputs()[0], conditions, 12)
    assert result.stage == 2


def test_max_timestep_schedule_and_sampled_bounds(prior):
    bridge = Bridge(dict(stage2_start_step=20000), prior)  # max_step_percent [5000, 0.98, 0.5, 5001]
    assert bridge.max_step_percent(0) == 0.98 and bridge.max_step_percent(4999) == 0.98
    assert bridge.max_step_percent(5001) == 0.5 and bridge.max_step_percent(24000) == 0.5
    assert timestep_range(0.02, 0.98, 1000) == (20, 980) and timestep_range(0.02, 0.5, 1000) == (20, 500)
    capped = Bridge(dict(stage2_start_step=20000, stage2_max_step_percent=0.2), prior)
    assert capped.max_step_percent(24000) == 0.2 and capped.max_step_percent(19000) == 0.5
    assert SDS(None, prior).max_step_percent(24000) == 0.5  # no stage two to cap
    g = torch.Generator().manual_seed(0)
    for low, high in ((20, 980), (20, 500), (20, 200)):
        t = sample_timesteps(4000, low, high, g)
        assert t.dtype == torch.long and t.shape == (4000,)
        assert t.min() == low and t.max() == high  # both ends are reached with 4000 samples


def test_weights():
    abar = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 999])
    assert torch.allclose(weight(t, abar, "sds"), (1 - abar[t]).view(2, 1, 1, 1))
    assert torch.equal(weight(t, abar, "uniform"), torch.ones(2, 1, 1, 1))


@pytest.mark.parametrize("name,step", [("sds", 0), ("bridge", 0), ("bridge", 30000), ("nfsd", 0)])
def test_distill_on_encoded_images_reaches_the_images(prior, conditions, name, step):
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to 64 by the prior
    method = make_method(name, dict(guidance_scale=7.5), prior)
    result = method.distill(prior.encode_images(images), conditions, step, generator=torch.Generator().manual_seed(1))
    result.loss.backward()
    assert result.t.shape == (2,) and result.stage == (2 if step else 1)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_base_method_has_no_parameters_or_state(prior):
    method = SDS(dict(), prior)
    assert method.param_groups() == [] and method.state_dict() == {}
    method.load_state_dict({})
    with pytest.raises(KeyError, match="unexpected method state"):
        method.load_state_dict({"lora": torch.zeros(1)})


def test_image_guidance_config():
    cfg = Config(prompt="a cat")
    g = image_guidance_config(cfg)
    assert (g.guidance_scale, g.stage2_scale, g.stage2_weighting, g.weighting) == (40.0, 40.0, "sds", "sds")
    assert g.stage2_start_step == 500 and g.max_step_percent == 0.98 and g.min_step_percent == 0.02
    assert g.target_modifier == cfg.image.target_modifier and not g.view_dependent and not g.cfg_on_target
    assert g.source_modifier == cfg.guidance.source_modifier
