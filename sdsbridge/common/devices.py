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
import time
from contextlib import contextmanager
from typing import Collection, Iterator, Optional

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


REPROBE_WINDOWS = 8
"""``CpuThreads`` times each candidate thread count again after this many timed windows (a run's steps change
cost as it goes: its resolution, its occupancy grid)."""
SAMPLE_SECONDS = 0.1
"""With no earlier sample to measure from (on entry), or one too recent, ``CpuThreads`` measures the load over
this many seconds."""


def machine_busy_seconds(cpus: Optional[Collection[int]] = None, path: str = "/proc/stat") -> Optional[float]:
    """Seconds the CPUs numbered in ``cpus`` (all of the machine's when None, or when /proc/stat does not number
    them all) have been busy since boot, summed over those CPUs, from /proc/stat. Waiting for I/O is not busy.
    None where /proc/stat cannot be read (not Linux, some sandboxes)."""
    try:
        with open(path, encoding="ascii") as file:
            # user nice system idle iowait irq softirq steal, in clock ticks (guest time is already in user, nice)
            ticks = {fields[0]: [int(v) for v in fields[1:9]] for fields in map(str.split, file)
                     if fields and fields[0].startswith("cpu")}
        names = [f"cpu{n}" for n in cpus] if cpus else []
        if not names or any(name not in ticks for name in names):
            names = ["cpu"]
        busy = sum(sum(ticks[name]) - ticks[name][3] - ticks[name][4] for name in names)
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, KeyError, IndexError):
        return None


class CpuThreads:
    """torch's CPU thread count, fitted to the cores other processes leave free.

    torch starts one OpenMP thread per core; when another process keeps a core busy, each parallel region
    waits for the thread that shares that core, and a step becomes many times slower (measured: the CPU demo
    fell from ~24 to ~2 steps/s with one competing process on two cores). So, unless the user set
    OMP_NUM_THREADS or SDSBRIDGE_THREADS (respected as they are), the count follows the free cores: the
    cores this process may use minus the load other processes put on them, at least 1.

    The load is that of the moment: the busy time of the cores we may run on (/proc/stat) less this process's
    own CPU time (every thread's, OpenMP's spin-waits included), per second of wall time, over the window since
    the last ``update`` (the training loop calls it every so many steps), or over ``SAMPLE_SECONDS`` on entry.
    Where /proc/stat cannot be read, the 1-minute load average less an estimate of our own threads stands in (it
    lags: a command started right after other work reads a load near 1 on an idle machine).

    Free cores are a ceiling, not always the fastest count: on the 2-core machine the CPU demo trained at 38.9
    steps/s with one thread and 30.9 with two, idle (small tensors: a second thread costs more in handing work
    over than it gives). So a caller that can time its work (the training loop) passes its rate to ``update``;
    the free count and half of it are each timed over one window, the faster is kept, and both are timed again
    after ``REPROBE_WINDOWS`` windows or when the free count changes.
    """

    def __init__(self):
        self.fixed = bool(os.environ.get("OMP_NUM_THREADS") or os.environ.get("SDSBRIDGE_THREADS"))
        if os.environ.get("SDSBRIDGE_THREADS"):
            torch.set_num_threads(max(1, int(os.environ["SDSBRIDGE_THREADS"])))
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.cores = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        self.threads = self.initial = torch.get_num_threads()
        self.busy_seconds = 0.0
        self.sample: Optional[tuple[float, float, float]] = None
        """At the last measurement: (wall clock, our cores' busy time, this process's CPU time), in seconds."""
        self.free = 0
        """The free cores at the last ``update``."""
        self.rates: dict[int, tuple[float, int]] = {}
        """Timed thread counts under the current free count: threads -> (work units per second, window number)."""
        self.windows = 0
        """Timed windows so far."""

    def take_sample(self) -> Optional[tuple[float, float, float]]:
        """(wall clock, our cores' busy time, this process's CPU time) now, in seconds; None without /proc/stat."""
        busy = machine_busy_seconds(self.cpus)
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def others_load(self) -> float:
        """The load of other processes on our cores, in cores kept busy: measured since the last sample (over
        ``SAMPLE_SECONDS`` when there is none, or it is more recent), else from the load average."""
        now = self.take_sample()
        if now is not None and (self.sample is None or now[0] - self.sample[0] < SAMPLE_SECONDS):
            self.sample = now
            time.sleep(SAMPLE_SECONDS)
            now = self.take_sample()
        before, self.sample = self.sample, now
        if now is None:
            return self.load_average_load()
        wall, busy, ours = (b - a for a, b in zip(before, now))
        return max(0.0, (busy - ours) / wall)

    def load_average_load(self) -> float:
        """The load of other processes on this machine's cores (1-minute average, our threads taken out)."""
        try:
            load = os.getloadavg()[0]
        except OSError:
            return 0.0
        ours = self.threads * (1.0 - math.exp(-self.busy_seconds / 60.0))  # the average's 1-minute decay
        return max(0.0, load - ours)

    def update(self, busy_seconds: float = 0.0, rate: Optional[float] = None) -> int:
        """Set and return the thread count for the current load. ``busy_seconds``: how long this process has
        been computing (used only where the load average stands in: our own threads count in it only after a
        minute or so). ``rate``: work done per second since the last ``update``, with the thread count set then
        (e.g. training steps/s; None when not timed): with it, the free count and half of it are compared."""
        if self.fixed:
            return torch.get_num_threads()
        self.busy_seconds = busy_seconds
        free = max(1, min(self.cores, int(self.cores - self.others_load() + 0.5)))
        if free != self.free:  # the load changed: earlier timings no longer hold
            self.free, self.rates = free, {}
        threads = free
        if rate is not None:
            self.windows += 1
            self.rates[self.threads] = (rate, self.windows)
            candidates = sorted({free, max(1, free // 2)}, reverse=True)
            untimed = [n for n in candidates
                       if n not in self.rates or self.windows - self.rates[n][1] >= REPROBE_WINDOWS]
            threads = untimed[0] if untimed else max(candidates, key=lambda n: self.rates[n][0])
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
