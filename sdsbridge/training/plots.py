"""Training curves of a run: ``<run>/plots/`` holds loss terms, guidance gradient norm, timestep t and render
resolution against the step (from ``metrics.jsonl``), each a PNG with the bridge's stage-two switch marked.

matplotlib's object API (``Figure``, no pyplot state) renders off screen; files are written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

from sdsbridge.common.atomic import atomic_write_bytes
from sdsbridge.common.jsonl import read_rows
from sdsbridge.distill.methods import method_class

PLOTS = ("losses", "grad_norm", "t", "resolution")
"""The PNGs written, ``plots/<name>.png``."""
TITLES = {"losses": "loss terms", "grad_norm": "guidance gradient norm", "t": "timestep t (mean over the batch)",
          "resolution": "render resolution (px)"}


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl that have a step (a torn last line, as a killed process leaves, is skipped)."""
    return [row for row in read_rows(path) if isinstance(row.get("step"), (int, float))]


def stage2_step(config) -> Optional[int]:
    """The step where the method's second stage starts (the bridge's stage two), None for methods with one stage."""
    starts = method_class(config.method).stage_starts(config.guidance)
    return int(starts[0]) if starts else None


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` where it is a finite number."""
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_png(rows: list[dict], name: str, stage2: Optional[int] = None) -> bytes:
    """One of ``PLOTS`` as PNG bytes (640x320 px): the quantity against the step, a dashed line at ``stage2``
    when it lies within the logged steps."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2), dpi=100)
    axes = figure.add_subplot()
    if name == "losses":
        keys = ["loss"] + sorted(k for k in {k for r in rows for k in r} if k.startswith("loss_"))
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                axes.plot(steps, [abs(v) for v in values], label=key, linewidth=1)
        if any(_series(rows, k)[0] for k in keys):
            axes.set_yscale("symlog", linthresh=1e-3)
            axes.legend(fontsize=7, loc="upper right")
        axes.set_ylabel("|loss|")
    else:
        steps, values = _series(rows, name)
        axes.plot(steps, values, linewidth=1, color="tab:blue")
        if name == "grad_norm" and values and min(values) > 0:
            axes.set_yscale("log")
    all_steps = [r["step"] for r in rows]
    if stage2 is not None and all_steps and min(all_steps) <= stage2 <= max(all_steps):
        axes.axvline(stage2, color="tab:red", linestyle="--", linewidth=1, label="stage two")
        axes.text(stage2, 1.0, " stage two", color="tab:red", fontsize=8, va="top", transform=axes.get_xaxis_transform())
    axes.set_xlabel("step")
    axes.set_title(TITLES[name], fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def write_plots(run_dir: Path, stage2: Optional[int] = None) -> list[Path]:
    """``<run_dir>/plots/<name>.png`` for each of ``PLOTS`` from ``<run_dir>/metrics.jsonl``; nothing when it
    holds no rows. Returns the paths written."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return []
    paths = []
    for name in PLOTS:
        path = Path(run_dir) / "plots" / f"{name}.png"
        atomic_write_bytes(path, plot_png(rows, name, stage2))
        paths.append(path)
    return paths
