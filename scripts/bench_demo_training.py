"""The CPU demo trained with the dense sampler and with the PyTorch occupancy grid, one after the other:
steps/s, the speed-up, `sdsbridge eval` figures of both runs, and where a training step's time goes.

    python scripts/bench_demo_training.py                       # configs/demo.yaml, 1500 steps each
    python scripts/bench_demo_training.py --steps 300 --no-eval  # quicker, speed only
    python scripts/bench_demo_training.py --grid render.num_samples_occupancy=64   # another grid step

Each run is ``sdsbridge train configs/demo.yaml render.sampler=... export.mesh=false export.video=false`` in a
temporary runs folder (``--keep DIR`` to keep them); both train at the same time (``--sequential``: one after
the other), so load from other processes hits both alike. Steps/s comes from each run's metrics.jsonl
(training loop only, first logged step to last: the prior's set-up is not counted), and, when both train at
once, over the time both were past their first 200 steps (compiled kernels) and neither had finished: the
speed-up printed is that one, the fairest on a machine whose load changes. ``--threads N`` sets
OMP_NUM_THREADS for the runs (default 1: two runs on two cores). The breakdown times ``--breakdown-steps``
steps of the same loop in this process (render forward, guidance = everything else: encode, prior, loss,
finiteness check; backward, optimizer, occupancy-grid update) after ``--breakdown-warmup`` untimed ones (past
the grid's warm-up, with compiled kernels, as most of a run is), one run after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SAMPLERS = {"dense": ["render.sampler=stratified"],
            "grid": ["render.sampler=occupancy-torch"]}
"""Overrides per run; the grid keeps the demo's step (1.732 * 2 * radius / 96 = 0.027 at its radius 0.75; the
dense sampler's spacing is the chord / 32 samples, at most 0.047)."""


def sdsbridge(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdsbridge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(process.args)} failed:\n{err}")
    return out


def steps_per_second(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].strip().endswith("}") else 0


def common_window_rates(trace: list[tuple[float, dict[str, int]]], start_step: int) -> dict[str, float]:
    """Steps/s of each run while all of them were training: from the first moment every run had passed
    ``start_step`` (compiled kernels, warm caches) to the moment the first one finished."""
    names = trace[0][1].keys()
    inside = [(t, steps) for t, steps in trace if all(steps[n] >= start_step for n in names)]
    done = min((t for t, steps in trace if any(steps[n] == max(s[n] for _, s in trace) for n in names)),
               default=trace[-1][0])
    inside = [(t, steps) for t, steps in inside if t <= done]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return {}
    (t0, s0), (t1, s1) = inside[0], inside[-1]
    return {n: (s1[n] - s0[n]) / (t1 - t0) for n in names}


