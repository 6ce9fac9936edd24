"""Score Distillation Sampling (DreamFusion) with classifier-free guidance."""

from __future__ import annotations

from typing import Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.distill.formulas import sds_gradient, weight
from sdsbridge.distill.methods.base import Method


class SDS(Method):
    """g = w(t) (eps(0) + scale (eps(y) - eps(0)) - eps): prompt roles 'cond' and 'uncond', one stage.

    Settings: ``guidance_scale`` (CFG scale), ``weighting`` (w(t): 'sds' = 1 - abar_t or 'uniform'), and
    the base class's.
    """

    name = "sds"

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        t = t.to(self.prior.device)
        eps = self.predict(latents, t, noise, conditions, self.cfg_roles(conditions), cameras)
        eps_cond, eps_uncond = self.cfg_predictions(eps, conditions)
        w = weight(t, self.prior.alphas_cumprod, self.settings.weighting)
        return sds_gradient(eps_cond, eps_uncond, noise, w, self.settings.guidance_scale)
