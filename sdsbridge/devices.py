"""Devices: which one a ``device:`` setting names, where a module lives, and seeding every RNG.

Accepted names (``config.DEVICE_PATTERN``): ``auto`` (the first CUDA device when torch sees one, else the
CPU), ``cpu``, ``cuda`` (the current CUDA device) and ``cuda:N`` (GPU number N).
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
from torch import nn

from sdsbridge.config import DEVICE_PATTERN
from sdsbridge.errors import UserError

_DEVICE = re.compile(DEVICE_PATTERN)


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` names. UserError (one line) for a malformed name, a CUDA device when torch
    sees none, or a GPU number this machine does not have."""
    name = str(name).strip()
    if not _DEVICE.match(name):
        raise UserError(f"device: '{name}' is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device: '{name}' was asked for but torch sees no CUDA device (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device: '{name}': torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module without tensors)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
