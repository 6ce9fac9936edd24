"""Time the training step (ms/step, peak memory, and where the time goes) with a Stable Diffusion prior.

    python scripts/bench_train_step.py                                   # tiny random prior, CPU-sized
    python scripts/bench_train_step.py --steps 2 --warmup 1 --resolutions 32 --set scene.n_levels=4
    python scripts/make_random_sd.py --arch sd21-base /tmp/sd21 --dtype fp16     # then, on a GPU:
    python scripts/bench_train_step.py --model /tmp/sd21 --dtype fp16 --resolutions 64,512
    python scripts/bench_train_step.py --estimate     # forecast GPU memory per method, full-size SD 2.1-base, no GPU

Cases, each timed for ``--steps`` steps after ``--warmup`` untimed ones:

- ``3D RxR``: the 3D trainer's step (``train_step.scene_step``) with renders of R x R pixels: random
  cameras -> render -> random backgrounds -> VAE encode (resized to the prior's resolution) -> one batched
  UNet call -> regularisers -> backward -> finiteness check -> AdamW step -> occupancy-grid refresh (CUDA).
  Steps are numbered from ``--at-step`` (default 10000: both regularisers on, t_max 0.5).
- ``2D``: the 2D image mode's step (``train_step.train_step``) on a [1, C, h, w] latent at the prior's
  resolution: one batched UNet call -> backward -> finiteness check -> AdamW step.

Reported per case: median and p90 ms/step (CUDA synchronised at the end of each step), peak memory (CUDA:
``torch.cuda.max_memory_allocated`` over the timed steps; CPU: the process's peak resident set size over
the timed steps, Linux VmHWM, else the lifetime ``ru_maxrss``), mean field samples per ray, and a
breakdown (median ms per section: render forward, VAE encode, UNet, VSD's LoRA UNet calls, backward,
optimizer, occupancy, other = the rest). On CUDA the breakdown comes from a second pass with a synchronise around every section.

The default ``--model`` is the tiny random pipeline built in a temporary folder. Included: the step's one
host sync (the finiteness check). Not included: logging, checkpoints and validation renders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from sdsbridge.config.schema import Config
from sdsbridge.config.loader import load_config
from sdsbridge.common.devices import resolve_device, seed_everything
from sdsbridge.common.errors import UserError
from sdsbridge.training.image2d import image_guidance_config, image_optimizer, latent_shape
from sdsbridge.distill.methods import Method, make_method
from sdsbridge.scene.nerf.renderer import choose_sampler
from sdsbridge.priors import load_prior
from sdsbridge.distill.prompts import PromptEmbeddings
from sdsbridge.testing.random_sd import build_random_pipeline
from sdsbridge.training.step import build_scene
from sdsbridge.training.step import Timer, build_optimizer, scene_step, train_step, untimed

SECTIONS = ("render", "vae encode", "unet", "lora unet", "backward", "optimizer", "occupancy", "other")
"""Breakdown columns, in step order; 'other' is the step's time outside the named sections."""


