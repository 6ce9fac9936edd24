"""Diffusion priors: Stable Diffusion (diffusers) and the exact reference prior of built-in shapes.

``load_prior`` is the one loader users, the trainer, the 2D image mode and the tests go through.
"""

from __future__ import annotations

from typing import Optional

import torch

from sdsbridge.config.schema import CameraConfig, PriorConfig
from sdsbridge.priors.base import Prior


def load_prior(cfg: PriorConfig, device: torch.device | str, camera_cfg: Optional[CameraConfig] = None) -> Prior:
    """Build the prior ``cfg.kind`` names on ``device``.

    'stable-diffusion' loads ``cfg.model`` (hub id or local folder); 'reference' renders its reference
    image sets with the training camera distribution ``camera_cfg`` (defaults when None).
    """
    if cfg.kind == "stable-diffusion":
        from sdsbridge.priors.stable_diffusion import StableDiffusionPrior

        return StableDiffusionPrior.from_config(cfg, device)
    if cfg.kind == "reference":
        from sdsbridge.priors.reference import ReferencePrior

        return ReferencePrior.from_config(cfg, camera_cfg or CameraConfig(), device)
    raise ValueError(f"unknown prior kind {cfg.kind!r}")  # config validation rejects this earlier


__all__ = ["Prior", "load_prior"]
