"""The first run on a new GPU machine, in one command: everything CUDA-side that the CPU cannot execute.

    python scripts/gpu_acceptance.py                    # on a GPU: ~8 minutes on one H100, no network
    python scripts/gpu_acceptance.py --cpu-dry-run      # every stage that needs no CUDA, small, on the CPU

Stages, in order (each one's failure is recorded and the others still run):

1. ``gpu tests``: ``pytest -m gpu`` (the CUDA-marked tests of the suite).
2. ``hash grid parity``: tinycudann's HashGrid against the PyTorch backend on the same parameters: values
   (max abs difference) and parameter gradients (relative difference).
3. ``occupancy parity``: nerfacc's CUDA occupancy-grid sampler against the PyTorch grid on the same grid and a
   field fitted to the torus: PSNR between the renders, at least 35 dB.
4. ``method steps``: one step of every method at 64 and 512 px renders with the full-size random SD 2.1-base
   architecture in fp16 (scripts/bench_train_step.py): ms and peak GB each, and the memory forecast's ratio.
5. ``train``: 200 steps of ``sdsbridge train`` end to end (64 px, the random full-size prior), mesh and video.
6. ``torch.compile``: the SDS step at 64 px with the UNet compiled and not: ms each.

With ``--cpu-dry-run`` the same code runs small on the CPU: the tiny random pipeline, 16/32 px, a few steps, the
CUDA halves of the parity stages replaced by the PyTorch ones (so the comparison code runs, not the kernels).
Writes ``--out`` (JSON: every stage's status, seconds, figures) and prints a table; exits 1 if any stage failed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import bench_train_step  # noqa: E402  (a script beside this one)

METHODS = ("sds", "bridge", "nfsd", "vsd", "bridge-vsd")
OCCUPANCY_MIN_PSNR = 35.0
DRY_OCCUPANCY_MIN_PSNR = 25.0
"""The dry run's PyTorch grid against 1024 stratified samples per ray: close, but not the same sampling."""


@dataclass
class Stage:
    """One stage's outcome."""

    name: str
    status: str = "pass"
    """'pass', 'fail' or 'skip' (with the reason in ``detail``)."""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    detail: str = ""


class Skip(Exception):
    """A stage that cannot run here (e.g. tinycudann not installed); not a failure."""


@dataclass
class Setup:
    """What the stages share: device, dtype, the random pipeline folder, sizes."""

    dry: bool
    device: torch.device
    dtype: str
    model: Path
    work: Path
    resolutions: list[int]
    train_steps: int


def run_stage(name: str, body: Callable[[], dict]) -> Stage:
    stage = Stage(name)
    start = time.perf_counter()
    try:
        stage.figures = body() or {}
    except Skip as exc:
        stage.status, stage.detail = "skip", str(exc)
    except Exception as exc:  # a failed stage is reported, and the next one runs
        stage.status = "fail"
        stage.detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        traceback.print_exc()
    stage.seconds = round(time.perf_counter() - start, 1)
    print(f"[{stage.status}] {name} ({stage.seconds} s) {stage.detail}", flush=True)
    return stage


# --- the stages ----------------------------------------------------------------------------------------
def gpu_tests(setup: Setup) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    if setup.dry:  # collect only: on the CPU every gpu test skips
        command.append("--collect-only")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|tests? collected)",
                                                       summary)}
    if done.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {summary}")
    return {"summary": summary, **counts}


