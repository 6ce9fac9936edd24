"""Checks a command makes before it creates a run directory or builds a scene, so a run that cannot start
fails in one line and leaves nothing behind. Each prior says what it checks (its ``check_prompt`` and
``check_machine``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line imports this module; torch and the components load with the first command
    from sdsbridge.config.schema import Config


def check_run(config: Config) -> None:
    """Every check ``train`` and ``image`` make before building anything, beyond the config's own validation:
    the prompt (``check_prompt``) and the prior on this machine (Stable Diffusion's model on its disk). ``config
    check`` runs the same, so it fails where ``train`` would."""
    from sdsbridge.priors import prior_class

    prior_class(config.prior.kind).check_machine(config.prior)
    check_prompt(config)


def check_prompt(config: Config) -> None:
    """What the prior needs of the prompt, true on any machine (the reference prior: a built-in shape)."""
    from sdsbridge.priors import prior_class

    if config.prompt.strip():
        prior_class(config.prior.kind).check_prompt(config.prompt)
