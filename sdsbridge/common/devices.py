"""Devices: which one a ``device:`` setting names, where a module lives, seeding every RNG, and how many CPU
threads torch uses.

Accepted names (``DEVICE_PATTERN``): ``auto`` (the first CUDA device when torch sees one, else the
CPU), ``cpu``, ``cuda`` (the current CUDA device) and ``cuda:N`` (GPU number N).
"""

from __future__ import annotations

import math
import os
import random
import re
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from sdsbridge.common.errors import UserError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
"""What ``device:`` accepts: auto, cpu, cuda or cuda:N."""
_DEVICE = re.compile(DEVICE_PATTERN)


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` names. UserError (one line) for a malformed name, a CUDA device when torch
    sees none, or a GPU number this machine does not have."""
    name = str(name).strip()
    if not _DEVICE.match(name):
        raise UserError(f"device: '{name}' is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device: '{name}' was asked for but torch sees no CUDA device (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device: '{name}': torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module without tensors)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def generator_device(generator: Optional[torch.Generator]) -> torch.device:
    """Where random numbers from ``generator`` are drawn: its own device, or the CPU for the global RNG (None).
    The step draws its cameras, background colours and timesteps there, on the CPU, whatever the run's device
    (then moves a few bytes); ray jitter and noise are drawn on the device that uses them."""
    return torch.device("cpu") if generator is None else generator.device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class CpuThreads:
    """torch's CPU thread count, fitted to the cores other processes leave free.

    torch starts one OpenMP thread per core; when another process keeps a core busy, each parallel region
    waits for the thread that shares that core, and a step becomes many times slower (measured: the CPU demo
    fell from ~24 to ~2 steps/s with one competing process on two cores). So, unless the user set
    OMP_NUM_THREADS or SDSBRIDGE_THREADS (respected as they are), the count follows the free cores: the
    cores this process may use minus the load other processes put on them (the 1-minute load average less
    our own threads), at least 1. ``update`` re-reads the load (the training loop calls it now and then).
    """

    def __init__(self):
        self.fixed = bool(os.environ.get("OMP_NUM_THREADS") or os.environ.get("SDSBRIDGE_THREADS"))
        if os.environ.get("SDSBRIDGE_THREADS"):
            torch.set_num_threads(max(1, int(os.environ["SDSBRIDGE_THREADS"])))
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = self.initial = torch.get_num_threads()
        self.busy_seconds = 0.0

    def others_load(self) -> float:
        """The load of other processes on this machine's cores (1-minute average, our threads taken out)."""
        try:
            load = os.getloadavg()[0]
        except OSError:
            return 0.0
        ours = self.threads * (1.0 - math.exp(-self.busy_seconds / 60.0))  # the average's 1-minute decay
        return max(0.0, load - ours)

    def update(self, busy_seconds: float = 0.0) -> int:
        """Set and return the thread count for the current load. ``busy_seconds``: how long this process has
        been computing (its own threads count in the load average only after a minute or so)."""
        if self.fixed:
            return torch.get_num_threads()
        self.busy_seconds = busy_seconds
        free = self.cores - self.others_load()
        threads = max(1, min(self.cores, int(free + 0.5)))
        if threads != self.threads or threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.threads = threads
        return threads


@contextmanager
def fitted_cpu_threads(device: torch.device) -> Iterator[Optional[CpuThreads]]:
    """Within: on the CPU, torch's thread count fitted to the free cores (``CpuThreads``, updated once on
    entry; the caller may ``update`` it again); the previous count is restored on exit. None on other
    devices."""
    if device.type != "cpu":
        yield None
        return
    threads = CpuThreads()
    threads.update()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads.initial)
