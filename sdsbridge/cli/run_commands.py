"""`sdsbridge config show|check` and `sdsbridge train` (with the exports at the end of training)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import List, Optional

import typer

from sdsbridge.cli.app import OVERRIDES_HELP, app, config_app, split_file_and_overrides
from sdsbridge.common.errors import EXIT_FAILED, EXIT_WRITE_FAILED, Interrupted, UserError, WriteFailed
from sdsbridge.cli.preflight import check_run
from sdsbridge.cli.view_command import view_settings_from_options
from sdsbridge.common.targets import check_folder


@config_app.command("show")
def config_show(
    file: Path = typer.Argument(..., help="A prompt YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Print the fully resolved config (defaults <- method preset <- FILE <- overrides) as YAML."""
    from sdsbridge.config.loader import load_config, to_yaml

    typer.echo(to_yaml(load_config(file, overrides or [])), nl=False)


@config_app.command("check")
def config_check(
    file: Path = typer.Argument(..., help="A prompt YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Validate FILE (and overrides) with every check `train` makes before it starts (the model is there, the
    reference prior knows the prompt's shape); print OK or the first problem."""
    from sdsbridge.config.loader import load_config

    config = load_config(file, overrides or [])
    check_run(config)
    typer.echo(f"OK: {file} ({config.method}, {config.prior.kind} prior, {config.train.steps} steps)")



SETTINGS_A_RESUME_MAY_CHANGE = ("train.steps", "device", "prior.device", "log.", "export.")
"""Settings `train --resume` changes without a warning: the length of the run, where it runs, what it logs and
exports. A change to any other (the prompt, the method, a scale) is named in a warning line: the run goes on from
a state trained with the old value."""


@app.command()
def train(
    file: Optional[str] = typer.Argument(None, help="prompt.yaml (not needed with --resume)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run: its directory or a .ckpt file. "
                                          "Raise train.steps=N to extend a finished run."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (overrides `device:`)."),
    method: Optional[str] = typer.Option(None, "--method", help="A registered method's name, "
                                         "e.g. bridge or sds (overrides `method:`; a wrong name lists them all)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    run_dir_option: Optional[Path] = typer.Option(None, "--run-dir", help="Train a fresh run in this directory "
                                                  "(created; it must not exist or be empty) instead of a new one "
                                                  "under log.runs_dir (what `sweep` uses)."),
    view: Optional[int] = typer.Option(None, "--view", metavar="[PORT]", help="Watch the run in the browser: a "
                                       "live 3D viewer on localhost:PORT (default 8080; needs viser, the 'view' "
                                       "extra). It takes under 10% of the training time and never changes the "
                                       "results."),
    view_host: Optional[str] = typer.Option(None, "--view-host", help="Address the viewer listens on (default "
                                            "127.0.0.1: this machine only; 0.0.0.0: every network it is on)."),
) -> None:
    """Train a NeRF from a prompt by score distillation, then export the mesh and turntable video."""
    from sdsbridge.training import checkpoint as ckpt
    from sdsbridge.common.atomic import make_dirs
    from sdsbridge.config.loader import changed_settings, config_from_dict, load_config
    from sdsbridge.training.rundir import create_run_dir, run_slug
    from sdsbridge.common.devices import resolve_device
    from sdsbridge.training.loop import prior_device, train as train_run

    path, overrides = split_file_and_overrides(file, overrides)
    view_settings = view_settings_from_options(view, view_host, "--view")
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
        changed = changed_settings(config_from_dict(checkpoint["config"]), config, unless=SETTINGS_A_RESUME_MAY_CHANGE)
        if changed:
            logging.getLogger("sdsbridge").warning(
                f"resuming with settings that differ from the run's: {'; '.join(changed)} (it goes on from a state "
                "trained with the old ones; config.yaml takes the new)")
        run_dir, fresh = ckpt.run_dir_of(checkpoint_path), False
        if checkpoint["step"] >= config.train.steps:
            typer.echo(f"{run_dir} is finished (step {checkpoint['step']} of {config.train.steps}): nothing to do. "
                       f"Raise train.steps to train on (`sdsbridge train --resume {run_dir} train.steps=N`); "
                       f"`sdsbridge export` / `video` / `report` {run_dir} make outputs.")
            return
        typer.echo(f"resuming from {checkpoint_path} (step {checkpoint['step']})")
    else:
        if path is None:
            raise UserError("train: give a prompt YAML file, or --resume RUN_DIR")
        config = load_config(path, overrides)
        checkpoint = None
        check_folder(run_dir_option if run_dir_option is not None else Path(config.log.runs_dir),
                     "--run-dir" if run_dir_option is not None else "log.runs_dir")
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
    viewer = None
    try:
        if view_settings is not None:
            from sdsbridge.view.viewer import LiveViewer

            viewer = LiveViewer(view_settings, f"sdsbridge: {run_dir.name}", training=True, cameras=config.cameras)
        result = train_run(config, run_dir, torch_device, checkpoint=checkpoint, show_progress=progress,
                           watcher=viewer)
    except (UserError, Interrupted):
        if viewer is not None:
            viewer.close()
        if fresh and not any((run_dir / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)  # it never got a checkpoint: nothing to resume, no trace
            if not runs_root_existed and runs_root.is_dir() and not any(runs_root.iterdir()):
                runs_root.rmdir()  # nor the runs folder this command made
        raise
    try:
        _finish_training(config, result, progress)
    finally:
        if viewer is not None:  # it showed the final scene during the exports
            viewer.close()
            typer.echo(f"viewer closed; `sdsbridge view {result.run_dir}` shows the run again")


def _finish_training(config, result, progress: bool) -> None:
    """The summary line, then the exports of a run that was not interrupted (exit 130 if it was)."""
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
    from sdsbridge.outputs.export.mesh import export_mesh
    from sdsbridge.outputs.export.video import export_video
    from sdsbridge.outputs.report import write_report

    from sdsbridge.common.devices import fitted_cpu_threads

    outputs, code = [], 0
    steps = [("mesh", config.export.mesh, lambda: export_mesh(result.scene, config, result.run_dir, result.step)),
             ("video", config.export.video, lambda: export_video(result.scene, config, result.run_dir, result.step,
                                                                 progress=progress)),
             ("report", config.export.report, lambda: write_report([result.run_dir]))]
    for name, wanted, make in steps:
        if not wanted:
            continue
        try:
            with fitted_cpu_threads(result.scene.device):  # the thread count training ran with
                outputs.append((name, make()))
        except UserError as exc:
            typer.echo(f"error: {name} export failed: {' '.join(str(exc).split())}", err=True)
            code = max(code, EXIT_WRITE_FAILED if isinstance(exc, WriteFailed) else EXIT_FAILED)
    return outputs, code

