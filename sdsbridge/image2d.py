"""2D score distillation (`sdsbridge image`): optimise one image directly under a prior, as the official
SDS-Bridge 2D code does, for one or more seeds, or for every prompt of a text file (batch mode).

What is optimised is the prior's latent x [1, C, h, w] itself: for Stable Diffusion a VAE latent
[1, 4, R/8, R/8] (R = ``image.resolution``, by default the prior's own), initialised like the official code
with x ~ N(0, I); for the reference prior (built at R = ``image.resolution``) the pixel-space tensor its ``encode_images`` returns
([1, 3, R, R] in [-1, 1] units), initialised the same way (N(0, I) is also what that prior's diffusion holds at t = T). Every step calls
``guidance.distill`` on x (the same SDS / bridge / NFSD code as 3D) and takes an AdamW step
(lr ``image.lr``, betas (0.9, 0.99), eps 1e-15, torch's default weight decay 0.01, as the official code).

Outputs in ``out_dir`` (each seed ``s``): ``seed-<s>.png`` (the final image, written atomically and last),
``seed-<s>.mp4`` (the initial image and one frame every ``image.video_every`` steps), ``metrics.jsonl``
(one row every ``log.log_every`` steps and at the last step: seed, step, loss, grad_norm, t, stage),
``config.yaml`` (the resolved config) and, for two or more seeds, ``grid.png`` (the seeds side by side).
Batch mode writes one such folder per prompt, ``out_dir/<index>-<slug>/``, and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import numpy as np
import torch
import yaml
from tqdm import tqdm

from sdsbridge.config import Config
from sdsbridge.config_loader import config_from_dict, config_to_dict, to_yaml
from sdsbridge.errors import UserError
from sdsbridge.guidance import distill, guidance_config_for_image
from sdsbridge.image_io import rewrite_metrics, write_png, write_video
from sdsbridge.priors import load_prior
from sdsbridge.priors.base import Prior
from sdsbridge.prompts import PromptEmbeddings
from sdsbridge.rundir import slugify

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


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file: one per line, surrounding whitespace stripped; blank lines and lines
    starting with '#' skipped. UserError if the file is missing, not UTF-8 text, or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


# --- the prior's image space -------------------------------------------------------------------------
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


@torch.no_grad()
def decode_latents(prior: Prior, latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] latents -> [N, 3, H, W] float32 images in [0, 1] on the CPU.

    Uses ``prior.decode_latents`` when the prior has one; else, for a prior with a VAE (Stable Diffusion),
    ``vae.decode(latents / scaling)`` mapped from [-1, 1]; else (pixel-space priors: the reference prior)
    the latents are images in [-1, 1].
    """
    decode = getattr(prior, "decode_latents", None)
    if decode is not None:
        return decode(latents).float().cpu()
    vae = getattr(prior, "vae", None)
    if vae is None:
        images = (latents.float() + 1.0) / 2.0
    else:
        x = latents.to(prior.device, prior.dtype) / prior.latent_scaling
        images = vae.decode(x).sample.float() / 2.0 + 0.5
    return images.clamp(0.0, 1.0).cpu()


