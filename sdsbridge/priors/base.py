"""The prior interface: what score distillation needs from a diffusion model, the settings every prior
reads, and the registry of prior kinds.

Two implementations: Stable Diffusion through diffusers (stable_diffusion.py) and the exact reference
prior of built-in shapes (reference.py). Methods only talk to the ``Prior`` Protocol and ask a prior's
``capabilities`` for what not every prior has. A prior class registers itself under its ``kind``
(``register_prior``) with its ``Settings`` (the ``prior:`` section), ``load`` and its checks before a run
(``check_prompt``, ``check_machine``). The
noise-schedule arithmetic (``noisy_latents``, ``alpha_bar``) lives here too, so that priors (VSD's LoRA) and
methods both import it downward.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol

import torch
import torch.nn.functional as F

from sdsbridge.common.checks import check
from sdsbridge.common.devices import DEVICE_PATTERN
from sdsbridge.scene.cameras import Cameras


@dataclass
class PriorSettings:
    """What every prior reads (the ``prior:`` keys they share)."""

    kind: str = "stable-diffusion"
    """Which prior (``PRIORS``): 'stable-diffusion' (diffusers) or 'reference' (exact denoiser of built-in shapes,
    CPU friendly)."""
    device: Optional[str] = None
    """Where the prior runs in 3D training: None = the scene's ``device``; else cpu, cuda or cuda:N. Renders go to it
    (resized there) and their gradients come back to the scene's device, so a second GPU can hold the UNet
    and VAE (most of the memory at 512 px) while the first holds the scene."""

    def validate(self) -> None:
        """UserError naming the first bad ``prior.*`` key. Subclasses check their own fields, then call this."""
        check(self.device is None or re.match(DEVICE_PATTERN, self.device) is not None, "prior.device",
              f"'{self.device}' is not one of null (the scene's device), auto, cpu, cuda, cuda:N")


PRIORS: dict[str, type] = {}
"""Prior kind (``prior.kind``) -> class, filled by ``register_prior`` where each class is defined (priors/
imports its modules)."""


def register_prior(cls: type) -> type:
    """Class decorator: ``PRIORS[cls.kind] = cls``. The class gives ``kind``, ``Settings``, ``capabilities``,
    ``load(settings, device, camera_cfg)``, ``check_prompt(prompt)`` and ``check_machine(settings)``."""
    if cls.kind in PRIORS and PRIORS[cls.kind] is not cls:
        raise ValueError(f"prior kind {cls.kind!r} is registered twice")
    PRIORS[cls.kind] = cls
    return cls


class Prior(Protocol):
    """A frozen diffusion prior.

    Conditions ("embeddings") are whatever ``embed_prompts`` returns: a tensor whose first dimension
    indexes prompts, so they can be indexed and concatenated (float text embeddings for SD, integer
    condition ids for the reference prior).
    """

    capabilities: ClassVar[frozenset[str]]
    """What not every prior has (``methods.base.PRIOR_CAPABILITIES``): 'text' (free-text embeddings that can be
    blended), 'adapters' (a UNet that takes LoRA adapters)."""
    image_resolution: int
    """R: ``encode_images`` resizes images (bilinearly) to R x R first."""
    num_train_timesteps: int
    """T, usually 1000."""
    alphas_cumprod: torch.Tensor
    """[T] float32 on ``device``: alpha-bar_t of the noise schedule."""
    device: torch.device

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> [P, ...] conditions (no gradient)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images in [0, 1] on any device -> [N, C, h, w] latents on ``device``, differentiable
        with respect to ``images`` (which are moved to ``device`` and resized to R x R by ``to_prior_images``)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latents -> [N, 3, R, R] float32 images in [0, 1] on ``device`` (no gradient)."""

    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                      cameras: Optional[Cameras] = None) -> torch.Tensor:
        """One batched evaluation: [M, C, h, w] noisy latents, [M] integer timesteps, [M, ...] conditions
        -> [M, C, h, w] predicted noise (float32, no gradient). ``cameras``: the M cameras the latents were
        rendered from (None in 2D), for priors that condition on the camera (the reference prior's nearest
        views; a multi-view prior's poses); others ignore them."""


def to_prior_images(images: torch.Tensor, resolution: int, device: torch.device) -> torch.Tensor:
    """[N, 3, H, W] images -> [N, 3, R, R] on ``device`` (R = ``resolution``), resized bilinearly (corners
    not aligned) only if H x W differs. Differentiable, so gradients flow back to the images' own device:
    the one place renders are resized for a prior, and what lets the prior live on another GPU than the
    scene."""
    images = images.to(device)
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(images, (resolution, resolution), mode="bilinear", align_corners=False)
    return images


def noisy_latents(latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) sg(x) + sqrt(1 - abar_t) noise for latents and noise [N, C, h, w], t [N] on
    ``alphas_cumprod``'s device."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * latents.detach() + (1.0 - abar).sqrt() * noise
