"""View-dependent prompts and their embeddings, computed once per run.

A method names the texts it conditions on by role (``Method.role_texts``): 'cond' and 'uncond' (the empty
prompt) for classifier-free guidance, 'target' and 'source' for the bridge's stage two, 'negative' for NFSD.
With ``view_dependent`` every non-empty text gets the camera's view suffix (", front view", ...), so each
role has one text per view label (except the method's view-independent roles, e.g. VSD's LoRA prompt).

Two options against multi-face (Janus) objects, both from threestudio's prompt processor:
- view interpolation: each camera's condition is a blend of the front/side/back embeddings by azimuth
  (``view_blend_weights``) instead of the one of its view label; overhead cameras keep theirs.
- Perp-Neg: besides the (blended) positive, each camera gets two negative conditions (other views of the
  'cond' role, ``perp_neg_negatives``) and their weights; the methods combine them (guidance.perp_neg_direction).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from sdsbridge.scene.cameras import VIEW_LABELS
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


def role_prompts(texts: dict[str, str], view_dependent: bool = True,
                 fixed_roles: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """role -> text (``Method.role_texts``) to role -> view label -> text: with ``view_dependent`` each text
    gets the label's suffix (the empty prompt stays empty), else every label maps to the same text; roles in
    ``fixed_roles`` never get a suffix."""
    return {role: {label: with_view(text, label) if view_dependent and role not in fixed_roles else text
                   for label in VIEW_LABELS}
            for role, text in texts.items()}


def azimuth_segments(azimuth: torch.Tensor, labels: list[str]) -> list[tuple[str, float]]:
    """Where each of N cameras ([N] azimuths in degrees, 0 = front; N view labels) lies between the views, as
    threestudio's Perp-Neg reads it: ('overhead', 0) for an overhead camera, ('front-side', r) for |azimuth| < 90
    with r = 1 - |azimuth| / 90 (1 at the front), else ('side-back', r) with r = 2 - |azimuth| / 90 (1 at the
    side)."""
    angles = ((azimuth.detach().float().cpu() + 180.0) % 360.0 - 180.0).abs().tolist()
    return [("overhead", 0.0) if label == "overhead" else ("front-side", 1.0 - a / 90.0) if a < 90.0
            else ("side-back", 2.0 - a / 90.0) for a, label in zip(angles, labels)]


def view_blend_weights(azimuth: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """[N] azimuths and N view labels -> [N, 4] weights over ``VIEW_LABELS`` (``azimuth_segments``): front r
    and side 1 - r between front and side, side r and back 1 - r between side and back, all overhead for an
    overhead camera. Rows sum to 1."""
    weights = torch.zeros(len(labels), len(VIEW_LABELS), device=torch.device("cpu"))  # host math, moved by the caller
    front, side, back, overhead = (VIEW_LABELS.index(v) for v in ("front", "side", "back", "overhead"))
    for n, (segment, r) in enumerate(azimuth_segments(azimuth, labels)):
        if segment == "overhead":
            weights[n, overhead] = 1.0
        elif segment == "front-side":
            weights[n, front], weights[n, side] = r, 1.0 - r
        else:
            weights[n, side], weights[n, back] = r, 1.0 - r
    return weights


PerpNegWeights = tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]
"""Perp-Neg's four weight functions (a, b, c) -> a exp(-b r) + c, in the order f_sb, f_fsb, f_fs, f_sf."""


def perp_neg_negatives(azimuth: torch.Tensor, labels: list[str], f: PerpNegWeights
                       ) -> tuple[list[tuple[Optional[str], Optional[str]]], torch.Tensor]:
    """Perp-Neg's two negatives per camera (threestudio's ``get_text_embeddings_perp_neg``): view labels
    (None = the empty prompt) and [N, 2] weights (negative: pushed away from). With r as in
    ``azimuth_segments``: between front and side the negatives are front and side with weights
    -f_fs(r), -f_sf(1 - r); between side and back, side and front with -f_sb(r), -f_fsb(r); overhead
    cameras get none (the empty prompt, weight 0)."""
    f_sb, f_fsb, f_fs, f_sf = f

    def decay(abc: Sequence[float], r: float) -> float:
        a, b, c = abc
        return a * math.exp(-b * r) + c

    negatives, weights = [], []
    for segment, r in azimuth_segments(azimuth, labels):
        if segment == "overhead":
            negatives.append((None, None))
            weights.append([0.0, 0.0])
        elif segment == "front-side":
            negatives.append(("front", "side"))
            weights.append([-decay(f_fs, r), -decay(f_sf, 1.0 - r)])
        else:
            negatives.append(("side", "front"))
            weights.append([-decay(f_sb, r), -decay(f_fsb, r)])
    return negatives, torch.tensor(weights, dtype=torch.float32, device=torch.device("cpu"))


