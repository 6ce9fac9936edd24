"""What reaches the user's terminal: our own log lines (logger "sdsbridge", INFO) and other libraries'
warnings and errors, but not their chatter, e.g. transformers' "`CLIPImageProcessor` requires torchvision
(not installed)" on every Stable Diffusion command, diffusers' "modules ... should be kept in float32", or
INFO lines of HTTP clients and compilers. ``--debug`` shows everything.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
"""Environment defaults read by transformers / diffusers when they are imported (a user's own setting wins)."""


class _OnceFilter(logging.Filter):
    """Drops an INFO line already shown by this command (a scene built again for the export repeats the
    backend and sampler lines)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def configure_logging(debug: bool) -> None:
    """Set up logging for a CLI command; call before transformers or diffusers are imported."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    logging.getLogger("sdsbridge").setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in logging.getLogger().handlers:  # the terminal handler basicConfig made (not a test's capture)
        if type(handler) is logging.StreamHandler and not any(isinstance(f, _OnceFilter) for f in handler.filters):
            handler.addFilter(_OnceFilter())
    if not debug:
        for name, level in QUIET_LIBRARIES.items():
            os.environ.setdefault(name, level)


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide diffusers' "Loading pipeline components" and transformers' "Loading weights" progress bars
    (download bars, from huggingface_hub, stay) unless the "sdsbridge" logger is at DEBUG (``--debug``)."""
    if logging.getLogger("sdsbridge").isEnabledFor(logging.DEBUG):
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


BACKEND_LOGGER = "sdsbridge.backend"
"""The logger of the lines that say which backend a scene uses (hash grid, sampler, nerfacc's kernels)."""


@contextmanager
def quiet_backend() -> Iterator[None]:
    """Hush the backend lines (``BACKEND_LOGGER``) while a finished run's scene is rebuilt for export, video or
    eval: those commands do not train, and ``train`` said them already."""
    log = logging.getLogger(BACKEND_LOGGER)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
