"""metrics.jsonl files (one JSON object per line): append rows, and drop the rows a resumed run redoes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from sdsbridge.atomic import append_bytes, atomic_write_bytes


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append one line per row to ``path`` (created if missing); WriteFailed if the OS refuses."""
    append_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def keep_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite ``path`` atomically with only the rows for which ``keep(row)`` is true; lines that are not a
    JSON object (e.g. one torn by a crash) are dropped too. Creates an empty file if ``path`` is missing."""
    kept = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and keep(row):
                kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode("utf-8"))
