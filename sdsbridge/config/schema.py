"""Typed configuration schema: ``Config``, made of the components' own settings (the method's ``guidance:``,
the prior's ``prior:``, the scene's ``scene:``, ``cameras:`` and ``render:``) and the sections of training and
outputs defined here. Loading and checks live in loader.py.

Every field has a default; the defaults are the official SDS-Bridge 3D setup (Stable Diffusion 2.1-base;
tests/test_official_recipe.py checks each against the official config). YAML keys are the field names. Fields
typed ``Any`` that hold a *scheduled* value take a number or ``[start_step, start_value, end_value, end_step]``
(see common/schedules.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from sdsbridge.distill.methods import METHODS
from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.scene.nerf.settings import RenderConfig, SceneConfig


DEFAULT_METHOD = "bridge"
"""``method:`` when no file says otherwise: the calibrated bridge."""


@dataclass
class LossConfig:
    """Regulariser weights (scheduled)."""

    sparsity: Any = 10.0
    """Weight of mean(sqrt(opacity^2 + 0.01))."""
    opacity: Any = field(default_factory=lambda: [10000, 0.0, 1000.0, 10001])
    """Weight of the opacity binary cross-entropy: 0 until step 10000, then 1000."""
    normal_smoothness: Any = 0.0
    """Weight of the surface-normal smoothness: the mean distance between the density's normals at a rendered
    surface point and at a point one normal step away (``normal_smoothness_loss``); 0 = off (the official recipe)."""
    normal_points: int = 2048
    """Surface points per step for ``normal_smoothness`` (drawn from the pixels with opacity > 0.5)."""


@dataclass
class TrainConfig:
    """The optimisation."""

    steps: int = 25000
    """Total training steps."""
    batch_size: int = 1
    """Cameras per step."""
    seed: int = 0
    """Seed for torch, numpy and python RNGs."""
    lr_grid: float = 1e-2
    """Learning rate of the hash grid."""
    lr_density: float = 1e-3
    """Learning rate of the density MLP."""
    lr_color: float = 1e-3
    """Learning rate of the colour MLP (threestudio's "feature network")."""
    lr_background: float = 1e-3
    """Learning rate of the background MLP."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    eps: float = 1e-15
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default, which the official run gets by passing none)."""
    max_bad_steps: int = 20
    """Abort after this many non-finite losses/gradients in a row."""


@dataclass
class LogConfig:
    """Run directory, logging, validation and checkpoints."""

    runs_dir: str = "runs"
    """Parent directory of run directories."""
    name: Optional[str] = None
    """Run directory name (default: a slug of method and prompt)."""
    log_every: int = 10
    """Write metrics.jsonl every N steps."""
    val_every: int = 1000
    """Save a validation grid every N steps (0 = never)."""
    val_views: int = 4
    """Evaluation views in the validation grid."""
    val_resolution: int = 128
    """Validation render resolution."""
    checkpoint_every: int = 1000
    """Save a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 3
    """Numbered checkpoints to keep besides last.ckpt."""
    max_checkpoint_failures: int = 3
    """Checkpoint writes that may fail in a row (disk full, I/O error) before the run stops; a failed one is
    logged and retried at the next interval, with training going on."""


@dataclass
class ExportConfig:
    """Mesh and turntable video written after training."""

    mesh: bool = True
    """Export a mesh when training ends."""
    video: bool = True
    """Render a turntable video when training ends."""
    format: str = "glb"
    """Mesh format: glb, obj or ply."""
    resolution: int = 256
    """Marching-cubes grid resolution."""
    threshold: Any = "auto"
    """Density iso-level: 'auto' or a number."""
    min_component_fraction: float = 0.05
    """Drop connected components with fewer faces than this fraction of the largest."""
    decimate_faces: int = 0
    """Target face count for decimation (0 = none), by quadric decimation (fast-simplification)."""
    texture: bool = False
    """Write a textured mesh: UV atlas (xatlas) + base-colour texture baked from the field, as mesh.glb (PBR
    base-colour texture) and mesh.obj + mesh.mtl + mesh.png (``export.format`` is then not used)."""
    texture_size: int = 1024
    """Texture width and height in texels."""
    texture_faces: int = 20000
    """Face budget of a textured mesh: it is decimated to this many faces before unwrapping (xatlas takes
    about 3 s for 20,000 faces on one CPU core, and grows faster than linearly); 0 = keep all faces."""
    video_frames: Optional[int] = None
    """Turntable frames; None = what fits the device: 120 on CUDA, 60 on the CPU (the log says which)."""
    video_resolution: Optional[int] = None
    """Turntable resolution; None = what fits the device: 512 on CUDA, 256 on the CPU."""
    video_fps: int = 30
    """Turntable frames per second."""
    report: bool = True
    """Write report.html (report.py: mesh viewer, turntable, validation timeline, plots, config) when training
    ends; `sdsbridge report RUN` writes it any time."""
    video_modes: list[str] = field(default_factory=lambda: ["rgb", "normal"])
    """Turntable panels, left to right: rgb (the colour render), normal (camera-space normals of the density
    gradient), shaded (textureless diffuse shading of the geometry), depth."""


@dataclass
class ImageConfig:
    """2D score distillation (`sdsbridge image`): defaults of the official 2D code."""

    steps: int = 1000
    """Optimisation steps."""
    stage2_start_step: int = 500
    """Bridge: first step of stage two."""
    guidance_scale: float = 40.0
    """CFG scale in stage one / SDS / NFSD."""
    stage2_scale: float = 40.0
    """Bridge stage two multiplier."""
    stage2_weighting: str = "sds"
    """Bridge stage two w(t) (1 - alphas_cumprod)."""
    lr: float = 0.01
    """AdamW learning rate."""
    target_modifier: str = ", detailed high resolution, high quality, sharp"
    """Target modifier in 2D."""
    resolution: Optional[int] = None
    """Image resolution in pixels (latent = resolution / 8 for Stable Diffusion); None = the prior's own: 512 for
    Stable Diffusion 2.1-base (its UNet's), ``prior.resolution`` for the reference prior (whose image set is
    rendered at this size: 512 would take minutes on a CPU)."""
    min_step_percent: float = 0.02
    """Lower end of t / T."""
    max_step_percent: float = 0.98
    """Upper end of t / T."""
    video_every: int = 10
    """Record a video frame every N steps (0 = no video)."""
    max_bad_steps: int = 20
    """Stop a seed after this many non-finite steps in a row (each is skipped), as ``train.max_bad_steps``: no
    image is written for it and the command ends with exit code 1."""
    lora_lr: float = 3e-4
    """VSD in 2D: learning rate of the LoRA and its camera embedding (the official 2D code's)."""
    lora_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """VSD in 2D: AdamW betas of the LoRA's group (the official 2D code's LoRA optimizer passes none: torch's
    default). The image latent's are the 3D run's (0.9, 0.99), as the official 2D code's image optimizer."""
    lora_eps: float = 1e-8
    """VSD in 2D: AdamW epsilon of the LoRA's group (torch's default, as the official 2D code's)."""
    lora_weight_decay: float = 0.0
    """VSD in 2D: AdamW weight decay of the LoRA's group (the official 2D code passes 0)."""


@dataclass
class Config:
    """Everything a run needs. Only `prompt` has no usable default."""

    prompt: str = ""
    """What to make, e.g. 'a DSLR photo of a pineapple'."""
    method: str = DEFAULT_METHOD
    """The score-distillation method, by its registered name (``METHODS``: 'bridge', SDS-Bridge in two stages;
    'sds'; 'nfsd'; 'vsd', ProlificDreamer's LoRA as learned source; 'bridge-vsd', the bridge with that source;
    and any other method in distill/methods/)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' (GPU number N)."""
    guidance: Any = field(default_factory=lambda: METHODS[DEFAULT_METHOD].Settings())
    """The method's settings: ``METHODS[method].Settings`` (a ``MethodSettings``)."""
    prior: Any = field(default_factory=StableDiffusionSettings)
    """The prior's settings: ``PRIORS[prior.kind].Settings`` (a ``PriorSettings``)."""
    scene: SceneConfig = field(default_factory=SceneConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
