"""JSON-lines files (metrics.jsonl, a sweep's attempt records: one JSON object per line): read them (torn
lines, as a killed writer leaves, skipped), append rows, and drop the rows a resumed run redoes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from sdsbridge.common.atomic import append_bytes, atomic_write_bytes


def _object_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """(line, parsed object) for each line of ``path`` that is a JSON object; nothing if it is missing."""
    if not Path(path).is_file():
        return
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield line, row


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per line ([] if it is missing; torn or non-object lines skipped)."""
    return [row for _, row in _object_lines(path)]


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append one line per row to ``path`` (created if missing); WriteFailed if the OS refuses."""
    append_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def keep_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite ``path`` atomically with only the rows for which ``keep(row)`` is true; lines that are not a
    JSON object (e.g. one torn by a crash) are dropped too. Creates an empty file if ``path`` is missing."""
    kept = [line + "\n" for line, row in _object_lines(path) if keep(row)]
    atomic_write_bytes(path, "".join(kept).encode("utf-8"))
