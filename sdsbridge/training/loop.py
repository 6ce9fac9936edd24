"""The 3D training loop, read top to bottom: build the scene, prior, method and optimizer (or restore them
from a checkpoint), then for each step ``scene_step`` (cameras -> render -> guidance + regularisers ->
AdamW step), and at their intervals a metrics row, a validation grid and a checkpoint.

Stage, timestep range, render resolution and loss weights are all functions of the step, so a resumed
run behaves exactly like an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sdsbridge.training import checkpoint as ckpt
from sdsbridge.common.atomic import atomic_write_bytes, remove_stale_temps
from sdsbridge.common.checks import shorten
from sdsbridge.scene.cameras import orbit_cameras
from sdsbridge.config.schema import Config
from sdsbridge.config.loader import config_to_dict, to_yaml
from sdsbridge.common.devices import fitted_cpu_threads, resolve_device, seed_everything
from sdsbridge.common.errors import Interrupted, RunFailed, UserError, WriteFailed
from sdsbridge.common.jsonl import append_rows, keep_rows
from sdsbridge.common.media import image_row, write_png
from sdsbridge.distill.methods import Method, make_method
from sdsbridge.training.plots import stage2_step, write_plots
from sdsbridge.priors import load_prior
from sdsbridge.scene.base import Scene
from sdsbridge.training.step import BadSteps, StepResult, Views, build_optimizer, build_scene, scene_step
from sdsbridge.training.watch import LoopControls, StepReport, StepWatcher

log = logging.getLogger("sdsbridge")


THREAD_CHECK_EVERY = 100
"""CPU runs re-fit their thread count every this many steps, to the load other processes put on the cores over
those steps and to the steps' own rate with each count tried (devices.CpuThreads)."""
LONG_RUN_STEPS = 1000
"""A CPU run with at least this many steps to go compiles its hash-grid kernels at the first step, not after the
~2M points the encoding otherwise runs eagerly first (for short runs and tests): the demo spent ~180 steps at
65 ms instead of 23 before compiling, 7 s against a compile of 3 s from inductor's cache (10-20 s cold, which a
long run pays anyway). Compiled and eager kernels give the same bits, so results do not change."""


class TrainingDiverged(RunFailed):
    """Too many non-finite steps in a row; the last good state was checkpointed (exit code 1)."""


@dataclass
class TrainResult:
    """What `train` reports back."""

    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    """The checkpoint written last (None if this call wrote none)."""
    interrupted: bool
    bad_steps: int
    seconds: float
    scene: Scene
    """The trained scene in memory, in eval mode (what the last checkpoint holds), for export."""


def make_checkpoint(scene: Scene, method: Method, optimizer: torch.optim.Optimizer, step: int, config: Config,
                    bad_steps: int) -> dict:
    """The checkpoint dict (checkpoint.py's layout): scene, method state, optimizer, RNGs, config."""
    return {"format": ckpt.FORMAT, "step": step, **scene.state_dict(), "method": method.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": ckpt.capture_rng_state(),
            "config": config_to_dict(config), "bad_steps": bad_steps}


