"""Settings of the NeRF scene: the field and background (``scene:``) and volume rendering (``render:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class SceneConfig:
    """The NeRF: hash-grid encoding, density/colour MLPs, background."""

    backend: str = "auto"
    """Hash-grid backend: 'auto' (tcnn on CUDA when importable, else torch), 'torch' or 'tcnn'."""
    radius: float = 1.0
    """Scene bound: a sphere (and the cube [-radius, radius]^3 the grid covers)."""
    n_levels: int = 16
    """Hash-grid levels."""
    n_features_per_level: int = 2
    """Features per level."""
    log2_hashmap_size: int = 19
    """log2 of the hash table size per level."""
    base_resolution: int = 16
    """Coarsest grid resolution."""
    per_level_scale: float = 1.447269237440378
    """Resolution growth factor between levels."""
    mlp_width: int = 64
    """Hidden width of the density and colour MLPs (two parallel heads on the grid features)."""
    mlp_hidden_layers: int = 1
    """Hidden layers of each of the density and colour MLPs."""
    blob_density: float = 10.0
    """Magic3D density blob peak: blob = blob_density * (1 - |x| / blob_radius)."""
    blob_radius: float = 0.5
    """Magic3D density blob radius."""
    background_width: int = 16
    """Hidden width of the background MLP (2 hidden layers, no biases)."""
    background_sh_degree: int = 3
    """Spherical-harmonics encoding of the background's view direction, tcnn's convention: ``degree`` bands,
    degree^2 coefficients (3 -> 9, as threestudio's NeuralEnvironmentMapBackground)."""
    random_background_prob: float = 0.5
    """Probability of a random solid background colour per training image."""
    background_color: Optional[list[float]] = None
    """Fixed background colour [r, g, b] in [0, 1] instead of the learned MLP (None = learned)."""


@dataclass
class RenderConfig:
    """Volume rendering."""

    resolution: Any = field(default_factory=lambda: [5000, 64, 512, 5001])
    """Scheduled training render resolution (pixels): 64 until step 5000, then 512."""
    sampler: str = "auto"
    """'auto' or 'occupancy' (an occupancy grid: nerfacc's CUDA kernels where they load, else the pure-PyTorch
    grid), 'occupancy-torch' (the PyTorch grid on any device) or 'stratified' (dense, num_samples per ray)."""
    num_samples: int = 64
    """Stratified samples per ray."""
    num_samples_occupancy: int = 512
    """Samples per ray (along the diagonal) with the occupancy grid."""
    occupancy_resolution: int = 32
    """Occupancy grid resolution (one level over the cube [-radius, radius]^3)."""
    occupancy_update_every: int = 16
    """Occupancy grid update interval in steps."""
    occupancy_threshold: float = 0.01
    """Occupancy grid threshold on density * step size (nerfacc's occ_thre)."""
    occupancy_alpha_threshold: float = 0.01
    """Skip samples whose alpha (from the field's density) is below this while marching (nerfacc's alpha_thre)."""
    occupancy_eval_samples: int = 128
    """PyTorch grid only (CPU, or CUDA without nerfacc's kernels): samples per cube diagonal in eval-mode renders
    (validation, eval, video), never finer than the training step; 128 is about the stratified sampler's
    spacing at 64 samples, a quarter of the training step's samples at equal quality (README). The alpha
    threshold keeps its density. nerfacc's CUDA grid renders at the training step."""
    chunk_rays: int = 16384
    """Rays per chunk when rendering without gradients (bounds memory at 512x512)."""
