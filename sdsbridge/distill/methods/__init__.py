"""Score-distillation methods, one small class each (``base.Method`` says what a method provides), and
``make_method``, which picks one by the config's ``method:`` name."""

from __future__ import annotations

from sdsbridge.config.schema import GuidanceConfig
from sdsbridge.distill.methods.base import GuidanceResult, Method
from sdsbridge.distill.methods.bridge import Bridge
from sdsbridge.distill.methods.nfsd import NFSD
from sdsbridge.distill.methods.sds import SDS
from sdsbridge.distill.methods.vsd import VSD, BridgeVSD
from sdsbridge.priors.base import Prior


def make_method(name: str, settings: GuidanceConfig, prior: Prior) -> Method:
    """The method ``name`` (config.METHODS: 'bridge', 'sds', 'nfsd', 'vsd', 'bridge-vsd') with ``settings`` on
    ``prior``."""
    if name == "bridge":
        return Bridge(settings, prior)
    if name == "sds":
        return SDS(settings, prior)
    if name == "nfsd":
        return NFSD(settings, prior)
    if name == "vsd":
        return VSD(settings, prior)
    if name == "bridge-vsd":
        return BridgeVSD(settings, prior)
    raise ValueError(f"unknown method {name!r}")  # config validation rejects this earlier


__all__ = ["Bridge", "BridgeVSD", "GuidanceResult", "Method", "NFSD", "SDS", "VSD", "make_method"]
