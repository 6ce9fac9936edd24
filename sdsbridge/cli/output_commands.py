"""`sdsbridge export`, `video`, `report` and `eval`: what is made from a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sdsbridge.cli.app import app
from sdsbridge.common.errors import UserError
from sdsbridge.common.limits import check_size
from sdsbridge.common.targets import check_new_files


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory (or a .ckpt file)."),
    format: Optional[str] = typer.Option(None, "--format", help="glb | obj | ply (default: export.format)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Marching-cubes grid size (default 256)."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="'auto' or a density level."),
    texture: Optional[bool] = typer.Option(None, "--texture/--no-texture", help="UV atlas + baked texture: "
                                           "mesh.glb and mesh.obj/.mtl/.png (default: export.texture)."),
    texture_size: Optional[int] = typer.Option(None, "--texture-size", help="Texture size in texels "
                                               "(default: export.texture_size, 1024)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (.glb, .obj or .ply; textured: .glb, "
                                       "with .obj/.mtl/.png beside it). Default: RUN/mesh/mesh-step<N>[-settings].<fmt>."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file of the same name "
                               "(atomically); without it, an existing file stops the command before any work."),
) -> None:
    """Extract a coloured mesh from a trained run (marching cubes on the density) to RUN/mesh/, named by the
    checkpoint step and the settings that differ from the run's (never replacing another export, nor an existing
    file without --force); with --texture a UV-unwrapped mesh with a texture baked from the field."""
    from sdsbridge.outputs.export.mesh import export_run_mesh
    from sdsbridge.common.devices import resolve_device

    if format is not None and format not in ("glb", "obj", "ply"):
        raise UserError(f"--format: '{format}' is not one of glb, obj, ply")
    check_size(resolution, "export.resolution", "--resolution")
    check_size(texture_size, "export.texture_size", "--texture-size")
    if texture and format not in (None, "glb", "obj"):
        raise UserError(f"--format {format}: a textured mesh is written as glb and obj")
    if out is not None:
        suffix = out.suffix.lstrip(".").lower()
        if suffix not in (("glb",) if texture else ("glb", "obj", "ply")) or (format and not texture and format != suffix):
            raise UserError(f"--out: {out}: expected a {'.glb' if texture else '.glb, .obj or .ply'} file"
                            + (f" matching --format {format}" if format and not texture else ""))
        check_new_files([out], "--out", force)
    level: Optional[str | float] = threshold
    if threshold not in (None, "auto"):
        try:
            level = float(threshold)
        except ValueError:
            raise UserError(f"--threshold: expected 'auto' or a number, got '{threshold}'") from None
    path = export_run_mesh(run, format, resolution, level, resolve_device(device), texture, texture_size, out, force)
    typer.echo(f"mesh: {path}")


@app.command()
def video(
    run: Path = typer.Argument(..., help="A run directory (or a .ckpt file)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Number of frames (default: export.video_frames, "
                                         "else 120 on CUDA, 60 on the CPU)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Frame height in pixels (default: "
                                             "export.video_resolution, else 512 on CUDA, 256 on the CPU)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Frames per second (default 30)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Panels side by side, from rgb,normal,shaded,depth "
                                       "(default: export.video_modes, rgb,normal)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .mp4 (default: RUN/video/turntable-step<N>"
                                       "[-settings].mp4)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file of the same name "
                               "(atomically); without it, an existing file stops the command before any work."),
) -> None:
    """Render a turntable video (default rgb | normal; shaded = textureless diffuse geometry) of a trained run
    to RUN/video/, named by the checkpoint step and the settings that differ from the run's (never replacing
    another video, nor an existing file without --force)."""
    from sdsbridge.outputs.export.video import parse_modes, render_run_video
    from sdsbridge.common.devices import resolve_device

    for name, value, key in (("--frames", frames, "export.video_frames"), ("--fps", fps, "export.video_fps"),
                             ("--resolution", resolution, "export.video_resolution")):
        check_size(value, key, name)
    modes = parse_modes(mode) if mode is not None else None
    if out is not None and out.suffix.lower() != ".mp4":
        raise UserError(f"--out: {out}: expected an .mp4 file")
    if out is not None:
        check_new_files([out], "--out", force)
    path = render_run_video(run, frames, resolution, fps, resolve_device(device), progress=progress, modes=modes,
                            out=out, force=force)
    typer.echo(f"video: {path}")


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="One or more run directories (several: side by side)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: RUN/report.html; for several "
                                       "runs, compare-<names>.html beside the first; those are refreshed)."),
    force: bool = typer.Option(False, "--force", help="Let --out replace an existing file (atomically)."),
) -> None:
    """Write a self-contained HTML page to look at a run: the prompt and config, an interactive 3D view of the
    mesh, the turntable videos, the validation grids as a timeline and the training curves. Only regular files
    inside the run, of their expected type and size, are embedded (report.py)."""
    from sdsbridge.outputs.report import write_report

    for run in runs:
        if not run.is_dir():
            raise UserError(f"report: {run}: no such run directory")
    if out is not None:
        check_new_files([out], "--out", force)
    typer.echo(f"report: {write_report(list(runs), out)}")


@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="A run directory (or a .ckpt file)."),
    json_output: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    views: int = typer.Option(16, "--views", help="Eval-orbit views rendered and scored."),
    mesh_resolution: int = typer.Option(128, "--mesh-resolution", help="Marching-cubes grid of the Chamfer mesh."),
) -> None:
    """Score a run against the truth: PSNR on held-out views, Chamfer distance of the mesh and colour
    saturation error (reference-prior runs); Stable Diffusion runs have no ground truth to score."""
    import json

    from sdsbridge.outputs.evaluation import evaluate_run
    from sdsbridge.common.devices import resolve_device

    check_size(views, "cameras.eval_views", "--views")
    check_size(mesh_resolution, "export.resolution", "--mesh-resolution")
    scores = evaluate_run(run, resolve_device(device), n_views=views, mesh_resolution=mesh_resolution)
    if json_output:
        typer.echo(json.dumps(scores, indent=2))
        return
    for key, value in scores.items():
        typer.echo(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")


