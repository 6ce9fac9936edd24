"""Small building blocks shared by the field and the background: a bias-free MLP and the spherical-harmonics
direction encoding (both as threestudio builds them through tinycudann, here in plain PyTorch)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def mlp(in_dims: int, out_dims: int, width: int, hidden_layers: int) -> nn.Sequential:
    """Linear/ReLU stack with ``hidden_layers`` hidden layers of ``width``; no output activation.

    No biases, as tcnn's fully fused MLP and threestudio's VanillaMLP, so an untrained field is the blob alone.
    """
    dims = [in_dims] + [width] * hidden_layers + [out_dims]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def spherical_harmonics(dirs: Tensor, degree: int) -> Tensor:
    """Real spherical harmonics of unit directions in tinycudann's convention: [N, 3] -> [N, degree^2].

    ``degree`` counts bands (l = 0 .. degree - 1), as tcnn's ``SphericalHarmonics`` encoding does; the signs
    and order follow tcnn (Condon-Shortley phase, m = -l .. l). Bands above 3 (degree > 4) are not needed
    by any config here and raise ValueError.
    """
    if not 1 <= degree <= 4:
        raise ValueError(f"spherical harmonics degree {degree} not supported (1..4)")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.5 / math.sqrt(math.pi))]
    if degree > 1:
        c1 = math.sqrt(3.0) / (2.0 * math.sqrt(math.pi))
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree > 2:
        c2 = math.sqrt(15.0) / (2.0 * math.sqrt(math.pi))
        c20 = math.sqrt(5.0) / (4.0 * math.sqrt(math.pi))
        out += [c2 * x * y, -c2 * y * z, c20 * (3.0 * z * z - 1.0), -c2 * x * z, 0.5 * c2 * (x * x - y * y)]
    if degree > 3:
        a = math.sqrt(70.0) / (8.0 * math.sqrt(math.pi))
        b = math.sqrt(105.0) / (2.0 * math.sqrt(math.pi))
        c = math.sqrt(42.0) / (8.0 * math.sqrt(math.pi))
        d = math.sqrt(7.0) / (4.0 * math.sqrt(math.pi))
        x2, y2, z2 = x * x, y * y, z * z
        out += [a * y * (y2 - 3.0 * x2), b * x * y * z, c * y * (1.0 - 5.0 * z2), d * z * (5.0 * z2 - 3.0),
                c * x * (1.0 - 5.0 * z2), 0.5 * b * z * (x2 - y2), a * x * (3.0 * y2 - x2)]
    return torch.stack(out, dim=-1)
