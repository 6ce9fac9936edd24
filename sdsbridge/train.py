"""The 3D training loop: cameras -> render -> guidance + regularisers -> AdamW step, read top to bottom.

Stage, timestep range, render resolution and loss weights are all functions of the step, so a resumed
run behaves exactly like an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdsbridge import checkpoint as ckpt
from sdsbridge.cameras import orbit_cameras, sample_cameras
from sdsbridge.config import Config
from sdsbridge.config_loader import config_to_dict, to_yaml
from sdsbridge.errors import UserError
from sdsbridge.guidance import current_stage, guidance_step
from sdsbridge.images import image_row, save_png
from sdsbridge.nerf.background import Background
from sdsbridge.nerf.field import NeRFField
from sdsbridge.nerf.renderer import Renderer
from sdsbridge.priors import load_prior
from sdsbridge.prompts import PromptEmbeddings
from sdsbridge.schedules import schedule_value

log = logging.getLogger("sdsbridge")


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the last good state was checkpointed."""


@dataclass
class Scene:
    """What a run optimises and renders."""

    field: NeRFField
    background: Background
    renderer: Renderer

    def train(self, mode: bool = True) -> "Scene":
        """Training mode (jittered samples) for all three parts, or eval mode with ``mode=False``."""
        self.field.train(mode)
        self.background.train(mode)
        self.renderer.train(mode)
        return self

    def eval(self) -> "Scene":
        return self.train(False)


