"""What a score-distillation method is: the prompts it conditions on, its gradient, and optionally
trainable parameters of its own and state that goes into checkpoints.

The trainer (``train_step.py``) and the 2D mode only talk to this class:

- ``role_texts(prompt)``: role -> prompt text; ``prompts.PromptEmbeddings`` adds view suffixes, embeds them
  once and hands ``distill`` the [N, ...] condition of each role.
- ``distill(latents, conditions, step, cameras, generator)``: samples t and noise, computes the
  method's ``gradient`` and returns a ``DistillResult`` whose ``loss`` backpropagates it to the latents.
  ``extra_losses`` carries losses of the method's own parameters (e.g. a LoRA's diffusion loss on
  detached latents); the step adds them to its total loss.
- ``param_groups()``: optimizer groups (``{"params", "lr", "name"}``) of the method's own parameters; the
  trainer appends them to the scene's groups of its one AdamW.
- ``state_dict()`` / ``load_state_dict()``: saved under "method" in checkpoints and restored on resume.
- ``reset(generator)``: fresh own parameters (the 2D mode calls it per seed).
- ``prompt_embeddings(prompt)``: the run's ``PromptEmbeddings`` with the method's roles and the settings'
  view options (suffixes, azimuth interpolation, Perp-Neg).

Perp-Neg applies wherever a method uses classifier-free guidance between 'cond' and 'uncond'
(``cfg_predictions``): SDS, the bridge's stage one, NFSD and VSD's pretrained branch.

Each method declares its settings (``Settings``, a dataclass extending ``MethodSettings``: the ``guidance:``
section of a config, checked by its ``validate``) and its capabilities (``stage_starts``, ``prior_needs``,
``trains_parameters``), and registers itself under its ``name`` with ``register_method``; the config checks, the
command line's help, the plots, the report and the memory forecast ask ``METHODS`` instead of keeping lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional

import torch

from sdsbridge.scene.cameras import Cameras
from sdsbridge.common.checks import check, check_schedule
from sdsbridge.distill.formulas import (injected_loss, perp_neg_direction, predict_batched, sample_timesteps,
                                timestep_range)
from sdsbridge.priors.base import Prior, noisy_latents
from sdsbridge.distill.prompts import PERP_NEG_ROLES, PromptEmbeddings, join_prompt
from sdsbridge.common.schedules import schedule_range, schedule_value


@dataclass
class MethodSettings:
    """What every method reads (the ``guidance:`` keys they share): the timestep range, the prompts' view
    options (suffixes, azimuth blending, Perp-Neg), the target modifier and gradient clipping."""

    min_step_percent: float = 0.02
    """Lower end of t ~ U[min, max] * num_train_timesteps."""
    max_step_percent: Any = field(default_factory=lambda: [5000, 0.98, 0.5, 5001])
    """Scheduled upper end of t / T: 0.98 until step 5000, then 0.5."""
    target_modifier: str = "."
    """Appended to the prompt for the target: y_tgt = prompt + ", " + modifier (the official 3D run's ".", so
    "a pineapple, ., front view"); a modifier that starts with "," is appended as it is."""
    cfg_on_target: bool = True
    """Classifier-free guidance between y_tgt and the empty prompt (the official 3D code); False: between the
    plain prompt and the empty prompt (the official 2D code)."""
    view_dependent: bool = True
    """Append ', front view' / ', side view' / ', back view' / ', overhead view' by camera."""
    grad_clip: Optional[float] = None
    """Clip the per-pixel guidance gradient to [-x, x] (None = no clipping)."""
    perp_neg: bool = False
    """Perp-Neg (Armandpour et al. 2023) against multi-face (Janus) objects: the other views' prompts are
    negatives, only their components perpendicular to the positive direction are subtracted, weighted by
    azimuth. Needs a text-conditioned prior (Stable Diffusion) and view-dependent prompts; costs two more
    UNet samples per image."""
    perp_neg_f_sb: list[float] = field(default_factory=lambda: [1.0, 0.5, -0.606])
    """Perp-Neg weight a exp(-b r) + c of the side negative between side and back (threestudio's defaults)."""
    perp_neg_f_fsb: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.967])
    """Perp-Neg weight of the front negative between side and back."""
    perp_neg_f_fs: list[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])
    """Perp-Neg weight of the front negative between front and side (r = 1 at the front)."""
    perp_neg_f_sf: list[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])
    """Perp-Neg weight of the side negative between front and side (of 1 - r)."""
    view_interpolation: bool = False
    """Blend the front/side/back prompt embeddings by azimuth instead of picking one view suffix (as Perp-Neg
    does for its positive prompt); overhead views keep their own. Needs a text-conditioned prior."""

    def validate(self) -> None:
        """UserError naming the first bad ``guidance.*`` key. Subclasses check their own fields, then call this."""
        check(0.0 <= self.min_step_percent < 1.0, "guidance.min_step_percent", "must lie in [0, 1)")
        check_schedule(self.max_step_percent, "guidance.max_step_percent", 0.0, 1.0)
        check(schedule_range(self.max_step_percent)[0] > self.min_step_percent, "guidance.min_step_percent",
              "min timestep must be below max timestep (guidance.max_step_percent)")
        check(self.grad_clip is None or self.grad_clip > 0, "guidance.grad_clip", "must be > 0 or null")
        for key in ("perp_neg_f_sb", "perp_neg_f_fsb", "perp_neg_f_fs", "perp_neg_f_sf"):
            check(len(getattr(self, key)) == 3, f"guidance.{key}", "expected [a, b, c] (weight a exp(-b r) + c)")
        for key in ("perp_neg", "view_interpolation"):
            check(not getattr(self, key) or self.view_dependent, f"guidance.{key}", "needs guidance.view_dependent: true")


