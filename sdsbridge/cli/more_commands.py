"""`sdsbridge image` (2D distillation), `sweep` (many runs, on local/Ray/Slurm) and `doctor` (this machine)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import typer

from sdsbridge.cli.app import IMAGE_OVERRIDES_HELP, app, split_file_and_overrides
from sdsbridge.common.errors import RunFailed, UserError
from sdsbridge.cli.preflight import check_prompt, check_run
from sdsbridge.common.limits import check_image_set
from sdsbridge.common.targets import check_folder


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
    method: Optional[str] = typer.Option(None, "--method", help="A registered method's name, "
                                         "e.g. bridge or sds (overrides `method:`; a wrong name lists them all)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """2D score distillation: optimise an image (SD latent or reference-prior pixels) with bridge/sds/nfsd/vsd
    and the official 2D settings (image.* keys)."""
    from sdsbridge.config.loader import load_config
    from sdsbridge.training.image2d import parse_seeds, run_image
    from sdsbridge.training.image_batch import batch_failure, run_image_batch
    from sdsbridge.training.rundir import create_run_dir, run_slug
    from sdsbridge.common.devices import resolve_device

    path, overrides = split_file_and_overrides(file, overrides)
    if device is not None:
        overrides.append(f"device={device}")
    if method is not None:
        overrides.append(f"method={method}")
    if batch is not None and not batch.is_file():
        raise UserError(f"--batch: {batch}: file not found")
    config = load_config(path, overrides, require_prompt=batch is None, command="image")
    check_folder(out if out is not None else Path(config.log.runs_dir), "--out" if out is not None else "log.runs_dir")
    if config.prior.kind == "reference" and config.image.resolution:  # its image set is rendered at that size
        check_image_set(config.image.resolution, config.prior.views_per_label, "image.resolution")
    seed_list = parse_seeds(seeds)
    torch_device = resolve_device(config.device)
    check_run(config)
    if out is None:
        name = f"image-{run_slug(config.method, batch.stem if batch else config.prompt, config.log.name)}"
        out = create_run_dir(config.log.runs_dir, name)
    if batch is not None:
        failure = batch_failure(run_image_batch(config, batch, out, torch_device, seed_list, progress))
        if failure is not None:
            raise failure
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
    from sdsbridge.sweep.launchers import SlurmOptions, run_sweep
    from sdsbridge.sweep.sweep_file import load_sweep, run_status

    if launcher not in ("local", "ray", "slurm"):
        raise UserError(f"--launcher: '{launcher}' is not one of local, ray, slurm")
    for name, value, low in (("--jobs", jobs, 1), ("--retries", retries, 0), ("--cpus-per-run", cpus_per_run, 1),
                             ("--time-min", time_min, 1), ("--max-parallel", max_parallel, 0)):
        if value < low:
            raise UserError(f"{name}: must be >= {low}, got {value}")
    plan = load_sweep(file, overrides or [], out)
    for run in plan.runs:
        _for_run(plan, run, check_prompt)
    if launcher == "local":  # the model is on this machine's disk only for runs started here
        for run in plan.runs:
            _for_run(plan, run, check_run)
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
        from sdsbridge.sweep.launchers import import_extra

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


def _for_run(plan, run, check) -> None:
    """``check(run.config)``, its UserError naming the sweep file and the run (as load_sweep's do)."""
    try:
        check(run.config)
    except UserError as exc:
        raise type(exc)(f"{plan.path}: run {run.name}: {exc}", exc.hints) from None


@app.command()
def doctor(
    model: Optional[str] = typer.Option(None, "--model", help="Prior model id or local folder to look for "
                                        "(default: prior.model's default)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    json_output: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check what this machine can use: device, CUDA, tinycudann, nerfacc kernels, ffmpeg, fp16, the model."""
    from sdsbridge.priors.hub import DEFAULT_SD_MODEL
    from sdsbridge.cli.doctor import exit_code, format_table, run_checks, summary, to_json

    checks = run_checks(model or DEFAULT_SD_MODEL, device)
    typer.echo(to_json(checks) if json_output else f"{format_table(checks)}\n{summary(checks)}")
    raise typer.Exit(exit_code(checks))

