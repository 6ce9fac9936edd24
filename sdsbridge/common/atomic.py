"""File writes: atomic replacement (a temporary file beside the target, fsync, then a rename over it),
sets of files written all or none, appends for logs, directory creation, and the clean-up of temporary files a
killed process left behind.

Readers (and a run that crashes or is interrupted mid-write) see the old file or the whole new one,
never a torn one; the temporary file, and the folders created for it that stay empty, are removed if the write
fails. Checkpoints, config copies, PNGs, videos, meshes, metrics and the reference prior's cache are all written
through here, so an operating-system error while writing (no space, read-only, permission denied, I/O error)
becomes one WriteFailed naming the path and the cause, here and nowhere else.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

from sdsbridge.common.errors import WriteFailed

TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp(\.[^.]*)?$")
"""Names of temporary files (``.<stem>.<pid>-<8 hex>.tmp<suffix>``); no final name ever matches."""


def temp_path_for(path: Path) -> Path:
    """A fresh temporary name beside ``path`` that keeps its suffix (writers pick formats by extension)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def describe_os_error(exc: OSError) -> str:
    """'no space left on device', 'read-only file system', ... (the OS's words, lower case)."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc)) or type(exc).__name__
    return text[:1].lower() + text[1:]


def write_failed(exc: OSError, path: Path, doing: str = "writing") -> WriteFailed:
    """The one-line WriteFailed for an OSError raised while ``doing`` ``path``."""
    return WriteFailed(f"{describe_os_error(exc)} {doing} {path}")


def _open_for_writing(path: Path, mode: str) -> BinaryIO:
    """Every file this package writes itself is opened here (tests inject faults at this point)."""
    return open(path, mode)


def _commit(tmp: Path, path: Path) -> None:
    """Make the finished temporary file durable and move it over ``path`` (tests inject faults here too)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def make_dirs(path: Path) -> Path:
    """``mkdir -p path``; an OS refusal is a WriteFailed naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failed(exc, path, "creating") from None
    return path


def _missing_folders(folders: Iterable[Path]) -> list[Path]:
    """The folders among ``folders`` and their parents that do not exist yet, deepest first."""
    missing: set[Path] = set()
    for folder in folders:
        folder = Path(folder).absolute()
        while not folder.exists() and folder != folder.parent:
            missing.add(folder)
            folder = folder.parent
    return sorted(missing, key=lambda f: len(f.parts), reverse=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty: what a failed write created for nothing."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer's file), gone, or a read-only parent
            continue


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # the folder turned read-only: nothing more can be done about it here
        pass


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (ffmpeg); when the block exits
    without an exception the file written there is synced and renamed over ``path``. Any OSError in the
    block or the commit becomes a WriteFailed; the temporary file, and the folders created for it that are
    left empty, are removed on every failure (and on Ctrl-C)."""
    path = Path(path)
    created = _missing_folders([path.parent])
    make_dirs(path.parent)
    tmp = temp_path_for(path)
    committed = False
    try:
        yield tmp
        _commit(tmp, path)
        committed = True
    except OSError as exc:
        raise write_failed(exc, path) from None
    finally:
        _unlink_quietly(tmp)
        if not committed:
            _remove_empty(created)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive within take effect when it ends (their handlers are swapped for ones that
    note them, and the first one noted is sent again), so a set of renames is never cut half-way. Outside the
    main thread, or under handlers Python did not install, nothing changes."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    pending: list[int] = []
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            os.kill(os.getpid(), pending[0])


def atomic_write_files(files: dict[Path, bytes]) -> list[Path]:
    """Write files that belong together (a textured mesh's .glb, .obj, .mtl and .png) all or none: each to a
    temporary file beside it, then all synced and renamed over their final names, with SIGINT / SIGTERM held
    back during the renames (``_signals_held``: a signal then takes effect once all are in place). A failure or
    an interrupt while writing leaves no file of the set under its final name; an OS error during the renames
    removes the ones already renamed (a file they replaced is then lost; the WriteFailed names the path).
    Folders created for them that are left empty are removed. Returns the paths, in order."""
    files = {Path(path): data for path, data in files.items()}
    created = _missing_folders({path.parent for path in files})
    temps: dict[Path, Path] = {}
    renamed: list[Path] = []
    committed = False
    try:
        for path, data in files.items():
            make_dirs(path.parent)
            temps[path] = temp_path_for(path)
            try:
                with _open_for_writing(temps[path], "xb") as handle:
                    handle.write(data)
            except OSError as exc:
                raise write_failed(exc, path) from None
        with _signals_held():
            for path, tmp in temps.items():
                try:
                    _commit(tmp, path)
                except OSError as exc:
                    raise write_failed(exc, path) from None
                renamed.append(path)
            committed = True
    finally:
        for tmp in temps.values():
            _unlink_quietly(tmp)
        if not committed:
            for path in renamed:
                _unlink_quietly(path)
            _remove_empty(created)
    return list(files)


class _RecordingHandle:
    """A binary file handle that remembers the first OSError its ``write`` raised: torch's zip writer
    re-raises it as a RuntimeError ('unexpected pos') that no longer says why."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self.handle, name)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Open a binary handle whose contents replace ``path`` when the block exits without an exception."""
    with atomic_path(path) as tmp, _open_for_writing(tmp, "xb") as raw:
        handle = _RecordingHandle(raw)
        try:
            yield handle
        except Exception as exc:
            if handle.error is not None and exc is not handle.error:
                raise handle.error from None  # the cause, not the writer's rewording of it
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as handle:
        handle.write(data)


def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created if missing); an OS refusal is a WriteFailed and the file is cut
    back to its old length. Not atomic: a killed process can leave a torn last line, which readers of
    appended logs (jsonl.py) skip."""
    try:
        with _open_for_writing(Path(path), "ab") as handle:
            start = handle.tell()
            try:
                handle.write(data)
                handle.flush()
            except OSError:
                handle.truncate(start)  # no torn line for the next append to run into
                raise
    except OSError as exc:
        raise write_failed(exc, Path(path)) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files under ``folder`` (recursively) that a killed or crashed writer left
    behind: those whose writing process is gone. Files of a live process (a run still training while
    its turntable is exported, or this process) are kept. Returns the paths removed."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).rglob(".*.tmp*"):
        match = TEMP_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        if _process_alive(int(match.group(1))):
            continue
        try:
            path.unlink()
        except OSError:  # gone already, or a read-only folder: the next write there says so
            continue
        removed.append(path)
    return removed
