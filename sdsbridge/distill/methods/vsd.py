"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023): the bridge with a *learned* source, and
the bridge whose stage two uses that learned source ("bridge + VSD" in the paper).

The paper (McAllister et al. 2024) reads VSD as the bridge whose source distribution is not described by a
prompt but learned: eps_lora, the same UNet with a LoRA adapter conditioned on the camera, trained with the
plain diffusion loss on the current renders, so it models what the renders look like now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.common.checks import check, check_choice
from sdsbridge.distill.formulas import bridge_gradient, predict_batched, vsd_gradient, weight
from sdsbridge.distill.methods.base import WEIGHTINGS, DistillResult, Method, MethodSettings, register_method
from sdsbridge.distill.methods.bridge import Bridge, BridgeSettings
from sdsbridge.priors.base import Prior, noisy_latents
from sdsbridge.priors.lora import LoraSource, camera_condition


@dataclass
class LearnedSourceSettings(MethodSettings):
    """The LoRA's settings (VSD's and the bridge-VSD's)."""

    lora_lr: float = 1e-4
    """Learning rate of the LoRA and the camera embedding (threestudio's prolificdreamer.yaml)."""
    lora_rank: int = 4
    """Rank of the LoRA on the UNet's attention projections (to_q, to_k, to_v, to_out.0)."""
    lora_condition_dropout: float = 0.1
    """Probability that a LoRA training step drops the camera condition (zeros), so the LoRA also learns the
    camera-free score (threestudio's ``lora_cfg_training``)."""

    def validate(self) -> None:
        check(self.lora_lr >= 0, "guidance.lora_lr", "must be >= 0")
        check(1 <= self.lora_rank <= 256, "guidance.lora_rank", "must lie in [1, 256]")
        check(0.0 <= self.lora_condition_dropout <= 1.0, "guidance.lora_condition_dropout", "must lie in [0, 1]")
        super().validate()


@dataclass
class VSDSettings(LearnedSourceSettings):
    """VSD's ``guidance:`` settings."""

    vsd_guidance_scale: float = 7.5
    """CFG scale of the pretrained branch (ProlificDreamer's 7.5; the official 2D code's too)."""
    weighting: str = "sds"
    """w(t): 'sds' (1 - alphas_cumprod[t]) or 'uniform' (1)."""

    def validate(self) -> None:
        check(self.vsd_guidance_scale >= 0, "guidance.vsd_guidance_scale", "must be >= 0")
        check_choice(self.weighting, "guidance.weighting", WEIGHTINGS)
        super().validate()


@dataclass
class BridgeVSDSettings(BridgeSettings, LearnedSourceSettings):
    """The bridge-VSD's ``guidance:`` settings: the bridge's (``source_modifier`` unused) and the LoRA's."""


class LearnedSource:
    """What a method with VSD's learned source adds (a mixin before its ``Method`` base): a ``LoraSource`` on the
    prior's UNet, the 'lora' prompt role (the plain prompt, never with a view suffix: the camera embedding tells
    the LoRA the view, threestudio's choice), the LoRA's diffusion loss on the detached latents with every
    ``distill`` (``extra_losses['lora']``, one timestep sample per image), its optimizer group ('lora', lr
    ``lora_lr``), state and reset.

    Settings: ``lora_lr``, ``lora_rank``, ``lora_condition_dropout``.
    """

    view_independent_roles = ("lora",)
    needs = frozenset({"adapters"})
    trains_parameters = True

    def __init__(self, settings: Optional[LearnedSourceSettings | dict], prior: Prior):
        super().__init__(settings, prior)
        self.source = LoraSource(prior, self.settings.lora_rank)

    def role_texts(self, prompt: str) -> dict[str, str]:
        return {**super().role_texts(prompt), "lora": prompt.strip()}

    def camera(self, cameras: Optional[Cameras], n: int) -> torch.Tensor:
        """[N, 16] camera condition of the N latents (zeros in 2D)."""
        return camera_condition(None if cameras is None else cameras.c2w, n, self.prior.device)

    def source_noise(self, x_t: torch.Tensor, t: torch.Tensor, conditions: dict[str, torch.Tensor],
                     cameras: Optional[Cameras]) -> torch.Tensor:
        """eps_lora(x_t; y, c) [N, C, h, w] in x_t's dtype, without gradients."""
        with torch.no_grad():
            eps = self.source.predict_noise(x_t, t, conditions["lora"], self.camera(cameras, x_t.shape[0]))
        return eps.to(x_t.dtype)

    def distill(self, latents: torch.Tensor, conditions: dict[str, torch.Tensor], step: int,
                cameras: Optional[Cameras] = None, generator: Optional[torch.Generator] = None) -> DistillResult:
        """The method's ``distill`` (t, then noise), then the LoRA's diffusion loss (its t, noise and condition
        dropout drawn after, from the same generator) as ``extra_losses['lora']``."""
        result = super().distill(latents, conditions, step, cameras, generator)
        result.extra_losses["lora"] = self.source.diffusion_loss(
            latents, conditions["lora"], self.camera(cameras, latents.shape[0]),
            self.settings.lora_condition_dropout, generator)
        return result

    def param_groups(self) -> list[dict]:
        return [*super().param_groups(), {"params": self.source.parameters(), "lr": self.settings.lora_lr, "name": "lora"}]

    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        self.source.reset(generator)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


