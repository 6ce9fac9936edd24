"""The background: a colour per viewing direction, as seen at infinity (no parallax)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sdsbridge.config import SceneConfig


class Background(nn.Module):
    """Small MLP from the unit view direction to an RGB colour in [0, 1].

    Args:
        cfg: scene settings (``background_width`` is the hidden width).
        device: where the parameters live (default: the CPU).
        hidden_layers: hidden layers of the MLP.
    """

    def __init__(self, cfg: SceneConfig, device: Optional[torch.device | str] = None, hidden_layers: int = 2):
        super().__init__()
        width = cfg.background_width
        dims = [3] + [width] * hidden_layers + [3]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers).to(device)
        fixed = None if cfg.background_color is None else torch.tensor(cfg.background_color, dtype=torch.float32)
        self.register_buffer("fixed_color", fixed, persistent=False)

    def forward(self, dirs: Tensor) -> Tensor:
        """[..., 3] view directions (normalised here) -> [..., 3] rgb in [0, 1] (the fixed colour when
        ``SceneConfig.background_color`` is set; the MLP then gets no gradient)."""
        if self.fixed_color is not None:
            return self.fixed_color.to(dirs).expand(*dirs.shape[:-1], 3)
        dirs = torch.nn.functional.normalize(dirs, dim=-1)
        return torch.sigmoid(self.mlp(dirs.reshape(-1, 3))).reshape(*dirs.shape[:-1], 3)
