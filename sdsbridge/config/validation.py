"""The checks of a resolved Config: every number finite and in range, every choice known, the method's and the
prior's own ``validate``, the prior's capabilities against what the method needs, and the warnings for settings
that silently change a run. One-line UserErrors naming the first bad key (``common/checks.py``)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from sdsbridge.common.checks import check, check_choice, check_range2, check_schedule, shown
from sdsbridge.common.devices import DEVICE_PATTERN
from sdsbridge.common.limits import SIZE_LIMITS, check_size
from sdsbridge.config.schema import Config
from sdsbridge.distill.methods import METHODS, method_class
from sdsbridge.distill.methods.base import PRIOR_CAPABILITIES
from sdsbridge.priors import PRIORS, prior_class

MAX_INT = 2**31 - 1
"""Integers in a config lie within +-MAX_INT (steps, sizes, seeds)."""


def _check_numbers(obj: Any, prefix: str = "") -> None:
    """Every float (also inside lists) finite, every integer within +-MAX_INT."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float):
                check(math.isfinite(item), key, f"must be a finite number, got {item}")
            elif isinstance(item, int) and not isinstance(item, bool):
                check(abs(item) <= MAX_INT, key, f"must lie within +-{MAX_INT}, got {item}")


def check_prior_fits_method(c: Config) -> None:
    """UserError when the method or its settings need a prior capability (``Method.prior_needs``) that the prior
    kind lacks, naming the setting that needs it and the kinds that have it."""
    cls, prior_cls = method_class(c.method), prior_class(c.prior.kind)
    for capability in sorted(cls.prior_needs(c.guidance) - prior_cls.capabilities):
        key, what = "method", c.method
        for option in ("perp_neg", "view_interpolation"):
            if capability not in cls.needs and getattr(c.guidance, option):
                key, what = f"guidance.{option}", "true"
                break
        kinds = [kind for kind, other in PRIORS.items() if capability in other.capabilities]
        check(False, key, f"{what} needs a prior that {PRIOR_CAPABILITIES[capability]} (prior.kind: "
               f"{' or '.join(kinds)}); prior.kind '{c.prior.kind}' has none")


