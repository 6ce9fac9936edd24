"""The background: a colour per viewing direction, as seen at infinity (no parallax).

As threestudio's NeuralEnvironmentMapBackground: the unit direction d is mapped to (d + 1) / 2 and encoded by
tinycudann's SphericalHarmonics (which maps its [0, 1] input back to [-1, 1], so the coefficients are those
of d itself), then a bias-free MLP (``background_width`` wide, 2 hidden layers) and a sigmoid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdsbridge.scene.nerf.activations import sigmoid
from sdsbridge.scene.nerf.settings import SceneConfig
from sdsbridge.scene.nerf.networks import mlp, spherical_harmonics


class Background(nn.Module):
    """View direction -> RGB colour in [0, 1].

    Args:
        cfg: scene settings (``background_width``, ``background_sh_degree``, ``background_color``).
        device: where the parameters live (default: the CPU).
        hidden_layers: hidden layers of the MLP.
    """

    def __init__(self, cfg: SceneConfig, device: Optional[torch.device | str] = None, hidden_layers: int = 2):
        super().__init__()
        self.sh_degree = cfg.background_sh_degree
        self.mlp = mlp(self.sh_degree ** 2, 3, cfg.background_width, hidden_layers).to(device)
        fixed = None if cfg.background_color is None else torch.tensor(cfg.background_color, dtype=torch.float32)
        self.register_buffer("fixed_color", fixed, persistent=False)

    def forward(self, dirs: Tensor) -> Tensor:
        """[..., 3] view directions (normalised here) -> [..., 3] rgb in [0, 1] (the fixed colour when
        ``SceneConfig.background_color`` is set; the MLP then gets no gradient)."""
        if self.fixed_color is not None:
            return self.fixed_color.to(dirs).expand(*dirs.shape[:-1], 3)
        unit = F.normalize(dirs.reshape(-1, 3), dim=-1)
        # (d + 1) / 2 into tcnn's encoding and back to [-1, 1] inside it: a no-op pair kept implicit here.
        encoded = spherical_harmonics(unit, self.sh_degree)
        return sigmoid(self.mlp(encoded)).reshape(*dirs.shape[:-1], 3)
