"""The size bounds of everything a user can make the tool allocate: one table, checked by the config schema and by
the command-line options that set the same sizes, before anything is created (README, Reliability).

A size outside its bound is one line naming the key (or option) and the bound, exit code 2, with nothing written:
a resolution of 100,000 would otherwise try to allocate tens to hundreds of GB, and fail with a traceback after
the run directory exists. The bounds are generous (several times what a good run uses) but each fits a
workstation's memory on its own.
"""

from __future__ import annotations

from typing import Optional

from sdsbridge.common.checks import check

SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "render.resolution": (1, 4096),  # px per side of a training render (official: 512); 4096² = 16.8 M rays
    "log.val_resolution": (1, 4096),  # px per side of a validation view
    "log.val_views": (1, 64),  # views in a validation grid
    "train.batch_size": (1, 64),  # cameras rendered per step (official: 1)
    "prior.resolution": (1, 1024),  # px of the reference prior's images (its whole image set is held in memory:
    #                                also bounded in bytes by MAX_IMAGE_SET_BYTES)
    "image.resolution": (1, 2048),  # px of a 2D image (Stable Diffusion: latent R/8; its attention grows as R⁴)
    "export.resolution": (8, 1024),  # marching-cubes grid per axis (export --resolution, eval --mesh-resolution):
    #                                 1024³ is 4 GiB of float32 densities, about 18 GB at the peak
    "export.texture_size": (16, 8192),  # texels per side of a baked texture (export --texture-size)
    "export.video_resolution": (2, 4096),  # px, turntable frame height (video --resolution)
    "export.video_frames": (1, 3600),  # turntable frames (video --frames): two minutes at 30 fps
    "export.video_fps": (1, 240),  # turntable frames per second (video --fps)
    "cameras.eval_views": (1, 1000),  # eval-orbit views (eval --views)
}
"""Config key -> (lowest, highest) value it may take. Command-line options that set the same size name the key
(``check_size``'s ``option``)."""

MAX_IMAGE_SET_BYTES = 8 << 30
"""The reference prior renders its whole image set into memory: 4 view labels x ``prior.views_per_label`` views x
(rgb + mask) x R² float32, about twice over while it is built. Its estimate must stay under 8 GiB (the default,
64 px x 200 views, needs 0.1 GiB)."""


def check_size(value: Optional[int], key: str, option: Optional[str] = None) -> None:
    """UserError "<option or key>: must lie in [low, high] ..." unless ``value`` (None: unset, fine) lies within
    ``SIZE_LIMITS[key]``; an option's message names the config key whose bound it shares."""
    if value is None:
        return
    low, high = SIZE_LIMITS[key]
    where = f" (the bound of {key})" if option else ""
    check(low <= value <= high, option or key, f"must lie in [{low}, {high}]{where}, got {value}")


def image_set_bytes(resolution: int, views_per_label: int) -> int:
    """Bytes the reference prior holds while it builds one shape's image set (``MAX_IMAGE_SET_BYTES``)."""
    return 2 * 4 * views_per_label * 4 * resolution * resolution * 4


def check_image_set(resolution: int, views_per_label: int, key: str = "prior.resolution") -> None:
    """UserError naming ``key`` (the resolution the image set is rendered at) and prior.views_per_label when the
    reference prior's image set would exceed ``MAX_IMAGE_SET_BYTES``."""
    need = image_set_bytes(resolution, views_per_label)
    check(need <= MAX_IMAGE_SET_BYTES, f"{key}, prior.views_per_label", f"the reference prior's image set (4 x "
          f"{views_per_label} views at {resolution} px) would need about {need / 2**30:.1f} GiB; at most "
          f"{MAX_IMAGE_SET_BYTES >> 30} GiB: lower either")
