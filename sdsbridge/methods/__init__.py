"""Score-distillation methods, one small class each (``base.Method`` says what a method provides), and
``make_method``, which picks one by the config's ``method:`` name."""

from __future__ import annotations

from sdsbridge.config import GuidanceConfig
from sdsbridge.methods.base import GuidanceResult, Method
from sdsbridge.methods.bridge import Bridge
from sdsbridge.methods.nfsd import NFSD
from sdsbridge.methods.sds import SDS
from sdsbridge.priors.base import Prior


def make_method(name: str, settings: GuidanceConfig, prior: Prior) -> Method:
    """The method ``name`` ('bridge', 'sds' or 'nfsd', config.METHODS) with ``settings`` on ``prior``."""
    if name == "bridge":
        return Bridge(settings, prior)
    if name == "sds":
        return SDS(settings, prior)
    if name == "nfsd":
        return NFSD(settings, prior)
    raise ValueError(f"unknown method {name!r}")  # config validation rejects this earlier


__all__ = ["Bridge", "GuidanceResult", "Method", "NFSD", "SDS", "make_method"]
