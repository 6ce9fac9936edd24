"""Folders shipped beside the code: the method presets (``configs``) and the assets (``assets``)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
"""The installed ``sdsbridge`` package folder (or the checkout's)."""


def package_folder(name: str) -> Path:
    """``sdsbridge/<name>`` when installed (pyproject's package-dir maps it there), else ``<name>/`` at the
    checkout's root (an editable install)."""
    installed = PACKAGE / name
    return installed if installed.is_dir() else PACKAGE.parent / name
