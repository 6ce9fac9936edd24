"""Write a random-initialised Stable Diffusion pipeline folder (no downloads): the exact SD 2.1-base
architecture, or a small/tiny one for tests.

    python scripts/make_random_sd.py --arch sd21-base OUT_DIR [--seed 0] [--dtype fp16]
    python scripts/make_random_sd.py --arch small OUT_DIR

Archs (see sdsbridge/testing/random_sd.py): ``sd21-base`` (from assets/sd21-base/*.json; 1.29 B parameters,
~5.2 GB in fp32, ~2.6 GB in fp16, a few minutes on a 2-core CPU), ``small`` (sd21-base with every width
shrunk, ~27 MB) and ``tiny`` (the test fixture, a few MB). The weights are random, so images are noise and
the tokenizer's text means nothing (byte-level symbols plus filler ids, see random_sd.py): use the folder
to exercise loading, shapes, memory and speed (``prior.model=OUT_DIR``, scripts/bench_train_step.py).

Prints the parameter count of each model. Refuses to write into a non-empty OUT_DIR (it could hold real
weights) unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from sdsbridge.common.errors import UserError
from sdsbridge.priors.architectures import ARCHITECTURES, parameter_counts
from sdsbridge.testing.random_sd import random_pipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_pipeline(out_dir: Path, arch: str, seed: int, dtype: torch.dtype) -> dict[str, int]:
    """Build ``arch`` with weights from ``seed``, store it as ``dtype`` in ``out_dir``; return the
    parameter counts {'unet', 'vae', 'text_encoder'} of the models as built."""
    pipe = random_pipeline(arch, seed, out_dir / "tokenizer")
    counts = parameter_counts((pipe.unet, pipe.vae, pipe.text_encoder))
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(str(out_dir))
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="pipeline folder to write (created; must be empty)")
    parser.add_argument("--arch", default="sd21-base", choices=sorted(ARCHITECTURES), help="architecture")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the stored weights")
    parser.add_argument("--force", action="store_true", help="write even if OUT_DIR is not empty")
    args = parser.parse_args(argv)

    try:
        out_dir = args.out_dir
        if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not args.force)):
            raise UserError(f"{out_dir} exists and is not an empty folder (use --force to write into it)")
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        counts = write_pipeline(out_dir, args.arch, args.seed, DTYPES[args.dtype])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start

    print(f"arch {args.arch}, seed {args.seed}, {args.dtype}: {out_dir}")
    for name, count in counts.items():
        print(f"  {name:<13} {count:>13,d} parameters ({count / 1e6:.1f} M)")
    total = sum(counts.values())
    print(f"  {'total':<13} {total:>13,d} parameters ({total / 1e6:.1f} M)")
    print(f"  {folder_size(out_dir) / 2**20:,.1f} MiB on disk, {seconds:.1f} s")
    print(f"load it with prior.model={out_dir} (random weights: outputs are noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
