"""2D score distillation (`sdsbridge image`): optimise one image directly under a prior, as the official
SDS-Bridge 2D code does, for one or more seeds (image_batch.py runs it for every prompt of a text file).

What is optimised is the prior's latent x [1, C, h, w] itself: for Stable Diffusion a VAE latent
[1, 4, R/8, R/8] (R = ``image.resolution``, by default the prior's own), initialised like the official code
with x ~ N(0, I); for the reference prior (built at R = ``image.resolution``) the pixel-space tensor its
``encode_images`` returns ([1, 3, R, R] in [-1, 1] units), initialised the same way (N(0, I) is also what that
prior's diffusion holds at t = T). Every step is ``train_step`` on x (the same methods and step as 3D): one
distillation and one AdamW step (``image_optimizer``: the official code's settings, the image latent's and, for
VSD, the LoRA's own).

Outputs in ``out_dir`` (each seed ``s``): ``seed-<s>.png`` (the final image, written atomically and last),
``seed-<s>.mp4`` (the initial image and one frame every ``image.video_every`` steps), ``metrics.jsonl``
(one row every ``log.log_every`` steps and at the last step: seed, step, loss, grad_norm, t, stage, bad_steps),
``config.yaml`` (the resolved config) and ``grid.png`` (the seeds side by side; the one image for one seed).

Non-finite steps follow the 3D rule: a step whose loss or gradient is not finite (guidance NaN or inf everywhere
included) is skipped and counted; ``image.max_bad_steps`` of them in a row, or every step of a seed, fail that
seed. A failed seed gets its metrics rows only (no PNG, no video; an earlier run's under those names are
removed), the other seeds go on, no grid.png is written, and ``run_image`` ends with a RunFailed (exit code 1)
naming the first failure and, for overflowing guidance, the ``image.*`` scale to lower.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sdsbridge.common.atomic import atomic_write_bytes, make_dirs, write_failed
from sdsbridge.config.schema import Config, ImageConfig
from sdsbridge.config.loader import to_yaml
from sdsbridge.common.errors import RunFailed, UserError
from sdsbridge.common.jsonl import append_rows, keep_rows
from sdsbridge.common.media import to_uint8, video_frame, write_png, write_video
from sdsbridge.distill.methods import Method, MethodSettings, make_method
from sdsbridge.distill.methods.base import setting_names
from sdsbridge.priors import load_prior
from sdsbridge.priors.base import Prior
from sdsbridge.distill.prompts import PromptEmbeddings
from sdsbridge.training.step import BadSteps, train_step

logger = logging.getLogger("sdsbridge")

VIDEO_FPS = 10
"""Frames per second of the optimisation video (the official 2D code's)."""
MAX_SEEDS = 100_000
"""Most seeds one spec may name."""
_SEED_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


# --- inputs ------------------------------------------------------------------------------------------
def parse_seeds(spec: str) -> list[int]:
    """'3' -> [3]; '0-7' -> [0, ..., 7] (inclusive); '0,2,5' -> [0, 2, 5]; items combine ('0-2,9').
    Raises UserError (one line) for anything else: empty items, negative or reversed ranges, repeats."""
    seeds: list[int] = []
    for item in str(spec).split(","):
        match = _SEED_ITEM.match(item.strip())
        if not match:
            raise UserError(f"seeds '{spec}': expected a seed (3), a range (0-7) or a list (0,2,5) of "
                            f"non-negative integers, got '{item.strip()}'")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"seeds '{spec}': range '{item.strip()}' runs backwards")
        if hi >= 2 ** 63 or len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise UserError(f"seeds '{spec}': too many or too large (at most {MAX_SEEDS} seeds below 2^63)")
        seeds.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise UserError(f"seeds '{spec}': seed {seed} is named twice")
        seen.add(seed)
    return seeds


# --- settings and the prior's image space ------------------------------------------------------------
IMAGE_SETTINGS = ("guidance_scale", "stage2_start_step", "stage2_scale", "stage2_weighting", "min_step_percent",
                  "max_step_percent", "target_modifier", "lora_lr")
"""Method settings the 2D mode takes from the ``image:`` field of the same name (``image_guidance_config``)."""
IMAGE_KEYS = {name: f"image.{name}" for name in IMAGE_SETTINGS}
"""The config key a 2D run sets each of ``IMAGE_SETTINGS`` with: what its errors name."""


