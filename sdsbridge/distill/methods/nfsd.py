"""Noise-Free Score Distillation (Katzir et al. 2024), a baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.distill.formulas import nfsd_gradient, weight
from sdsbridge.distill.methods.base import Method, register_method
from sdsbridge.distill.methods.sds import SDSSettings

NFSD_NEGATIVE = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
"""NFSD's negative prompt (the paper's)."""


@dataclass
class NFSDSettings(SDSSettings):
    """NFSD's ``guidance:`` settings: SDS's CFG scale (of eps(y) - eps(0); the preset configs/nfsd.yaml sets the
    paper's 7.5) and weighting, and the negative prompt."""

    nfsd_negative: str = NFSD_NEGATIVE
    """The negative prompt y_neg."""


@register_method
class NFSD(Method):
    """g = w(t) (scale (eps(y) - eps(0)) + delta), delta = eps(0) for t < 200 and eps(0) - eps(y_neg)
    above: prompt roles 'cond', 'uncond' and 'negative' (3 predictions per sample, one batched call).

    Settings: ``guidance_scale``, ``weighting``, ``nfsd_negative`` (y_neg), and the base class's.
    """

    name = "nfsd"
    summary = "Noise-Free Score Distillation (Katzir et al.), a baseline"
    Settings = NFSDSettings

    def role_texts(self, prompt: str) -> dict[str, str]:
        return {**super().role_texts(prompt), "negative": self.settings.nfsd_negative.strip()}

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        t = t.to(self.prior.device)
        *eps, eps_neg = self.predict(latents, t, noise, conditions, self.cfg_roles(conditions) + ("negative",), cameras)
        eps_cond, eps_uncond = self.cfg_predictions(eps, conditions)
        w = weight(t, self.prior.alphas_cumprod, self.settings.weighting)
        return nfsd_gradient(eps_cond, eps_uncond, eps_neg, t, w, self.settings.guidance_scale)

    def scale_settings(self, stage: int) -> tuple[str, ...]:
        return ("guidance_scale",)
