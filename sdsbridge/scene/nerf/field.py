"""The radiance field: hash-grid features -> two parallel heads, density (with the Magic3D blob) and a
view-independent colour, as threestudio's ImplicitVolume (its "density network" and "feature network").

World coordinates live in the cube [-radius, radius]^3; the hash grid sees them mapped to [0, 1]^3.
Density is softplus(raw + blob), blob = blob_density * (1 - |x| / blob_radius), and zero outside the cube.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdsbridge.scene.nerf.settings import SceneConfig
from sdsbridge.scene.nerf.activations import sigmoid, softplus
from sdsbridge.scene.nerf.encoding import HashGridEncoding
from sdsbridge.scene.nerf.networks import mlp


def blob_density(x: Tensor, peak: float, radius: float) -> Tensor:
    """Magic3D density blob: [N, 3] points -> [N] pre-activation offsets peak * (1 - |x| / radius)."""
    return peak * (1.0 - x.norm(dim=-1) / radius)


def inside_cube(x: Tensor, radius: float) -> Tensor:
    """[N, 3] points -> [N] bool, True inside the closed cube [-radius, radius]^3."""
    return (x.abs() <= radius).all(dim=-1)


class NeRFField(nn.Module):
    """Density and colour of the scene: two bias-free MLPs side by side on the hash-grid features, density
    enc -> width -> 1 and colour enc -> width -> 3 (sigmoid), so colour gradients never reshape density.

    Args:
        cfg: scene settings (grid shape, MLP width/depth, blob, radius).
        device: where the parameters live (default: the CPU).
    """

    def __init__(self, cfg: SceneConfig, device: Optional[torch.device | str] = None):
        super().__init__()
        self.radius = float(cfg.radius)
        self.blob_peak = float(cfg.blob_density)
        self.blob_radius = float(cfg.blob_radius)
        self.encoding = HashGridEncoding(
            n_levels=cfg.n_levels, n_features_per_level=cfg.n_features_per_level,
            log2_hashmap_size=cfg.log2_hashmap_size, base_resolution=cfg.base_resolution,
            per_level_scale=cfg.per_level_scale, backend=cfg.backend, device=device)
        features = self.encoding.n_output_dims
        self.density_mlp = mlp(features, 1, cfg.mlp_width, cfg.mlp_hidden_layers).to(device)
        self.color_mlp = mlp(features, 3, cfg.mlp_width, cfg.mlp_hidden_layers).to(device)

    def _features(self, x: Tensor) -> Tensor:
        """[N, 3] world points -> [N, F] hash-grid features of the points mapped to [0, 1]^3."""
        unit = ((x + self.radius) / (2.0 * self.radius)).clamp(0.0, 1.0)
        return self.encoding(unit)

    def _activate(self, x: Tensor, raw: Tensor) -> Tensor:
        sigma = softplus(raw + blob_density(x, self.blob_peak, self.blob_radius))
        return torch.where(inside_cube(x, self.radius), sigma, torch.zeros_like(sigma))

    def density(self, x: Tensor) -> Tensor:
        """[N, 3] world points -> [N] density (per unit length, >= 0; 0 outside the cube)."""
        return self._activate(x, self.density_mlp(self._features(x))[:, 0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[N, 3] world points -> (density [N], rgb [N, 3] in [0, 1])."""
        h = self._features(x)
        rgb = sigmoid(self.color_mlp(h))
        return self._activate(x, self.density_mlp(h)[:, 0]), rgb

    def colour(self, x: Tensor) -> Tensor:
        """[N, 3] world points -> [N, 3] rgb in [0, 1] (``forward``'s colour)."""
        return self(x)[1]

    def normals(self, x: Tensor, eps: float = 1e-2) -> Tensor:
        """[N, 3] world points -> [N, 3] unit outward normals, -grad(density) by central differences.

        ``eps`` is the finite-difference step in world units. Where the gradient vanishes the normal is 0.
        """
        return finite_difference_normals(self.density, x, eps)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer group: 'grid' (hash table), 'density' and 'color' (the two heads)."""
        return {"grid": list(self.encoding.parameters()), "density": list(self.density_mlp.parameters()),
                "color": list(self.color_mlp.parameters())}


def finite_difference_normals(density_fn, x: Tensor, eps: float) -> Tensor:
    """Outward unit normals -grad(sigma)/|grad(sigma)| of ``density_fn`` ([M, 3] -> [M]) at [N, 3] points,
    by central differences with step ``eps``; returns [N, 3]."""
    offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps  # [3, 3]
    probes = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], dim=1)  # [N, 6, 3]
    sigma = density_fn(probes.reshape(-1, 3)).reshape(-1, 6)
    grad = (sigma[:, :3] - sigma[:, 3:]) / (2.0 * eps)
    return -F.normalize(grad, dim=-1, eps=1e-12)