@register_method
class VSD(LearnedSource, Method):
    """g = w(t) (eps^s(x_t; y) - eps_lora(x_t; y, c)), w(t) = 1 - abar_t ('sds' weighting), where eps^s is CFG
    with scale ``vsd_guidance_scale`` between 'cond' (view suffixes as configured) and 'uncond' on the
    pretrained UNet (adapter off), and eps_lora the LoRA-adapted UNet (``LearnedSource``).

    Settings: ``vsd_guidance_scale``, ``weighting``, ``LearnedSource``'s and the base class's. Needs a Stable
    Diffusion prior.
    """

    name = "vsd"
    summary = "Variational Score Distillation (ProlificDreamer): a camera-conditioned LoRA as the learned source"
    Settings = VSDSettings

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        t = t.to(self.prior.device)
        x_t = noisy_latents(latents, t, noise, self.prior.alphas_cumprod)
        eps = predict_batched(self.prior, x_t, t, [conditions[role] for role in self.cfg_roles(conditions)])
        eps_cond, eps_uncond = self.cfg_predictions(eps, conditions)
        eps_pretrained = eps_uncond + self.settings.vsd_guidance_scale * (eps_cond - eps_uncond)
        w = weight(t, self.prior.alphas_cumprod, self.settings.weighting)
        return vsd_gradient(eps_pretrained, self.source_noise(x_t, t, conditions, cameras), w)

    def scale_settings(self, stage: int) -> tuple[str, ...]:
        return ("vsd_guidance_scale",)


@register_method
class BridgeVSD(LearnedSource, Bridge):
    """The bridge with VSD's learned source in stage two: stage one is SDS (as the bridge's), stage two
    g = w(t) s (eps(x_t; y_tgt) - eps_lora(x_t; y, c)). The LoRA trains from the first step, so it models the
    renders by the time stage two starts.

    Settings: the bridge's and ``LearnedSource``'s (``source_modifier`` is not used).
    """

    name = "bridge-vsd"
    summary = "the bridge with VSD's learned source in stage two"
    Settings = BridgeVSDSettings

    def role_texts(self, prompt: str) -> dict[str, str]:
        texts = super().role_texts(prompt)
        del texts["source"]  # the LoRA is the source
        return texts

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        if stage == 1:
            return Bridge.gradient(self, latents, t, noise, conditions, stage, cameras)
        t = t.to(self.prior.device)
        x_t = noisy_latents(latents, t, noise, self.prior.alphas_cumprod)
        [eps_tgt] = predict_batched(self.prior, x_t, t, [conditions["target"]])
        w = weight(t, self.prior.alphas_cumprod, self.settings.stage2_weighting)
        return bridge_gradient(eps_tgt, self.source_noise(x_t, t, conditions, cameras), w, self.settings.stage2_scale)
