"""SDS-Bridge (calibrated score distillation, McAllister et al. 2024): SDS first, then the bridge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.distill.formulas import bridge_gradient, weight
from sdsbridge.common.checks import check, check_choice
from sdsbridge.distill.methods.base import WEIGHTINGS, register_method
from sdsbridge.distill.methods.sds import SDS, SDSSettings
from sdsbridge.distill.prompts import join_prompt

SOURCE_MODIFIER = (
    "oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
)
"""The official source modifier: describes the artifacts of today's renders."""


@dataclass
class BridgeSettings(SDSSettings):
    """The bridge's ``guidance:`` settings: SDS's for stage one, then stage two's."""

    stage2_start_step: int = 20000
    """First step of stage two (derived from the step, so resumed runs switch too)."""
    stage2_scale: float = 1.0
    """Stage two: multiplier s of (eps_tgt - eps_src) (the official class default is 100)."""
    stage2_weighting: str = "uniform"
    """Stage two: w(t), 'sds' or 'uniform'."""
    stage2_max_step_percent: Optional[float] = None
    """Stage two: cap on t / T (None = use max_step_percent)."""
    source_modifier: str = SOURCE_MODIFIER
    """Appended to the prompt for the source y_src: describes today's artifacts."""

    def validate(self) -> None:
        check_choice(self.stage2_weighting, "guidance.stage2_weighting", WEIGHTINGS)
        check(self.stage2_start_step >= 0, "guidance.stage2_start_step", "must be >= 0")
        if self.stage2_max_step_percent is not None:
            check(self.min_step_percent < self.stage2_max_step_percent <= 1.0, "guidance.stage2_max_step_percent",
                  "must lie in (min_step_percent, 1]")
        super().validate()


@register_method
class Bridge(SDS):
    """Stage one (before ``stage2_start_step``) is SDS; stage two is
    g = w(t) s (eps(x_t; y_tgt) - eps(x_t; y_src)), with no noise term and no unconditional branch.
    y_tgt = prompt + ", " + target modifier (role 'target'), y_src = prompt + ", " + source modifier (role
    'source'), which describes today's artifacts.

    Settings: ``stage2_start_step``, ``stage2_scale`` (s), ``stage2_weighting`` (w), ``stage2_max_step_percent``
    (cap on t / T in stage two), ``source_modifier``, and SDS's for stage one.
    """

    name = "bridge"
    summary = "SDS-Bridge (calibrated score distillation): SDS, then target minus source prompt"
    Settings = BridgeSettings

    @classmethod
    def stage_starts(cls, settings: BridgeSettings) -> tuple[int, ...]:
        return (settings.stage2_start_step,)

    def role_texts(self, prompt: str) -> dict[str, str]:
        return {**super().role_texts(prompt), "target": join_prompt(prompt, self.settings.target_modifier),
                "source": join_prompt(prompt, self.settings.source_modifier)}

    def stage(self, step: int) -> int:
        """Two from ``stage2_start_step`` on (the official code switches only when the step equals it, so a
        resumed run never switches there)."""
        return 2 if step >= self.settings.stage2_start_step else 1

    def max_step_percent(self, step: int) -> float:
        value = super().max_step_percent(step)
        if self.stage(step) == 2 and self.settings.stage2_max_step_percent is not None:
            value = min(value, self.settings.stage2_max_step_percent)
        return value

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        if stage == 1:
            return super().gradient(latents, t, noise, conditions, stage, cameras)
        t = t.to(self.prior.device)
        eps_tgt, eps_src = self.predict(latents, t, noise, conditions, ("target", "source"), cameras)
        w = weight(t, self.prior.alphas_cumprod, self.settings.stage2_weighting)
        return bridge_gradient(eps_tgt, eps_src, w, self.settings.stage2_scale)

    def scale_settings(self, stage: int) -> tuple[str, ...]:
        return ("stage2_scale",) if stage == 2 else super().scale_settings(stage)