# --- timing and memory ---------------------------------------------------------------------------------
class Sections:
    """Wall-clock milliseconds per named section of one step; with ``sync`` (CUDA only) the device is
    synchronised before and after each section so that its kernels are counted in it."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


class TimedPrior:
    """The prior with ``encode_images``, ``predict_noise`` and ``unet_output`` (VSD's LoRA calls: 'lora unet')
    timed into ``sections`` (reassigned per step); every other attribute is the prior's own."""

    def __init__(self, prior):
        self._prior = prior
        self.sections: Timer = untimed

    def __getattr__(self, name: str):
        return getattr(self._prior, name)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with self.sections("vae encode"):
            return self._prior.encode_images(images)

    def predict_noise(self, *args, **kwargs) -> torch.Tensor:
        with self.sections("unet"):
            return self._prior.predict_noise(*args, **kwargs)

    def unet_output(self, *args, **kwargs) -> torch.Tensor:
        with self.sections("lora unet"):
            return self._prior.unet_output(*args, **kwargs)


def _vm_hwm_bytes() -> Optional[int]:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's resident high-water mark (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux (or not allowed): peak_memory falls back to the lifetime peak


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max_memory_allocated, else VmHWM, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[int, Sections], float], steps: int, warmup: int, device: torch.device) -> dict:
    """Run ``step(i, sections)`` (which returns samples per ray, or 0) ``warmup`` times untimed, then
    ``steps`` timed times; on CUDA, ``steps`` more with per-section synchronisation for the breakdown.

    Returns {'ms': [steps] per-step ms, 'sections': [steps] {section: ms}, 'peak_bytes', 'samples_per_ray'}.
    """
    for i in range(warmup):
        step(i, Sections(device, sync=False))
    synchronize(device)
    reset_peak_memory(device)
    totals, breakdown, samples = [], [], []
    for i in range(warmup, warmup + steps):
        sections = Sections(device, sync=False)
        start = time.perf_counter()
        samples.append(step(i, sections))
        synchronize(device)
        totals.append((time.perf_counter() - start) * 1e3)
        breakdown.append(sections.ms)
    peak = peak_memory(device)
    if device.type == "cuda":  # the timed pass's sections hold launch times only: time them properly
        breakdown = []
        for i in range(warmup + steps, warmup + 2 * steps):
            sections = Sections(device, sync=True)
            start = time.perf_counter()
            step(i, sections)
            synchronize(device)
            sections.ms["total"] = (time.perf_counter() - start) * 1e3
            breakdown.append(sections.ms)
    else:
        for ms, total in zip(breakdown, totals):
            ms["total"] = total
    for ms in breakdown:
        ms["other"] = ms["total"] - sum(v for k, v in ms.items() if k != "total")
    return {"ms": totals, "sections": breakdown, "peak_bytes": peak, "samples_per_ray": float(np.mean(samples))}


# --- the steps -----------------------------------------------------------------------------------------
def make_3d_step(config: Config, method: Method, prompts: PromptEmbeddings, device: torch.device, resolution: int,
                 at_step: int) -> Callable[[int, Sections], float]:
    """A fresh scene and optimizer; returns step(i, sections) -> mean samples per ray of ``scene_step`` at
    step at_step + i with renders of ``resolution`` pixels."""
    config = dataclasses.replace(config, render=dataclasses.replace(config.render, resolution=resolution))
    scene = build_scene(config, device)
    optimizer = build_optimizer(scene, method, config.train)
    scene.train()

    def step(i: int, sections: Sections) -> float:
        method.prior.sections = sections
        views, _ = scene_step(scene, method, prompts, optimizer, config, at_step + i, timer=sections)
        return views.samples_per_ray

    return step


def make_2d_step(config: Config, prior: TimedPrior) -> tuple[Callable, tuple]:
    """The 2D image mode's ``train_step`` on a latent of the prior's own resolution; returns (step, latent
    shape)."""
    prior.sections = untimed  # the set-up below calls the prior: keep it out of the last step's breakdown
    method = make_method(config.method, image_guidance_config(config), prior)
    conditions = method.prompt_embeddings(config.prompt).conditions(["front"])
    shape = latent_shape(prior, prior.image_resolution)
    latents = torch.randn(shape, device=prior.device).requires_grad_(True)
    optimizer = image_optimizer(latents, method, config.image)

    def step(i: int, sections: Sections) -> float:
        prior.sections = sections
        train_step(method, optimizer, latents, conditions, i, timer=sections)
        return 0.0

    return step, shape


