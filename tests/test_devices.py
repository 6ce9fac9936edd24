"""Device names (auto | cpu | cuda | cuda:N), the device of a module, seeding."""

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


def test_cpu_threads_follow_the_free_cores(monkeypatch):
    import os

    import torch

    from sdsbridge.common import devices

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SDSBRIDGE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
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


def test_cpu_threads_respect_the_users_setting(monkeypatch):
    import os

    import torch

    from sdsbridge.common import devices

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 0.0, 0.0))
    before = torch.get_num_threads()
    with devices.fitted_cpu_threads(torch.device("cpu")) as threads:
        assert threads.update(busy_seconds=100) == before  # the user's count stays, whatever the load