WEIGHTINGS = ("sds", "uniform")
"""What a ``weighting`` setting accepts: w(t) = 1 - abar_t ('sds') or 1 ('uniform')."""

PRIOR_CAPABILITIES = {"text": "embeds free text (view blending, Perp-Neg)",
                      "adapters": "has a UNet to put LoRA adapters on"}
"""What a method may need of a prior (``Method.prior_needs``), by name; a prior lists what it has (``capabilities``)."""

METHODS: dict[str, type["Method"]] = {}
"""Method name (``method:``) -> class, in registration order. Filled by ``register_method`` where each class is
defined; ``methods/__init__.py`` imports every module of its folder, so a new method's file registers itself."""


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: ``METHODS[cls.name] = cls`` (a name registered twice is a programming error)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def setting_names(settings_type: type) -> list[str]:
    """The field names of a settings dataclass, in declaration order."""
    return [f.name for f in fields(settings_type)]


@dataclass
class DistillResult:
    """What one ``Method.distill`` returns (and what the trainer logs)."""

    loss: torch.Tensor
    """Scalar on the prior's device; backpropagating it puts g / N on the latents (and through the encoder
    on the images)."""
    grad_norm: torch.Tensor
    """Scalar tensor on the prior's device: L2 norm of the injected gradient g over the whole batch (after
    clipping). A tensor, so reading it (``.item()``) is the caller's choice of when to sync."""
    t: torch.Tensor
    """[N] integer timesteps used."""
    stage: int
    """1, or 2 in the bridge's stage two."""
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Scalar losses of the method's own parameters, by name (none for SDS, the bridge and NFSD)."""
    guidance_finite: Optional[torch.Tensor] = None
    """Bool scalar on the prior's device: False when every element of g was NaN or inf (``loss`` is then NaN, so
    the step is skipped and counted like any non-finite step). A tensor, read only when a step was skipped."""


