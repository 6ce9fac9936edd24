"""A trained scene in seconds: fit a field to a built-in shape by direct supervision of density and colour
at points (no rendering, no prior), for benchmarks and tests that need a field with a real surface.

Targets at a point x with signed distance d(x): density ``peak * sigmoid(-d / width)`` per unit length (an
opaque shell ``width`` thick at the surface, empty outside) and the shape's Lambert colour (priors/shapes.py).
"""

from __future__ import annotations

import torch

from sdsbridge.scene.nerf.field import NeRFField
from sdsbridge.priors.shapes import get_shape, shade


def shape_density(sdf_values: torch.Tensor, peak: float, width: float) -> torch.Tensor:
    """[N] signed distances (world units) -> [N] target density (per world unit)."""
    return peak * torch.sigmoid(-sdf_values / width)


def fit_field_to_shape(field: NeRFField, shape: str = "torus", steps: int = 200, points: int = 1 << 15,
                       peak: float = 200.0, width: float = 0.01, lr: float = 1e-2, seed: int = 0) -> float:
    """Fit ``field`` in place for ``steps`` AdamW steps on ``points`` points each, half uniform in the field's
    cube and half in the shape's bounding sphere; returns the last loss (mean squared error of log(1 + density)
    plus the colour error weighted by the target occupancy)."""
    target = get_shape(shape)
    generator = torch.Generator().manual_seed(seed)
    device = next(field.parameters()).device
    optimizer = torch.optim.AdamW(field.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-15)
    loss = torch.zeros(())
    for _ in range(steps):
        uniform = (torch.rand(points // 2, 3, generator=generator) * 2 - 1) * field.radius
        inner = torch.randn(points - points // 2, 3, generator=generator)
        inner = inner / inner.norm(dim=-1, keepdim=True) * target.bound * torch.rand(len(inner), 1, generator=generator)
        x = torch.cat([uniform, inner])
        sdf = target.sdf(x)
        sigma_target = shape_density(sdf, peak, width)
        rgb_target = shade(target, x)
        x, sigma_target, rgb_target = x.to(device), sigma_target.to(device), rgb_target.to(device)
        sigma, rgb = field(x)
        weight = sigma_target / peak
        loss = ((torch.log1p(sigma) - torch.log1p(sigma_target)) ** 2).mean() + \
            (weight[:, None] * (rgb - rgb_target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())