@dataclass
class TrainResult:
    """What `train` reports back."""

    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    interrupted: bool
    bad_steps: int
    seconds: float


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA -> UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: 'cuda' was asked for but torch sees no CUDA device (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_scene(config: Config, device: torch.device) -> Scene:
    """Field, background and renderer from the config, on ``device``."""
    field = NeRFField(config.scene, device=device).to(device)
    background = Background(config.scene).to(device)
    renderer = Renderer(field, background, config.render, radius=config.scene.radius)
    return Scene(field, background, renderer)


def build_optimizer(scene: Scene, config: Config) -> torch.optim.AdamW:
    """AdamW with one named parameter group per part (the official run's): hash grid, density head, colour
    head, background; betas, eps and weight decay shared."""
    t = config.train
    groups = scene.field.param_groups()
    return torch.optim.AdamW(
        [{"params": groups["grid"], "lr": t.lr_grid, "name": "grid"},
         {"params": groups["density"], "lr": t.lr_density, "name": "density"},
         {"params": groups["color"], "lr": t.lr_color, "name": "color"},
         {"params": list(scene.background.parameters()), "lr": t.lr_background, "name": "background"}],
        betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)


def regularizer_losses(opacity: torch.Tensor, step: int, config: Config) -> dict[str, torch.Tensor]:
    """Weighted sparsity (mean sqrt(opacity^2 + 0.01)) and opacity BCE (pushes opacity to 0 or 1)."""
    losses = {}
    w_sparsity = schedule_value(config.loss.sparsity, step)
    if w_sparsity > 0:
        losses["sparsity"] = w_sparsity * torch.sqrt(opacity ** 2 + 0.01).mean()
    w_opacity = schedule_value(config.loss.opacity, step)
    if w_opacity > 0:
        clamped = opacity.clamp(1e-3, 1.0 - 1e-3)
        losses["opacity"] = w_opacity * F.binary_cross_entropy(clamped, clamped)
    return losses


def make_checkpoint(scene: Scene, optimizer: torch.optim.Optimizer, step: int, config: Config,
                    bad_steps: int) -> dict:
    return {"format": ckpt.FORMAT, "step": step, "field": scene.field.state_dict(),
            "background": scene.background.state_dict(), "renderer": scene.renderer.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": ckpt.capture_rng_state(),
            "config": config_to_dict(config), "bad_steps": bad_steps}


def load_scene_state(scene: Scene, checkpoint: dict) -> None:
    """Load field, background and renderer (occupancy grid) state from a checkpoint dict."""
    try:
        scene.field.load_state_dict(checkpoint["field"])
        scene.background.load_state_dict(checkpoint["background"])
        scene.renderer.load_state_dict(checkpoint["renderer"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"checkpoint does not match this config's scene: {str(exc).splitlines()[0]}") from None


@torch.no_grad()
def save_validation(scene: Scene, config: Config, step: int, path: Path, device: torch.device) -> None:
    """A grid of fixed eval views (rows: views; columns: rgb | opacity | depth) as PNG."""
    cameras = orbit_cameras(config.cameras, config.log.val_views).to(device)
    res = config.log.val_resolution
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = scene.renderer.render(cameras, res, res, chunk_rays=config.render.chunk_rays)
    rows = [image_row(out.rgb[i], out.opacity[i], out.depth[i]) for i in range(len(cameras))]
    save_png(path, np.concatenate(rows, axis=0))


@contextmanager
def stop_requests() -> Iterator[dict]:
    """Turn Ctrl-C / SIGTERM into a flag the loop checks after each step (then it checkpoints and exits)."""
    flag = {"signal": None}

    def handler(signum, _frame):
        if flag["signal"] is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def with_random_backgrounds(out, probability: float) -> torch.Tensor:
    """[N, H, W, 3] rgb where each image's background is, with ``probability``, replaced by a random solid
    colour (so the field cannot paint the background into the object). Always draws the same random
    numbers, whatever the outcome, so runs stay reproducible."""
    n = out.rgb.shape[0]
    use_solid = (torch.rand(n) < probability).to(out.rgb.device)
    colors = torch.rand(n, 3).to(out.rgb.device)
    transparency = 1.0 - out.opacity
    recomposited = out.rgb - transparency * out.background + transparency * colors[:, None, None, :]
    return torch.where(use_solid[:, None, None, None], recomposited, out.rgb)


def drop_metrics_after(path: Path, step: int) -> None:
    """Resuming from an older checkpoint redoes steps past it: drop their metrics lines first, so
    metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def loss_and_grads_finite(loss: torch.Tensor, parameters: list[torch.Tensor]) -> bool:
    """Whether the loss and every gradient are finite: one reduction on the device, one host sync."""
    checks = [torch.isfinite(loss).reshape(1)]
    checks += [torch.isfinite(p.grad).all().reshape(1) for p in parameters if p.grad is not None]
    return bool(torch.cat(checks).all())


def train(config: Config, run_dir: Path, device: torch.device, checkpoint: Optional[dict] = None,
          show_progress: bool = True) -> TrainResult:
    """Train (or continue training, from a ``checkpoint`` dict as ``load_checkpoint`` returns it) the scene
    for ``config.train.steps`` steps in ``run_dir``."""
    started = time.time()
    seed_everything(config.train.seed)
    scene = build_scene(config, device)
    optimizer = build_optimizer(scene, config)
    prior = load_prior(config.prior, device, config.cameras)
    prompts = PromptEmbeddings(prior, config.prompt, config.guidance, config.method)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    start_step, bad_steps_total = 0, 0
    if checkpoint is not None:
        load_scene_state(scene, checkpoint)
        optimizer.load_state_dict(checkpoint["optimizer"])
        ckpt.restore_rng_state(checkpoint["rng"])
        start_step, bad_steps_total = checkpoint["step"], checkpoint.get("bad_steps", 0)
        log.info(f"resuming {run_dir} at step {start_step} (stage {current_stage(config.method, start_step, config.guidance)})")
    (run_dir / "config.yaml").write_text(to_yaml(config))
    ckpt_dir = run_dir / "checkpoints"
    steps = config.train.steps
    if start_step >= steps:
        log.info(f"{run_dir} is already at step {start_step} of {steps}; raise train.steps to continue")
        return TrainResult(run_dir, start_step, None, False, bad_steps_total, time.time() - started)

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(make_checkpoint(scene, optimizer, step, config, bad_steps_total),
                                    ckpt_dir, config.log.keep_checkpoints)

    drop_metrics_after(run_dir / "metrics.jsonl", start_step)
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
    bar = tqdm(total=steps, initial=start_step, disable=not show_progress, dynamic_ncols=True, unit="step")
    bad_in_row, step, last_saved, interrupted = 0, start_step, None, False
    scene.train()
    with stop_requests() as stop, metrics_file:
        for step in range(start_step, steps):
            # --- one optimisation step -------------------------------------------------------------
            cameras = sample_cameras(config.cameras, config.train.batch_size).to(device)
            res = int(round(schedule_value(config.render.resolution, step)))
            out = scene.renderer.render(cameras, res, res)
            rgb = with_random_backgrounds(out, config.scene.random_background_prob)
            images = rgb.permute(0, 3, 1, 2)  # [N, 3, H, W]
            result = guidance_step(prior, images, prompts.conditions(cameras.labels), config.method, step,
                                   config.guidance, camera_positions=cameras.positions)
            losses = {"guidance": result.loss, **regularizer_losses(out.opacity, step, config)}
            loss = sum(losses.values())

            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # a non-finite loss gives non-finite gradients: checked together below
            if loss_and_grads_finite(loss, parameters):
                optimizer.step()
                bad_in_row = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                bad_in_row += 1
                bad_steps_total += 1
                log.warning(f"step {step}: non-finite loss or gradient, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= config.train.max_bad_steps:
                    path = save(step)
                    raise TrainingDiverged(
                        f"training diverged: {bad_in_row} non-finite steps in a row at step {step}; the last good "
                        f"state is in {path} (try lower learning rates or guidance scale)")
            scene.renderer.update_occupancy(step)  # occupancy-grid samplers only (CPU and CUDA)
            done = step + 1

            # --- progress, metrics, validation, checkpoints ----------------------------------------
            # Scalars reach the host only on logging steps (each .item() waits for the device).
            bar.update(1)
            if done % config.log.log_every == 0 or done == steps:
                bar.set_postfix(loss=f"{loss.item():.4g}", stage=result.stage, t=int(result.t.float().mean()))
                record = {"step": done, "loss": loss.item(), "stage": result.stage,
                          "t": result.t.float().mean().item(), "grad_norm": result.grad_norm.item(),
                          "resolution": res,
                          "bad_steps": bad_steps_total, "elapsed_s": round(time.time() - started, 3),
                          **{f"loss_{k}": v.item() for k, v in losses.items()}}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if config.log.val_every and done % config.log.val_every == 0:
                scene.eval()
                save_validation(scene, config, done, run_dir / "validation" / f"step-{done:07d}.png", device)
                scene.train()
            if done % config.log.checkpoint_every == 0 or done == steps:
                last_saved = save(done)
            if stop["signal"] is not None:
                last_saved = save(done)
                interrupted = True
                log.info(f"stopped by signal {stop['signal']} at step {done}; checkpoint {last_saved}; "
                         f"resume with: sdsbridge train --resume {run_dir}")
                break
    bar.close()
    step = done if steps > start_step else start_step
    if bad_steps_total:
        log.warning(f"{bad_steps_total} non-finite step(s) were skipped in this run")
    return TrainResult(run_dir, step, last_saved, interrupted, bad_steps_total, time.time() - started)


def load_trained_scene(run_or_checkpoint: Path, device: torch.device) -> tuple[Scene, Config, int]:
    """Rebuild the scene of a run (or checkpoint) for export/eval: (scene in eval mode, config, step)."""
    from sdsbridge.config_loader import config_from_dict

    path = ckpt.find_checkpoint(run_or_checkpoint)
    checkpoint = ckpt.load_checkpoint(path, map_location=device)
    config = config_from_dict(checkpoint["config"])
    scene = build_scene(config, device)
    load_scene_state(scene, checkpoint)
    return scene.eval(), config, int(checkpoint["step"])
