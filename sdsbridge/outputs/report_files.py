"""Which of a run's files the report page reads and embeds: only regular files whose real path lies inside the run
directory, with the suffix and the first bytes of their kind, under the kind's size cap, and while the page holds
less than ``PAGE_BUDGET`` bytes of files. Any other file is left out with a one-line note on the page and in the
log: a symbolic link in a run (to a secret, to /dev/zero, to a 3 GB video) is never followed into the page.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sdsbridge.common.atomic import describe_os_error

logger = logging.getLogger("sdsbridge")

MIB = 2 ** 20


@dataclass(frozen=True)
class FileKind:
    """What a file of one kind must look like to be read."""

    suffix: str
    mime: str
    max_bytes: int
    magic: bytes = b""
    """Its first bytes (mp4: at offset 4)."""
    magic_offset: int = 0


KINDS = {
    "mesh": FileKind(".glb", "model/gltf-binary", 200 * MIB, b"glTF"),
    "video": FileKind(".mp4", "video/mp4", 200 * MIB, b"ftyp", 4),
    "image": FileKind(".png", "image/png", 20 * MIB, b"\x89PNG\r\n\x1a\n"),
    "config": FileKind(".yaml", "text/yaml", 256 << 10),  # safe_yaml's bound
    "metrics": FileKind(".jsonl", "application/jsonl", 256 * MIB),  # read for the plots, not embedded
}
"""Kind -> its suffix, MIME type, size cap (a default run's mesh is about 10 MB, its turntable 1-3 MB) and magic."""

PAGE_BUDGET = 512 * MIB
"""Most bytes of files one page embeds (about 680 MB of base64); later files get a note instead."""


def inside(path: Path, run_dir: Path) -> bool:
    """Whether ``path``'s real path (symbolic links resolved) lies inside ``run_dir``'s."""
    return Path(path).resolve().is_relative_to(Path(run_dir).resolve())


def _stat_refusal(info: os.stat_result, kind: str) -> str:
    """Why a file with this stat may not be read as a ``kind`` file ("" when it may)."""
    cap = KINDS[kind].max_bytes
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > cap:
        return f"{info.st_size / MIB:.0f} MiB, over the {cap / MIB:g} MiB a {kind} file may have"
    return ""


def refusal(path: Path, run_dir: Path, kind: str) -> str:
    """Why ``path`` may not be read as a ``kind`` file of the run ``run_dir`` (one phrase), "" when it may: a
    regular file, no symbolic link, inside the run, of the kind's suffix and size. Reads nothing."""
    spec, path = KINDS[kind], Path(path)
    if path.suffix.lower() != spec.suffix:
        return f"not a {spec.suffix} file"
    if path.is_symlink():
        return "a symbolic link (only the run's own files are read)"
    if not inside(path, run_dir):
        return "outside the run directory (through a linked folder)"
    try:
        return _stat_refusal(path.stat(), kind)
    except OSError as exc:
        return f"unreadable ({describe_os_error(exc)})"


def read_run_file(path: Path, run_dir: Path, kind: str) -> tuple[Optional[bytes], str]:
    """(the bytes of ``path``, "") when it may be read as a ``kind`` file of the run ``run_dir`` (``refusal``) and
    begins with the kind's magic bytes, else (None, why not). Opened without following a link and without
    blocking (a FIFO put there in the meantime), and checked again on the open file."""
    why = refusal(path, run_dir, kind)
    if why:
        return None, why
    spec = KINDS[kind]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return None, f"unreadable ({describe_os_error(exc)})"
    try:
        if _stat_refusal(os.fstat(fd), kind):
            return None, "replaced while it was opened"
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(spec.max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > spec.max_bytes:
        return None, f"over the {spec.max_bytes / MIB:g} MiB a {kind} file may have"
    if spec.magic and data[spec.magic_offset:spec.magic_offset + len(spec.magic)] != spec.magic:
        return None, f"its contents are not a {spec.suffix} file's"
    return data, ""


@dataclass
class Embedder:
    """Turns a page's files into ``data:`` URIs within ``PAGE_BUDGET``, noting the files it leaves out."""

    budget: int = PAGE_BUDGET
    notes: list[str] = field(default_factory=list)
    """One line per file left out: '<path>: not embedded: <why>'."""

    def uri(self, path: Path, run_dir: Path, kind: str) -> Optional[str]:
        """``data:<mime>;base64,...`` of ``path`` (``read_run_file``), or None with a note (page and log)."""
        data, why = read_run_file(path, run_dir, kind)
        if data is not None and len(data) > self.budget:
            data, why = None, f"the page already embeds its {PAGE_BUDGET // MIB} MiB of files"
        if data is None:
            self.notes.append(f"{path}: not embedded: {why}")
            logger.warning("report: %s", self.notes[-1])
            return None
        self.budget -= len(data)
        return f"data:{KINDS[kind].mime};base64," + base64.b64encode(data).decode("ascii")
