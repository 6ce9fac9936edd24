"""Checks a command makes before it creates a run directory or builds a scene, so a run that cannot start
fails in one line and leaves nothing behind."""

from __future__ import annotations

import os

from sdsbridge.config.schema import KNOWN_MIRRORS, Config, PriorConfig
from sdsbridge.common.errors import UserError


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to a true value (what ``from_pretrained`` will honour)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def check_run(config: Config) -> None:
    """Every check ``train`` and ``image`` make before building anything, beyond the config's own validation:
    the prior's model (``check_prior_model``, this machine's disk) and the prompt (``check_prompt``). ``config
    check`` runs the same, so it fails where ``train`` would."""
    check_prior_model(config.prior)
    check_prompt(config)


def check_prompt(config: Config) -> None:
    """On the reference prior, that the prompt names one of its built-in shapes (true on any machine)."""
    if config.prior.kind == "reference" and config.prompt.strip():
        from sdsbridge.priors.reference_prompts import parse_prompt

        parse_prompt(config.prompt)


def check_prior_model(prior: PriorConfig) -> None:
    """UserError when the Stable Diffusion model of ``prior`` certainly cannot load: a local folder that is
    missing or not a complete pipeline, a hub id that is not in the local cache while the hub is offline, or
    one removed from the hub and not cached. Looks at the disk only (doctor's check); an uncached hub id with
    the network on is left to the download."""
    if prior.kind != "stable-diffusion":
        return
    from sdsbridge.cli.doctor import check_prior_model as doctor_check

    check = doctor_check(prior.model)
    if check.status == "fail":
        raise UserError(f"prior.model: {check.detail}")
    if check.status == "warn" and _offline():
        raise UserError(f"prior.model: '{prior.model}' is not (fully) in the local Hugging Face cache and "
                        f"HF_HUB_OFFLINE=1 is set, so it cannot be downloaded; {KNOWN_MIRRORS}; or set prior.model "
                        "to a local folder")