def train_all(samplers: dict[str, list[str]], runs: Path, args: argparse.Namespace, env: dict) -> dict:
    """Train one run per sampler, all at once (so they share whatever else loads the machine) unless
    ``--sequential``; then evaluate them one by one."""
    results, running, trace = {}, {}, []
    for name, overrides in samplers.items():
        running[name] = sdsbridge("train", str(args.config), *overrides, f"train.steps={args.steps}",
                                  "export.mesh=false", "export.video=false", f"log.runs_dir={runs}",
                                  f"log.name={name}", "--no-progress", env=env)
        if args.sequential:
            finish(running[name])
    while any(p.poll() is None for p in running.values()):
        trace.append((time.time(), {n: last_step(runs / n) for n in samplers}))
        time.sleep(0.5)
    for name, process in running.items():
        finish(process)
        results[name] = {"steps_per_s": steps_per_second(runs / name)}
    if trace and not args.sequential:
        for name, rate in common_window_rates(trace, min(200, args.steps // 4)).items():
            results[name]["together_steps_per_s"] = rate
    if args.eval:
        for name in samplers:
            scores = json.loads(finish(sdsbridge("eval", str(runs / name), "--json", env=env)))
            results[name].update({k: scores[k] for k in ("psnr_db", "chamfer", "saturation_error", "mask_iou")
                                  if k in scores})
    return results


def breakdown(overrides: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Mean ms per section of ``scene_step`` over ``--breakdown-steps`` steps (after ``--breakdown-warmup``
    untimed, the kernels compiled from the first as in a long run); 'guidance' is what the step spends outside
    the timed sections (encode, UNet/prior, loss, finiteness check); the sections add up to the whole step."""
    from contextlib import contextmanager

    import torch

    from sdsbridge.config.loader import load_config
    from sdsbridge.common.devices import seed_everything
    from sdsbridge.distill.methods import make_method
    from sdsbridge.priors import load_prior
    from sdsbridge.training.step import build_scene
    from sdsbridge.training.step import build_optimizer, scene_step

    config = load_config(args.config, overrides)
    device = torch.device("cpu")
    seed_everything(0)
    scene = build_scene(config, device)
    prior = load_prior(config.prior, device, config.cameras)
    method = make_method(config.method, config.guidance, prior)
    prompts = method.prompt_embeddings(config.prompt)
    optimizer = build_optimizer(scene, method, config.train)
    scene.train()
    scene.field.encoding.compile_after_points = 0  # as train() does for a long run
    totals = dict.fromkeys(("render", "guidance", "backward", "optimizer", "occupancy"), 0.0)
    n, warmup = args.breakdown_steps, args.breakdown_warmup
    for step in range(warmup + n):
        ms: dict[str, float] = {}

        @contextmanager
        def timer(section: str):
            start = time.perf_counter()
            yield
            ms[section] = ms.get(section, 0.0) + (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        scene_step(scene, method, prompts, optimizer, config, step, timer=timer)
        ms["guidance"] = (time.perf_counter() - start) * 1e3 - sum(ms.values())
        if step >= warmup:
            for key in totals:
                totals[key] += ms.get(key, 0.0) / n
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the runs (0: inherit)")
    parser.add_argument("--no-eval", dest="eval", action="store_false", help="skip `sdsbridge eval`")
    parser.add_argument("--grid", nargs="*", default=[], help="extra overrides for the grid run")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for both runs (e.g. train.seed=1)")
    parser.add_argument("--breakdown-steps", type=int, default=100, help="0: no step-time breakdown")
    parser.add_argument("--breakdown-warmup", type=int, default=300, help="untimed steps before the breakdown")
    parser.add_argument("--keep", type=Path, help="keep the runs in this folder")
    parser.add_argument("--sequential", action="store_true", help="one run after the other (default: both at "
                        "once, each on its own thread, so that other load on the machine hits both alike)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    samplers = {"dense": SAMPLERS["dense"] + args.set, "grid": SAMPLERS["grid"] + args.set + args.grid}
    runs = args.keep or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        results = train_all(samplers, runs, args, env)
    finally:
        if args.keep is None:
            shutil.rmtree(runs, ignore_errors=True)
    print(f"{args.config.name}, {args.steps} steps, threads {args.threads or 'default'}, "
          f"{'one after the other' if args.sequential else 'both at once'}")
    rate_keys = ("steps_per_s", "together_steps_per_s")
    for name, r in results.items():
        scores = "  ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in rate_keys)
        together = f", {r['together_steps_per_s']:.1f} while both ran" if "together_steps_per_s" in r else ""
        print(f"  {name:5s} {r['steps_per_s']:6.1f} steps/s (whole run{together})  {scores}  "
              f"[{' '.join(samplers[name])}]")
    key = "together_steps_per_s" if all("together_steps_per_s" in r for r in results.values()) else "steps_per_s"
    print(f"training speed-up grid vs dense: {results['grid'][key] / results['dense'][key]:.2f}x "
          f"({'while both ran' if key != 'steps_per_s' else 'whole runs'}; target >= 1.5x)")
    if args.breakdown_steps:
        print(f"ms per step ({args.breakdown_steps} steps after {args.breakdown_warmup} untimed, in this process):")
        for name, overrides in samplers.items():
            parts = breakdown(overrides, args)
            print(f"  {name:5s} total {sum(parts.values()):6.1f}: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
