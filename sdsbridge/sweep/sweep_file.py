"""Sweeps: many ordinary runs from one file, under one sweep directory, resumable and idempotent.

A sweep file (YAML; every key but ``prompts``/``prompts_file`` optional)::

    base: ../configs/demo.yaml        # a prompt/config file (relative to the sweep file)
    prompts: [a red torus, a blue box] # or prompts_file: prompts.txt (one per line; blank lines, # comments skipped)
    grid:                              # every combination of these variations is one run
      method: [bridge, sds]
      train.seed: [0, 1]
    set: {train.steps: 2000}           # key: value for every run
    eval: {views: 16, mesh_resolution: 128}   # score finished reference-prior runs (false: never)
    out: sweeps/demo                   # the sweep directory (default sweeps/<file stem>, relative to the CWD)

Settings of one run, later ones winning: defaults <- method preset <- ``base`` <- ``set`` <- command-line
``key=value`` <- its prompt and grid values. Every combination is resolved and validated before anything
is written or started.

The sweep directory::

    runs/<name>/            ordinary run directories (train --resume, export, eval all work on them)
    configs/<name>.yaml     the resolved config a run started from
    logs/<name>.log         stdout + stderr of every attempt
    state/<name>.jsonl      one line per attempt start and end (mode fresh|resume, exit code, seconds)
    state/<name>.done.json  written last, when the run trained to the end (and was scored): the run is done
    state/<name>.lock       held (flock) while a worker runs it, so two sweeps never run it at once
    sweep.csv, sweep.json   one row per run (``sweep_rows``)
    reports/<prompt>.html   the report page (report.py) of each prompt's finished runs side by side

A run is *done* when its ``.done.json`` exists, *partial* when its run directory holds a checkpoint (it is
resumed from there), else *missing* (started fresh). ``<name>`` is ``<prompt slug>__key=value__...`` over the
grid keys, values reduced to letters, digits and ``._-``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdsbridge.common.atomic import atomic_write_bytes
from sdsbridge.config.schema import Config
from sdsbridge.config.loader import _check_keys, _parse_overrides, _read_yaml, load_config, to_yaml
from sdsbridge.common.errors import UserError
from sdsbridge.common.jsonl import read_rows
from sdsbridge.common.limits import check_size
from sdsbridge.common.targets import check_folder
from sdsbridge.training.rundir import slugify

MAX_RUNS = 10_000
"""Most combinations one sweep file may expand to."""
MAX_VALUES_PER_KEY = 64
"""Most values one grid key may list."""
MAX_PROMPTS = 5_000
"""Most prompts one sweep may hold."""
MAX_PROMPTS_BYTES = 4 << 20
"""Largest prompts file read."""
MAX_NAME_BYTES = 200
"""Longest run name. The longest file named after a run is the temporary file of its completion marker,
``state/.<name>.done.<pid>-<8 hex>.tmp.json``: 32 bytes more than the name, within the 255 of a file name."""
EVAL_KEYS = ("psnr_db", "chamfer", "saturation_error", "mask_iou", "normal_error_deg")
"""``eval`` scores copied into a run's row (as ``eval_<key>``)."""
FINAL_KEYS = ("loss", "loss_guidance", "grad_norm", "bad_steps")
"""metrics.jsonl entries of the last row copied into a run's row (as ``final_<key>``)."""


@dataclass
class SweepFile:
    """The keys of a sweep file (module docstring)."""

    base: Optional[str] = None
    """A prompt/config YAML every run starts from (relative to the sweep file)."""
    prompts: Optional[list] = None
    """The prompts, one run (per grid combination) each."""
    prompts_file: Optional[str] = None
    """Or a text file of prompts, one per line (relative to the sweep file)."""
    grid: dict = field(default_factory=dict)
    """key -> list of values; the runs are every combination (keys as in ``key=value`` overrides)."""
    set: dict = field(default_factory=dict)
    """key -> value applied to every run."""
    eval: Any = True
    """Score finished reference-prior runs: true, false, or {views: N, mesh_resolution: R}."""
    out: Optional[str] = None
    """The sweep directory (default sweeps/<sweep file stem>)."""


