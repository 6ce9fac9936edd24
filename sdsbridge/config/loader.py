"""Loading a Config: schema defaults <- method preset (configs/<method>.yaml) <- user file <- ``key=value``
overrides, with one-line UserErrors for every bad input, and the range checks of every field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdsbridge.common.devices import DEVICE_PATTERN
from sdsbridge.config.schema import METHODS, Config
from sdsbridge.common.errors import UserError
from sdsbridge.common.package_files import package_folder
from sdsbridge.common.safe_yaml import MAX_BYTES, MalformedYaml, load_yaml
from sdsbridge.common.schedules import is_schedule, schedule_range


MAX_LIST_ITEMS = 16
"""Longest list a config value may hold (the schema's lists hold 2 to 4 numbers)."""
MAX_INT = 2**31 - 1
"""Integers in a config lie within +-MAX_INT (steps, sizes, seeds)."""


def presets_dir() -> Path:
    """Directory of the method presets (configs/ in a checkout, sdsbridge/configs when installed)."""
    return package_folder("configs")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES // 1024} KiB; not a config file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
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


IMAGE_ONLY_SECTION = "image"
"""The section only ``sdsbridge image`` reads (the 2D mode's own steps, scales, learning rates)."""
THREE_D_SECTIONS = ("scene", "cameras", "render", "loss", "train", "export")
"""Sections only the 3D commands read; ``sdsbridge image`` rejects them on its command line."""


def _unknown_key_message(key: str, source: str, command: str = "train") -> str:
    """'unknown key' with a hint: the key whose last part is the same ('train.name' -> 'log.name'; the
    closest of several, and of those the one the command reads: ``image.*`` for 'image', another section for
    the 3D commands), else the closest full key, else the closest last part."""
    valid = _all_keys(Config())
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k != key]
    preferred = [k for k in same_leaf if (k.split(".")[0] == IMAGE_ONLY_SECTION) == (command == "image")]
    same_leaf = preferred or same_leaf
    close = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) if same_leaf else []
    if not close:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component alone: 'trian.stpes' -> 'train.steps'
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}"


