"""View-dependent prompts and their embeddings, computed once per run.

A method names the texts it conditions on by role (``Method.role_texts``): 'cond' and 'uncond' (the empty
prompt) for classifier-free guidance, 'target' and 'source' for the bridge's stage two, 'negative' for NFSD.
With ``view_dependent`` every non-empty text gets the camera's view suffix (", front view", ...), so each
role has one text per view label.
"""

from __future__ import annotations

from typing import Optional

import torch

from sdsbridge.cameras import VIEW_LABELS
from sdsbridge.priors.base import Prior

VIEW_SUFFIXES = {label: f", {label} view" for label in VIEW_LABELS}
"""View label -> suffix appended to the prompt: ', front view', ', side view', ', back view', ', overhead view'."""


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


def role_prompts(texts: dict[str, str], view_dependent: bool = True) -> dict[str, dict[str, str]]:
    """role -> text (``Method.role_texts``) to role -> view label -> text: with ``view_dependent`` each text
    gets the label's suffix (the empty prompt stays empty), else every label maps to the same text."""
    return {role: {label: with_view(text, label) if view_dependent else text for label in VIEW_LABELS}
            for role, text in texts.items()}


class PromptEmbeddings:
    """The embeddings of every (role, view) prompt of ``texts`` (role -> text, ``Method.role_texts``), from
    one ``prior.embed_prompts`` call.

    ``prompts[role][label]`` holds the texts (role -> view label -> text, ``role_prompts``); identical texts
    are embedded once into ``embeddings`` [P, ...] (on the prior's device), and ``rows[role]`` [4] gives each
    view label's row (in ``VIEW_LABELS`` order).
    """

    def __init__(self, prior: Prior, texts: dict[str, str], view_dependent: bool = True):
        self.prompts = role_prompts(texts, view_dependent)
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
