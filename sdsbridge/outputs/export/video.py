"""Turntable video: the eval orbit rendered frame by frame, panels side by side (``MODES``: rgb, normal,
shaded, depth; default rgb | normal), as H.264 mp4.

Frames are [R, k*R, 3] uint8 for k panels (R = resolution, padded by one edge pixel to even sizes when R is
odd, as yuv420p needs). Normal and shaded panels come from the density gradient at each ray's expected surface
point (shading.py). Depth is shaded on a range fixed for the whole video (camera distance -/+ scene radius,
near = bright), so it does not flicker, and fades to black with opacity.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from sdsbridge.scene.cameras import camera_rays, orbit_cameras
from sdsbridge.common.atomic import remove_stale_temps
from sdsbridge.training.checkpoint import find_checkpoint, run_dir_of
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.common.devices import fitted_cpu_threads
from sdsbridge.common.errors import UserError
from sdsbridge.common.targets import check_new_files
from sdsbridge.outputs.export.shading import normal_panel, shaded_panel, surface_normals, to_camera
from sdsbridge.common.media import pad_to_even, to_uint8, write_video
from sdsbridge.scene.base import RenderOutput
from sdsbridge.outputs.naming import output_name
from sdsbridge.training.checkpoint import load_trained_scene
from sdsbridge.training.step import cube_normal_step, normal_step

logger = logging.getLogger("sdsbridge")

MODES = ("rgb", "normal", "shaded", "depth")
"""Turntable panels: the colour render, camera-space normals, textureless diffuse shading, depth."""
DEFAULT_MODES = ("rgb", "normal")


def parse_modes(text: str) -> tuple[str, ...]:
    """'rgb,normal' -> ('rgb', 'normal'); UserError naming --mode for an unknown or repeated panel."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise UserError(f"--mode: '{text}' is not a comma-separated list of distinct panels from "
                        f"{', '.join(MODES)}")
    return modes


def depth_panel(depth: torch.Tensor, opacity: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """[H, W, 1] expected depth (sum of w_i t_i) and opacity -> [H, W, 1] grey in [0, 1].

    The surface distance depth / opacity maps linearly from ``near`` (1) to ``far`` (0), times opacity.
    """
    surface = depth / opacity.clamp_min(1e-6)
    shade = 1.0 - (surface - near) / max(far - near, 1e-6)
    return (shade.clamp(0, 1) * opacity.clamp(0, 1)).float()


def turntable_frame(out: RenderOutput, index: int, near: float, far: float, modes: Sequence[str] = ("rgb", "depth"),
                    normals_cam: Optional[torch.Tensor] = None) -> np.ndarray:
    """View ``index`` of a render as [H, k*W, 3] uint8, the ``modes`` panels side by side, padded to even height
    and width. ``normals_cam`` ([H, W, 3] camera-space normals of that view) is needed for normal / shaded."""
    opacity = out.opacity[index]
    panels = {"rgb": lambda: out.rgb[index], "depth": lambda: depth_panel(out.depth[index], opacity, near, far),
              "normal": lambda: normal_panel(normals_cam, opacity), "shaded": lambda: shaded_panel(normals_cam, opacity)}
    return pad_to_even(np.concatenate([to_uint8(panels[mode]()) for mode in modes], axis=1))


@torch.no_grad()
def render_turntable(scene, camera_cfg: CameraConfig, path: Path, frames: int = 120, resolution: int = 512,
                     fps: int = 30, chunk_rays: Optional[int] = None,
                     background_color: Optional[Sequence[float]] = None, progress: bool = True,
                     modes: Sequence[str] = DEFAULT_MODES, normal_step: Optional[float] = None) -> Path:
    """Render ``frames`` views of the eval orbit (``camera_cfg.eval_elevation`` / ``eval_distance`` /
    ``eval_fovy``, azimuth from 0 in equal steps) one at a time and write an mp4 (libx264, yuv420p) at
    ``fps`` to ``path``, atomically (``media.write_video``).

    Args:
        scene: a ``Scene`` (rendered in eval mode; normals from its ``density``).
        resolution: frame height in pixels (each panel is resolution x resolution).
        chunk_rays: rays per pass (default: the scene's).
        background_color: RGB in [0, 1] behind the object (default: the scene's learnt background).
        progress: show a tqdm bar.
        modes: the panels, left to right (``MODES``).
        normal_step: the normal and shaded panels' finite-difference step in world units (default: 1/64 of
            the scene cube; ``training.step.normal_step`` gives a trained run's).
    Returns ``path``.
    """
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"video: modes must be a non-empty list of {', '.join(MODES)}, got {list(modes)}")
    if frames < 1 or resolution < 2 or fps < 1:
        raise UserError(f"video: frames, fps must be >= 1 and resolution >= 2 (got frames={frames}, "
                        f"resolution={resolution}, fps={fps})")
    device = scene.device
    cameras = orbit_cameras(camera_cfg, frames).to(device)
    fd_step = normal_step or cube_normal_step(scene.radius)
    background = None if background_color is None else torch.tensor(background_color, dtype=torch.float32,
                                                                      device=device)
    near = camera_cfg.eval_distance - scene.radius
    far = camera_cfg.eval_distance + scene.radius
    was_training = scene.training
    scene.eval()
    started = time.time()

    def rendered_frames():
        for i in tqdm(range(frames), disable=not progress, desc="turntable", unit="frame", dynamic_ncols=True):
            camera = cameras[i:i + 1]
            out = scene.render(camera, resolution, resolution, background_color=background, chunk_rays=chunk_rays)
            normals_cam = None
            if "normal" in modes or "shaded" in modes:
                origins, dirs = camera_rays(camera, resolution, resolution)
                normals = surface_normals(scene, origins[0], dirs[0], out.depth[0], out.opacity[0], fd_step)
                normals_cam = to_camera(normals, camera.c2w[0])
            yield turntable_frame(out, 0, near, far, modes, normals_cam)

    try:
        write_video(path, rendered_frames(), fps)
    finally:
        scene.train(was_training)
    logger.info("video: %d frames of %dx%d (%s) at %d fps in %.1f s", frames, len(modes) * resolution,
                resolution, " | ".join(modes), fps, time.time() - started)
    return path


