"""A recorder of host syncs: the tensor calls that make the host wait for a device (on CUDA) and where our code
makes them. On the CPU nothing waits, so this is how a CPU test sees what would stall a GPU step."""

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere",
           "masked_select", "unique", "unique_consecutive"}
"""Tensor functions whose result the host must wait for (values read, or an output shape that depends on them)."""
PACKAGE = "sdsbridge"
DEBUG = False


def _syncing_index(func, args) -> bool:
    """Boolean-mask indexing (``x[mask]``, ``x[mask] = v``): its output shape is the mask's count."""
    if getattr(func, "__name__", "") not in ("__getitem__", "__setitem__") or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def our_frame() -> str:
    """'module.function' of the innermost frame of our package on the stack (the code that asked)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename.replace("\\", "/")
        inner = frame.f_code.co_name.startswith("<") and frame.f_back is not None and \
            frame.f_back.f_code.co_filename == frame.f_code.co_filename  # a comprehension: name its function
        if f"/{PACKAGE}/" in filename and "/tests/" not in filename and not inner:
            module = filename.rsplit(f"/{PACKAGE}/", 1)[1].removesuffix(".py").replace("/", ".")
            return f"{module}.{frame.f_code.co_name}" + (f":{frame.f_lineno}" if DEBUG else "")
        frame = frame.f_back
    return "<outside>"


class HostSyncs(TorchFunctionMode):
    """Within: counts syncing tensor calls by the function of ours that made them (``counts``)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING or _syncing_index(func, args):
            self.counts[our_frame()] += 1
        return func(*args, **(kwargs or {}))