def image_guidance_config(config: Config) -> MethodSettings:
    """The 2D mode's method settings: ``config.guidance`` (the method's ``Settings``) with those of its fields
    that ``image:`` sets replaced (the official 2D code's scales, weighting, switch step, timestep range, target
    modifier and LoRA learning rate), CFG on the plain prompt and no view suffixes (so no view interpolation or
    Perp-Neg). Fields the method does not have are not touched (so any method runs in 2D)."""
    image_values = dict(
        {name: getattr(config.image, name) for name in IMAGE_SETTINGS},
        weighting="sds",
        stage2_max_step_percent=None,
        cfg_on_target=False,
        view_dependent=False,
        view_interpolation=False,
        perp_neg=False,
    )
    own = set(setting_names(type(config.guidance)))
    return dataclasses.replace(config.guidance, **{k: v for k, v in image_values.items() if k in own})


LOW_NOISE_T = 0.2
"""t / T below which the optimisation removes the last noise."""
MIN_LOW_NOISE_STEPS = 20
"""Fewer expected steps below ``LOW_NOISE_T`` than this leave a visibly noisy image."""


def too_few_steps(im) -> Optional[str]:
    """A warning when ``image.steps`` gives fewer than ``MIN_LOW_NOISE_STEPS`` expected steps with t below
    ``LOW_NOISE_T`` (t is uniform on [min_step_percent, max_step_percent] every step), else None."""
    span = im.max_step_percent - im.min_step_percent
    low = im.steps * max(0.0, min(LOW_NOISE_T, im.max_step_percent) - im.min_step_percent) / span if span > 0 else im.steps
    if low >= MIN_LOW_NOISE_STEPS:
        return None
    return (f"image.steps={im.steps}: only about {low:.0f} steps will sample t below {LOW_NOISE_T:g} T, where the last "
            f"noise is removed, so expect a noisy image (the official 2D runs take 1000 steps)")


def load_image_prior(config: Config, device: torch.device | str) -> Prior:
    """``load_prior`` for the 2D mode: the reference prior is built at ``image.resolution`` if set, else at its
    ``prior.resolution``; Stable Diffusion loads as configured."""
    prior_cfg = config.prior
    if prior_cfg.kind == "reference":
        prior_cfg = dataclasses.replace(prior_cfg, resolution=config.image.resolution or prior_cfg.resolution)
    return load_prior(prior_cfg, device, config.cameras)


