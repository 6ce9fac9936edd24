"""Loading a Config: schema defaults <- method preset (configs/<method>.yaml) <- user file <- ``key=value``
overrides, with one-line UserErrors for every bad input, and the range checks of every field.

The ``guidance:`` and ``prior:`` sections take the settings of the chosen method and prior kind (their
``Settings`` in the registries). A key that another method or prior kind reads is dropped with a warning (a
sweep's base file may hold the bridge's stage-two keys for an SDS run too); a key none reads is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdsbridge.common.devices import DEVICE_PATTERN
from sdsbridge.config.schema import DEFAULT_METHOD, Config
from sdsbridge.distill.methods import METHODS, method_class
from sdsbridge.distill.methods.base import PRIOR_CAPABILITIES, setting_names
from sdsbridge.priors import PRIORS, prior_class
from sdsbridge.common.checks import check, check_choice, check_range2, check_schedule
from sdsbridge.common.errors import UserError
from sdsbridge.common.package_files import package_folder
from sdsbridge.common.safe_yaml import MAX_BYTES, MalformedYaml, load_yaml



logger = logging.getLogger("sdsbridge")

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


def component_fields() -> dict[str, dict[str, list[str]]]:
    """The component sections' keys: {'guidance': key -> the methods that read it, 'prior': key -> the prior
    kinds that read it}, from the registries."""
    sections: dict[str, dict[str, list[str]]] = {"guidance": {}, "prior": {}}
    for section, registry in (("guidance", METHODS), ("prior", PRIORS)):
        for name, cls in registry.items():
            for key in setting_names(cls.Settings):
                sections[section].setdefault(key, []).append(name)
    return sections


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every key of a Config (sections and their keys; the component sections with every component's keys)."""
    keys = []
    components = component_fields() if not prefix else {}
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(obj, f.name)
        if key in components:
            keys.extend(f"{key}.{sub}" for sub in components[key])
        elif dataclasses.is_dataclass(value):
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
    """Unknown keys and section/value mix-ups, found before OmegaConf sees the data. The component sections
    (``guidance:``, ``prior:``) take the keys of any registered method or prior kind."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    components = component_fields() if not prefix else {}
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in fields:
            raise UserError(_unknown_key_message(full_key, source, command))
        default = getattr(schema, key)
        if key in components or dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise UserError(f"{source}: key '{full_key}' is a section: expected a mapping of its keys, "
                                f"got {value!r}")
            if key in components:
                _check_component_keys(value, components[key], source, full_key, command)
            else:
                _check_keys(value, default, source, full_key + ".", command)
        elif isinstance(value, dict):
            raise UserError(f"{source}: key '{full_key}' takes a value, not a section")
        elif isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
            raise UserError(f"{source}: key '{full_key}': a list of {len(value)} values; it takes at most "
                            f"{MAX_LIST_ITEMS}")


def _check_component_keys(data: dict, known: dict[str, list[str]], source: str, section: str, command: str) -> None:
    """``_check_keys`` for a component section: every key known to some component, each a value."""
    for key, value in data.items():
        full_key = f"{section}.{key}"
        if key not in known:
            raise UserError(_unknown_key_message(full_key, source, command))
        if isinstance(value, dict):
            raise UserError(f"{source}: key '{full_key}' takes a value, not a section")
        if isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
            raise UserError(f"{source}: key '{full_key}': a list of {len(value)} values; it takes at most "
                            f"{MAX_LIST_ITEMS}")


def _read_choice(layers: list[dict], section: Optional[str], key: str, default: str) -> Any:
    """The value of ``section.key`` (or of top-level ``key``) in the first of ``layers`` that sets it."""
    for layer in layers:
        node = layer.get(section) if section else layer
        if isinstance(node, dict) and key in node:
            return node[key]
    return default


def _only_settings_of(data: dict, section: str, owner: str, settings_type: type, source: str, warn: bool) -> dict:
    """``data`` without the keys of ``section`` that ``settings_type`` (the chosen component's settings) lacks but
    another component reads; warns naming them unless ``warn`` is False (a checkpoint's full config)."""
    values = data.get(section)
    if not isinstance(values, dict):
        return data
    own, known = set(setting_names(settings_type)), component_fields()[section]
    foreign = [key for key in values if key not in own and key in known]
    if not foreign:
        return data
    if warn:
        keys = ", ".join(f"{section}.{key} ({'/'.join(known[key])})" for key in foreign)
        logger.warning(f"{source}: {owner} does not read {keys}; ignored")
    return {**data, section: {key: value for key, value in values.items() if key not in foreign}}


def _structured(method: Any, kind: Any) -> Any:
    """The OmegaConf schema of a Config whose ``guidance`` and ``prior`` are the settings of ``method`` and
    prior ``kind`` (UserError for unknown names)."""
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    if not isinstance(kind, str) or kind not in PRIORS:
        raise UserError(f"prior.kind: '{kind}' is not one of {', '.join(PRIORS)}")
    return OmegaConf.structured(Config(method=method, guidance=method_class(method).Settings(),
                                       prior=prior_class(kind).Settings()))


def _for_components(data: dict, method: str, kind: str, source: str, warn: bool = True) -> dict:
    """``data`` with only the chosen method's ``guidance`` keys and the chosen prior kind's ``prior`` keys."""
    data = _only_settings_of(data, "guidance", f"method '{method}'", method_class(method).Settings, source, warn)
    return _only_settings_of(data, "prior", f"prior.kind '{kind}'", prior_class(kind).Settings, source, warn)


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
    method = _read_choice([cli, user], None, "method", DEFAULT_METHOD)
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    preset_path = presets_dir() / f"{method}.yaml"
    preset = _read_yaml(preset_path) if preset_path.is_file() else {}
    kind = _read_choice([cli, user, preset], "prior", "kind", Config().prior.kind)

    for source, data in ((str(preset_path), preset), (str(path), user), ("command line", cli)):
        _check_keys(data, Config(), source, command=command)
    cfg = _structured(method, kind)
    preset = _for_components(preset, method, kind, str(preset_path))
    user = _for_components(user, method, kind, str(path))
    cli = _for_components(cli, method, kind, "command line")
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
    if command == "train":
        for warning in setting_warnings(config):
            logger.warning(warning)
    return config


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


def to_yaml(config: Config) -> str:
    """The fully resolved config as YAML (what config.yaml in a run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    """Rebuild a Config from a plain dict (e.g. one stored in a checkpoint), then apply ``key=value``
    overrides (no method preset is re-applied)."""
    cli = _parse_overrides(list(overrides))
    method = _read_choice([cli, data], None, "method", DEFAULT_METHOD)
    kind = _read_choice([cli, data], "prior", "kind", Config().prior.kind)
    _check_keys(data, Config(), "checkpoint config")
    _check_keys(cli, Config(), "command line")
    cfg = _structured(method, kind)
    cfg = _merge(cfg, _for_components(data, method, kind, "checkpoint config", warn=False), "checkpoint config")
    cfg = _merge(cfg, _for_components(cli, method, kind, "command line"), "command line")
    config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict:
    """A Config as plain builtins (for checkpoints and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(config))


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
    check_schedule(r.resolution, "render.resolution", 1, 4096)
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
           "export.threshold", f"expected 'auto' or a number, got {e.threshold!r}")
    check(0.0 <= e.min_component_fraction <= 1.0, "export.min_component_fraction", "must lie in [0, 1]")
    check(e.decimate_faces >= 0, "export.decimate_faces", "must be >= 0")
    check(16 <= e.texture_size <= 8192, "export.texture_size", "must lie in [16, 8192]")
    check(e.texture_faces == 0 or e.texture_faces >= 4, "export.texture_faces", "must be 0 or >= 4")
    check(isinstance(e.video_modes, list) and len(e.video_modes) > 0 and len(set(e.video_modes)) == len(e.video_modes)
           and all(m in ("rgb", "normal", "shaded", "depth") for m in e.video_modes), "export.video_modes",
           f"expected a list of distinct panels from rgb, normal, shaded, depth, got {e.video_modes!r}")
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
    check(im.lora_lr >= 0, "image.lora_lr", "must be >= 0")