PERP_NEG_ROLES = ("perp_neg_0", "perp_neg_1")
"""Condition keys of Perp-Neg's two negatives; "perp_neg_weights" holds their [N, 2] weights."""


class PromptEmbeddings:
    """The embeddings of every (role, view) prompt of ``texts`` (role -> text, ``Method.role_texts``), from
    one ``prior.embed_prompts`` call.

    ``prompts[role][label]`` holds the texts (role -> view label -> text, ``role_prompts``); identical texts
    are embedded once into ``embeddings`` [P, ...] (on the prior's device), and ``rows[role]`` [4] gives each
    view label's row (in ``VIEW_LABELS`` order).
    """

    def __init__(self, prior: Prior, texts: dict[str, str], view_dependent: bool = True,
                 fixed_roles: Sequence[str] = (), interpolate: bool = False, perp_neg: Optional[PerpNegWeights] = None):
        self.prompts = role_prompts(texts, view_dependent, fixed_roles)
        self.interpolate = interpolate and view_dependent
        """Blend the view embeddings by azimuth (``view_blend_weights``) in ``conditions``."""
        self.perp_neg = perp_neg if view_dependent else None
        """Perp-Neg's weight functions, or None (off)."""
        if self.perp_neg is not None and not {"cond", "uncond"} <= set(texts):
            raise ValueError("Perp-Neg needs the 'cond' and 'uncond' roles")
        unique = list(dict.fromkeys(text for by_label in self.prompts.values() for text in by_label.values()))
        self.embeddings = prior.embed_prompts(unique)
        row = {text: i for i, text in enumerate(unique)}
        self.rows = {role: torch.tensor([row[by_label[label]] for label in VIEW_LABELS], device=self.embeddings.device)
                     for role, by_label in self.prompts.items()}
        self.view_roles = {role for role, by_label in self.prompts.items() if len(set(by_label.values())) > 1}
        """Roles whose text differs by view (what interpolation blends)."""

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.prompts)

    def conditions(self, labels: list[str], azimuth: Optional[torch.Tensor] = None,
                   roles: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
        """N view labels (and [N] azimuths in degrees, needed with interpolation or Perp-Neg) -> role -> [N, ...]
        conditions: each camera's row picked by its view label, or with ``interpolate`` the azimuth blend of
        the role's view rows. With Perp-Neg also ``PERP_NEG_ROLES`` (the negatives' conditions) and
        "perp_neg_weights" ([N, 2] float32 on the embeddings' device).

        ``roles`` restricts the role outputs (default: all embedded roles).
        """
        try:
            views = torch.tensor([VIEW_LABELS.index(label) for label in labels], device=self.embeddings.device)
        except ValueError:
            raise ValueError(f"unknown view label in {labels}; expected one of {VIEW_LABELS}") from None
        if (self.interpolate or self.perp_neg is not None) and azimuth is None:
            raise ValueError("view interpolation and Perp-Neg need the cameras' azimuths")
        blend = None
        if self.interpolate:
            blend = view_blend_weights(azimuth, labels).to(self.embeddings.device, self.embeddings.dtype)
        out = {}
        for role in roles or self.roles:
            if blend is not None and role in self.view_roles:
                out[role] = torch.einsum("nk,k...->n...", blend, self.embeddings[self.rows[role]])
            else:
                out[role] = self.embeddings[self.rows[role][views]]
        if self.perp_neg is not None:
            negatives, weights = perp_neg_negatives(azimuth, labels, self.perp_neg)
            empty = self.rows["uncond"][0]
            for i, role in enumerate(PERP_NEG_ROLES):
                rows = [empty if pair[i] is None else self.rows["cond"][VIEW_LABELS.index(pair[i])] for pair in negatives]
                out[role] = self.embeddings[torch.stack(rows)]
            out["perp_neg_weights"] = weights.to(self.embeddings.device)
        return out

    def texts(self, labels: list[str]) -> dict[str, list[str]]:
        """N view labels -> role -> the N prompt texts (for logging)."""
        return {role: [by_label[label] for label in labels] for role, by_label in self.prompts.items()}
