"""Score-distillation formulas as plain functions over tensors; the methods (``methods/``) combine them.

Notation: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps with eps ~ N(0, I) and abar_t the prior's
``alphas_cumprod``; eps_phi(x_t; y, t) is the prior's noise prediction; classifier-free guidance (CFG) is
eps^w(y) = eps(0) + w (eps(y) - eps(0)). A method produces a per-latent gradient g [N, C, h, w] that is
injected through ``injected_loss`` = 0.5 ||x - sg(x - g)||^2 / N, whose gradient with respect to x is g / N.

- SDS (and the bridge's stage one): g = w(t) (eps^w(y) - eps).
- Bridge stage two: g = w(t) s (eps(x_t; y_tgt) - eps(x_t; y_src)); no noise term, no unconditional branch.
- NFSD: g = w(t) (w_cfg (eps(y) - eps(0)) + delta), delta = eps(0) if t < 200 else eps(0) - eps(y_neg).
- VSD: g = w(t) (eps^w(y) - eps_lora(y, c)), eps_lora the same UNet with a LoRA trained on the renders.
- Perp-Neg replaces CFG's direction e = eps(y) - eps(0) by e + sum_i w_i perp(eps(y_i) - eps(0), e) for the
  negative prompts y_i (other views), perp(a, e) = a - (<a, e> / <e, e>) e per sample.

The SDS and bridge formulas keep the official code's order of floating-point operations, so results match
it bit for bit; do not reorder them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from sdsbridge.priors.base import Prior
from sdsbridge.scene.cameras import Cameras

NFSD_SMALL_T = 200
"""NFSD uses delta = eps(0) below this timestep (of T = 1000) and eps(0) - eps(y_neg) from it on."""


def timestep_range(min_percent: float, max_percent: float, num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive integer bounds (t_min, t_max) = (floor(min% T), floor(max% T)), t_max within [t_min, T-1]."""
    t_min = int(math.floor(min_percent * num_train_timesteps + 1e-6))
    t_max = int(math.floor(max_percent * num_train_timesteps + 1e-6))
    t_max = min(max(t_max, t_min), num_train_timesteps - 1)
    return t_min, t_max


def sample_timesteps(n: int, t_min: int, t_max: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n] integer timesteps, each uniform on {t_min, ..., t_max}, on the generator's device (CPU when
    None)."""
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


def predict_batched(prior: Prior, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: list[torch.Tensor],
                    cameras: Optional[Cameras] = None) -> list[torch.Tensor]:
    """The prior's noise prediction for each of K conditions ([N, ...] each) on the same noisy latents
    [N, C, h, w] and timesteps [N], in one batched ``predict_noise`` call of K * N samples. Returns K
    tensors [N, C, h, w] in the latents' dtype. ``cameras``: the N cameras the latents were rendered from, or None."""
    n, k = latents_noisy.shape[0], len(conditions)
    eps = prior.predict_noise(latents_noisy.repeat(k, 1, 1, 1), t.repeat(k), torch.cat(conditions),
                              None if cameras is None else cameras.repeat(k))
    return list(eps.to(latents_noisy.dtype).split(n))


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


def vsd_gradient(eps_pretrained: torch.Tensor, eps_lora: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """VSD: w (eps_pretrained - eps_lora), with eps_pretrained the CFG prediction of the pretrained UNet and
    eps_lora the LoRA's (the learned source); tensors [N, C, h, w], w [N, 1, 1, 1]."""
    return w * (eps_pretrained - eps_lora)


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The part of each x [N, C, h, w] perpendicular to y [N, C, h, w], per sample:
    x - (<x, y> / max(<y, y>, 1e-6)) y."""
    dot = (x * y).sum(dim=(1, 2, 3))
    norm2 = (y * y).sum(dim=(1, 2, 3)).clamp_min(1e-6)
    return x - (dot / norm2).view(-1, 1, 1, 1) * y


def perp_neg_direction(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eps_negatives: list[torch.Tensor],
                       weights: torch.Tensor) -> torch.Tensor:
    """Perp-Neg's guidance direction e_pos + sum_i weights[:, i] perp(eps_neg_i - eps_uncond, e_pos), with
    e_pos = eps_cond - eps_uncond; tensors [N, C, h, w], ``weights`` [N, K] for K negatives (negative
    values push away). CFG then uses eps_uncond + scale * direction."""
    e_pos = eps_cond - eps_uncond
    accumulated = torch.zeros_like(e_pos)
    for i, eps_neg in enumerate(eps_negatives):
        accumulated = accumulated + weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(eps_neg - eps_uncond, e_pos)
    return e_pos + accumulated
