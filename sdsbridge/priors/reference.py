"""The reference prior: an exact diffusion prior over renders of the built-in shapes (CPU friendly).

Each condition (parsed from a prompt by reference_prompts.py) selects a finite image set: renders of its
shapes from fixed reference cameras (sampled once, with a fixed seed, from the training camera
distribution, ``views_per_label`` per view label), from its view labels, clean plus any degraded copies.
The noise prediction is the exact optimal denoiser of that set (denoiser.py), in pixel space: "encoding"
is a bilinear resize to ``resolution`` and [0, 1] -> [-1, 1], so latents are [N, 3, R, R].

With ``nearest_views = K > 0`` and camera positions given, a sample's set is instead the images of its
condition's shapes (and copies) at the K reference cameras whose directions are nearest the query
camera's, whatever their view label; this keeps 3D consistency (with view-label sets the nearest image may
come from a quite different pose).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from sdsbridge.common.atomic import atomic_file
from sdsbridge.scene.cameras import VIEW_LABELS, Cameras, cameras_from_angles, sample_cameras
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.common.errors import WriteFailed
from sdsbridge.priors import shapes as shapes_module
from sdsbridge.common.checks import check
from sdsbridge.common.limits import check_image_set, check_size
from sdsbridge.common.package_files import user_cache_folder
from sdsbridge.priors.base import PriorSettings, register_prior, to_prior_images
from sdsbridge.priors.denoiser import noise_from_denoised, optimal_denoiser, sd_alphas_cumprod
from sdsbridge.priors.reference_prompts import Condition, parse_prompt
from sdsbridge.priors.shapes import get_shape, render_shape

logger = logging.getLogger("sdsbridge")

REFERENCE_SEED = 1234
"""Seed of the reference cameras (fixed: the image sets are part of the prior's definition)."""
SUPERSAMPLE = 2
"""Rays per pixel per axis for the reference renders (anti-aliased edges, like a NeRF's soft ones)."""
SATURATION_FACTOR = 2.5
"""Over-saturated copies: HSV saturation times this (capped at 1), HSV value unchanged (``oversaturate``)."""
CACHE_VERSION = 3
"""Bump when the renderer or the cached content changes, so stale disk caches are not used."""


def reference_cameras(cfg: CameraConfig, views_per_label: int, seed: int = REFERENCE_SEED) -> Cameras:
    """``views_per_label`` cameras per view label, sorted by label (VIEW_LABELS order), deterministic.

    Samples the training distribution in rounds and bins by label; a label the distribution rarely or
    never produces (e.g. 'overhead' with elevations up to 45 deg) is filled from the distribution
    restricted to that label's region (overhead: elevation above ``cfg.overhead_elevation``).
    """
    generator = torch.Generator().manual_seed(seed)
    picked: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label in VIEW_LABELS}
    for _ in range(8):
        cams = sample_cameras(cfg, 4 * views_per_label, generator)
        for i, label in enumerate(cams.labels):
            if len(picked[label]) < views_per_label:
                picked[label].append((float(cams.elevation[i]), float(cams.azimuth[i]), float(cams.distance[i]),
                                      math.degrees(float(cams.fovy[i]))))
        if all(len(v) == views_per_label for v in picked.values()):
            break
    for label, chosen in picked.items():
        need = views_per_label - len(chosen)
        if need > 0:
            chosen.extend(_restricted_angles(cfg, label, need, generator))
    rows = torch.tensor([row for label in VIEW_LABELS for row in picked[label]], dtype=torch.float32)
    cams = cameras_from_angles(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], cfg)
    cams.labels = [label for label in VIEW_LABELS for _ in range(views_per_label)]
    return cams


def _restricted_angles(cfg: CameraConfig, label: str, n: int,
                       generator: torch.Generator) -> list[tuple[float, float, float, float]]:
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    el_lo, el_hi = cfg.elevation_range
    h = cfg.front_half_angle
    if label == "overhead":
        top = el_hi if el_hi > cfg.overhead_elevation else 89.0
        elevation, azimuth = uniform(cfg.overhead_elevation + 1e-3, top), uniform(-180.0, 180.0)
    else:
        elevation = uniform(el_lo, min(el_hi, cfg.overhead_elevation))
        if label == "front":
            azimuth = uniform(-h, h)
        elif label == "back":
            azimuth = 180.0 + uniform(-h, h)
        else:
            sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
            azimuth = sign * uniform(h, 180.0 - h)
    distance, fovy = uniform(*cfg.distance_range), uniform(*cfg.fovy_range)
    return [tuple(map(float, row)) for row in torch.stack([elevation, azimuth, distance, fovy], dim=1)]


