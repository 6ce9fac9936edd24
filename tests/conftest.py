"""Shared fixtures."""

import os
import tempfile

import pytest
import torch

from sdsbridge.testing.browser import find_chromium
from sdsbridge.testing.random_sd import build_random_pipeline


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A random-initialised tiny Stable Diffusion pipeline folder (64x64 images, latents [4, 32, 32]),
    built once per test run; load it with ``prior.model=<this folder>``."""
    return build_random_pipeline(tmp_path_factory.mktemp("tiny-sd"), arch="tiny", seed=0)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """torch on one CPU thread for a module (use with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``):
    tiny workloads run far faster on one thread when the CPU is shared (two OpenMP threads spin against other
    processes: ~50x slower UNet calls measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """The per-user cache (reference image sets) in a fresh temporary folder for this test run (subprocesses
    inherit it), not in the user's home."""
    os.environ["SDSBRIDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdsbridge-test-cache-")


@pytest.fixture(scope="module")
def browser():
    """The chromium binary for the browser tests; skips them, saying why, where there is none."""
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    return path
