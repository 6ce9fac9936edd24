"""Diffusion priors: Stable Diffusion (diffusers) and the exact reference prior of built-in shapes, found by
``prior.kind`` in ``PRIORS``.

``load_prior`` is the one loader users, the trainer, the 2D image mode and the tests go through. Every module of
this folder is imported here (none imports diffusers before it needs it), so a prior's file registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

import torch

from sdsbridge.common.errors import UserError
from sdsbridge.priors.base import PRIORS, Prior, PriorSettings, register_prior
from sdsbridge.scene.cameras import CameraConfig

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
_registered = sorted(PRIORS.items())  # by name, whatever order the files imported in
PRIORS.clear()
PRIORS.update(_registered)


def prior_class(kind: str) -> type:
    """The prior class registered as ``kind``; UserError naming the registered ones otherwise."""
    if kind not in PRIORS:
        raise UserError(f"prior.kind: '{kind}' is not one of {', '.join(PRIORS)}")
    return PRIORS[kind]


def load_prior(settings: PriorSettings, device: torch.device | str, camera_cfg: Optional[CameraConfig] = None) -> Prior:
    """Build the prior ``settings.kind`` names on ``device`` (``camera_cfg``: the training cameras, which the
    reference prior renders its image sets with; defaults when None)."""
    return prior_class(settings.kind).load(settings, torch.device(device), camera_cfg or CameraConfig())


__all__ = ["PRIORS", "Prior", "PriorSettings", "load_prior", "prior_class", "register_prior"]
