"""Folders: those shipped beside the code (the method presets ``configs``, the ``assets``) and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
"""The installed ``sdsbridge`` package folder (or the checkout's)."""


def package_folder(name: str) -> Path:
    """``sdsbridge/<name>`` when installed (pyproject's package-dir maps it there), else ``<name>/`` at the
    checkout's root (an editable install)."""
    installed = PACKAGE / name
    return installed if installed.is_dir() else PACKAGE.parent / name


CACHE_ENV = "SDSBRIDGE_CACHE_DIR"
"""Environment variable naming the per-user cache folder (tests point it at a temporary folder)."""


def user_cache_folder(name: str) -> Path:
    """``<cache>/<name>``: the cache is $SDSBRIDGE_CACHE_DIR, else $XDG_CACHE_HOME/sdsbridge, else
    ~/.cache/sdsbridge. Not created here."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdsbridge")
    return Path(os.path.expandvars(root)).expanduser() / name