def hash_grid_parity(setup: Setup) -> dict:
    from sdsbridge.scene.nerf.encoding import HashGridEncoding

    other = "torch" if setup.dry else "tcnn"
    if not setup.dry:
        try:
            import tinycudann  # noqa: F401
        except Exception as exc:
            raise Skip(f"tinycudann not importable ({type(exc).__name__})") from None
    shape = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
                 per_level_scale=1.447269237440378)
    if setup.dry:
        shape.update(n_levels=4, log2_hashmap_size=12)
    fast = HashGridEncoding(**shape, backend=other, device=setup.device)
    reference = HashGridEncoding(**shape, backend="torch", device=setup.device)
    with torch.no_grad():
        fast.params.uniform_(-1.0, 1.0)
    reference.load_state_dict(fast.state_dict())
    n = 4096 if setup.dry else 100_000
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=generator).to(setup.device)
    grad_out = torch.randn(n, fast.n_output_dims, generator=generator).to(setup.device)
    y_fast, y_ref = fast(x), reference(x)
    (y_fast * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    value = float((y_fast - y_ref).detach().abs().max())
    grad = float((fast.params.grad - reference.params.grad).norm() / reference.params.grad.norm())
    if value > 5e-3 or grad > 1e-3:  # tcnn's fma vs mul+add moves frac(p) by an ulp; an index error is O(1)
        raise AssertionError(f"{other} vs torch: max value difference {value:.2e}, gradient {grad:.2e}")
    return {"backend": other, "max_value_diff": value, "relative_grad_diff": grad}


def occupancy_parity(setup: Setup) -> dict:
    from sdsbridge.scene.cameras import orbit_cameras
    from sdsbridge.config.schema import CameraConfig, RenderConfig, SceneConfig
    from sdsbridge.scene.nerf.background import Background
    from sdsbridge.scene.nerf.field import NeRFField
    from sdsbridge.scene.nerf.renderer import Renderer, nerfacc_cuda_available
    from sdsbridge.testing.shape_fit import fit_field_to_shape
    from sdsbridge.outputs.scores import psnr

    if not setup.dry and not nerfacc_cuda_available():
        raise RuntimeError("nerfacc's CUDA kernels do not load (no prebuilt wheel and no working nvcc build)")
    scene = SceneConfig(n_levels=8, log2_hashmap_size=15) if setup.dry else SceneConfig()
    torch.manual_seed(0)
    field_ = NeRFField(scene, device=setup.device).to(setup.device)
    fit_field_to_shape(field_, "torus", steps=30 if setup.dry else 300, points=4096 if setup.dry else 1 << 16)
    background = Background(scene).to(setup.device)
    # The dry run compares the PyTorch grid with dense stratified sampling (a real comparison, of two CPU samplers).
    theirs_name = "stratified" if setup.dry else "occupancy"
    ours = Renderer(field_, background, RenderConfig(sampler="occupancy-torch"), radius=1.0)
    theirs = Renderer(field_, background, RenderConfig(sampler=theirs_name, num_samples=1024), radius=1.0)
    if theirs.sampler != theirs_name:
        raise RuntimeError(f"asked for the {theirs_name} sampler, got {theirs.sampler}")
    ours.update_occupancy(0)
    theirs.load_state_dict(ours.state_dict() if not setup.dry else {})  # the same grid: the same images
    resolution = 32 if setup.dry else 128
    cameras = orbit_cameras(CameraConfig(), 4).to(setup.device)
    with torch.no_grad():
        a = ours.eval().render(cameras, resolution, resolution)
        b = theirs.eval().render(cameras, resolution, resolution)
    value = min(psnr(a.rgb[i], b.rgb[i]) for i in range(len(cameras)))
    if value < (DRY_OCCUPANCY_MIN_PSNR if setup.dry else OCCUPANCY_MIN_PSNR):
        raise AssertionError(f"{theirs_name} vs occupancy-torch renders: PSNR {value:.1f} dB < {OCCUPANCY_MIN_PSNR}")
    return {"sampler": theirs_name, "min_psnr_db": round(value, 1) if math.isfinite(value) else "inf"}


def method_steps(setup: Setup, methods=METHODS) -> dict:
    from sdsbridge.config.loader import load_config
    from sdsbridge.training.memory import architecture_of, forecast_step
    from sdsbridge.scene.nerf.encoding import resolve_backend

    figures = {}
    arch = architecture_of(str(setup.model))
    for method in methods:
        argv = ["--model", str(setup.model), "--device", str(setup.device), "--dtype", setup.dtype,
                "--method", method, "--steps", "1" if setup.dry else "3", "--warmup", "0" if setup.dry else "2",
                "--resolutions", ",".join(map(str, setup.resolutions)), "--at-step", "20000", "--no-2d"]
        if setup.dry:
            argv += ["--set", "scene.n_levels=4", "scene.log2_hashmap_size=12", "render.num_samples=16"]
        args = bench_train_step.parse_args(argv)
        _, rows = bench_train_step.run(args, str(setup.model))
        config = load_config(None, [f"prompt={args.prompt}", f"method={method}", *args.set])
        for row, resolution in zip(rows, setup.resolutions):
            ms = statistics.median(row["ms"])
            if not math.isfinite(ms):
                raise AssertionError(f"{method} {resolution}px: no time measured")
            entry = {"ms": round(ms, 1), "peak_gb": round(row["peak_bytes"] / 2 ** 30, 2),
                     "samples_per_ray": round(row["samples_per_ray"], 1)}
            if arch is not None and setup.device.type == "cuda":  # the forecast against CUDA's own count
                forecast = forecast_step(config, arch, torch.float16, resolution,
                                         samples_per_ray=max(1, round(row["samples_per_ray"])),
                                         backend=resolve_backend("auto", setup.device)[0])
                entry["forecast_gb"] = round(sum(forecast.parts.values()) / 2 ** 30, 2)
            figures[f"{method} {resolution}px"] = entry
    return figures


def train_end_to_end(setup: Setup) -> dict:
    from sdsbridge.cli import main as cli_main

    prompt = setup.work / "prompt.yaml"
    prompt.write_text("prompt: a DSLR photo of a pineapple\n")
    runs = setup.work / "runs"
    args = ["train", str(prompt), f"prior.model={setup.model}", f"prior.dtype={setup.dtype}",
            f"train.steps={setup.train_steps}", "render.resolution=64", f"log.runs_dir={runs}", "log.val_every=100",
            "--device", str(setup.device), "--no-progress"]
    if setup.dry:
        args += ["scene.n_levels=4", "scene.log2_hashmap_size=12", "render.resolution=16", "render.num_samples=16",
                 "export.resolution=16", "export.video_frames=2", "export.video_resolution=16", "log.log_every=1"]
    start = time.perf_counter()
    try:
        cli_main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code != 0:
        raise RuntimeError(f"sdsbridge train exited {code}")
    [run_dir] = list(runs.iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    meshes, videos = list((run_dir / "mesh").glob("*.glb")), list((run_dir / "video").glob("*.mp4"))
    if not (rows and all(math.isfinite(r["loss"]) for r in rows) and meshes and videos):
        raise AssertionError(f"run {run_dir}: metrics finite {bool(rows)}, mesh {bool(meshes)}, video {bool(videos)}")
    return {"steps": rows[-1]["step"], "seconds": round(time.perf_counter() - start, 1),
            "train_steps_per_s": round(rows[-1]["step"] / max(rows[-1]["elapsed_s"], 1e-9), 2),
            "mesh_bytes": meshes[0].stat().st_size, "video_bytes": videos[0].stat().st_size}


def compile_on_and_off(setup: Setup) -> dict:
    figures = {}
    for compiled in (False, True):
        argv = ["--model", str(setup.model), "--device", str(setup.device), "--dtype", setup.dtype, "--method", "sds",
                "--steps", "1" if setup.dry else "5", "--warmup", "1" if setup.dry else "3",
                "--resolutions", str(setup.resolutions[0]), "--no-2d"]
        if compiled:
            argv.append("--compile")
        if setup.dry:
            argv += ["--set", "scene.n_levels=4", "scene.log2_hashmap_size=12", "render.num_samples=16"]
        _, rows = bench_train_step.run(bench_train_step.parse_args(argv), str(setup.model))
        figures["compiled_ms" if compiled else "eager_ms"] = round(statistics.median(rows[0]["ms"]), 1)
    return figures


STAGES: list[tuple[str, Callable[[Setup], dict]]] = [
    ("gpu tests", gpu_tests), ("hash grid parity", hash_grid_parity), ("occupancy parity", occupancy_parity),
    ("method steps", method_steps), ("train", train_end_to_end), ("torch.compile", compile_on_and_off)]


# --- set-up and report ---------------------------------------------------------------------------------
def make_setup(dry: bool, work: Path) -> Setup:
    from sdsbridge.testing.random_sd import build_random_pipeline

    if dry:
        model = build_random_pipeline(work / "tiny-sd", arch="tiny", seed=0)
        return Setup(True, torch.device("cpu"), "fp32", model, work, [16, 32], 4)
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run with --cpu-dry-run on a machine without a GPU")
    print("building the random full-size SD 2.1-base pipeline (fp16, ~2.6 GB) ...", flush=True)
    model = build_random_pipeline(work / "sd21-base", arch="sd21-base", seed=0, dtype=torch.float16)
    return Setup(False, torch.device("cuda"), "fp16", model, work, [64, 512], 200)


def format_table(stages: list[Stage], header: str) -> str:
    lines = [header, "", f"{'stage':<20}{'status':<8}{'seconds':>9}  figures"]
    for s in stages:
        figures = s.detail or ", ".join(f"{k}: {v}" for k, v in s.figures.items() if not isinstance(v, dict))
        lines.append(f"{s.name:<20}{s.status:<8}{s.seconds:>9.1f}  {figures}")
        for key, value in s.figures.items():
            if isinstance(value, dict):
                lines.append(f"{'':<37}{key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every stage that needs no CUDA, small, on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu-acceptance.json"), help="JSON results (default: %(default)s)")
    parser.add_argument("--only", nargs="*", help="run only these stages (names as in the table)")
    args = parser.parse_args(argv)
    names = [name for name, _ in STAGES]
    if args.only and set(args.only) - set(names):
        parser.error(f"--only: unknown stage(s) {sorted(set(args.only) - set(names))}; stages: {names}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdsbridge-acceptance-") as tmp:
        setup = make_setup(args.cpu_dry_run, Path(tmp))
        stages = [run_stage(name, lambda body=body: body(setup)) for name, body in STAGES
                  if not args.only or name in args.only]
    device = torch.cuda.get_device_name(0) if setup.device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    header = (f"sdsbridge GPU acceptance{' (CPU dry run)' if setup.dry else ''}: {device}, torch {torch.__version__}, "
              f"{round(time.perf_counter() - started)} s")
    print(format_table(stages, header))
    passed = all(s.status != "fail" for s in stages)
    args.out.write_text(json.dumps({"header": header, "dry_run": setup.dry, "passed": passed,
                                    "stages": [asdict(s) for s in stages]}, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