def validate(c: Config, require_prompt: bool = True) -> None:
    """Check ranges and choices; raise UserError naming the first bad key."""
    _check_numbers(c)
    if require_prompt:
        check(bool(c.prompt.strip()), "prompt", "missing: set `prompt: ...` in the YAML or prompt=... on the "
               "command line")
    check(c.method in METHODS, "method", f"'{c.method}' is not one of {', '.join(METHODS)}")
    check(re.match(DEVICE_PATTERN, c.device) is not None, "device", f"'{c.device}' is not one of auto, cpu, cuda, "
           "cuda:N")
    c.guidance.validate()
    c.prior.validate()
    check_prior_fits_method(c)
    s = c.scene
    check_choice(s.backend, "scene.backend", ("auto", "torch", "tcnn"))
    check(s.radius > 0, "scene.radius", "must be positive")
    check(1 <= s.n_levels <= 32, "scene.n_levels", "must lie in [1, 32]")
    check(s.n_features_per_level in (1, 2, 4, 8), "scene.n_features_per_level", "must be 1, 2, 4 or 8")
    check(10 <= s.log2_hashmap_size <= 24, "scene.log2_hashmap_size", "must lie in [10, 24]")
    check(s.base_resolution > 1, "scene.base_resolution", "must be > 1")
    check(s.per_level_scale >= 1.0, "scene.per_level_scale", "must be >= 1")
    check(s.mlp_width > 0, "scene.mlp_width", "must be positive")
    check(s.mlp_hidden_layers >= 0, "scene.mlp_hidden_layers", "must be >= 0")
    check(s.background_width > 0, "scene.background_width", "must be positive")
    check(1 <= s.background_sh_degree <= 4, "scene.background_sh_degree", "must lie in [1, 4]")
    check(0.0 <= s.random_background_prob <= 1.0, "scene.random_background_prob", "must lie in [0, 1]")
    check(s.background_color is None or (len(s.background_color) == 3 and all(0 <= v <= 1 for v in s.background_color)),
           "scene.background_color", "expected null or [r, g, b] with values in [0, 1]")
    cam = c.cameras
    check_range2(cam.distance_range, "cameras.distance_range", 1e-3, 1e3)
    check_range2(cam.fovy_range, "cameras.fovy_range", 1.0, 179.0)
    check_range2(cam.elevation_range, "cameras.elevation_range", -90.0, 90.0)
    check_range2(cam.azimuth_range, "cameras.azimuth_range", -360.0, 360.0)
    check(cam.eval_distance > 0, "cameras.eval_distance", "must be positive")
    check(1.0 <= cam.eval_fovy <= 179.0, "cameras.eval_fovy", "must lie in [1, 179]")
    check(cam.eval_views > 0, "cameras.eval_views", "must be positive")
    r = c.render
    check_schedule(r.resolution, "render.resolution", *SIZE_LIMITS["render.resolution"])
    check_choice(r.sampler, "render.sampler", ("auto", "stratified", "occupancy", "occupancy-torch"))
    check(r.num_samples > 0, "render.num_samples", "must be positive")
    check(r.num_samples_occupancy > 0, "render.num_samples_occupancy", "must be positive")
    check(r.occupancy_resolution > 0, "render.occupancy_resolution", "must be positive")
    check(r.occupancy_update_every > 0, "render.occupancy_update_every", "must be positive")
    check(r.occupancy_eval_samples > 0, "render.occupancy_eval_samples", "must be positive")
    check(0.0 <= r.occupancy_threshold <= 1.0, "render.occupancy_threshold", "must lie in [0, 1]")
    check(0.0 <= r.occupancy_alpha_threshold < 1.0, "render.occupancy_alpha_threshold", "must lie in [0, 1)")
    check(r.chunk_rays > 0, "render.chunk_rays", "must be positive")
    check_schedule(c.loss.sparsity, "loss.sparsity", 0.0, float("inf"))
    check_schedule(c.loss.opacity, "loss.opacity", 0.0, float("inf"))
    check_schedule(c.loss.normal_smoothness, "loss.normal_smoothness", 0.0, float("inf"))
    check(1 <= c.loss.normal_points <= 1 << 20, "loss.normal_points", "must be in [1, 1048576]")
    t = c.train
    check(t.steps >= 0, "train.steps", "must be >= 0")
    check(t.batch_size > 0, "train.batch_size", "must be positive")
    for key in ("lr_grid", "lr_density", "lr_color", "lr_background", "eps", "weight_decay"):
        check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "expected [b1, b2] in [0, 1)")
    check(t.max_bad_steps > 0, "train.max_bad_steps", "must be positive")
    lg = c.log
    for key in ("log_every", "checkpoint_every", "val_views", "val_resolution"):
        check(getattr(lg, key) > 0, f"log.{key}", "must be positive")
    check(lg.val_every >= 0, "log.val_every", "must be >= 0")
    check(lg.keep_checkpoints >= 0, "log.keep_checkpoints", "must be >= 0")
    check(lg.max_checkpoint_failures > 0, "log.max_checkpoint_failures", "must be positive")
    e = c.export
    check_choice(e.format, "export.format", ("glb", "obj", "ply"))
    check(e.resolution >= 8, "export.resolution", "must be >= 8")
    check(e.threshold == "auto" or (isinstance(e.threshold, (int, float)) and not isinstance(e.threshold, bool)),
           "export.threshold", f"expected 'auto' or a number, got {shown(e.threshold)}")
    check(0.0 <= e.min_component_fraction <= 1.0, "export.min_component_fraction", "must lie in [0, 1]")
    check(e.decimate_faces >= 0, "export.decimate_faces", "must be >= 0")
    check(e.texture_faces == 0 or e.texture_faces >= 4, "export.texture_faces", "must be 0 or >= 4")
    check(isinstance(e.video_modes, list) and len(e.video_modes) > 0 and len(set(e.video_modes)) == len(e.video_modes)
           and all(m in ("rgb", "normal", "shaded", "depth") for m in e.video_modes), "export.video_modes",
           f"expected a list of distinct panels from rgb, normal, shaded, depth, got {shown(e.video_modes)}")
    for key in ("video_frames", "video_resolution", "video_fps"):
        check(getattr(e, key) is None or getattr(e, key) > 0, f"export.{key}", "must be positive")
    im = c.image
    check(im.steps >= 0, "image.steps", "must be >= 0")
    check(im.resolution is None or im.resolution > 0, "image.resolution", "must be positive")
    check(im.lr >= 0, "image.lr", "must be >= 0")
    check_choice(im.stage2_weighting, "image.stage2_weighting", ("sds", "uniform"))
    check(0.0 <= im.min_step_percent < im.max_step_percent <= 1.0, "image.min_step_percent",
           "min timestep must be below max timestep (image.max_step_percent), both in [0, 1]")
    check(im.video_every >= 0, "image.video_every", "must be >= 0")
    check(im.max_bad_steps > 0, "image.max_bad_steps", "must be positive")
    for key in ("lora_lr", "lora_eps", "lora_weight_decay"):
        check(getattr(im, key) >= 0, f"image.{key}", "must be >= 0")
    check(len(im.lora_betas) == 2 and all(0 <= b < 1 for b in im.lora_betas), "image.lora_betas",
          "expected [b1, b2] in [0, 1)")
    _check_sizes(c)


def _check_sizes(c: Config) -> None:
    """Every size of ``SIZE_LIMITS`` (common/limits.py) the config holds within its bounds (the reference prior
    checks its resolution and the bytes of its image set itself)."""
    for key in SIZE_LIMITS:
        section, name = key.split(".")
        if key != "render.resolution" and section != "prior":  # a schedule, checked above; the prior checks its own
            check_size(getattr(getattr(c, section), name), key)


def setting_warnings(config: Config) -> list[str]:
    """What the settings silently change, as sentences: a stage of the method that starts after the last step
    (``method=bridge`` with fewer ``train.steps`` than ``guidance.stage2_start_step`` is plain SDS)."""
    warnings = []
    for start in method_class(config.method).stage_starts(config.guidance):
        if start >= config.train.steps:
            warnings.append(f"method {config.method}: its stage two starts at step {start}, but the run has "
                            f"train.steps={config.train.steps}, so it never gets there (every step is stage one); "
                            "lower guidance.stage2_start_step or raise train.steps")
    return warnings
