"""View-dependent prompts and their embeddings, computed once per run.

Roles (which text each prior evaluation is conditioned on):

- ``cond``: what SDS, NFSD and the bridge's stage one condition on, with CFG against ``uncond``: y_tgt when
  ``cfg_on_target`` (the official 3D code: "a pineapple, ., front view"), else the plain prompt (the
  official 2D code).
- ``target``: y_tgt = prompt + ", " + target modifier (bridge stage two).
- ``source``: y_src = prompt + source modifier (bridge stage two).
- ``uncond``: the empty prompt (never gets a view suffix).
- ``negative``: NFSD's negative prompt.

With ``view_dependent`` every role but ``uncond`` gets the camera's view suffix (", front view", ...).
"""

from __future__ import annotations

from typing import Optional

import torch

from sdsbridge.cameras import VIEW_LABELS
from sdsbridge.config import GuidanceConfig
from sdsbridge.priors.base import Prior

VIEW_SUFFIXES = {label: f", {label} view" for label in VIEW_LABELS}
"""View label -> suffix appended to the prompt: ', front view', ', side view', ', back view', ', overhead view'."""

ROLES_BY_METHOD = {
    "sds": ("cond", "uncond"),
    "nfsd": ("cond", "uncond", "negative"),
    "bridge": ("cond", "uncond", "target", "source"),
}
"""The roles each method evaluates the prior with."""


def join_prompt(prompt: str, modifier: str) -> str:
    """``prompt + ", " + modifier`` as the official code joins them ("a pineapple" and "." give
    "a pineapple, ."); a modifier that already starts with "," or ";" (the 2D code's ", sharp") is appended
    as it is, and an empty modifier leaves the prompt alone. Trailing separators of the prompt are dropped."""
    prompt = prompt.strip().rstrip(",;").strip()
    modifier = modifier.strip()
    if not modifier:
        return prompt
    if modifier[0] in ",;":
        modifier = modifier[1:].strip()
        if not modifier:
            return prompt
    if not prompt:
        return modifier
    return f"{prompt}, {modifier}"


def with_view(text: str, label: str) -> str:
    """``text`` with the suffix of view ``label`` (the empty prompt stays empty)."""
    return text + VIEW_SUFFIXES[label] if text else text


def role_prompts(prompt: str, method: str, cfg: GuidanceConfig) -> dict[str, dict[str, str]]:
    """role -> view label -> prompt text, for the roles ``method`` needs (see ROLES_BY_METHOD).

    Without ``cfg.view_dependent`` every view label maps to the same text.
    """
    target = join_prompt(prompt, cfg.target_modifier)
    base = {
        "cond": target if cfg.cfg_on_target else prompt.strip(),
        "uncond": "",
        "target": target,
        "source": join_prompt(prompt, cfg.source_modifier),
        "negative": cfg.nfsd_negative.strip(),
    }
    texts = {}
    for role in ROLES_BY_METHOD[method]:
        text = base[role]
        texts[role] = {label: with_view(text, label) if cfg.view_dependent else text for label in VIEW_LABELS}
    return texts


class PromptEmbeddings:
    """The embeddings of every (role, view) prompt ``method`` needs, from one ``prior.embed_prompts`` call.

    ``prompts[role][label]`` holds the texts (role -> view label -> text); identical texts are embedded
    once into ``embeddings`` [P, ...] (on the prior's device), and ``rows[role]`` [4] gives each view
    label's row (in ``VIEW_LABELS`` order).
    """

    def __init__(self, prior: Prior, prompt: str, cfg: GuidanceConfig, method: str):
        self.prompts = role_prompts(prompt, method, cfg)
        unique = list(dict.fromkeys(text for by_label in self.prompts.values() for text in by_label.values()))
        self.embeddings = prior.embed_prompts(unique)
        row = {text: i for i, text in enumerate(unique)}
        self.rows = {role: torch.tensor([row[by_label[label]] for label in VIEW_LABELS], device=self.embeddings.device)
                     for role, by_label in self.prompts.items()}

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.prompts)

    def conditions(self, labels: list[str], roles: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
        """N view labels -> role -> [N, ...] conditions, each camera's row picked by its view label.

        ``roles`` restricts the output (default: all embedded roles).
        """
        try:
            views = torch.tensor([VIEW_LABELS.index(label) for label in labels], device=self.embeddings.device)
        except ValueError:
            raise ValueError(f"unknown view label in {labels}; expected one of {VIEW_LABELS}") from None
        return {role: self.embeddings[self.rows[role][views]] for role in (roles or self.roles)}

    def texts(self, labels: list[str]) -> dict[str, list[str]]:
        """N view labels -> role -> the N prompt texts (for logging)."""
        return {role: [by_label[label] for label in labels] for role, by_label in self.prompts.items()}