def _check_keys(data: dict, schema: Any, source: str, prefix: str = "", command: str = "train") -> None:
    """Unknown keys and section/value mix-ups, found before OmegaConf sees the data."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in fields:
            raise UserError(_unknown_key_message(full_key, source, command))
        default = getattr(schema, key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise UserError(f"{source}: key '{full_key}' is a section: expected a mapping of its keys, "
                                f"got {value!r}")
            _check_keys(value, default, source, full_key + ".", command)
        elif isinstance(value, dict):
            raise UserError(f"{source}: key '{full_key}' takes a value, not a section")
        elif isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
            raise UserError(f"{source}: key '{full_key}': a list of {len(value)} values; it takes at most "
                            f"{MAX_LIST_ITEMS}")


def _merge(base: Any, update: dict, source: str, command: str = "train") -> Any:
    _check_keys(update, Config(), source, command=command)
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
            value = load_yaml(raw) if raw.strip() else ""
        except MalformedYaml:
            value = raw  # not YAML: taken as a plain string
        except UserError as exc:
            raise UserError(f"override '{key}': {exc}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[Path], overrides: list[str] = (), require_prompt: bool = True,
                command: str = "train") -> Config:
    """Resolve a Config: schema defaults <- configs/<method>.yaml <- user file <- ``key=value`` overrides.

    The method is read from the overrides, else the user file, else the default ('bridge'), then its
    preset is applied under the user's values. ``command`` ('train' or 'image') picks the hints for unknown
    keys, and 'image' rejects 3D sections on the command line. Raises UserError on any bad input.
    """
    user = _read_yaml(Path(path)) if path is not None else {}
    cli = _parse_overrides(list(overrides))
    method = cli.get("method", user.get("method", Config.method))
    if method not in METHODS:
        raise UserError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    preset_path = presets_dir() / f"{method}.yaml"
    preset = _read_yaml(preset_path) if preset_path.is_file() else {}

    cfg = OmegaConf.structured(Config)
    if command == "image":
        for section in THREE_D_SECTIONS:
            if section in cli:
                key = f"{section}.{next(iter(cli[section]))}" if isinstance(cli[section], dict) and cli[section] else section
                raise UserError(f"command line: '{key}' is a 3D setting, which `sdsbridge image` does not use; its "
                                "settings are image.* (e.g. image.steps=500 image.guidance_scale=30)")
    cfg = _merge(cfg, preset, str(preset_path), command)
    cfg = _merge(cfg, user, str(path), command)
    cfg = _merge(cfg, cli, "command line", command)
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


def _check_numbers(obj: Any, prefix: str = "") -> None:
    """Every float (also inside lists) finite, every integer within +-MAX_INT."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float):
                _check(math.isfinite(item), key, f"must be a finite number, got {item}")
            elif isinstance(item, int) and not isinstance(item, bool):
                _check(abs(item) <= MAX_INT, key, f"must lie within +-{MAX_INT}, got {item}")


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
    _check_numbers(c)
    if require_prompt:
        _check(bool(c.prompt.strip()), "prompt", "missing: set `prompt: ...` in the YAML or prompt=... on the "
               "command line")
    _check_choice(c.method, "method", METHODS)
    _check(re.match(DEVICE_PATTERN, c.device) is not None, "device", f"'{c.device}' is not one of auto, cpu, cuda, "
           "cuda:N")
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
    _check(g.vsd_guidance_scale >= 0, "guidance.vsd_guidance_scale", "must be >= 0")
    _check(g.lora_lr >= 0, "guidance.lora_lr", "must be >= 0")
    _check(1 <= g.lora_rank <= 256, "guidance.lora_rank", "must lie in [1, 256]")
    _check(0.0 <= g.lora_condition_dropout <= 1.0, "guidance.lora_condition_dropout", "must lie in [0, 1]")
    for key in ("perp_neg_f_sb", "perp_neg_f_fsb", "perp_neg_f_fs", "perp_neg_f_sf"):
        _check(len(getattr(g, key)) == 3, f"guidance.{key}", "expected [a, b, c] (weight a exp(-b r) + c)")
    needs_sd = {"method": c.method in ("vsd", "bridge-vsd"), "guidance.perp_neg": g.perp_neg,
                "guidance.view_interpolation": g.view_interpolation}
    for key, used in needs_sd.items():
        what = c.method if key == "method" else "true"
        _check(not used or c.prior.kind == "stable-diffusion", key,
               f"{what} needs prior.kind: stable-diffusion (the reference prior has no UNet or text embeddings to "
               "adapt or blend)")
        _check(not used or key == "method" or g.view_dependent, key, "needs guidance.view_dependent: true")
    p = c.prior
    _check_choice(p.kind, "prior.kind", ("stable-diffusion", "reference"))
    _check_choice(p.dtype, "prior.dtype", ("auto", "fp16", "bf16", "fp32"))
    _check(bool(p.model.strip()), "prior.model", "must not be empty")
    _check(p.resolution > 0, "prior.resolution", "must be positive")
    _check(p.views_per_label > 0, "prior.views_per_label", "must be positive")
    _check(p.nearest_views >= 0, "prior.nearest_views", "must be >= 0")
    _check(p.device is None or re.match(DEVICE_PATTERN, p.device) is not None, "prior.device",
           f"'{p.device}' is not one of null (the scene's device), auto, cpu, cuda, cuda:N")
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
    _check(1 <= s.background_sh_degree <= 4, "scene.background_sh_degree", "must lie in [1, 4]")
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
    _check_choice(r.sampler, "render.sampler", ("auto", "stratified", "occupancy", "occupancy-torch"))
    _check(r.num_samples > 0, "render.num_samples", "must be positive")
    _check(r.num_samples_occupancy > 0, "render.num_samples_occupancy", "must be positive")
    _check(r.occupancy_resolution > 0, "render.occupancy_resolution", "must be positive")
    _check(r.occupancy_update_every > 0, "render.occupancy_update_every", "must be positive")
    _check(r.occupancy_eval_samples > 0, "render.occupancy_eval_samples", "must be positive")
    _check(0.0 <= r.occupancy_threshold <= 1.0, "render.occupancy_threshold", "must lie in [0, 1]")
    _check(0.0 <= r.occupancy_alpha_threshold < 1.0, "render.occupancy_alpha_threshold", "must lie in [0, 1)")
    _check(r.chunk_rays > 0, "render.chunk_rays", "must be positive")
    _check_schedule(c.loss.sparsity, "loss.sparsity", 0.0, float("inf"))
    _check_schedule(c.loss.opacity, "loss.opacity", 0.0, float("inf"))
    t = c.train
    _check(t.steps >= 0, "train.steps", "must be >= 0")
    _check(t.batch_size > 0, "train.batch_size", "must be positive")
    for key in ("lr_grid", "lr_density", "lr_color", "lr_background", "eps", "weight_decay"):
        _check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "expected [b1, b2] in [0, 1)")
    _check(t.max_bad_steps > 0, "train.max_bad_steps", "must be positive")
    lg = c.log
    for key in ("log_every", "checkpoint_every", "val_views", "val_resolution"):
        _check(getattr(lg, key) > 0, f"log.{key}", "must be positive")
    _check(lg.val_every >= 0, "log.val_every", "must be >= 0")
    _check(lg.keep_checkpoints >= 0, "log.keep_checkpoints", "must be >= 0")
    _check(lg.max_checkpoint_failures > 0, "log.max_checkpoint_failures", "must be positive")
    e = c.export
    _check_choice(e.format, "export.format", ("glb", "obj", "ply"))
    _check(e.resolution >= 8, "export.resolution", "must be >= 8")
    _check(e.threshold == "auto" or (isinstance(e.threshold, (int, float)) and not isinstance(e.threshold, bool)),
           "export.threshold", f"expected 'auto' or a number, got {e.threshold!r}")
    _check(0.0 <= e.min_component_fraction <= 1.0, "export.min_component_fraction", "must lie in [0, 1]")
    _check(e.decimate_faces >= 0, "export.decimate_faces", "must be >= 0")
    _check(16 <= e.texture_size <= 8192, "export.texture_size", "must lie in [16, 8192]")
    _check(e.texture_faces == 0 or e.texture_faces >= 4, "export.texture_faces", "must be 0 or >= 4")
    _check(isinstance(e.video_modes, list) and len(e.video_modes) > 0 and len(set(e.video_modes)) == len(e.video_modes)
           and all(m in ("rgb", "normal", "shaded", "depth") for m in e.video_modes), "export.video_modes",
           f"expected a list of distinct panels from rgb, normal, shaded, depth, got {e.video_modes!r}")
    for key in ("video_frames", "video_resolution", "video_fps"):
        _check(getattr(e, key) is None or getattr(e, key) > 0, f"export.{key}", "must be positive")
    im = c.image
    _check(im.steps >= 0, "image.steps", "must be >= 0")
    _check(im.resolution is None or im.resolution > 0, "image.resolution", "must be positive")
    _check(im.lr >= 0, "image.lr", "must be >= 0")
    _check_choice(im.stage2_weighting, "image.stage2_weighting", ("sds", "uniform"))
    _check(0.0 <= im.min_step_percent < im.max_step_percent <= 1.0, "image.min_step_percent",
           "min timestep must be below max timestep (image.max_step_percent), both in [0, 1]")
    _check(im.video_every >= 0, "image.video_every", "must be >= 0")
    _check(im.lora_lr >= 0, "image.lora_lr", "must be >= 0")
