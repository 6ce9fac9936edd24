"""Score-distillation methods, one small class each (``base.Method`` says what a method provides), found by
name in ``METHODS``.

Every module of this folder is imported here, and each registers its classes (``base.register_method``), so a
new method is one new file: its class, its ``Settings`` and its preset ``configs/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from sdsbridge.common.errors import UserError
from sdsbridge.distill.methods.base import METHODS, DistillResult, Method, MethodSettings, register_method
from sdsbridge.priors.base import Prior

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
_registered = sorted(METHODS.items())  # by name, whatever order the files imported in
METHODS.clear()
METHODS.update(_registered)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; UserError naming the registered ones otherwise."""
    if name not in METHODS:
        raise UserError(f"method: '{name}' is not one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, settings: Optional[MethodSettings | dict], prior: Prior) -> Method:
    """The method ``name`` with ``settings`` (its ``Settings``, or a mapping of their fields; None: defaults)
    on ``prior``."""
    return method_class(name)(settings, prior)


__all__ = ["METHODS", "DistillResult", "Method", "MethodSettings", "make_method", "method_class", "register_method"]