@dataclass
class SweepRun:
    """One combination: an ordinary run."""

    name: str
    """Directory name of the run (``runs/<name>``) and of its state files."""
    prompt: str
    grid: dict
    """key -> this combination's value."""
    config: Config
    """The resolved, validated config."""


@dataclass
class Sweep:
    """A parsed, validated sweep."""

    path: Path
    out: Path
    runs: list[SweepRun]
    grid_keys: list[str]
    eval_views: Optional[int]
    """Eval-orbit views scored per finished reference-prior run; None = no scoring."""
    eval_mesh_resolution: int


def _fail(path: Path, message: str) -> UserError:
    return UserError(f"{path}: {message}")


def _value_text(value: Any) -> str:
    """A YAML value as the right-hand side of a ``key=value`` override (JSON is YAML flow syntax)."""
    return json.dumps(value)


def _name_part(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:40] or "-"  # '-1' stays '-1': values must not collide


def run_name(prompt: str, grid: dict) -> str:
    """``<prompt slug>__key=value__...`` (grid keys in file order); a name longer than ``MAX_NAME_BYTES`` is cut
    there and ends in ``__`` and 10 hex digits of its full text's SHA-256, so it stays unique and every file named
    after it fits the file system's 255 bytes."""
    name = "__".join([slugify(prompt, 48), *(f"{key}={_name_part(value)}" for key, value in grid.items())])
    if len(name) <= MAX_NAME_BYTES:  # ASCII (slug, config keys, _name_part): a byte per character
        return name
    return f"{name[:MAX_NAME_BYTES - 12]}__{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _read_prompts(path: Path, spec: SweepFile) -> list[str]:
    if (spec.prompts is None) == (spec.prompts_file is None):
        raise _fail(path, "give either 'prompts' (a list) or 'prompts_file' (a text file, one prompt per line)")
    if spec.prompts is not None:
        prompts = spec.prompts if isinstance(spec.prompts, list) else [spec.prompts]
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise _fail(path, "prompts: every prompt must be a non-empty string")
    else:
        file = path.parent / str(spec.prompts_file)
        if not file.is_file():
            raise _fail(path, f"prompts_file: {file}: file not found")
        if file.stat().st_size > MAX_PROMPTS_BYTES:
            raise _fail(path, f"prompts_file: {file}: larger than {MAX_PROMPTS_BYTES >> 20} MiB")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise _fail(path, f"prompts_file: {file}: not a UTF-8 text file") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise _fail(path, "no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise _fail(path, f"{len(prompts)} prompts; a sweep takes at most {MAX_PROMPTS}")
    return [p.strip() for p in prompts]


def _check_variations(path: Path, section: str, mapping: Any, lists: bool) -> dict:
    """``grid`` / ``set``: a mapping of known config keys (to lists of values for the grid)."""
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise _fail(path, f"{section}: expected a mapping of config keys to {'lists of values' if lists else 'values'}")
    out = {}
    for key, value in mapping.items():
        if key == "prompt":
            raise _fail(path, f"{section}: 'prompt' is set by 'prompts' / 'prompts_file'")
        values = value if isinstance(value, list) and lists else [value]
        if lists and not values:
            raise _fail(path, f"grid: key '{key}' lists no values")
        if len(values) > MAX_VALUES_PER_KEY:
            raise _fail(path, f"grid: key '{key}' lists {len(values)} values; at most {MAX_VALUES_PER_KEY}")
        for item in values:
            _check_keys(_parse_overrides([f"{key}={_value_text(item)}"]), Config(), f"{path}: {section}")
        out[key] = values if lists else value
    return out


def _eval_settings(path: Path, value: Any) -> tuple[Optional[int], int]:
    if value is True:
        return 16, 128
    if value is False or value is None:
        return None, 128
    if not isinstance(value, dict) or set(value) - {"views", "mesh_resolution"}:
        raise _fail(path, "eval: expected true, false or {views: N, mesh_resolution: R}")
    views, resolution = value.get("views", 16), value.get("mesh_resolution", 128)
    for name, number, key in (("views", views, "cameras.eval_views"), ("mesh_resolution", resolution, "export.resolution")):
        if not isinstance(number, int) or isinstance(number, bool):
            raise _fail(path, f"eval: {name}: expected an integer, got {number!r}")
        try:
            check_size(number, key, f"eval: {name}")  # the bounds of eval's --views and --mesh-resolution
        except UserError as exc:
            raise _fail(path, str(exc)) from None
    return views, resolution


def load_sweep(path: Path, overrides: list[str] = (), out: Optional[Path] = None) -> Sweep:
    """Parse ``path``, expand the grid and resolve and validate every run's config (UserError naming the file
    and the key, or the run and the key, at the first problem). Nothing is written."""
    path = Path(path)
    data = _read_yaml(path)
    names = [f.name for f in dataclasses.fields(SweepFile)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            raise _fail(path, f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                        + f"; a sweep file takes {', '.join(names)}")
    spec = SweepFile(**data)
    for key in ("base", "prompts_file", "out"):
        if getattr(spec, key) is not None and not isinstance(getattr(spec, key), str):
            raise _fail(path, f"{key}: expected a path")
    base = path.parent / spec.base if spec.base is not None else None
    if base is not None and not base.is_file():
        raise _fail(path, f"base: {base}: file not found")
    prompts = _read_prompts(path, spec)
    grid = _check_variations(path, "grid", spec.grid, lists=True)
    fixed = _check_variations(path, "set", spec.set, lists=False)
    overrides = list(overrides)
    clash = set(grid) & {item.split("=", 1)[0].strip() for item in overrides}
    if clash:
        raise UserError(f"override '{sorted(clash)[0]}': the sweep's grid varies this key; change it in {path}")
    eval_views, eval_mesh = _eval_settings(path, spec.eval)
    count = len(prompts) * (1 if not grid else math.prod(len(v) for v in grid.values()))
    if count > MAX_RUNS:
        raise _fail(path, f"{count} runs; a sweep takes at most {MAX_RUNS}")

    runs, seen = [], {}
    for prompt in prompts:
        for values in itertools.product(*grid.values()):
            combo = dict(zip(grid, values))
            name = run_name(prompt, combo)
            if name in seen:
                raise _fail(path, f"two runs would share the directory '{name}' ({seen[name]!r} and "
                            f"{(prompt, combo)!r}): make the prompts or values differ in letters or digits")
            seen[name] = (prompt, combo)
            args = [*(f"{k}={_value_text(v)}" for k, v in fixed.items()), *overrides,
                    f"prompt={_value_text(prompt)}", *(f"{k}={_value_text(v)}" for k, v in combo.items())]
            try:
                config = load_config(base, args)
            except UserError as exc:
                raise UserError(f"{path}: run {name}: {exc}") from None
            runs.append(SweepRun(name, prompt, combo, config))
    out_dir = Path(out) if out is not None else Path(spec.out) if spec.out is not None else Path("sweeps") / path.stem
    out_dir = out_dir.absolute()  # Ray and Slurm workers need not start in this directory
    check_folder(out_dir, "--out" if out is not None else f"{path}: out")
    return Sweep(path, out_dir, runs, list(grid), eval_views, eval_mesh)


# ------------------------------------------------------------------------------------------- state on disk

def run_dir(sweep_dir: Path, name: str) -> Path:
    return Path(sweep_dir) / "runs" / name


def state_path(sweep_dir: Path, name: str, suffix: str) -> Path:
    """``state/<name><suffix>``: ``.jsonl`` (attempts), ``.done.json`` (the result), ``.lock``."""
    return Path(sweep_dir) / "state" / f"{name}{suffix}"


def has_checkpoint(run: Path) -> bool:
    """Whether a run directory holds a checkpoint to resume from (checkpoint.py's names)."""
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name == "last.ckpt" or re.match(r"^step-\d+\.ckpt$", p.name)
                                   for p in folder.iterdir())


def run_status(sweep_dir: Path, name: str) -> str:
    """'done' (its result is written), 'partial' (a checkpoint to resume from) or 'missing'."""
    if state_path(sweep_dir, name, ".done.json").is_file():
        return "done"
    return "partial" if has_checkpoint(run_dir(sweep_dir, name)) else "missing"


def sweep_rows(sweep: Sweep) -> list[dict]:
    """One row per run: name, prompt, the grid values, status (done | partial | missing | failed: the last
    attempt failed and left it unfinished), steps trained / of, attempts started, wall_s (seconds of the
    attempts that ended), final metrics (``final_*``), ``eval_*`` scores, error, run_dir."""
    rows = []
    for run in sweep.runs:
        folder = run_dir(sweep.out, run.name)
        attempts = read_rows(state_path(sweep.out, run.name, ".jsonl"))
        ends = [a for a in attempts if a.get("event") == "end"]
        status = run_status(sweep.out, run.name)
        if status != "done" and attempts and attempts[-1].get("event") == "end" and \
                attempts[-1].get("exit_code") not in (0, 130):  # the newest attempt failed
            status = "failed"
        metrics = read_rows(folder / "metrics.jsonl")
        last = metrics[-1] if metrics else {}
        row = {"name": run.name, "prompt": run.prompt, **run.grid, "status": status, "steps": last.get("step", 0),
               "of_steps": run.config.train.steps, "attempts": sum(a.get("event") == "start" for a in attempts),
               "wall_s": round(sum(a.get("seconds", 0.0) for a in ends), 1)}
        row.update({f"final_{k}": last[k] for k in FINAL_KEYS if k in last})
        if status == "done":
            result = json.loads(state_path(sweep.out, run.name, ".done.json").read_text(encoding="utf-8"))
            row.update({f"eval_{k}": v for k, v in result.get("eval", {}).items() if k in EVAL_KEYS})
            if "eval_error" in result:
                row["error"] = result["eval_error"]
        elif status == "failed":
            row["error"] = ends[-1].get("error", "")
        row["run_dir"] = str(folder)
        rows.append(row)
    return rows


def write_tables(sweep: Sweep) -> tuple[Path, Path, list[dict]]:
    """Write ``sweep.csv`` and ``sweep.json`` (``sweep_rows``) atomically; returns their paths and the rows."""
    rows = sweep_rows(sweep)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = sweep.out / "sweep.csv", sweep.out / "sweep.json"
    atomic_write_bytes(csv_path, buffer.getvalue().encode("utf-8"))
    atomic_write_bytes(json_path, (json.dumps({"sweep": str(sweep.path), "runs": rows}, indent=2) + "\n").encode())
    return csv_path, json_path, rows


def write_reports(sweep: Sweep) -> list[Path]:
    """``reports/<prompt slug>.html``: for every prompt with finished runs, their report pages side by side (one
    column per grid combination, e.g. bridge beside sds). Returns the pages written."""
    from sdsbridge.outputs.report import write_report

    done: dict[str, list[Path]] = {}
    for run in sweep.runs:
        if run_status(sweep.out, run.name) == "done":
            done.setdefault(run.prompt, []).append(run_dir(sweep.out, run.name))
    return [write_report(runs, Path(sweep.out) / "reports" / f"{slugify(prompt)}.html") for prompt, runs in done.items()]


def write_run_config(sweep: Sweep, run: SweepRun) -> Path:
    """``configs/<name>.yaml``: the resolved config a fresh run starts from (``train FILE --run-dir``)."""
    path = Path(sweep.out) / "configs" / f"{run.name}.yaml"
    atomic_write_bytes(path, to_yaml(run.config).encode("utf-8"))
    return path
