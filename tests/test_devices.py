"""Device names (auto | cpu | cuda | cuda:N), the device of a module, seeding, the CPU thread count."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from sdsbridge.config.loader import load_config
from sdsbridge.common.devices import module_device, resolve_device, seed_everything
from sdsbridge.common.errors import UserError


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda1", "CPU", "cuda:-1", ""])
def test_malformed_names_are_one_line_user_errors(name):
    with pytest.raises(UserError, match="is not one of auto, cpu, cuda, cuda:N") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="device"):
        load_config(None, ["prompt=x", f"device={name}"])


def test_a_numbered_gpu_is_accepted_by_the_config():
    assert load_config(None, ["prompt=x", "device=cuda:1"]).device == "cuda:1"


def test_numbered_gpus_against_the_gpus_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"'cuda:2': torch sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="torch sees no CUDA device"):
            resolve_device(name)


def test_module_device():
    assert module_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_seed_everything_repeats_every_generator():
    seed_everything(5)
    first = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(5)
    assert torch.equal(torch.rand(3), first[0]) and np.array_equal(np.random.rand(3), first[1])
    assert random.random() == first[2]


class FakeMachine:
    """A wall clock, this process's CPU time and the machine's busy time (all in seconds), which advance only
    when ``run`` or ``sleep`` is called; ``others`` is how many cores other processes keep busy meanwhile."""

    def __init__(self, others: float = 0.0):
        self.others, self.wall, self.ours, self.busy = others, 1000.0, 0.0, 0.0
        self.sleeps = 0

    def run(self, seconds: float, ours: float = 0.0) -> None:
        """``seconds`` pass while this process keeps ``ours`` cores busy."""
        self.wall += seconds
        self.ours += ours * seconds
        self.busy += (self.others + ours) * seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.run(seconds)

    def monotonic(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.ours


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine, no thread count set by the user; torch's count is restored afterwards."""
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SDSBRIDGE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def machine(monkeypatch, two_cores):
    """A ``FakeMachine`` in place of /proc/stat and the clocks; the load average says 9 busy cores, so a
    thread count that reads it instead comes out as 1."""
    import os

    from sdsbridge.common import devices

    fake = FakeMachine()
    monkeypatch.setattr(devices, "machine_busy_seconds", lambda cpus=None: fake.busy)
    monkeypatch.setattr(devices, "time", fake)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    return fake


def test_an_idle_machine_gets_every_core(machine):
    from sdsbridge.common import devices

    torch.set_num_threads(1)
    with devices.fitted_cpu_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 2
    assert machine.sleeps == 1  # one short measurement on entry


def test_a_process_busy_on_one_of_two_cores_leaves_one_thread(machine):
    from sdsbridge.common import devices

    machine.others = 1.0
    with devices.fitted_cpu_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    machine.others = 0.6  # a share of a core, as when it competes with our threads: still one core taken
    with devices.fitted_cpu_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1


def test_our_own_threads_are_not_others_load(machine):
    from sdsbridge.common import devices

    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        machine.run(30.0, ours=2.0)  # both cores busy, all of it our threads (OpenMP spin-waits included)
        assert threads.update(busy_seconds=30.0) == 2


def test_later_updates_measure_the_window_since_the_last(machine):
    from sdsbridge.common import devices

    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert threads.threads == 2
        machine.others = 1.0
        machine.run(10.0, ours=1.0)
        machine.others = 0.0  # gone by the time of the update: the window's average still counts it
        assert threads.update(busy_seconds=10.0) == 1
        machine.run(5.0, ours=1.0)  # measured from the last update (from entry, 10 of 15 s: a load of 0.67)
        assert threads.update(busy_seconds=15.0) == 2
        assert machine.sleeps == 1  # later updates do not wait to measure
        assert threads.update() == 2  # a window too short to measure: a fresh short one
        assert machine.sleeps == 2


def test_never_fewer_than_one_thread(machine):
    from sdsbridge.common import devices

    machine.others = 5.0
    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert torch.get_num_threads() == 1
        machine.run(10.0, ours=1.0)
        assert threads.update() == 1


def test_a_timed_caller_keeps_the_faster_thread_count(monkeypatch, machine):
    import os

    from sdsbridge.common import devices

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    speed = {4: 30.0, 2: 40.0}  # steps/s: fewer threads are faster here
    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert threads.threads == 4
        chosen = []
        for window in range(12):
            machine.run(3.0, ours=float(threads.threads))
            chosen.append(threads.update(rate=speed[threads.threads]))
        # four timed, then half of them timed, then the faster kept; timed again after REPROBE_WINDOWS windows
        assert chosen[:3] == [2, 2, 2]
        assert 4 in chosen[3:] and chosen[-1] == 2
        assert chosen.count(4) <= 1 + 12 // devices.REPROBE_WINDOWS
        speed[4] = 50.0  # now more threads pay: the next timing of four is kept
        for window in range(devices.REPROBE_WINDOWS + 2):
            machine.run(3.0, ours=float(threads.threads))
            threads.update(rate=speed[threads.threads])
        assert threads.threads == 4
        machine.others = 3.0  # a busy machine: one core free, nothing to compare
        machine.run(3.0, ours=1.0)
        assert threads.update(rate=speed[4]) == 1
        machine.run(3.0, ours=1.0)
        assert threads.update(rate=10.0) == 1
    assert threads.rates.keys() <= {1, 4}  # the timings of the idle machine were dropped when the load changed