# --- setup and report ----------------------------------------------------------------------------------
def set_attention(prior, mode: str) -> None:
    """'sdpa': diffusers' AttnProcessor2_0 (F.scaled_dot_product_attention) in the UNet and VAE;
    'default': the plain matmul-softmax AttnProcessor; 'slicing' is applied when loading (PriorConfig)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if mode in ("sdpa", "default"):
        for module in (prior.unet, prior.vae):
            module.set_attn_processor(AttnProcessor2_0() if mode == "sdpa" else AttnProcessor())


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder or hub id (default: tiny random pipeline)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="prior dtype (auto: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last UNet and VAE")
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "default", "slicing"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per case first")
    parser.add_argument("--resolutions", default="64,512", help="comma-separated 3D render sizes (pixels)")
    parser.add_argument("--no-2d", action="store_true", help="skip the 2D case")
    parser.add_argument("--method", default="sds", choices=("sds", "bridge", "nfsd", "vsd", "bridge-vsd"),
                        help="sds and the bridge both evaluate the UNet on 2N samples per step, nfsd on 3N; vsd on "
                        "2N plus the LoRA's N without and N with gradients")
    parser.add_argument("--prompt", default="a DSLR photo of a hamburger")
    parser.add_argument("--at-step", type=int, default=10000, help="training step the 3D steps start at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. scene.n_levels=8 render.num_samples=32")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--estimate", action="store_true",
                        help="forecast the peak GPU memory of every method (no GPU needed; sdsbridge.training.memory) instead "
                        "of timing")
    parser.add_argument("--samples-per-ray", type=int, help="--estimate: field samples per ray assumed for the render")
    parser.add_argument("--backend", default="torch", choices=("torch", "tcnn"),
                        help="--estimate: the hash grid's backend (tcnn keeps far less per sample)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    try:
        args.resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--resolutions: expected comma-separated integers, got {args.resolutions!r}")
    return args


def run(args: argparse.Namespace, model: str) -> tuple[str, list[dict]]:
    """Load everything, run every case; returns (header line, rows)."""
    device = resolve_device(args.device)
    overrides = [f"prompt={args.prompt}", f"method={args.method}", f"device={device}",
                 f"prior.model={model}", f"prior.dtype={args.dtype}", f"prior.channels_last={args.channels_last}",
                 f"prior.attention_slicing={args.attention == 'slicing'}", f"train.seed={args.seed}", *args.set]
    config = load_config(None, overrides)
    seed_everything(config.train.seed)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    raw_prior = load_prior(config.prior, device, config.cameras)
    set_attention(raw_prior, args.attention)
    if args.compile:
        raw_prior.unet = torch.compile(raw_prior.unet)
    prior = TimedPrior(raw_prior)
    method = make_method(config.method, config.guidance, prior)
    prompts = method.prompt_embeddings(config.prompt)

    rows = []
    for resolution in args.resolutions:
        step = make_3d_step(config, method, prompts, device, resolution, args.at_step)
        rows.append({"case": "3D", "resolution": f"{resolution}x{resolution}",
                     **measure(step, args.steps, args.warmup, device)})
    if not args.no_2d:
        step, shape = make_2d_step(config, prior)
        rows.append({"case": "2D", "resolution": f"latent {shape[-2]}x{shape[-1]}",
                     **measure(step, args.steps, args.warmup, device)})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    header = (f"model {model} ({raw_prior.image_resolution}px, {str(raw_prior.dtype).replace('torch.', '')}), "
              f"device {name}, attention {args.attention}, channels_last {args.channels_last}, "
              f"compile {args.compile}, method {config.method}, batch {config.train.batch_size}, "
              f"sampler {choose_sampler(config.render.sampler, device)[0]}, "
              f"{args.steps} steps after {args.warmup} warm-up")
    return header, rows


def format_report(header: str, rows: list[dict]) -> str:
    """The results table and the per-section breakdown as text."""
    lines = [header, "", f"{'case':<5}{'resolution':<16}{'ms/step':>10}{'p90':>10}{'peak MiB':>11}{'samples/ray':>13}"]
    for r in rows:
        samples = f"{r['samples_per_ray']:.1f}" if r["case"] == "3D" else "-"
        lines.append(f"{r['case']:<5}{r['resolution']:<16}{statistics.median(r['ms']):>10.1f}"
                     f"{np.percentile(r['ms'], 90):>10.1f}{r['peak_bytes'] / 2**20:>11.0f}{samples:>13}")
    lines += ["", "breakdown, median ms per step" + (" (synchronised per section)" if "cuda" in header else ""),
              f"{'case':<5}{'resolution':<16}" + "".join(f"{s:>11}" for s in SECTIONS) + f"{'total':>10}"]
    for r in rows:
        med = {s: statistics.median(ms.get(s, 0.0) for ms in r["sections"]) for s in (*SECTIONS, "total")}
        lines.append(f"{r['case']:<5}{r['resolution']:<16}" + "".join(f"{med[s]:>11.1f}" for s in SECTIONS)
                     + f"{med['total']:>10.1f}")
    return "\n".join(lines)


ESTIMATE_METHODS = ("sds", "bridge", "nfsd", "vsd", "bridge-vsd")


def estimate(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """``--estimate``: the forecast peak GPU memory of one step (``sdsbridge.training.memory``) for every method at each
    resolution, on one GPU, with ``prior.cpu_offload`` and with ``prior.device`` on a second GPU (scene GPU |
    prior GPU). The architecture is ``--model``'s (its configs, no weights) or SD 2.1-base's; dtype fp16 unless
    ``--dtype`` says otherwise."""
    from sdsbridge.training.memory import (DEFAULT_SAMPLES_PER_RAY, GIB, architecture_of, forecast_dtype, forecast_step,
                                  meta_prior, random_architecture, render_bytes)

    if args.model:
        arch = architecture_of(args.model)
        if arch is None:
            raise UserError(f"--model: cannot read the unet/vae/text_encoder configs of '{args.model}' (a local "
                            "pipeline folder or a hub id in the local cache)")
    else:
        arch = random_architecture("sd21-base")
    dtype = forecast_dtype(args.dtype)
    samples = args.samples_per_ray or DEFAULT_SAMPLES_PER_RAY
    rows = []
    for method in ESTIMATE_METHODS:
        config = load_config(None, [f"prompt={args.prompt}", f"method={method}", *args.set])
        costs = render_bytes(config, args.backend)
        prior = meta_prior(arch, dtype)  # one per method: VSD adds its adapter to the UNet
        for resolution in args.resolutions:
            one = forecast_step(config, arch, dtype, resolution, samples, costs, prior=prior)
            forecasts = {"one GPU": one, "cpu_offload": one.with_options(cpu_offload=True),
                         "prior.device": one.with_options(prior_on_other_gpu=True)}
            rows.append({"method": method, "resolution": resolution,
                         "parts": {k: v / GIB for k, v in forecasts["one GPU"].parts.items()},
                         **{name: {which: f.gpu_bytes(which) / GIB for which in f.devices}
                            for name, f in forecasts.items()}})
    header = (f"forecast peak GPU memory of one training step, GiB ({args.model or 'SD 2.1-base architecture'}, "
              f"{str(dtype).replace('torch.', '')}, batch {config.train.batch_size}, {samples} samples/ray assumed, "
              f"{args.backend} hash grid; CUDA context and allocator slack included)")
    return header, rows


def format_estimate(header: str, rows: list[dict]) -> str:
    lines = [header, "", f"{'method':<12}{'render':>8}{'one GPU':>10}{'cpu_offload':>13}{'prior.device (scene | prior)':>31}"
             f"   {'prior weights / activations / render':>36}"]
    for r in rows:
        split = f"{r['prior.device']['scene']:.1f} | {r['prior.device']['prior']:.1f}"
        p = r["parts"]
        lines.append(f"{r['method']:<12}{r['resolution']:>6}px{r['one GPU']['scene']:>10.1f}{r['cpu_offload']['scene']:>13.1f}"
                     f"{split:>31}   {p['prior weights']:>14.2f} / {p['prior activations']:.2f} / {p['render']:.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.estimate:
        try:
            header, rows = estimate(args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_estimate(header, rows))
        if args.json:
            args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        return 0
    try:
        with tempfile.TemporaryDirectory(prefix="sdsbridge-bench-") as tmp:
            model = args.model or str(build_random_pipeline(Path(tmp) / "tiny-sd", arch="tiny", seed=0))
            header, rows = run(args, model)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.model is None:
        header = header.replace(f"model {model}", "model tiny random pipeline")
    print(format_report(header, rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
