"""Batch mode of ``sdsbridge image``: one ``image2d.run_image`` per prompt of a text file, each into its
own folder ``out_dir/<index>-<slug>/``, loading the prior once; resumable (finished prompts are skipped,
half-done ones redo only their unfinished seeds)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from sdsbridge.config.schema import Config
from sdsbridge.config.loader import config_from_dict, config_to_dict
from sdsbridge.common.errors import EXIT_FAILED, RunFailed, UserError, WriteFailed
from sdsbridge.training.image2d import ImageResult, is_done, load_image_prior, run_image
from sdsbridge.training.rundir import slugify


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file: one per line, surrounding whitespace stripped; blank lines and lines
    starting with '#' skipped. UserError if the file is missing, not UTF-8 text, or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


@dataclass
class BatchItem:
    """One prompt of a batch."""

    index: int
    """Position among the file's prompts (0-based; comments and blank lines not counted)."""
    prompt: str
    out_dir: Path
    status: str
    """'done' (made now), 'skipped' (finished earlier) or 'failed' (see ``error``)."""
    error: Optional[str] = None
    exit_code: int = 0
    """A failed prompt's error's exit code: 1 when its work failed (a seed's non-finite steps: ``run_image``'s
    RunFailed), 2 when the prior rejected the prompt."""
    result: Optional[ImageResult] = None


RUN_ONLY_KEYS = {"device": None, "log": None,
                 "prior": ("attention_slicing", "channels_last", "cpu_offload", "cache_dir")}
"""Config keys that do not change the images (top-level sections: None = all of it); ignored when a batch
compares a folder's config.yaml with the current settings."""


def recipe(config: Config) -> dict:
    """The config as plain builtins without RUN_ONLY_KEYS: what decides the images."""
    data = config_to_dict(config)
    for key, sub in RUN_ONLY_KEYS.items():
        if sub is None:
            data.pop(key, None)
        else:
            for name in sub:
                data.get(key, {}).pop(name, None)
    return data


def stored_recipe(path: Path) -> Optional[dict]:
    """``recipe`` of a folder's config.yaml (None if it does not load)."""
    try:
        return recipe(config_from_dict(yaml.safe_load(path.read_text())))
    except (UserError, yaml.YAMLError, TypeError, AttributeError):
        return None


def prompt_dir(out_dir: Path, index: int, prompt: str, count: int) -> Path:
    """``out_dir/<index>-<slug>``: the index zero-padded to the width of the largest (>= 4 digits)."""
    width = max(4, len(str(count - 1)))
    return Path(out_dir) / f"{index:0{width}d}-{slugify(prompt, 48)}"


def run_image_batch(config: Config, prompts_file: Path, out_dir: Path, device: torch.device | str, seeds: list[int],
                    progress: bool = True) -> list[BatchItem]:
    """One ``run_image`` per prompt of ``prompts_file`` (see ``read_prompts``) into ``prompt_dir(...)``,
    loading the prior once. Resumable: prompts whose outputs are complete (``is_done``) are skipped, and
    in a half-done folder only the seeds without a final PNG are optimised again. A folder made with a
    different config is a UserError (so images of different settings never mix). Prompts the prior
    rejects (UserError) and prompts with a seed that failed on non-finite steps (RunFailed) are reported as
    failed and the batch goes on; neither is done, so a rerun tries them again. Prints a summary line (and one
    line per failure)."""
    prompts = read_prompts(prompts_file)
    out_dir = Path(out_dir)
    jobs = [(i, p, prompt_dir(out_dir, i, p, len(prompts)), dataclasses.replace(config, prompt=p))
            for i, p in enumerate(prompts)]
    for _, _, folder, cfg in jobs:
        stored = folder / "config.yaml"
        if stored.is_file() and stored_recipe(stored) != recipe(cfg):
            raise UserError(f"{folder}: made with different settings (see its config.yaml); use another output "
                            "folder or the same settings")
    items: list[BatchItem] = []
    prior = None
    start = time.perf_counter()
    for i, prompt, folder, cfg in jobs:
        if is_done(folder, seeds):
            items.append(BatchItem(i, prompt, folder, "skipped"))
            continue
        prior = prior if prior is not None else load_image_prior(config, device)
        try:
            result = run_image(cfg, folder, device, seeds, progress, prior=prior, skip_done=True,
                               desc=f"[{i + 1}/{len(prompts)}] ")
        except WriteFailed:
            raise  # a full or read-only disk fails every prompt after it too
        except UserError as exc:
            items.append(BatchItem(i, prompt, folder, "failed", error=str(exc), exit_code=exc.exit_code))
            continue
        items.append(BatchItem(i, prompt, folder, "done", result=result))
    counts = {s: sum(item.status == s for item in items) for s in ("done", "skipped", "failed")}
    print(f"batch: {len(items)} prompts x {len(seeds)} seed(s): {counts['done']} made, {counts['skipped']} "
          f"skipped (already done), {counts['failed']} failed, {time.perf_counter() - start:.1f} s -> {out_dir}")
    for item in items:
        if item.status == "failed":
            print(f"  failed [{item.index}] {item.prompt!r}: {item.error}")
    return items


def batch_failure(items: list[BatchItem]) -> Optional[RunFailed]:
    """The error a batch ends with when the work of some of its prompts failed (``exit_code`` 1), else None.
    Prompts the prior rejected alone do not fail the batch (they are reported in its summary)."""
    failed = [item for item in items if item.exit_code == EXIT_FAILED]
    if not failed:
        return None
    named = ", ".join(f"[{item.index}] {item.prompt!r}" for item in failed[:5]) + (", ..." if len(failed) > 5 else "")
    return RunFailed(f"batch: {len(failed)} of {len(items)} prompts failed on non-finite steps and have no images "
                     f"({named}: listed above, with the setting to lower); rerunning the command retries them")