def test_training_times_its_steps_for_the_thread_count(monkeypatch, tmp_path):
    """The loop passes each window's steps/s (its steps' own time, compile windows left out) to the fitter."""
    from sdsbridge.common import devices
    from sdsbridge.training import loop

    rates = []
    real_update = devices.CpuThreads.update

    def update(self, busy_seconds=0.0, rate=None):
        rates.append(rate)
        return real_update(self, busy_seconds, rate)

    monkeypatch.setattr(devices.CpuThreads, "update", update)
    monkeypatch.setattr(loop, "THREAD_CHECK_EVERY", 2)
    from tests.cli_helpers import TINY

    settings = [a for a in TINY if "=" in a]  # the CLI flags aside
    config = load_config(None, [*settings, "prompt=a red torus", "method=sds", "prior.cache_dir=null",
                                "train.steps=7"])
    loop.train(config, tmp_path, torch.device("cpu"), show_progress=False)
    timed = rates[1:]  # the first is the entry's untimed fit
    assert len(timed) == 3 and all(r is None or r > 0 for r in timed)
    assert any(r is not None for r in timed)


def test_the_real_reader_counts_busy_time():
    import os
    import time

    from sdsbridge.common import devices

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here")
    before, started = devices.machine_busy_seconds(), time.process_time()
    while time.process_time() - started < 0.2:
        pass
    after = devices.machine_busy_seconds()
    assert isinstance(before, float) and isinstance(after, float)
    assert after - before >= 0.1  # at least about the 0.2 s our loop kept a core busy
    cpus = os.sched_getaffinity(0)
    assert isinstance(devices.machine_busy_seconds(cpus), float)
    assert devices.machine_busy_seconds(cpus) <= devices.machine_busy_seconds() + 0.1  # our cores, of all


def test_busy_time_leaves_out_idle_and_io_waits(tmp_path):
    import os

    from sdsbridge.common import devices

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user and nice
    stat.write_text("cpu  300 20 100 5000 900 10 20 5 70 7\n"
                    "cpu0 200 20 60 2000 800 10 10 5 70 7\n"
                    "cpu1 100 0 40 3000 100 0 10 0 0 0\n"
                    "intr 12345 0 0\n")
    tick = os.sysconf("SC_CLK_TCK")
    assert devices.machine_busy_seconds(path=str(stat)) == pytest.approx(455 / tick)
    assert devices.machine_busy_seconds({1}, path=str(stat)) == pytest.approx(150 / tick)
    assert devices.machine_busy_seconds({0, 1}, path=str(stat)) == pytest.approx(455 / tick)
    assert devices.machine_busy_seconds({4, 5}, path=str(stat)) == pytest.approx(455 / tick)  # not numbered: all
    stat.write_text("cpu  not numbers\n")
    assert devices.machine_busy_seconds(path=str(stat)) is None
    assert devices.machine_busy_seconds(path=str(tmp_path / "missing")) is None


def test_cpu_threads_follow_the_load_average_without_proc_stat(monkeypatch, two_cores):
    import os

    from sdsbridge.common import devices

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(devices, "machine_busy_seconds", lambda cpus=None: None)
    before = torch.get_num_threads()
    load = [0.2]
    monkeypatch.setattr(os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert torch.get_num_threads() == 4  # an idle machine: every core
        load[0] = 2.0 + 4.0  # two busy processes, plus our own four threads after a long while
        assert threads.update(busy_seconds=3600) == 2 and torch.get_num_threads() == 2
        load[0] = 9.0
        assert threads.update(busy_seconds=3600) == 1  # never fewer than one
    assert torch.get_num_threads() == before  # restored on exit
    with devices.fitted_cpu_threads(torch.device("cuda")) as threads:
        assert threads is None


def test_cpu_threads_respect_the_users_setting(monkeypatch, machine):
    import os

    from sdsbridge.common import devices

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    machine.others = 5.0
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 0.0, 0.0))
    before = torch.get_num_threads()
    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert torch.get_num_threads() == before
        machine.run(10.0)
        assert threads.update(busy_seconds=100) == before  # the user's count stays, whatever the load
    monkeypatch.setattr(devices, "machine_busy_seconds", lambda cpus=None: None)
    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert threads.update(busy_seconds=100) == before
