"""The `sdsbridge` command line (typer). Heavy imports (torch, diffusers) happen inside commands.

Every error a user or the machine causes is a UserError (or a subclass, errors.py): printed as one line on
stderr with its exit code (2 bad input, 1 failed, 3 could not write), no traceback unless --debug.
SIGINT and SIGTERM stop every command the same way: the file being written is abandoned (no temporary
file stays), one line is printed, exit code 130; `train` first finishes its step and checkpoints.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sdsbridge.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_WRITE_FAILED, Interrupted, RunFailed, UserError,
                              WriteFailed)
from sdsbridge.preflight import check_prompt, check_run
from sdsbridge.quiet import configure_logging


def _flags_without_type(option_class) -> None:
    """Show boolean flags in help as `--flag/--no-flag` alone, not followed by typer's `<bool>` type column (the
    flag takes no value). A presentation detail of typer's help; skipped if typer changes that method."""
    shown_type = getattr(option_class, "display_type_rich", None)
    if shown_type is None:
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown_type(self, ctx)

    option_class.display_type_rich = display_type_rich


try:
    from typer.core import TyperOption

    _flags_without_type(TyperOption)
except ImportError:  # another typer layout: its default help stays
    pass

app = typer.Typer(
    help="Text-to-3D by calibrated score distillation (SDS-Bridge) from a diffusion prior.\n\n"
    "Start with `sdsbridge train configs/demo.yaml` (CPU demo, minutes) or write a prompt.yaml with one line, "
    "`prompt: a DSLR photo of a pineapple`, and run `sdsbridge train prompt.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check a resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

OVERRIDES_HELP = "key=value overrides, e.g. train.steps=2000 guidance.guidance_scale=50 (applied last)."
IMAGE_OVERRIDES_HELP = "key=value overrides, e.g. image.steps=500 image.guidance_scale=30 method=sds (applied last)."


def _print_version(value: bool) -> None:
    if value:
        from sdsbridge import __version__

        typer.echo(f"sdsbridge {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Text-to-3D by calibrated score distillation."""
    configure_logging(debug)  # ours at INFO; other libraries' chatter off the terminal (quiet.py)


@config_app.command("show")
def config_show(
    file: Path = typer.Argument(..., help="A prompt YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Print the fully resolved config (defaults <- method preset <- FILE <- overrides) as YAML."""
    from sdsbridge.config_loader import load_config, to_yaml

    typer.echo(to_yaml(load_config(file, overrides or [])), nl=False)


@config_app.command("check")
def config_check(
    file: Path = typer.Argument(..., help="A prompt YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Validate FILE (and overrides) with every check `train` makes before it starts (the model is there, the
    reference prior knows the prompt's shape); print OK or the first problem."""
    from sdsbridge.config_loader import load_config

    config = load_config(file, overrides or [])
    check_run(config)
    typer.echo(f"OK: {file} ({config.method}, {config.prior.kind} prior, {config.train.steps} steps)")


def _split_file_and_overrides(file: Optional[str], overrides: Optional[List[str]]) -> tuple[Optional[Path], list[str]]:
    """`train --resume RUN key=value` puts the first override where FILE would be: move it back."""
    overrides = list(overrides or [])
    if file is not None and "=" in file and not Path(file).exists():
        return None, [file, *overrides]
    return (Path(file) if file is not None else None), overrides


@app.command()
def train(
    file: Optional[str] = typer.Argument(None, help="prompt.yaml (not needed with --resume)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run: its directory or a .ckpt file. "
                                          "Raise train.steps=N to extend a finished run."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides `device:`)."),
    method: Optional[str] = typer.Option(None, "--method", help="bridge | sds | nfsd | vsd | bridge-vsd "
                                         "(overrides `method:`)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    run_dir_option: Optional[Path] = typer.Option(None, "--run-dir", help="Train a fresh run in this directory "
                                                  "(created; it must not exist or be empty) instead of a new one "
                                                  "under log.runs_dir (what `sweep` uses)."),
) -> None:
    """Train a NeRF from a prompt by score distillation, then export the mesh and turntable video."""
    from sdsbridge import checkpoint as ckpt
    from sdsbridge.atomic import make_dirs, remove_stale_temps
    from sdsbridge.config_loader import config_from_dict, load_config
    from sdsbridge.rundir import create_run_dir, run_slug
    from sdsbridge.devices import resolve_device
    from sdsbridge.train import prior_device, train as train_run

    path, overrides = _split_file_and_overrides(file, overrides)
    if device is not None:
        overrides.append(f"device={device}")
    if method is not None:
        overrides.append(f"method={method}")
    if resume is not None and run_dir_option is not None:
        raise UserError("train: --run-dir starts a fresh run; --resume continues one in its own directory (give one)")
    if run_dir_option is not None and run_dir_option.exists() and (
            not run_dir_option.is_dir() or any(run_dir_option.iterdir())):
        raise UserError(f"--run-dir: {run_dir_option} exists and is not an empty directory; an existing run is "
                        "never reused (continue it with --resume)")
    if resume is not None:
        checkpoint_path, checkpoint = ckpt.load_newest(resume, for_resume=True)  # on the CPU: RNG states stay there
        config = config_from_dict(checkpoint["config"], overrides)
        run_dir, fresh = ckpt.run_dir_of(checkpoint_path), False
        if checkpoint["step"] >= config.train.steps:
            typer.echo(f"{run_dir} is finished (step {checkpoint['step']} of {config.train.steps}): nothing to do. "
                       f"Raise train.steps to train on (`sdsbridge train --resume {run_dir} train.steps=N`); "
                       f"`sdsbridge export` / `video` / `report` {run_dir} make outputs.")
            return
        remove_stale_temps(run_dir)
        typer.echo(f"resuming from {checkpoint_path} (step {checkpoint['step']})")
    else:
        if path is None:
            raise UserError("train: give a prompt YAML file, or --resume RUN_DIR")
        config = load_config(path, overrides)
        checkpoint = None
    torch_device = resolve_device(config.device)
    prior_device(config, torch_device)  # a prior.device this machine lacks fails before a run directory exists
    check_run(config)  # a model or prompt that cannot work fails before a run directory or a scene exists
    if torch_device.type == "cpu" and config.prior.kind == "stable-diffusion":
        logging.getLogger("sdsbridge").warning(
            "Stable Diffusion on the CPU: every step takes seconds (minutes at 512 px), a run days; "
            "`sdsbridge doctor` shows what this machine can use, `sdsbridge train configs/demo.yaml` is the CPU demo")
    runs_root = Path(config.log.runs_dir)
    runs_root_existed = runs_root.exists()
    if resume is None:
        run_dir = (make_dirs(run_dir_option) if run_dir_option is not None else
                   create_run_dir(config.log.runs_dir, run_slug(config.method, config.prompt, config.log.name)))
        fresh = True
    typer.echo(f"run directory: {run_dir}")
    try:
        result = train_run(config, run_dir, torch_device, checkpoint=checkpoint, show_progress=progress)
    except (UserError, Interrupted):
        if fresh and not any((run_dir / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)  # it never got a checkpoint: nothing to resume, no trace
            if not runs_root_existed and runs_root.is_dir() and not any(runs_root.iterdir()):
                runs_root.rmdir()  # nor the runs folder this command made
        raise
    minutes, seconds = divmod(int(result.seconds), 60)
    summary = f"{result.step} steps, {minutes}m{seconds:02d}s; run: {result.run_dir}"
    if result.interrupted:
        typer.echo(f"interrupted: {summary}; resume with `sdsbridge train --resume {result.run_dir}`")
        raise typer.Exit(130)
    outputs, code = _export_after_training(config, result, progress)
    typer.echo(f"done: {summary}" + "".join(f"; {name}: {path}" for name, path in outputs))
    if code:
        raise typer.Exit(code)


def _export_after_training(config, result, progress: bool) -> tuple[list[tuple[str, Path]], int]:
    """Mesh, turntable and report page of the trained scene in memory at the end of `train` (export.mesh /
    export.video / export.report).
    A failed export is reported in one line and does not hide the other output; the trained run is kept
    either way. Returns the outputs and the exit code: 0, 1 (an export failed) or 3 (one could not be
    written)."""
    from sdsbridge.export.mesh import export_mesh
    from sdsbridge.export.video import export_video
    from sdsbridge.report import write_report

    outputs, code = [], 0
    steps = [("mesh", config.export.mesh, lambda: export_mesh(result.scene, config, result.run_dir, result.step)),
             ("video", config.export.video, lambda: export_video(result.scene, config, result.run_dir, result.step,
                                                                 progress=progress)),
             ("report", config.export.report, lambda: write_report([result.run_dir]))]
    for name, wanted, make in steps:
        if not wanted:
            continue
        try:
            outputs.append((name, make()))
        except UserError as exc:
            typer.echo(f"error: {name} export failed: {' '.join(str(exc).split())}", err=True)
            code = max(code, EXIT_WRITE_FAILED if isinstance(exc, WriteFailed) else EXIT_FAILED)
    return outputs, code


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
) -> None:
    """Extract a coloured mesh from a trained run (marching cubes on the density) to RUN/mesh/, named by the
    checkpoint step and the settings that differ from the run's (never replacing another export); with
    --texture a UV-unwrapped mesh with a texture baked from the field."""
    from sdsbridge.export.mesh import export_run_mesh
    from sdsbridge.devices import resolve_device

    if format is not None and format not in ("glb", "obj", "ply"):
        raise UserError(f"--format: '{format}' is not one of glb, obj, ply")
    if resolution is not None and resolution < 8:
        raise UserError(f"--resolution: must be >= 8, got {resolution}")
    if texture_size is not None and not 16 <= texture_size <= 8192:
        raise UserError(f"--texture-size: must lie in [16, 8192], got {texture_size}")
    if texture and format not in (None, "glb", "obj"):
        raise UserError(f"--format {format}: a textured mesh is written as glb and obj")
    if out is not None:
        suffix = out.suffix.lstrip(".").lower()
        if suffix not in (("glb",) if texture else ("glb", "obj", "ply")) or (format and not texture and format != suffix):
            raise UserError(f"--out: {out}: expected a {'.glb' if texture else '.glb, .obj or .ply'} file"
                            + (f" matching --format {format}" if format and not texture else ""))
    level: Optional[str | float] = threshold
    if threshold not in (None, "auto"):
        try:
            level = float(threshold)
        except ValueError:
            raise UserError(f"--threshold: expected 'auto' or a number, got '{threshold}'") from None
    path = export_run_mesh(run, format, resolution, level, resolve_device(device), texture, texture_size, out)
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
) -> None:
    """Render a turntable video (default rgb | normal; shaded = textureless diffuse geometry) of a trained run
    to RUN/video/, named by the checkpoint step and the settings that differ from the run's (never replacing
    another video)."""
    from sdsbridge.export.video import parse_modes, render_run_video
    from sdsbridge.devices import resolve_device

    for name, value in (("--frames", frames), ("--resolution", resolution), ("--fps", fps)):
        if value is not None and value <= 0:
            raise UserError(f"{name}: must be positive, got {value}")
    modes = parse_modes(mode) if mode is not None else None
    if out is not None and out.suffix.lower() != ".mp4":
        raise UserError(f"--out: {out}: expected an .mp4 file")
    path = render_run_video(run, frames, resolution, fps, resolve_device(device), progress=progress, modes=modes,
                            out=out)
    typer.echo(f"video: {path}")


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="One or more run directories (several: side by side)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: RUN/report.html; for several "
                                       "runs, compare-<names>.html beside the first)."),
) -> None:
    """Write a self-contained HTML page to look at a run: the prompt and config, an interactive 3D view of the
    mesh, the turntable videos, the validation grids as a timeline and the training curves."""
    from sdsbridge.report import write_report

    for run in runs:
        if not run.is_dir():
            raise UserError(f"report: {run}: no such run directory")
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

    from sdsbridge.evaluation import evaluate_run
    from sdsbridge.devices import resolve_device

    if views <= 0:
        raise UserError(f"--views: must be positive, got {views}")
    if mesh_resolution < 8:
        raise UserError(f"--mesh-resolution: must be >= 8, got {mesh_resolution}")
    scores = evaluate_run(run, resolve_device(device), n_views=views, mesh_resolution=mesh_resolution)
    if json_output:
        typer.echo(json.dumps(scores, indent=2))
        return
    for key, value in scores.items():
        typer.echo(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")


@app.command()
def image(
    file: Optional[str] = typer.Argument(None, help="prompt.yaml (with --batch, settings only)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=IMAGE_OVERRIDES_HELP),
    seeds: str = typer.Option("0", "--seeds", help="Seeds: '0', '0-7' or '0,2,5' (one image each; a grid "
                              "compares them)."),
    batch: Optional[Path] = typer.Option(None, "--batch", help="A text file of prompts, one per line: one "
                                         "image per prompt, resumable (done prompts are skipped)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a new runs/image-...)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    method: Optional[str] = typer.Option(None, "--method", help="bridge | sds | nfsd | vsd | bridge-vsd "
                                         "(overrides `method:`)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """2D score distillation: optimise an image (SD latent or reference-prior pixels) with bridge/sds/nfsd/vsd
    and the official 2D settings (image.* keys)."""
    from sdsbridge.config_loader import load_config
    from sdsbridge.image2d import parse_seeds, run_image
    from sdsbridge.image_batch import run_image_batch
    from sdsbridge.rundir import create_run_dir, run_slug
    from sdsbridge.devices import resolve_device

    path, overrides = _split_file_and_overrides(file, overrides)
    if device is not None:
        overrides.append(f"device={device}")
    if method is not None:
        overrides.append(f"method={method}")
    if batch is not None and not batch.is_file():
        raise UserError(f"--batch: {batch}: file not found")
    config = load_config(path, overrides, require_prompt=batch is None, command="image")
    seed_list = parse_seeds(seeds)
    torch_device = resolve_device(config.device)
    check_run(config)
    if out is None:
        name = f"image-{run_slug(config.method, batch.stem if batch else config.prompt, config.log.name)}"
        out = create_run_dir(config.log.runs_dir, name)
    if batch is not None:
        run_image_batch(config, batch, out, torch_device, seed_list, progress)
        return
    result = run_image(config, out, torch_device, seed_list, progress)
    typer.echo(f"images: {', '.join(str(p) for p in result.images.values())}")
    if result.grid is not None:
        typer.echo(f"grid: {result.grid}")


@app.command()
def sweep(
    file: Path = typer.Argument(..., help="A sweep file: prompts, a base config and a grid of key=value variations."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value for every run (after the sweep's `set`)."),
    launcher: str = typer.Option("local", "--launcher", help="local | ray | slurm (ray, slurm: optional extras)."),
    jobs: int = typer.Option(1, "--jobs", help="local: runs at a time (one GPU each when there are GPUs)."),
    retries: int = typer.Option(1, "--retries", help="Resume a run that crashed up to N more times."),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep directory (default: the file's `out`, else "
                                       "sweeps/<file stem>)."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: a running cluster (e.g. auto, "
                                          "ray://host:10001); default: start a local one."),
    cpus_per_run: int = typer.Option(1, "--cpus-per-run", help="ray, on a cluster without GPUs: CPUs per run; "
                                     "slurm: CPUs per job."),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: the partition."),
    time_min: int = typer.Option(240, "--time-min", help="slurm: time limit per job in minutes (a job that "
                                 "reaches it checkpoints and is requeued)."),
    max_parallel: int = typer.Option(0, "--max-parallel", help="slurm: jobs of the array running at once (0: "
                                     "no limit)."),
    slurm_local: bool = typer.Option(False, "--slurm-local", help="slurm: run the jobs as local processes through "
                                     "submitit (a dry run of the Slurm path, no cluster needed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every run and list them with their status; "
                                 "start nothing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the overall progress bar."),
) -> None:
    """Run every combination of a sweep file (prompts x grid), each an ordinary run under one sweep directory.
    Re-running skips finished runs, resumes interrupted ones from their checkpoint and starts missing ones;
    sweep.csv / sweep.json hold one row per run."""
    from sdsbridge.launchers import SlurmOptions, run_sweep
    from sdsbridge.sweep import load_sweep, run_status

    if launcher not in ("local", "ray", "slurm"):
        raise UserError(f"--launcher: '{launcher}' is not one of local, ray, slurm")
    for name, value, low in (("--jobs", jobs, 1), ("--retries", retries, 0), ("--cpus-per-run", cpus_per_run, 1),
                             ("--time-min", time_min, 1), ("--max-parallel", max_parallel, 0)):
        if value < low:
            raise UserError(f"{name}: must be >= {low}, got {value}")
    plan = load_sweep(file, overrides or [], out)
    for run in plan.runs:
        check_prompt(run.config)
    if launcher == "local":  # the model is on this machine's disk only for runs started here
        for run in plan.runs:
            check_run(run.config)
            if jobs > 1 and run.config.prior.device not in (None, "cpu"):
                raise UserError(f"--jobs {jobs}: run {run.name} puts its prior on {run.config.prior.device}; "
                                "runs that span two GPUs need --jobs 1")
    if dry_run:
        for run in plan.runs:
            typer.echo(f"{run_status(plan.out, run.name):>8}  {run.name}")
        typer.echo(f"{len(plan.runs)} runs in {plan.out}: OK")
        return
    if address is not None and launcher != "ray":
        raise UserError("--address: only for --launcher ray")
    if slurm_local and launcher != "slurm":
        raise UserError("--slurm-local: only for --launcher slurm")
    if launcher != "local":
        from sdsbridge.launchers import import_extra

        import_extra("ray" if launcher == "ray" else "submitit")  # the missing extra, before anything is written
    if launcher == "slurm" and not slurm_local and shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: sbatch not found (is this a Slurm login node?); --slurm-local runs the "
                        "jobs as local processes through submitit")
    slurm = SlurmOptions(partition, time_min, 1, cpus_per_run, max_parallel, slurm_local)
    rows = run_sweep(plan, launcher, jobs, retries, address, cpus_per_run, slurm, progress)
    unfinished = [row for row in rows if row["status"] != "done"]
    if unfinished:
        raise RunFailed(f"sweep: {len(unfinished)} of {len(rows)} runs not done ({unfinished[0]['name']}: "
                        f"{unfinished[0]['status']}{': ' + unfinished[0]['error'] if unfinished[0].get('error') else ''}); "
                        f"logs in {plan.out / 'logs'}; re-run the sweep to resume them")


@app.command()
def doctor(
    model: Optional[str] = typer.Option(None, "--model", help="Prior model id or local folder to look for "
                                        "(default: prior.model's default)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    json_output: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check what this machine can use: device, CUDA, tinycudann, nerfacc kernels, ffmpeg, fp16, the model."""
    from sdsbridge.config import DEFAULT_SD_MODEL
    from sdsbridge.doctor import exit_code, format_table, run_checks, summary, to_json

    checks = run_checks(model or DEFAULT_SD_MODEL, device)
    typer.echo(to_json(checks) if json_output else f"{format_table(checks)}\n{summary(checks)}")
    raise typer.Exit(exit_code(checks))


WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EDQUOT, errno.EFBIG)
"""OS errors that mean 'this machine refused a write' (exit code 3) where no writer translated them."""


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the typer app; a UserError becomes one line and its exit code, SIGINT /
    SIGTERM one line and exit code 130 (errors.py lists the codes)."""
    args = list(sys.argv[1:] if argv is None else argv)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app(args=args, prog_name="sdsbridge", standalone_mode=True)
    except UserError as exc:
        if "--debug" in args:
            raise
        message = " ".join(str(exc).split())  # always one line
        typer.echo(f"error: {message}", err=True)
        for hint in getattr(exc, "hints", ()):
            typer.echo(f"  - {' '.join(hint.split())}", err=True)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        typer.echo(f"interrupted ({signal.Signals(exc.signum).name}): stopped; no partially written file was kept",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS or "--debug" in args:
            raise
        from sdsbridge.atomic import describe_os_error

        typer.echo(f"error: {describe_os_error(exc)}: {exc.filename or 'a file'}", err=True)
        sys.exit(EXIT_WRITE_FAILED)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
