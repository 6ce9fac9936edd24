"""Score distillation: SDS, the SDS-Bridge (two stages) and NFSD as plain functions over tensors.

Notation (see shared DESIGN.md): x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps with eps ~ N(0, I);
eps_phi(x_t; y, t) is the prior's noise prediction; CFG eps^w(y) = eps(0) + w (eps(y) - eps(0)).
Every method produces a per-latent gradient g [N, C, h, w] that is injected through
``injected_loss`` = 0.5 ||x - sg(x - g)||^2 / N, whose gradient with respect to x is g / N.

- SDS (and the bridge's stage one): g = w(t) (eps^w(y) - eps).
- Bridge stage two: g = w(t) s (eps(x_t; y_tgt) - eps(x_t; y_src)); no noise term, no unconditional branch.
- NFSD: g = w(t) (w_cfg (eps(y) - eps(0)) + delta), delta = eps(0) if t < 200 else eps(0) - eps(y_neg).

Each step evaluates the prior once, batched: 2N samples for SDS and the bridge, 3N for NFSD (it needs
the negative prompt too; the official code makes two 2N calls).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sdsbridge.config import Config, GuidanceConfig
from sdsbridge.priors.base import Prior
from sdsbridge.schedules import schedule_value

NFSD_SMALL_T = 200
"""NFSD uses delta = eps(0) below this timestep (of T = 1000) and eps(0) - eps(y_neg) from it on."""


@dataclass
class GuidanceResult:
    """What one guidance evaluation returns (and what the trainer logs)."""

    loss: torch.Tensor
    """Scalar; backpropagating it puts grad / N on the latents (and through the VAE on the images)."""
    grad_norm: torch.Tensor
    """Scalar tensor on the prior's device: L2 norm of the injected gradient g over the whole batch (after
    clipping). A tensor, so reading it (``.item()``) is the caller's choice of when to sync."""
    t: torch.Tensor
    """[N] integer timesteps used."""
    stage: int
    """1 or 2 (bridge stage two)."""


def current_stage(method: str, step: int, cfg: GuidanceConfig) -> int:
    """The bridge is in stage two from ``cfg.stage2_start_step`` on (derived from the step, so a run
    resumed past the switch is in stage two); SDS and NFSD have one stage."""
    if method == "bridge" and step >= cfg.stage2_start_step:
        return 2
    return 1


def max_step_percent(step: int, cfg: GuidanceConfig, stage: int) -> float:
    """Upper end of t / T at ``step``: the scheduled ``cfg.max_step_percent``, capped in stage two by
    ``cfg.stage2_max_step_percent`` when set."""
    value = schedule_value(cfg.max_step_percent, step)
    if stage == 2 and cfg.stage2_max_step_percent is not None:
        value = min(value, cfg.stage2_max_step_percent)
    return value


def timestep_range(step: int, cfg: GuidanceConfig, stage: int, num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive integer bounds (t_min, t_max) = (floor(min% T), floor(max% T)), t_max within [t_min, T-1]."""
    t_min = int(math.floor(cfg.min_step_percent * num_train_timesteps + 1e-6))
    t_max = int(math.floor(max_step_percent(step, cfg, stage) * num_train_timesteps + 1e-6))
    t_max = min(max(t_max, t_min), num_train_timesteps - 1)
    return t_min, t_max


def sample_timesteps(n: int, step: int, cfg: GuidanceConfig, stage: int, num_train_timesteps: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n] integer timesteps, each uniform on {t_min, ..., t_max} (see ``timestep_range``), on the
    generator's device (CPU when None)."""
    t_min, t_max = timestep_range(step, cfg, stage, num_train_timesteps)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(t_min, t_max + 1, (n,), generator=generator, device=device, dtype=torch.long)


def weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str) -> torch.Tensor:
    """w(t) as [N, 1, 1, 1]: 'sds' = 1 - abar_t, 'uniform' = 1."""
    abar = alphas_cumprod[t.to(alphas_cumprod.device)].view(-1, 1, 1, 1)
    if kind == "sds":
        return 1.0 - abar
    if kind == "uniform":
        return torch.ones_like(abar)
    raise ValueError(f"unknown weighting {kind!r}")


