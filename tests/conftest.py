"""Shared fixtures."""

import pytest

from sdsbridge.random_sd import build_random_pipeline


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A random-initialised tiny Stable Diffusion pipeline folder (64x64 images, latents [4, 32, 32]),
    built once per test run; load it with ``prior.model=<this folder>``."""
    return build_random_pipeline(tmp_path_factory.mktemp("tiny-sd"), arch="tiny", seed=0)