def blur_images(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] images (edge pixels replicated)."""
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def oversaturate(images: torch.Tensor, factor: float = SATURATION_FACTOR) -> torch.Tensor:
    """Scale the HSV saturation of [N, 3, H, W] colours in [0, 1] by ``factor`` (capped at 1) at constant HSV
    value: each channel moves away from the brightest one, so brightness and white stay as they are."""
    value = images.max(dim=1, keepdim=True).values
    return (value - factor * (value - images)).clamp(0.0, 1.0)


def blur_within_silhouette(images: torch.Tensor, masks: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Blur the colours of [N, 3, H, W] renders over white inside their coverage ``masks`` [N, 1, H, W] in [0, 1],
    keeping the silhouette: the colour premultiplied by coverage is blurred, divided by the blurred coverage,
    and put back over white with the clean coverage. The object neither grows a halo nor mixes with the
    background, so the copy differs from the clean image in sharpness only, not in brightness or shape."""
    premultiplied = images - (1.0 - masks)  # rgb = m * colour + (1 - m) * white
    colour = blur_images(premultiplied, sigma_px) / blur_images(masks, sigma_px).clamp_min(1e-6)
    return masks * colour.clamp(0.0, 1.0) + (1.0 - masks)


def degrade(images: torch.Tensor, masks: torch.Tensor, kind: str) -> torch.Tensor:
    """A degraded copy of [N, 3, R, R] renders in [0, 1] with coverage [N, 1, R, R]: 'blur' (sigma R/32 px,
    within the silhouette) or 'saturate' (HSV saturation x SATURATION_FACTOR at constant value)."""
    if kind == "blur":
        return blur_within_silhouette(images, masks, images.shape[-1] / 32.0)
    if kind == "saturate":
        return oversaturate(images)
    raise ValueError(f"unknown degradation {kind!r}")


@dataclass
class ReferenceSettings(PriorSettings):
    """The reference prior (``prior.kind: reference``): the exact denoiser of built-in shape renders."""

    kind: str = "reference"
    resolution: int = 64
    """Image resolution in pixels."""
    views_per_label: int = 200
    """Reference renders per (shape, view label)."""
    nearest_views: int = 0
    """Condition on the K reference views nearest the camera (0 = by view label)."""
    cache_dir: Optional[str] = "auto"
    """Where rendered image sets are cached, keyed by everything they depend on (shape, resolution, views,
    cameras): 'auto' = the per-user cache (``$SDSBRIDGE_CACHE_DIR``, else ``~/.cache/sdsbridge``; ``reference/``
    in it), a folder, or null = memory only (rendered again by every run). Writes are atomic, so concurrent runs
    and sweeps share it; an entry that does not load is rendered again and replaced."""

    def validate(self) -> None:
        check(self.resolution > 0, "prior.resolution", "must be positive")
        check(self.views_per_label > 0, "prior.views_per_label", "must be positive")
        check(self.nearest_views >= 0, "prior.nearest_views", "must be >= 0")
        check_size(self.resolution, "prior.resolution")
        check_image_set(self.resolution, self.views_per_label)
        super().validate()