def restore_checkpoint(checkpoint: dict, scene: Scene, method: Method, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Load scene, method and optimizer state and every RNG from a checkpoint dict; returns (step, bad
    steps so far). Checkpoints written before methods had state carry no "method" entry."""
    scene.load_state_dict(checkpoint)
    try:
        method.load_state_dict(checkpoint.get("method", {}))
        optimizer.load_state_dict(checkpoint["optimizer"])
        ckpt.restore_rng_state(checkpoint["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(f"checkpoint's method, optimizer or RNG state does not fit this run: "
                        f"{type(exc).__name__}: {shorten(str(exc), 300)}") from None
    return checkpoint["step"], checkpoint.get("bad_steps", 0)


def metrics_row(done: int, views: Views, result: StepResult, bad_steps: int, seconds: float) -> dict:
    """One line of metrics.jsonl after ``done`` steps (reads the step's scalars: one host sync)."""
    return {"step": done, "loss": result.loss.item(), "stage": result.distill.stage,
            "t": result.distill.t.float().mean().item(), "grad_norm": result.distill.grad_norm.item(),
            "resolution": views.resolution, "bad_steps": bad_steps, "elapsed_s": round(seconds, 3),
            **{f"loss_{k}": v.item() for k, v in result.losses.items()}}


def try_write(what: str, write) -> bool:
    """Run ``write()``; a WriteFailed is logged as a warning instead of stopping training. True if written."""
    try:
        write()
    except WriteFailed as exc:
        log.warning(f"{what} not written: {exc}")
        return False
    return True


@torch.no_grad()
def save_validation(scene: Scene, config: Config, path: Path) -> None:
    """A grid of fixed eval views (rows: views; columns: rgb | opacity | depth) as PNG, rendered in eval
    mode without touching the training RNG."""
    device = scene.device
    cameras = orbit_cameras(config.cameras, config.log.val_views).to(device)
    res = config.log.val_resolution
    scene.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = scene.render(cameras, res, res, chunk_rays=config.render.chunk_rays)
    scene.train()
    write_png(path, np.concatenate([image_row(out.rgb[i], out.opacity[i], out.depth[i]) for i in range(len(cameras))]))


@contextmanager
def stop_requests() -> Iterator[dict]:
    """Turn Ctrl-C / SIGTERM into a flag the loop checks after each step (then it checkpoints and exits)."""
    flag = {"signal": None}

    def handler(signum, _frame):
        if flag["signal"] is not None:  # second Ctrl-C: stop now (a checkpoint being written is abandoned)
            raise Interrupted(signum)
        flag["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def prior_device(config: Config, scene_device: torch.device) -> torch.device:
    """The prior's device: ``prior.device`` when set (UserError for a device this machine lacks), else the
    scene's."""
    return scene_device if config.prior.device is None else resolve_device(config.prior.device)


def warn_if_gpu_too_small(config: Config, device: torch.device) -> Optional[str]:
    """Before the prior loads: on a CUDA device, a warning (logged and returned) when the forecast peak memory of
    the run's largest step (``memory.check_fit``) exceeds the GPU's, naming the settings that would fit. Reads the
    pipeline's configs only; silent when they cannot be read (the loader reports that)."""
    if device.type != "cuda" or config.prior.kind != "stable-diffusion":
        return None
    from sdsbridge.training import memory
    from sdsbridge.scene.nerf.encoding import resolve_backend

    arch = memory.architecture_of(config.prior.model)
    if arch is None:
        return None
    backend, _ = resolve_backend(config.scene.backend, device)
    _, advice = memory.check_fit(config, arch, torch.cuda.get_device_properties(device).total_memory,
                                 torch.cuda.device_count(), backend)
    if advice:
        log.warning(advice)
    return advice


def train(config: Config, run_dir: Path, device: torch.device, checkpoint: Optional[dict] = None,
          show_progress: bool = True, watcher: Optional[StepWatcher] = None) -> TrainResult:
    """Train (or continue training, from a ``checkpoint`` dict as ``load_checkpoint`` returns it) the scene
    for ``config.train.steps`` steps in ``run_dir``. ``watcher`` (the live viewer) is called between steps
    (watch.py); it never changes the results."""
    started = time.time()
    seed_everything(config.train.seed)
    scene = build_scene(config, device)
    # Before the prior loads (the slow part): a folder that cannot hold this run stops it here.
    parameters = [p for group in scene.param_groups() for p in group["params"]]
    ckpt.check_room(run_dir, ckpt.estimate_checkpoint_bytes(parameters))
    if checkpoint is None:  # a resumed run's config.yaml changes only once its checkpoint is known to fit (below)
        atomic_write_bytes(run_dir / "config.yaml", to_yaml(config).encode("utf-8"))
    warn_if_gpu_too_small(config, prior_device(config, device))
    prior = load_prior(config.prior, prior_device(config, device), config.cameras)
    method = make_method(config.method, config.guidance, prior)
    prompts = method.prompt_embeddings(config.prompt)
    optimizer = build_optimizer(scene, method, config.train)

    start_step, bad_steps = 0, 0
    if checkpoint is not None:
        start_step, bad_steps = restore_checkpoint(checkpoint, scene, method, optimizer)
        # Only now, when nothing can refuse the resume any more (exit 2 writes nothing), is the run touched.
        remove_stale_temps(run_dir)
        atomic_write_bytes(run_dir / "config.yaml", to_yaml(config).encode("utf-8"))
        log.info(f"resuming {run_dir} at step {start_step} (stage {method.stage(start_step)})")
    steps = config.train.steps
    if start_step >= steps:
        log.info(f"{run_dir} is already at step {start_step} of {steps}; raise train.steps to continue")
        return TrainResult(run_dir, start_step, None, False, bad_steps, time.time() - started, scene.eval())

    saver = ckpt.CheckpointSaver(run_dir / "checkpoints", config.log.keep_checkpoints,
                                 config.log.max_checkpoint_failures, start_step if checkpoint is not None else None)

    def save(step: int, final: bool = False) -> Optional[Path]:
        return saver.save(make_checkpoint(scene, method, optimizer, step, config, bad.total), final)

    metrics_path = run_dir / "metrics.jsonl"
    keep_rows(metrics_path, lambda row: row.get("step", 0) <= start_step)  # a resumed run redoes later steps
    bar = tqdm(total=steps, initial=start_step, disable=not show_progress, dynamic_ncols=True, unit="step")
    compiled_before = scene.one_off_seconds
    if device.type == "cpu" and steps - start_step >= LONG_RUN_STEPS:
        scene.prepare_long_run()
    bad = BadSteps(config.train.max_bad_steps, total=bad_steps)  # bad_steps: the checkpoint's count
    done, last_saved, interrupted, unwritten_rows = start_step, None, False, []
    scene.train()
    if watcher is not None:
        watcher.attach(scene, config, run_dir, start_step)
    watched_since = time.perf_counter()
    with stop_requests() as stop, logging_redirect_tqdm(), fitted_cpu_threads(device) as threads:  # log lines print above the bar, not glued to it
        window_seconds, window_timed = 0.0, True  # the steps' own time since the last thread check
        for step in range(start_step, steps):
            step_started = time.perf_counter()
            views, result = scene_step(scene, method, prompts, optimizer, config, step)
            window_seconds += time.perf_counter() - step_started
            if scene.one_off_seconds != compiled_before:  # e.g. a one-off kernel compile: not the rate
                compiled_before = scene.one_off_seconds
                window_timed = False
                bar.unpause()
            diverged = bad.record(method, result)
            if not result.finite:
                # Steps count from 1 in messages, as in metrics.jsonl: loop index ``step`` is step ``step + 1``.
                log.warning(f"step {step + 1}: {bad.cause}, step skipped ({bad.in_row} in a row)")
            if diverged:
                path = save(step, final=True)
                raise TrainingDiverged(
                    f"training diverged: {bad.in_row} non-finite steps in a row at step {step + 1} ({bad.cause}); "
                    f"{bad.advice}; the last good state is in {path}")
            done = step + 1
            if threads is not None and done % THREAD_CHECK_EVERY == 0:
                whole_window = window_timed and done - start_step >= THREAD_CHECK_EVERY  # not a resume's partial one
                threads.update(time.time() - started, THREAD_CHECK_EVERY / window_seconds if whole_window else None)
                window_seconds, window_timed = 0.0, True

            # Scalars reach the host only on logging steps (each .item() waits for the device).
            bar.update(1)
            row, validation = None, None
            if done % config.log.log_every == 0 or done == steps:
                row = metrics_row(done, views, result, bad.total, time.time() - started)
                unwritten_rows.append(row)  # rows a failed append kept go out with the next one
                if try_write("metrics", lambda: append_rows(metrics_path, unwritten_rows)):
                    unwritten_rows = []
                bar.set_postfix(loss=f"{row['loss']:.4g}", stage=row["stage"], t=int(row["t"]))
            if config.log.val_every and (done % config.log.val_every == 0 or done == steps):  # and the last step's
                validation = run_dir / "validation" / f"step-{done:07d}.png"
                if not try_write("validation image", lambda: save_validation(scene, config, validation)):
                    validation = None
                try_write("plots", lambda: write_plots(run_dir, stage2_step(config)))
            if watcher is not None:  # the live viewer: renders within its time budget, or waits while paused
                report = StepReport(done, steps, method.stage(step), views.cameras,
                                    time.perf_counter() - watched_since, row, validation)
                watcher.between_steps(report, LoopControls(lambda: stop["signal"] is not None,
                                                           lambda: save(done)))
                watched_since = time.perf_counter()
            if stop["signal"] is not None:
                last_saved = save(done, final=True)
                interrupted = True
                log.info(f"stopped by signal {stop['signal']} at step {done}; checkpoint {last_saved}; "
                         f"resume it with `sdsbridge train --resume {run_dir}`")
                break
            if done % config.log.checkpoint_every == 0 or done == steps:
                last_saved = save(done, final=done == steps) or last_saved
    bar.close()
    if watcher is not None:
        watcher.finish(done, interrupted)
    if done > start_step:
        try_write("plots", lambda: write_plots(run_dir, stage2_step(config)))
    if bad.total:
        log.warning(f"{bad.total} non-finite step(s) were skipped in this run")
    if not interrupted and done > start_step and bad.total - bad_steps == done - start_step:
        raise RunFailed(f"training failed: all {done - start_step} steps were non-finite and skipped, nothing was "
                        f"learned ({bad.cause}); {bad.advice}; the state is in {last_saved}")
    return TrainResult(run_dir, done, last_saved, interrupted, bad.total, time.time() - started, scene.eval())
