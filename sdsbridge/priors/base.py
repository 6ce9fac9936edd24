"""The prior interface: what score distillation needs from a diffusion model.

Two implementations: Stable Diffusion through diffusers (stable_diffusion.py) and the exact reference
prior of built-in shapes (reference.py). Guidance code only talks to this Protocol.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch


class Prior(Protocol):
    """A frozen diffusion prior.

    Conditions ("embeddings") are whatever ``embed_prompts`` returns: a tensor whose first dimension
    indexes prompts, so they can be indexed and concatenated (float text embeddings for SD, integer
    condition ids for the reference prior).
    """

    image_resolution: int
    """Renders are resized (bilinearly) to this square size before ``encode_images``."""
    num_train_timesteps: int
    """T, usually 1000."""
    alphas_cumprod: torch.Tensor
    """[T] float32 on ``device``: alpha-bar_t of the noise schedule."""
    device: torch.device

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> [P, ...] conditions (no gradient)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] images in [0, 1] (R = image_resolution) -> [N, C, h, w] latents, differentiable."""

    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                      camera_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One batched evaluation: [M, C, h, w] noisy latents, [M] integer timesteps, [M, ...] conditions
        -> [M, C, h, w] predicted noise (float32, no gradient). ``camera_positions`` ([M, 3], world
        space) is used only by the reference prior's nearest-view conditioning; others ignore it."""