def to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8."""
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


# --- the optimisation --------------------------------------------------------------------------------
@dataclass
class Trace:
    """What one optimisation produced."""

    image: np.ndarray
    """[H, W, 3] uint8 final image."""
    frames: list[np.ndarray]
    """[H, W, 3] uint8 video frames: the initial image, then one every ``video_every`` steps."""
    metrics: list[dict]
    """Rows of metrics.jsonl."""
    seconds: float
    """Wall time of the loop (including video frame decoding)."""


def optimise_image(prior: Prior, embeddings: PromptEmbeddings, config: Config, seed: int,
                   progress: bool = True, desc: str = "") -> Trace:
    """Run ``image.steps`` steps of ``config.method`` on a fresh latent (see the module docstring).

    One CPU ``torch.Generator`` seeded with ``seed`` draws the initial latent, then every step's t and
    noise (inside ``distill``), so a seed gives the same image whatever else runs (CPU and CUDA alike, up
    to the prior's numerics).
    """
    im = config.image
    gcfg = guidance_config_for_image(config)
    generator = torch.Generator().manual_seed(seed)
    shape = latent_shape(prior, im.resolution or prior.image_resolution)
    latents = torch.randn(shape, generator=generator).to(prior.device).requires_grad_(True)
    optimizer = torch.optim.AdamW([latents], lr=im.lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.01)
    conditions = embeddings.conditions(["front"])  # no view suffixes in 2D: every label has the same text

    frames = [to_hwc_uint8(decode_latents(prior, latents)[0])] if im.video_every else []
    rows = []
    start = time.perf_counter()
    bar = tqdm(range(im.steps), desc=desc or f"seed {seed}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        result = distill(prior, latents, conditions, config.method, step, gcfg, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        if step % config.log.log_every == 0 or step == im.steps - 1:
            t, grad_norm = int(result.t[0]), result.grad_norm.item()
            rows.append({"seed": seed, "step": step, "loss": result.loss.item(), "grad_norm": grad_norm,
                         "t": t, "stage": result.stage})
            bar.set_postfix(stage=result.stage, t=t, grad=f"{grad_norm:.3g}", refresh=False)
        if im.video_every and (step + 1) % im.video_every == 0:
            frames.append(to_hwc_uint8(decode_latents(prior, latents)[0]))
    bar.close()
    seconds = time.perf_counter() - start
    image = to_hwc_uint8(decode_latents(prior, latents)[0])
    return Trace(image=image, frames=frames, metrics=rows, seconds=seconds)


# --- outputs -----------------------------------------------------------------------------------------
def image_path(out_dir: Path, seed: int) -> Path:
    """The final image of ``seed``: ``out_dir/seed-<seed>.png``."""
    return Path(out_dir) / f"seed-{seed}.png"


def is_done(out_dir: Path, seeds: list[int]) -> bool:
    """True when every seed's final PNG (and, for several seeds, grid.png) exists."""
    grid_ok = len(seeds) < 2 or (Path(out_dir) / "grid.png").is_file()
    return grid_ok and all(image_path(out_dir, s).is_file() for s in seeds)


@dataclass
class ImageResult:
    """What ``run_image`` wrote."""

    out_dir: Path
    images: dict[int, Path]
    """seed -> final PNG."""
    videos: dict[int, Path]
    """seed -> optimisation mp4 (seeds optimised in this call, with ``image.video_every`` > 0)."""
    grid: Optional[Path]
    """grid.png (two or more seeds), else None."""
    metrics: Path
    config: Path
    optimised: list[int] = field(default_factory=list)
    """Seeds optimised in this call (the others were skipped as done)."""
    seconds: float = 0.0
    """Wall time of the optimisation loops."""
    steps: int = 0
    """Steps run in this call, all seeds together."""

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
    Raises UserError for user-caused problems (e.g. a prompt the reference prior cannot parse).
    """
    if not seeds:
        raise UserError("seeds: no seed given")
    prior = prior if prior is not None else load_image_prior(config, device)
    embeddings = PromptEmbeddings(prior, config.prompt, guidance_config_for_image(config), config.method)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (skip_done and image_path(out_dir, s).is_file())]

    config_path = out_dir / "config.yaml"
    config_path.write_text(to_yaml(config))
    metrics_path = out_dir / "metrics.jsonl"
    rewrite_metrics(metrics_path, set(todo))
    result = ImageResult(out_dir=out_dir, images={s: image_path(out_dir, s) for s in seeds}, videos={},
                         grid=None, metrics=metrics_path, config=config_path, optimised=todo)
    for seed in todo:
        trace = optimise_image(prior, embeddings, config, seed, progress, desc=f"{desc}seed {seed}")
        with open(metrics_path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in trace.metrics)
        if trace.frames:
            result.videos[seed] = out_dir / f"seed-{seed}.mp4"
            write_video(result.videos[seed], trace.frames)
        write_png(image_path(out_dir, seed), trace.image)  # last: its presence marks the seed done
        result.seconds += trace.seconds
        result.steps += config.image.steps
    if len(seeds) > 1:
        result.grid = out_dir / "grid.png"
        write_png(result.grid, np.concatenate([iio.imread(image_path(out_dir, s)) for s in seeds], axis=1))
    return result


# --- batch mode --------------------------------------------------------------------------------------
@dataclass
class BatchItem:
    """One prompt of a batch."""

    index: int
    """Position among the file's prompts (0-based; comments and blank lines not counted)."""
    prompt: str
    out_dir: Path
    status: str
    """'done' (made now), 'skipped' (finished earlier) or 'failed' (a user error; see ``error``)."""
    error: Optional[str] = None
    result: Optional[ImageResult] = None


RUN_ONLY_KEYS = {"device": None, "log": None,
                 "prior": ("attention_slicing", "channels_last", "cpu_offload", "cache_dir")}
"""Config keys that do not change the images (top-level sections: None = all of it); ignored when a batch
compares a folder's config.yaml with the current settings."""


def recipe(config: Config) -> dict:
    """The config as plain builtins without RUN_ONLY_KEYS: what decides the images."""
    data = config_to_dict(config)
    for key, sub in RUN_ONLY_KEYS.items():
        if sub is None:
            data.pop(key, None)
        else:
            for name in sub:
                data.get(key, {}).pop(name, None)
    return data


def stored_recipe(path: Path) -> Optional[dict]:
    """``recipe`` of a folder's config.yaml (None if it does not load)."""
    try:
        return recipe(config_from_dict(yaml.safe_load(path.read_text())))
    except (UserError, yaml.YAMLError, TypeError, AttributeError):
        return None


def prompt_dir(out_dir: Path, index: int, prompt: str, count: int) -> Path:
    """``out_dir/<index>-<slug>``: the index zero-padded to the width of the largest (>= 4 digits)."""
    width = max(4, len(str(count - 1)))
    return Path(out_dir) / f"{index:0{width}d}-{slugify(prompt, 48)}"


def run_image_batch(config: Config, prompts_file: Path, out_dir: Path, device: torch.device | str, seeds: list[int],
                    progress: bool = True) -> list[BatchItem]:
    """One ``run_image`` per prompt of ``prompts_file`` (see ``read_prompts``) into ``prompt_dir(...)``,
    loading the prior once. Resumable: prompts whose outputs are complete (``is_done``) are skipped, and
    in a half-done folder only the seeds without a final PNG are optimised again. A folder made with a
    different config is a UserError (so images of different settings never mix). Prompts the prior
    rejects (UserError) are reported as failed and the batch goes on. Prints a summary line (and one line
    per failure)."""
    prompts = read_prompts(prompts_file)
    out_dir = Path(out_dir)
    jobs = [(i, p, prompt_dir(out_dir, i, p, len(prompts)), dataclasses.replace(config, prompt=p))
            for i, p in enumerate(prompts)]
    for _, _, folder, cfg in jobs:
        stored = folder / "config.yaml"
        if stored.is_file() and stored_recipe(stored) != recipe(cfg):
            raise UserError(f"{folder}: made with different settings (see its config.yaml); use another output "
                            "folder or the same settings")
    items: list[BatchItem] = []
    prior = None
    start = time.perf_counter()
    for i, prompt, folder, cfg in jobs:
        if is_done(folder, seeds):
            items.append(BatchItem(i, prompt, folder, "skipped"))
            continue
        prior = prior if prior is not None else load_image_prior(config, device)
        try:
            result = run_image(cfg, folder, device, seeds, progress, prior=prior, skip_done=True,
                               desc=f"[{i + 1}/{len(prompts)}] ")
        except UserError as exc:
            items.append(BatchItem(i, prompt, folder, "failed", error=str(exc)))
            continue
        items.append(BatchItem(i, prompt, folder, "done", result=result))
    counts = {s: sum(item.status == s for item in items) for s in ("done", "skipped", "failed")}
    print(f"batch: {len(items)} prompts x {len(seeds)} seed(s): {counts['done']} made, {counts['skipped']} "
          f"skipped (already done), {counts['failed']} failed, {time.perf_counter() - start:.1f} s -> {out_dir}")
    for item in items:
        if item.status == "failed":
            print(f"  failed [{item.index}] {item.prompt!r}: {item.error}")
    return items