def video_path(run_dir: Path, step: int, frames: int, resolution: int, fps: int, modes: Sequence[str],
               defaults: tuple[int, int, int, Sequence[str]]) -> Path:
    """``<run_dir>/video/turntable-step<step>[-tags].mp4`` (outputs.py), tagged with what differs from
    ``defaults`` (frames, resolution, fps, modes: what the end of `train` uses): '12f', '64px', '10fps',
    'rgb_depth'."""
    default_frames, default_resolution, default_fps, default_modes = defaults
    tags = [f"{frames}f" if frames != default_frames else "", f"{resolution}px" if resolution != default_resolution else "",
            f"{fps}fps" if fps != default_fps else "", "_".join(modes) if tuple(modes) != tuple(default_modes) else ""]
    return Path(run_dir) / "video" / output_name("turntable", step, tags, ".mp4")


def export_video(scene, config, run_dir: Path, step: int, frames: Optional[int] = None,
                 resolution: Optional[int] = None, fps: Optional[int] = None, progress: bool = True,
                 modes: Optional[Sequence[str]] = None, out: Optional[Path] = None, replace: bool = True) -> Path:
    """The turntable of a trained scene at training step ``step`` as ``out``, else as ``video_path``
    (``<run_dir>/video/turntable-step<step>[-tags].mp4``). Unset arguments come from ``config.export``
    (``video_modes`` for the panels), and where that leaves frames or resolution unset, from
    ``turntable_size`` (what fits the scene's device). ``replace`` false: UserError, before any frame is
    rendered, when the file exists (common/targets.py). Returns the path."""
    export = config.export
    device = scene.device
    defaults = (*turntable_size(export.video_frames, export.video_resolution, device, log=False), export.video_fps,
                tuple(export.video_modes))
    frames, resolution = turntable_size(frames or export.video_frames, resolution or export.video_resolution, device)
    fps, modes = fps or export.video_fps, tuple(modes or export.video_modes)
    path = Path(out) if out is not None else video_path(run_dir, step, frames, resolution, fps, modes, defaults)
    check_new_files([path], "--out" if out is not None else "video", force=replace)
    return render_turntable(scene, config.cameras, path, frames=frames, resolution=resolution, fps=fps,
                            chunk_rays=config.render.chunk_rays, progress=progress, modes=modes,
                            normal_step=normal_step(config, scene.radius))


def render_run_video(run_dir: Path, frames: Optional[int] = None, resolution: Optional[int] = None,
                     fps: Optional[int] = None, device: Union[torch.device, str] = "cpu",
                     progress: bool = True, modes: Optional[Sequence[str]] = None, out: Optional[Path] = None,
                     force: bool = False) -> Path:
    """``export_video`` of a run's newest checkpoint (``run_dir``: a run directory or a checkpoint file); writes
    ``out``, else ``<run_dir>/video/turntable-step<step>[-tags].mp4`` (``video_path``), never replacing the
    videos of other steps or settings, nor an existing file of the same name unless ``force``."""
    checkpoint = find_checkpoint(Path(run_dir))
    remove_stale_temps(run_dir_of(checkpoint))  # left by a killed write
    scene, config, step = load_trained_scene(Path(run_dir), torch.device(device))
    n_frames, size = turntable_size(frames or config.export.video_frames, resolution or config.export.video_resolution,
                                    scene.device, log=False)
    scene.prepare_for_points(n_frames * size * size)  # rays: fewer than the field points they sample
    with fitted_cpu_threads(torch.device(device)):
        return export_video(scene, config, run_dir_of(checkpoint), step, frames, resolution, fps, progress, modes, out,
                            replace=force)


TURNTABLE_SIZES = {"cuda": (120, 512), "cpu": (60, 256)}
"""(frames, resolution) of a turntable whose size nobody set, by device type: on a 2-core CPU a 256x256 frame
of a default-size scene takes about a second with the occupancy grid (a 512x512 one about four)."""


def turntable_size(frames: Optional[int], resolution: Optional[int], device: torch.device,
                   log: bool = True) -> tuple[int, int]:
    """Frames and resolution of a turntable: the given ones, else ``TURNTABLE_SIZES`` for the device (logged
    with ``log``)."""
    default_frames, default_resolution = TURNTABLE_SIZES["cuda" if device.type == "cuda" else "cpu"]
    if log and (frames is None or resolution is None):
        logger.info("video: %s frames at %s px (%s; set export.video_frames / export.video_resolution, or "
                    "--frames / --resolution, for another size)", frames or default_frames,
                    resolution or default_resolution, f"the default on {device.type.upper()}")
    return frames or default_frames, resolution or default_resolution