@register_prior
class ReferencePrior:
    """Exact denoiser of built-in shape renders; implements the Prior Protocol (priors/base.py).

    Conditions are integer ids ([P] int64) into this instance's table of parsed prompts. Image sets
    are rendered lazily per shape on first use, kept in memory and optionally cached on disk.
    """

    kind = "reference"
    Settings = ReferenceSettings
    capabilities = frozenset()
    num_train_timesteps = 1000

    def __init__(self, resolution: int = 64, views_per_label: int = 200, nearest_views: int = 0,
                 camera_cfg: Optional[CameraConfig] = None, cache_dir: Optional[str] = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.image_resolution = resolution
        self.views_per_label = views_per_label
        self.nearest_views = nearest_views
        self.camera_cfg = camera_cfg or CameraConfig()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.alphas_cumprod = sd_alphas_cumprod(self.num_train_timesteps).to(self.device)
        self.cameras = reference_cameras(self.camera_cfg, views_per_label)
        self.directions = F.normalize(self.cameras.positions, dim=-1).to(self.device)  # [L*V, 3]
        self._conditions: list[Condition] = []
        self._condition_ids: dict[Condition, int] = {}
        self._banks: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, cfg: ReferenceSettings, device: torch.device, camera_cfg: CameraConfig) -> "ReferencePrior":
        """The prior of ``cfg`` on ``device``, its image sets rendered with the training cameras ``camera_cfg``."""
        cache = str(user_cache_folder("reference")) if cfg.cache_dir == "auto" else cfg.cache_dir
        return cls(cfg.resolution, cfg.views_per_label, cfg.nearest_views, camera_cfg, cache, device)

    @classmethod
    def check_prompt(cls, prompt: str) -> None:
        """UserError unless ``prompt`` names one of the built-in shapes."""
        parse_prompt(prompt)

    @classmethod
    def check_machine(cls, cfg: ReferenceSettings) -> None:
        """Nothing to check: the reference prior needs no files."""

    # --- conditions ---------------------------------------------------------------------------------
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """P prompts -> [P] int64 condition ids. Raises UserError for prompts naming no built-in shape.

        A new condition's image set is rendered (or loaded from the cache) here, not in the first step.
        """
        ids = []
        for prompt in prompts:
            condition = parse_prompt(prompt)
            if condition not in self._condition_ids:
                self._blocks(condition, all_views=self.nearest_views > 0)
                self._condition_ids[condition] = len(self._conditions)
                self._conditions.append(condition)
            ids.append(self._condition_ids[condition])
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def condition(self, condition_id: int) -> Condition:
        """The parsed condition behind an id from ``embed_prompts``."""
        return self._conditions[int(condition_id)]

    # --- images -------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] (any device) -> [N, 3, R, R] in [-1, 1] on ``device`` (moved and resized
        by ``to_prior_images``; differentiable)."""
        return to_prior_images(images, self.image_resolution, self.device) * 2.0 - 1.0

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] latents in [-1, 1] -> [N, 3, R, R] float32 images in [0, 1] on ``device``."""
        return ((latents.detach().to(self.device, torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)

    def clean_renders(self, shape_name: str) -> torch.Tensor:
        """[L*V, 3, R, R] renders in [0, 1] of a shape from ``self.cameras`` (label-sorted)."""
        r = self.image_resolution
        return (self._bank(shape_name, "clean")[0].reshape(-1, 3, r, r) + 1.0) / 2.0

    def clean_masks(self, shape_name: str) -> torch.Tensor:
        """[L*V, 1, R, R] coverage in [0, 1] of ``clean_renders(shape_name)`` (the fraction of each pixel the
        shape covers)."""
        self._bank(shape_name, "clean")
        return self._masks[shape_name]

    def _bank(self, shape_name: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [L*V, 3*R*R] float32 in [-1, 1], squared norms [L*V] float64) of one kind of copy."""
        key = (shape_name, kind)
        if key not in self._banks:
            if kind == "clean":
                images, masks = self._load_or_render(shape_name)
                images, self._masks[shape_name] = images.to(self.device), masks.to(self.device)
            else:
                images = degrade(self.clean_renders(shape_name), self.clean_masks(shape_name), kind)
            flat = (images * 2.0 - 1.0).reshape(images.shape[0], -1).contiguous()
            self._banks[key] = (flat, flat.to(torch.float64).pow(2).sum(-1))
        return self._banks[key]

    def reference_set(self, condition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image set of a condition (for inspection and tests): (images [K, 3, R, R] in [0, 1],
        camera indices [K] into ``self.cameras``)."""
        blocks, _, cams = self._blocks(self.condition(condition_id), all_views=False)
        r = self.image_resolution
        images = torch.cat([(b.reshape(-1, 3, r, r) + 1.0) / 2.0 for b in blocks])
        return images, torch.cat(cams)

    def _blocks(self, condition: Condition, all_views: bool):
        """Blocks of a condition's set: (images [K_b, D] list, squared norms list, camera indices list)."""
        v = self.views_per_label
        labels = VIEW_LABELS if all_views else condition.labels
        spans: list[tuple[int, int]] = []  # label ranges of the label-sorted banks, adjacent ones merged
        for label in labels:
            lo = VIEW_LABELS.index(label) * v
            if spans and spans[-1][1] == lo:
                spans[-1] = (spans[-1][0], lo + v)
            else:
                spans.append((lo, lo + v))
        images, sqnorms, cams = [], [], []
        for shape_name in condition.shapes:
            for kind in ("clean",) + condition.degradations:
                flat, sqn = self._bank(shape_name, kind)
                for lo, hi in spans:
                    images.append(flat[lo:hi])
                    sqnorms.append(sqn[lo:hi])
                    cams.append(torch.arange(lo, hi, device=self.device))
        return images, sqnorms, cams

    # --- the prior ----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                      cameras: Optional[Cameras] = None) -> torch.Tensor:
        """[M, 3, R, R] noisy latents, [M] integer timesteps, [M] condition ids (, the M cameras: their centres
        pick the nearest reference views) -> [M, 3, R, R] float32 exact noise prediction."""
        camera_positions = None if cameras is None else cameras.positions
        x = latents_noisy.detach().to(self.device, torch.float32)
        t = t.to(self.device).long().reshape(-1).expand(x.shape[0])
        conditions = conditions.to(self.device).long().reshape(-1)
        nearest = self.nearest_views > 0 and camera_positions is not None
        out = torch.empty_like(x)
        for cid in torch.unique(conditions).tolist():
            rows = torch.nonzero(conditions == cid).squeeze(1)
            images, sqnorms, cams = self._blocks(self.condition(cid), all_views=nearest)
            if not nearest:
                x0 = optimal_denoiser(x[rows], t[rows], images, self.alphas_cumprod, None, sqnorms)
            else:
                x0 = torch.cat([self._nearest_denoised(x[r:r + 1], t[r:r + 1], camera_positions[r], images,
                                                       sqnorms, cams) for r in rows.tolist()])
            out[rows] = noise_from_denoised(x[rows], x0, t[rows], self.alphas_cumprod)
        return out

    def _nearest_denoised(self, x: torch.Tensor, t: torch.Tensor, camera_position: torch.Tensor,
                          images: list[torch.Tensor], sqnorms: list[torch.Tensor], cams: list[torch.Tensor]
                          ) -> torch.Tensor:
        """E[x0 | x_t] of one sample [1, 3, R, R] over the images of its ``nearest_views`` closest reference
        cameras: those rows are gathered from each block first (a set ~50x smaller than the blocks, which
        hold every view; masking the full set gave the same values at 50x the cost)."""
        query = F.normalize(camera_position.to(self.device, torch.float32), dim=-1)
        k = min(self.nearest_views, self.directions.shape[0])
        closest = torch.topk((query[None] @ self.directions.T)[0], k).indices  # [k] camera indices
        chosen = torch.zeros(self.directions.shape[0], dtype=torch.bool, device=self.device)
        chosen[closest] = True
        picks = [chosen[c].nonzero().squeeze(1) for c in cams]  # rows of each block, in block order
        kept = [i for i, p in enumerate(picks) if p.numel()]
        return optimal_denoiser(x, t, [images[i][picks[i]] for i in kept], self.alphas_cumprod, None,
                                [sqnorms[i][picks[i]] for i in kept])

    # --- disk cache ---------------------------------------------------------------------------------
    def _cache_key(self, shape_name: str) -> str:
        shape = get_shape(shape_name)
        spec = {
            "version": CACHE_VERSION, "shape": shape.params, "albedo": shape.albedo,
            "light": shapes_module.LIGHT_DIRECTION, "ambient": shapes_module.AMBIENT,
            "resolution": self.image_resolution, "supersample": SUPERSAMPLE,
            "hit_epsilon": shapes_module.HIT_EPSILON, "max_steps": shapes_module.MAX_STEPS,
            "views_per_label": self.views_per_label, "seed": REFERENCE_SEED,
            "cameras": {k: v for k, v in dataclasses.asdict(self.camera_cfg).items() if not k.startswith("eval_")},
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _load_or_render(self, shape_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(renders [L*V, 3, R, R], coverage masks [L*V, 1, R, R]) float32 on the CPU, from the disk cache
        when it holds them."""
        expected = (len(self.cameras), 3, self.image_resolution, self.image_resolution)
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"reference-{shape_name}-{self._cache_key(shape_name)}.pt"
            if path.is_file():
                try:
                    cached = torch.load(path, map_location="cpu", weights_only=True)
                    images, masks = cached["images"], cached["masks"]
                    if (tuple(images.shape) == expected and images.dtype == masks.dtype == torch.float32
                            and tuple(masks.shape) == (expected[0], 1, *expected[2:])):
                        return images, masks
                except Exception:  # a corrupt or foreign file: render again and overwrite it
                    pass
        started = time.time()
        logger.info("reference prior: rendering the image set of '%s' (%d views at %d px)%s", shape_name,
                    len(self.cameras), self.image_resolution,
                    f", once: cached in {self.cache_dir}" if path is not None else " (no cache: prior.cache_dir is null)")
        images, masks = render_shape(shape_name, self.cameras.to(self.device), self.image_resolution, SUPERSAMPLE)
        images, masks = images.to(torch.float32).cpu(), masks.to(torch.float32).cpu()
        logger.info("reference prior: '%s' rendered in %.1f s", shape_name, time.time() - started)
        if path is not None:
            try:
                with atomic_file(path) as handle:
                    torch.save({"images": images, "masks": masks}, handle)
            except WriteFailed as exc:  # a cache: the run goes on without it
                logger.warning("reference prior: cache not written (%s)", exc)
        return images, masks
