"""Run directories: ``<runs_dir>/<slug>`` named from method and prompt, always new, always inside runs_dir."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Optional

from sdsbridge.common.atomic import make_dirs, write_failed

MAX_SLUG_LENGTH = 64


def slugify(text: str, max_length: int = MAX_SLUG_LENGTH) -> str:
    """ASCII slug: lower case letters, digits and single dashes; no path separators or dots.

    '../../etc/passwd' -> 'etc-passwd'; an empty result becomes 'run'.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_length].rstrip("-")
    return slug or "run"


def run_slug(method: str, prompt: str, name: Optional[str] = None) -> str:
    """The directory name for a run: the user's name if given, else '<method>-<prompt>'."""
    return slugify(name) if name else slugify(f"{method}-{prompt}")


def create_run_dir(runs_dir: str | Path, slug: str) -> Path:
    """Create and return a new directory ``runs_dir/slug`` (or ``slug-2``, ``slug-3``, ... if taken).

    Never reuses an existing directory, so an earlier run is never overwritten. WriteFailed if the OS
    refuses (read-only, permission denied, no space).
    """
    root = make_dirs(Path(runs_dir))
    for index in range(1, 10_000):
        candidate = root / (slug if index == 1 else f"{slug}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise write_failed(exc, candidate, "creating") from None
        return candidate
    raise RuntimeError(f"could not find a free run directory for {slug} in {root}")
