"""Where a command may write, checked before it does any work: so a command that would replace an existing output,
write a file onto a folder or a folder onto a file stops in one line (exit code 2) with nothing written.

The rule (README, Reliability): a command never replaces an existing file unless it is given ``--force`` (then the
new file replaces the old one atomically). That covers `export`'s mesh files (all four of a textured mesh),
`video`'s mp4 and every ``--out FILE``. Files a run keeps up to date itself are outside the rule: the end-of-training
exports of `train` (a resumed run exports into its own directory again), ``RUN/report.html`` (the run's page,
which `sdsbridge report RUN` refreshes) and a sweep's tables and pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from sdsbridge.common.errors import UserError


def _file_above(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` when it is not a folder (so nothing can be created below it)."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_new_files(paths: Iterable[Path], what: str, force: bool = False) -> None:
    """UserError "<what>: <path> ..." when one of ``paths`` (files a command is about to write) is a folder, lies
    below an existing file, or exists while ``force`` is false."""
    for path in map(Path, paths):
        if path.is_dir():
            raise UserError(f"{what}: {path} is a directory; give a file name")
        blocker = _file_above(path)
        if blocker is not None:
            raise UserError(f"{what}: {path}: {blocker} is a file, not a directory")
        if (path.exists() or path.is_symlink()) and not force:
            raise UserError(f"{what}: {path} exists; --force replaces it")


def check_folder(path: Path, what: str) -> None:
    """UserError "<what>: ..." when the folder ``path`` (to use or create) is an existing file, or lies below
    one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a directory")
    blocker = _file_above(path)
    if blocker is not None:
        raise UserError(f"{what}: {path}: {blocker} is a file, not a directory")