class Method:
    """A score-distillation method on a frozen ``prior`` with ``settings``. The base class is the common
    machinery; subclasses give ``gradient`` and, as needed, more prompt roles, stages, parameters, state.

    Settings used here: ``target_modifier``, ``cfg_on_target`` (the 'cond' text), ``min_step_percent``,
    ``max_step_percent`` (the timestep range), ``grad_clip``.
    """

    name: ClassVar[str] = "method"
    """What ``method:`` calls it (the registry's key)."""
    summary: ClassVar[str] = ""
    """One line for the command line's help and the docs."""
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    """The dataclass of its ``guidance:`` settings."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """Prior capabilities it needs whatever its settings (``PRIOR_CAPABILITIES``)."""
    trains_parameters: ClassVar[bool] = False
    """Whether it has parameters of its own that the optimizer trains (``param_groups``)."""
    view_independent_roles: tuple[str, ...] = ()
    """Roles whose text never gets a view suffix (VSD's LoRA prompt)."""

    def __init__(self, settings: Optional[MethodSettings | dict], prior: Prior):
        """``settings``: the method's ``Settings``, or a mapping of their fields (None: the defaults)."""
        self.settings = settings if isinstance(settings, MethodSettings) else self.Settings(**(settings or {}))
        self.prior = prior

    # --- capabilities (of the class and its settings: known before a prior loads) -----------------------
    @classmethod
    def stage_starts(cls, settings: MethodSettings) -> tuple[int, ...]:
        """The steps where a stage after the first begins (the plots mark them; the memory forecast traces a
        step of each stage). None by default: one stage."""
        return ()

    @classmethod
    def prior_needs(cls, settings: MethodSettings) -> frozenset[str]:
        """Prior capabilities these settings need: ``needs``, plus 'text' for Perp-Neg or view blending."""
        return cls.needs | ({"text"} if settings.perp_neg or settings.view_interpolation else frozenset())

    def prompt_embeddings(self, prompt: str) -> PromptEmbeddings:
        """The embeddings of ``role_texts(prompt)`` with the settings' view options: suffixes
        (``view_dependent``), azimuth blending (``view_interpolation``, and always with ``perp_neg``, whose
        positive threestudio blends) and Perp-Neg's negatives and weights (``perp_neg``)."""
        s = self.settings
        perp_neg = (s.perp_neg_f_sb, s.perp_neg_f_fsb, s.perp_neg_f_fs, s.perp_neg_f_sf) if s.perp_neg else None
        return PromptEmbeddings(self.prior, self.role_texts(prompt), s.view_dependent, self.view_independent_roles,
                                interpolate=s.view_interpolation or s.perp_neg, perp_neg=perp_neg)

    # --- prompts ---------------------------------------------------------------------------------------
    def role_texts(self, prompt: str) -> dict[str, str]:
        """role -> text before view suffixes: 'cond', what CFG conditions on (y_tgt = prompt + ", " +
        target modifier with ``cfg_on_target``, as the official 3D code; else the plain prompt, as its 2D
        code), and 'uncond', the empty prompt."""
        cond = join_prompt(prompt, self.settings.target_modifier) if self.settings.cfg_on_target else prompt.strip()
        return {"cond": cond, "uncond": ""}

    # --- schedule --------------------------------------------------------------------------------------
    def stage(self, step: int) -> int:
        """The stage at ``step`` (a function of the step, so a resumed run is in the right one)."""
        return 1

    def max_step_percent(self, step: int) -> float:
        """Upper end of t / T at ``step``: the scheduled ``max_step_percent``."""
        return schedule_value(self.settings.max_step_percent, step)

    # --- the gradient ----------------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                roles: tuple[str, ...], cameras: Optional[Cameras] = None) -> list[torch.Tensor]:
        """The prior's noise prediction on x_t (``noisy_latents``) for each of ``roles``, in one batched call:
        a list of [N, C, h, w]. ``t`` [N] on the prior's device."""
        missing = [role for role in roles if role not in conditions]
        if missing:
            raise KeyError(f"conditions lack roles {missing} (have {sorted(conditions)})")
        x_t = noisy_latents(latents, t, noise, self.prior.alphas_cumprod)
        return predict_batched(self.prior, x_t, t, [conditions[role] for role in roles], cameras)

    @staticmethod
    def cfg_roles(conditions: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """The roles classifier-free guidance predicts: 'cond', 'uncond', and Perp-Neg's negatives when the
        conditions carry them."""
        return ("cond", "uncond") + (PERP_NEG_ROLES if "perp_neg_weights" in conditions else ())

    @staticmethod
    def cfg_predictions(eps: list[torch.Tensor], conditions: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) from the predictions of ``cfg_roles``; with Perp-Neg eps_cond is replaced by
        eps_uncond + the Perp-Neg direction, so that CFG eps_uncond + s (eps_cond - eps_uncond) becomes
        eps_uncond + s (e_pos + sum_i w_i perp(e_i, e_pos))."""
        eps_cond, eps_uncond, *negatives = eps
        if negatives:
            weights = conditions["perp_neg_weights"].to(eps_cond.device, eps_cond.dtype)
            eps_cond = eps_uncond + perp_neg_direction(eps_cond, eps_uncond, negatives, weights)
        return eps_cond, eps_uncond

    def gradient(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, conditions: dict[str, torch.Tensor],
                 stage: int, cameras: Optional[Cameras] = None) -> torch.Tensor:
        """g [N, C, h, w] for latents [N, C, h, w], timesteps t [N], noise [N, C, h, w] and the role ->
        [N, ...] ``conditions`` (no clipping, no NaN handling)."""
        raise NotImplementedError

    def scale_settings(self, stage: int) -> tuple[str, ...]:
        """The ``guidance:`` keys that scale g in ``stage``: what a run whose gradient overflows everywhere names
        (a scale of 1e300 makes every element inf or NaN). None known by default."""
        return ()

    def distill(self, latents: torch.Tensor, conditions: dict[str, torch.Tensor], step: int,
                cameras: Optional[Cameras] = None, generator: Optional[torch.Generator] = None) -> DistillResult:
        """One score-distillation evaluation on latents [N, C, h, w] (with grad to what produced them).

        Samples t (uniform on ``max/min_step_percent`` x T) and then noise ``torch.randn`` from ``generator``
        (the global RNG when None), in that order; computes ``gradient``, replaces NaNs and infinities by
        0, clips to [-grad_clip, grad_clip] when set, and returns the injected loss with grad norm, t, stage. A
        gradient that is NaN or inf everywhere carries nothing to learn: its loss is NaN (``guidance_finite``), so
        the step is skipped, not taken with zeros.
        """
        stage = self.stage(step)
        t_min, t_max = timestep_range(self.settings.min_step_percent, self.max_step_percent(step),
                                      self.prior.num_train_timesteps)
        t = sample_timesteps(latents.shape[0], t_min, t_max, generator).to(self.prior.device)
        noise_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=noise_device, dtype=latents.dtype)
        noise = noise.to(latents.device)

        grad = self.gradient(latents, t, noise, conditions, stage, cameras)
        guidance_finite = torch.isfinite(grad).any()  # no host sync: read only when the step is skipped
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self.settings.grad_clip is not None:
            grad = grad.clamp(-self.settings.grad_clip, self.settings.grad_clip)
        loss = injected_loss(latents, grad)
        loss = torch.where(guidance_finite, loss, torch.full_like(loss, float("nan")))
        return DistillResult(loss=loss, grad_norm=grad.norm().detach(), t=t, stage=stage,
                             guidance_finite=guidance_finite)

    # --- trainable parameters and state ----------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """AdamW groups of the method's own parameters: ``{"params": [...], "lr": float, "name": str}``
        each (betas, eps and weight decay are the trainer's: ``train.*`` in 3D, ``image.lora_*`` in 2D). None by
        default."""
        return []

    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-initialise the method's own parameters (from ``generator``, else the global RNG). None here."""

    def state_dict(self) -> dict:
        """What a checkpoint stores for the method (tensors and builtins). Nothing by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (on resume)."""
        if state:
            raise KeyError(f"{self.name}: unexpected method state {sorted(state)}")