@torch.no_grad()
def latent_shape(prior: Prior, resolution: int) -> tuple[int, int, int, int]:
    """(1, C, h, w) of an R x R image's latent (R = ``resolution`` pixels): C and the downscale factor f
    are read off ``prior.encode_images`` of a grey image (SD: C = 4, f = 8; reference: C = 3, f = 1).
    UserError if R is not a multiple of f."""
    r = prior.image_resolution
    z = prior.encode_images(torch.full((1, 3, r, r), 0.5, device=prior.device))
    factor = r // z.shape[-1]
    if resolution % factor:
        raise UserError(f"image.resolution: {resolution} is not a multiple of the prior's latent factor {factor}")
    return (1, z.shape[1], resolution // factor, resolution // factor)


def first_image(prior: Prior, latents: torch.Tensor) -> np.ndarray:
    """The first of [N, C, h, w] latents as an [H, W, 3] uint8 image (``prior.decode_latents``)."""
    return to_uint8(prior.decode_latents(latents)[0].permute(1, 2, 0))


# --- the optimisation --------------------------------------------------------------------------------
@dataclass
class Trace:
    """What one optimisation produced."""

    image: Optional[np.ndarray]
    """[H, W, 3] uint8 final image; None when the seed failed (``failure``)."""
    frames: list[np.ndarray]
    """[H, W, 3] uint8 video frames: the initial image, then one every ``video_every`` steps."""
    metrics: list[dict]
    """Rows of metrics.jsonl."""
    seconds: float
    """Wall time of the loop (including video frame decoding)."""
    steps: int = 0
    """Steps run (``image.steps``, or fewer when the seed failed)."""
    bad_steps: int = 0
    """Non-finite steps skipped."""
    failure: Optional[str] = None
    """Why the seed failed (``image.max_bad_steps`` non-finite steps in a row, or all of them), else None."""


IMAGE_BETAS = (0.9, 0.99)
"""AdamW betas of the image latent (the official 2D code's image optimizer, as the 3D run's)."""
IMAGE_EPS = 1e-15
"""AdamW epsilon of the image latent."""
IMAGE_WEIGHT_DECAY = 0.01
"""AdamW weight decay of the image latent (torch's default: the official 2D code passes none)."""


def image_optimizer(latents: torch.Tensor, method: Method, im: ImageConfig) -> torch.optim.AdamW:
    """One AdamW with the settings of the official 2D code's two (generate.py): the image latent ``latents``
    (lr ``im.lr``, ``IMAGE_BETAS``, ``IMAGE_EPS``, ``IMAGE_WEIGHT_DECAY``), then the method's own groups (VSD's
    LoRA and camera embedding, lr ``image.lora_lr`` through ``image_guidance_config``) with ``im.lora_betas``,
    ``im.lora_eps`` and ``im.lora_weight_decay`` (official: torch's defaults (0.9, 0.999) and 1e-8, weight decay
    0). AdamW updates each tensor on its own, so one optimizer steps both as the two would."""
    lora = {"betas": tuple(im.lora_betas), "eps": im.lora_eps, "weight_decay": im.lora_weight_decay}
    groups = [{"params": [latents], "lr": im.lr, "name": "image"}, *({**g, **lora} for g in method.param_groups())]
    return torch.optim.AdamW(groups, betas=IMAGE_BETAS, eps=IMAGE_EPS, weight_decay=IMAGE_WEIGHT_DECAY)


def optimise_image(method: Method, embeddings: PromptEmbeddings, config: Config, seed: int,
                   progress: bool = True, desc: str = "") -> Trace:
    """Run ``image.steps`` steps of ``method`` (``train_step``) on a fresh latent (see the module docstring).

    One CPU ``torch.Generator`` seeded with ``seed`` draws the initial latent, then every step's t and
    noise (inside ``Method.distill``), so a seed gives the same image whatever else runs (CPU and CUDA
    alike, up to the prior's numerics). A non-finite step is skipped with a warning; ``image.max_bad_steps``
    in a row stop the seed, and they or a seed whose every step was skipped set ``Trace.failure`` (steps
    counted from 1 in messages).
    """
    im, prior = config.image, method.prior
    generator = torch.Generator().manual_seed(seed)
    shape = latent_shape(prior, im.resolution or prior.image_resolution)
    latents = torch.randn(shape, generator=generator).to(prior.device).requires_grad_(True)
    method.reset(generator)  # a fresh LoRA per seed (VSD); nothing for the other methods
    optimizer = image_optimizer(latents, method, im)
    conditions = embeddings.conditions(["front"])  # no view suffixes in 2D: every label has the same text

    frames = [first_image(prior, latents)] if im.video_every else []
    rows = []
    done, bad, failure = 0, BadSteps(im.max_bad_steps), None
    start = time.perf_counter()
    bar = tqdm(range(im.steps), desc=desc or f"seed {seed}", disable=not progress, dynamic_ncols=True)
    with logging_redirect_tqdm():  # warnings print above the bar, not glued to it
        for step in bar:
            result = train_step(method, optimizer, latents, conditions, step, generator=generator)
            done = step + 1
            diverged = bad.record(method, result, IMAGE_KEYS)
            if not result.finite:
                logger.warning(f"seed {seed} step {done}: {bad.cause}, step skipped ({bad.in_row} in a row)")
            if diverged:
                failure = (f"{bad.in_row} non-finite steps in a row at step {done} of {im.steps} ({bad.cause}); "
                           f"{bad.advice}")
            if step % config.log.log_every == 0 or done == im.steps or failure:
                t, grad_norm = int(result.distill.t[0]), result.distill.grad_norm.item()
                rows.append({"seed": seed, "step": step, "loss": result.loss.item(), "grad_norm": grad_norm,
                             "t": t, "stage": result.distill.stage, "bad_steps": bad.total})
                bar.set_postfix(stage=result.distill.stage, t=t, grad=f"{grad_norm:.3g}", refresh=False)
            if failure:
                break
            if im.video_every and done % im.video_every == 0:
                frames.append(first_image(prior, latents))
    bar.close()
    seconds = time.perf_counter() - start
    if failure is None and bad.total and bad.total == done:
        failure = f"all {done} steps were non-finite and skipped, nothing was learned ({bad.cause}); {bad.advice}"
    elif failure is None and bad.total:
        logger.warning(f"seed {seed}: {bad.total} non-finite step(s) of {done} were skipped")
    image = first_image(prior, latents) if failure is None else None
    return Trace(image=image, frames=frames, metrics=rows, seconds=seconds, steps=done, bad_steps=bad.total,
                 failure=failure)


# --- outputs -----------------------------------------------------------------------------------------
def image_path(out_dir: Path, seed: int) -> Path:
    """The final image of ``seed``: ``out_dir/seed-<seed>.png``."""
    return Path(out_dir) / f"seed-{seed}.png"


def video_path(out_dir: Path, seed: int) -> Path:
    """The optimisation video of ``seed``: ``out_dir/seed-<seed>.mp4``."""
    return Path(out_dir) / f"seed-{seed}.mp4"


def remove_files(paths: list[Path]) -> None:
    """Delete those of ``paths`` that exist (an earlier run's outputs); WriteFailed if the OS refuses."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise write_failed(exc, path, "removing") from None


def failure_message(failed: dict[int, str], seeds: list[int], out_dir: Path) -> str:
    """One line for the ``failed`` seeds (seed -> ``Trace.failure``) of the ``seeds`` optimised: how many, the
    first one's reason, and that they have no image (so no grid)."""
    first, reason = next(iter(failed.items()))
    if len(seeds) == 1:
        return (f"image failed: seed {first}: {reason}; no image was written (its metrics rows are in "
                f"{Path(out_dir) / 'metrics.jsonl'})")
    named = ", ".join(str(seed) for seed in list(failed)[:10]) + (", ..." if len(failed) > 10 else "")
    others = f"; the other seeds' images are in {out_dir}" if len(failed) < len(seeds) else ""
    return (f"image failed: {len(failed)} of {len(seeds)} seeds failed ({named}) and have no image, so no grid.png "
            f"was written; seed {first}: {reason}{others}")


def is_done(out_dir: Path, seeds: list[int]) -> bool:
    """True when every seed's final PNG and grid.png exist."""
    return (Path(out_dir) / "grid.png").is_file() and all(image_path(out_dir, s).is_file() for s in seeds)


@dataclass
class ImageResult:
    """What ``run_image`` wrote."""

    out_dir: Path
    images: dict[int, Path]
    """seed -> final PNG."""
    videos: dict[int, Path]
    """seed -> optimisation mp4 (seeds optimised in this call, with ``image.video_every`` > 0)."""
    grid: Path
    """grid.png (the seeds' images side by side, in the order given)."""
    metrics: Path
    config: Path
    optimised: list[int] = field(default_factory=list)
    """Seeds optimised in this call (the others were skipped as done)."""
    seconds: float = 0.0
    """Wall time of the optimisation loops."""
    steps: int = 0
    """Steps run in this call, all seeds together."""
    bad_steps: dict[int, int] = field(default_factory=dict)
    """seed -> non-finite steps skipped (seeds optimised in this call)."""

    @property
    def ms_per_step(self) -> Optional[float]:
        """Mean loop time per step (milliseconds; None if nothing ran)."""
        return 1000.0 * self.seconds / self.steps if self.steps else None


def run_image(config: Config, out_dir: Path, device: torch.device | str, seeds: list[int], progress: bool = True,
              prior: Optional[Prior] = None, skip_done: bool = False, desc: str = "") -> ImageResult:
    """Optimise one image per seed for ``config.prompt`` with ``config.method``; write the outputs listed
    in the module docstring to ``out_dir`` (created if needed).

    ``prior``: an already loaded prior (batch mode loads it once), else ``load_image_prior(config, device)``.
    ``skip_done``: keep seeds whose final PNG exists instead of optimising them again.
    Raises UserError for user-caused problems (e.g. a prompt the reference prior cannot parse), and RunFailed
    (exit code 1) after the last seed when a seed failed on non-finite steps (see the module docstring).
    """
    if not seeds:
        raise UserError("seeds: no seed given")
    warning = too_few_steps(config.image)
    if warning:
        logger.warning(warning)
    prior = prior if prior is not None else load_image_prior(config, device)
    method = make_method(config.method, image_guidance_config(config), prior)
    embeddings = method.prompt_embeddings(config.prompt)  # no view suffixes in 2D (image_guidance_config)
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    todo = [s for s in seeds if not (skip_done and image_path(out_dir, s).is_file())]

    config_path = out_dir / "config.yaml"
    atomic_write_bytes(config_path, to_yaml(config).encode("utf-8"))
    metrics_path = out_dir / "metrics.jsonl"
    keep_rows(metrics_path, lambda row: row.get("seed") not in todo)  # seeds about to run again start afresh
    result = ImageResult(out_dir=out_dir, images={s: image_path(out_dir, s) for s in seeds}, videos={},
                         grid=out_dir / "grid.png", metrics=metrics_path, config=config_path, optimised=todo)
    failed: dict[int, str] = {}
    for seed in todo:
        trace = optimise_image(method, embeddings, config, seed, progress, desc=f"{desc}seed {seed}")
        append_rows(metrics_path, trace.metrics)
        result.seconds += trace.seconds
        result.steps += trace.steps
        result.bad_steps[seed] = trace.bad_steps
        if trace.failure is not None:  # no image that looks finished: an earlier run's would mark the seed done
            failed[seed] = trace.failure
            remove_files([image_path(out_dir, seed), video_path(out_dir, seed)])
            continue
        if trace.frames:
            result.videos[seed] = video_path(out_dir, seed)
            write_video(result.videos[seed], (video_frame(frame) for frame in trace.frames), VIDEO_FPS)
        write_png(image_path(out_dir, seed), trace.image)  # last: its presence marks the seed done
    if failed:
        remove_files([out_dir / "grid.png"])
        raise RunFailed(failure_message(failed, todo, out_dir))
    result.grid = out_dir / "grid.png"  # always, also for one seed: one place to look
    write_png(result.grid, np.concatenate([iio.imread(image_path(out_dir, s)) for s in seeds], axis=1))
    return result