def sds_gradient(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, noise: torch.Tensor, w: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """SDS with CFG: w (eps_uncond + scale (eps_cond - eps_uncond) - noise); tensors [N, C, h, w], w
    broadcastable ([N, 1, 1, 1])."""
    return w * (eps_uncond + scale * (eps_cond - eps_uncond) - noise)


def bridge_gradient(eps_tgt: torch.Tensor, eps_src: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """Bridge stage two: w scale (eps_tgt - eps_src)."""
    return w * scale * (eps_tgt - eps_src)


def nfsd_gradient(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eps_neg: torch.Tensor, t: torch.Tensor,
                  w: torch.Tensor, scale: float, small_t: int = NFSD_SMALL_T) -> torch.Tensor:
    """NFSD: w (scale (eps_cond - eps_uncond) + delta), delta = eps_uncond where t < small_t, else
    eps_uncond - eps_neg (chosen per sample; ``t`` is [N])."""
    small = (t.to(eps_uncond.device) < small_t).view(-1, 1, 1, 1)
    delta = torch.where(small, eps_uncond, eps_uncond - eps_neg)
    return w * (scale * (eps_cond - eps_uncond) + delta)


def injected_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||latents - sg(latents - grad)||^2 / N (sum over all elements, N = batch size): a scalar whose
    gradient with respect to ``latents`` is grad / N."""
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / latents.shape[0]


def _required(conditions: dict[str, torch.Tensor], roles: tuple[str, ...]) -> list[torch.Tensor]:
    missing = [role for role in roles if role not in conditions]
    if missing:
        raise KeyError(f"conditions lack roles {missing} (have {sorted(conditions)})")
    return [conditions[role] for role in roles]


def guidance_gradient(prior: Prior, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      conditions: dict[str, torch.Tensor], method: str, stage: int, cfg: GuidanceConfig,
                      camera_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient g [N, C, h, w] of ``method`` at ``stage`` for given timesteps t [N] and noise
    [N, C, h, w] (no clipping, no NaN handling). One batched ``prior.predict_noise`` call.

    ``conditions`` maps roles to [N, ...] conditions (see prompts.py): 'cond' and 'uncond' for SDS and
    stage one, 'target' and 'source' for stage two, plus 'negative' for NFSD.
    """
    n = latents.shape[0]
    t = t.to(prior.device)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    latents_noisy = abar.sqrt() * latents.detach() + (1.0 - abar).sqrt() * noise

    if method == "nfsd":
        roles = ("cond", "uncond", "negative")
    elif stage == 2:
        roles = ("target", "source")
    else:
        roles = ("cond", "uncond")
    conds = torch.cat(_required(conditions, roles))
    k = len(roles)
    positions = None if camera_positions is None else camera_positions.repeat(k, 1)
    eps = prior.predict_noise(latents_noisy.repeat(k, 1, 1, 1), t.repeat(k), conds, positions)
    eps = eps.to(latents.dtype).split(n)

    if method == "nfsd":
        w = weight(t, prior.alphas_cumprod, cfg.weighting)
        return nfsd_gradient(eps[0], eps[1], eps[2], t, w, cfg.guidance_scale)
    if stage == 2:
        w = weight(t, prior.alphas_cumprod, cfg.stage2_weighting)
        return bridge_gradient(eps[0], eps[1], w, cfg.stage2_scale)
    w = weight(t, prior.alphas_cumprod, cfg.weighting)
    return sds_gradient(eps[0], eps[1], noise, w, cfg.guidance_scale)


def distill(prior: Prior, latents: torch.Tensor, conditions: dict[str, torch.Tensor], method: str, step: int,
            cfg: GuidanceConfig, camera_positions: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None) -> GuidanceResult:
    """One score-distillation evaluation on latents [N, C, h, w] (with grad to what produced them).

    Samples t (``sample_timesteps``) and then noise ``torch.randn`` from ``generator`` (in that order),
    computes g with ``guidance_gradient``, replaces NaNs, clips to [-grad_clip, grad_clip] when set, and
    returns the injected loss with grad norm, t and stage.
    """
    stage = current_stage(method, step, cfg)
    n = latents.shape[0]
    t = sample_timesteps(n, step, cfg, stage, prior.num_train_timesteps, generator).to(prior.device)
    noise_device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=noise_device, dtype=latents.dtype)
    noise = noise.to(latents.device)

    grad = guidance_gradient(prior, latents, t, noise, conditions, method, stage, cfg, camera_positions)
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if cfg.grad_clip is not None:
        grad = grad.clamp(-cfg.grad_clip, cfg.grad_clip)
    return GuidanceResult(loss=injected_loss(latents, grad), grad_norm=grad.norm().detach(), t=t, stage=stage)


def guidance_step(prior: Prior, images: torch.Tensor, conditions: dict[str, torch.Tensor], method: str,
                  step: int, cfg: GuidanceConfig, camera_positions: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> GuidanceResult:
    """Images [N, 3, H, W] in [0, 1] -> encoded by the prior (which resizes them) and distilled
    (``distill``). The loss backpropagates to ``images``."""
    latents = prior.encode_images(images)
    return distill(prior, latents, conditions, method, step, cfg, camera_positions, generator)


def guidance_config_for_image(cfg: Config) -> GuidanceConfig:
    """The GuidanceConfig of the 2D image mode: ``cfg.image``'s scales, weighting, switch step, timestep
    range and target modifier (official 2D code), no view suffixes; modifiers, NFSD negative and grad clip
    from ``cfg.guidance``."""
    im = cfg.image
    return dataclasses.replace(
        cfg.guidance,
        guidance_scale=im.guidance_scale,
        weighting="sds",
        stage2_start_step=im.stage2_start_step,
        stage2_scale=im.stage2_scale,
        stage2_weighting=im.stage2_weighting,
        stage2_max_step_percent=None,
        min_step_percent=im.min_step_percent,
        max_step_percent=im.max_step_percent,
        target_modifier=im.target_modifier,
        cfg_on_target=False,
        view_dependent=False,
    )
