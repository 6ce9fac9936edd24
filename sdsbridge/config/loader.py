"""Loading a Config: schema defaults <- method preset (configs/<method>.yaml) <- user file <- ``key=value``
overrides, with one-line UserErrors for every bad input, and the range checks of every field.

The ``guidance:`` and ``prior:`` sections take the settings of the chosen method and prior kind (their
``Settings`` in the registries). A key that another method or prior kind reads is dropped with a warning (a
sweep's base file may hold the bridge's stage-two keys for an SDS run too); a key none reads is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdsbridge.config.schema import DEFAULT_METHOD, Config
from sdsbridge.distill.methods import METHODS, method_class
from sdsbridge.config.validation import setting_warnings, validate
from sdsbridge.distill.methods.base import setting_names
from sdsbridge.priors import PRIORS, prior_class
from sdsbridge.common.checks import shorten, shown
from sdsbridge.common.errors import UserError
from sdsbridge.common.package_files import package_folder
from sdsbridge.common.safe_yaml import MAX_BYTES, MalformedYaml, load_yaml



logger = logging.getLogger("sdsbridge")

MAX_LIST_ITEMS = 16
"""Longest list a config value may hold (the schema's lists hold 2 to 4 numbers)."""


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


@functools.cache
def component_fields() -> dict[str, dict[str, list[str]]]:
    """The component sections' keys: {'guidance': key -> the methods that read it, 'prior': key -> the prior
    kinds that read it}, from the registries (filled at import, so computed once; do not modify)."""
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
                                f"got {shown(value)}")
            if key in components:
                _check_component_keys(value, components[key], source, full_key, command)
            else:
                _check_keys(value, default, source, full_key + ".", command)
        else:
            _check_value(value, full_key, source)


def _check_value(value: Any, full_key: str, source: str) -> None:
    """A key that takes a value: not a section, and a flat list of at most ``MAX_LIST_ITEMS`` (no key takes a list
    of lists; the checks after the merge compare and hash the items as values)."""
    if isinstance(value, dict):
        raise UserError(f"{source}: key '{full_key}' takes a value, not a section")
    if isinstance(value, list) and len(value) > MAX_LIST_ITEMS:
        raise UserError(f"{source}: key '{full_key}': a list of {len(value)} values; it takes at most "
                        f"{MAX_LIST_ITEMS}")
    if isinstance(value, list) and any(isinstance(item, (list, dict)) for item in value):
        raise UserError(f"{source}: key '{full_key}': a list inside a list (or a section in one); it takes a value "
                        "or a list of values")


def _check_component_keys(data: dict, known: dict[str, list[str]], source: str, section: str, command: str) -> None:
    """``_check_keys`` for a component section: every key known to some component, each a value."""
    for key, value in data.items():
        full_key = f"{section}.{key}"
        if key not in known:
            raise UserError(_unknown_key_message(full_key, source, command))
        _check_value(value, full_key, source)


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


def _check_method(method: Any) -> None:
    """UserError unless ``method`` is a registered method's name."""
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"method: '{method}' is not one of {', '.join(METHODS)}")


def _structured(method: Any, kind: Any) -> Any:
    """The OmegaConf schema of a Config whose ``guidance`` and ``prior`` are the settings of ``method`` and
    prior ``kind`` (UserError for unknown names)."""
    _check_method(method)
    if not isinstance(kind, str) or kind not in PRIORS:
        raise UserError(f"prior.kind: '{kind}' is not one of {', '.join(PRIORS)}")
    return OmegaConf.structured(Config(method=method, guidance=method_class(method).Settings(),
                                       prior=prior_class(kind).Settings()))


def _for_components(data: dict, method: str, kind: str, source: str, warn: bool = True) -> dict:
    """``data`` with only the chosen method's ``guidance`` keys and the chosen prior kind's ``prior`` keys."""
    data = _only_settings_of(data, "guidance", f"method '{method}'", method_class(method).Settings, source, warn)
    return _only_settings_of(data, "prior", f"prior.kind '{kind}'", prior_class(kind).Settings, source, warn)


def _merge(base: Any, update: dict, source: str) -> Any:
    """``update`` (checked by ``_check_keys`` already) merged onto ``base``; UserError naming the key OmegaConf
    refuses (a wrong type)."""
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise UserError(f"{source}: key '{key}': {shorten(str(exc).splitlines()[0], 200)}") from None


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
    _check_method(method)  # before its preset is looked for
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
    cfg = _merge(cfg, preset, str(preset_path))
    cfg = _merge(cfg, user, str(path))
    cfg = _merge(cfg, cli, "command line")
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: {shorten(str(exc).splitlines()[0], 200)}") from None
    validate(config, require_prompt=require_prompt)
    if command == "train":
        for warning in setting_warnings(config):
            logger.warning(warning)
    return config


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


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'steps': 1}} -> {'train.steps': 1}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: Config, after: Config, unless: tuple[str, ...] = ()) -> list[str]:
    """"key old -> new" for each setting ``after`` changes (values cut for a message), in schema order, but for
    keys starting with one of ``unless``; keys only one of them has (another method's ``guidance`` settings) are
    not compared one by one (``method`` names that change)."""
    old, new = _flat(config_to_dict(before)), _flat(config_to_dict(after))
    return [f"{key} {shown(old[key], 40)} -> {shown(new[key], 40)}" for key in new
            if key in old and old[key] != new[key] and not key.startswith(unless)]
