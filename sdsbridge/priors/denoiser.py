"""The exact (optimal) denoiser of a finite image set, and Stable Diffusion's noise schedule.

For data uniformly distributed on images {x_i} and x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alpha-bar),
the posterior mean is
    E[x0 | x_t] = sum_i softmax_i(-|x_t - sqrt(a_t) x_i|^2 / (2 (1 - a_t))) x_i
and the optimal noise prediction is eps_hat = (x_t - sqrt(a_t) E[x0 | x_t]) / sqrt(1 - a_t).
Plain functions over tensors; the reference prior (reference.py) is built on them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's 'scaled_linear' schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2.

    Returns alpha-bar [T] float32 (computed in float64).
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def optimal_denoiser(x_t: torch.Tensor, t: torch.Tensor, images: Union[torch.Tensor, Sequence[torch.Tensor]],
                     alphas_cumprod: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     image_sqnorms: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """E[x0 | x_t] for an image set.

    x_t: [M, *S] noisy samples; t: [M] integer timesteps; images: [K, *S], or a list of blocks
    [K_b, *S] that together form the set (avoids concatenating large sets); alphas_cumprod: [T];
    mask: optional [M, K] bool, which images (in block order) each sample's set contains (each row needs
    at least one True); image_sqnorms: optional per-block [K_b] float64 |x_i|^2 (precomputed for speed).
    Returns [M, *S] in the dtype of x_t.

    The |x_t|^2 term is constant over i and dropped before the softmax; dot products use the images'
    dtype (float32 sets: a matmul), logits and the softmax are float64.
    """
    blocks = [images] if isinstance(images, torch.Tensor) else list(images)
    m = x_t.shape[0]
    flat = x_t.reshape(m, -1)
    a = alphas_cumprod.to(torch.float64)[t.long()].to(x_t.device)  # [M]
    sqrt_a = a.sqrt()[:, None]
    logits = []
    for j, block in enumerate(blocks):
        b = block.reshape(block.shape[0], -1)
        sqn = image_sqnorms[j] if image_sqnorms is not None else b.to(torch.float64).pow(2).sum(-1)
        dots = (flat.to(b.dtype) @ b.T).to(torch.float64)  # [M, K_b]
        # -|x_t - s x_i|^2 / (2(1-a)) = (s <x_t, x_i> - a |x_i|^2 / 2) / (1 - a) + const(i)
        logits.append((sqrt_a * dots - 0.5 * a[:, None] * sqn[None]) / (1.0 - a)[:, None])
    logits = torch.cat(logits, dim=1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    out = torch.zeros_like(flat, dtype=blocks[0].dtype)
    start = 0
    for block in blocks:
        k = block.shape[0]
        out = out + weights[:, start:start + k].to(block.dtype) @ block.reshape(k, -1)
        start += k
    return out.to(x_t.dtype).reshape(x_t.shape)


def noise_from_denoised(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor,
                        alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """eps_hat = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t); [M, *S] tensors, [M] timesteps."""
    a = alphas_cumprod.to(torch.float64)[t.long()].to(x_t.device)
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    sqrt_a = a.sqrt().reshape(shape)
    sigma = (1.0 - a).sqrt().reshape(shape)
    return ((x_t.to(torch.float64) - sqrt_a * x0_hat.to(torch.float64)) / sigma).to(x_t.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; [M, *S] tensors, [M] timesteps."""
    a = alphas_cumprod.to(x0.device, x0.dtype)[t.long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a.sqrt().reshape(shape) * x0 + (1.0 - a).sqrt().reshape(shape) * noise
