"""``sdsbridge doctor``: what this machine can use (torch build, device, accelerators, ffmpeg, the prior).

Each check is a small function that returns one ``Check`` row; ``run_checks`` calls them in order and turns
an exception inside any of them into a "fail" (or "warn") row carrying the error's first line, so the doctor
itself never crashes. Nothing here touches the network or builds anything: nerfacc's CUDA kernels are only
imported when a CUDA device is present and they are prebuilt (or already JIT-built), and the prior model is
looked up in a local folder or the local Hugging Face cache only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from sdsbridge.priors.hub import DEFAULT_SD_MODEL, cached_model_status

STATUSES = ("ok", "warn", "fail", "info")
TCNN_HINT = ("optional accelerator, build from source: "
             "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch")
_GIB = 1024 ** 3


@dataclass
class Check:
    """One row of the doctor's report."""

    name: str
    """What was checked, e.g. "torch", "CUDA device", "prior model"."""
    status: str
    """"ok" | "warn" | "fail" | "info"."""
    detail: str
    """One line: a version, a reason or a hint."""


# ----------------------------------------------------------------------------------------------- helpers

def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow prints and warnings from third-party imports (so ``--json`` output stays clean)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _is_cuda(device: str) -> bool:
    """Whether ``device`` names a usable CUDA device."""
    import torch

    return device.startswith("cuda") and torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ checks

def check_python() -> Check:
    """Python version and interpreter."""
    status = "ok" if sys.version_info >= (3, 10) else "fail"
    return Check("python", status, f"{platform.python_version()} ({sys.executable})")


def check_platform() -> Check:
    """OS, architecture and CPU count."""
    return Check("platform", "info", f"{platform.platform()} ({platform.machine()}, {os.cpu_count()} CPUs)")


def check_torch() -> Check:
    """torch version and build: CUDA (and cuDNN) version, ROCm, or CPU-only."""
    import torch

    if torch.version.cuda:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        build = f"CUDA {torch.version.cuda} build" + (f", cuDNN {cudnn}" if cudnn else "")
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU-only build"
    return Check("torch", "ok", f"{torch.__version__} ({build}, {torch.get_num_threads()} CPU threads)")


def check_cuda_device() -> Check:
    """Whether torch sees a CUDA device, and which."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        more = f" (+{count - 1} more: device=cuda:N picks one; auto uses cuda:0)" if count > 1 else ""
        return Check("CUDA device", "ok", f"{props.name}, compute capability {props.major}.{props.minor}{more}")
    if not torch.version.cuda and not getattr(torch.version, "hip", None):
        return Check("CUDA device", "info", "none: torch is a CPU-only build (install a CUDA build of torch "
                                            "from pytorch.org to train on a GPU)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "check the NVIDIA driver (nvidia-smi)"
    return Check("CUDA device", "warn", f"torch is a CUDA build but sees no device; {hint}")


def check_device(device: str) -> Check:
    """The device training would use for ``--device`` / ``device=`` (``auto`` picks CUDA when present)."""
    from sdsbridge.common.devices import resolve_device
    from sdsbridge.common.errors import UserError

    try:
        resolved = str(resolve_device(device))
    except UserError as exc:
        return Check("device", "fail", str(exc).removeprefix("device: "))
    if resolved == "cpu":
        why = "no CUDA device" if device == "auto" else "asked for"
        return Check("device", "info", f"{device} -> cpu ({why}); Stable Diffusion training needs a GPU in "
                                       "practice, prior.kind=reference runs on the CPU")
    return Check("device", "ok", f"{device} -> {resolved}")


def check_gpu_memory(device: str, model: str = DEFAULT_SD_MODEL) -> Check:
    """Total and free memory of the CUDA device, against the forecast of the default run (``gpu_memory_fit``)."""
    import torch

    if not _is_cuda(device):
        return Check("GPU memory", "info", "n/a (no CUDA device in use)")
    from sdsbridge.scene.nerf.encoding import resolve_backend

    index = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    return gpu_memory_fit(total, free, model, torch.cuda.device_count(), resolve_backend("auto", device)[0])


def gpu_memory_fit(total: int, free: int, model: str, gpus: int, backend: str = "torch") -> Check:
    """The GPU's memory against the forecast peak of the default run (the official 3D recipe at 512 px) on
    ``model``'s architecture (its configs when readable, else SD 2.1-base's) with hash-grid ``backend``: 'warn'
    naming the settings that would fit when it does not (``memory.check_fit``)."""
    from sdsbridge.training import memory
    from sdsbridge.config.loader import load_config

    detail = f"{total / _GIB:.1f} GiB total, {free / _GIB:.1f} GiB free"
    arch = memory.architecture_of(model) or memory.random_architecture("sd21-base")
    forecast, advice = memory.check_fit(load_config(None, ["prompt=x", f"prior.model={model}"]), arch, total, gpus,
                                        backend)
    if advice:
        return Check("GPU memory", "warn", f"{detail}; {advice}")
    return Check("GPU memory", "ok", f"{detail}; the default run's 512px steps are forecast at "
                                     f"~{forecast.peak_gpu_bytes() / _GIB:.0f} GiB")


def check_tinycudann() -> Check:
    """Whether tinycudann (the optional fast hash grid) imports; never a failure, the torch grid works."""
    if importlib.util.find_spec("tinycudann") is None:
        return Check("tinycudann", "warn", f"not installed (the torch hash grid is used); {TCNN_HINT}")
    try:
        with _quiet():
            import tinycudann  # noqa: F401
    except Exception as exc:  # a broken build raises ImportError, OSError, RuntimeError...
        return Check("tinycudann", "warn", f"installed but does not import: {_first_line(exc)}")
    try:
        from importlib.metadata import version

        found = version("tinycudann")
    except Exception:
        found = "version unknown"
    return Check("tinycudann", "ok", f"{found} (used by scene.backend=auto on CUDA)")


def check_nerfacc() -> Check:
    """nerfacc's version (its Python side works on the CPU too)."""
    with _quiet():
        import nerfacc
    return Check("nerfacc", "ok", str(getattr(nerfacc, "__version__", "version unknown")))


def _nerfacc_jit_dir() -> Optional[Path]:
    """Where torch would keep a JIT build of nerfacc's kernels (None if torch's helper is unavailable)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory("nerfacc_cuda", verbose=False))
    except Exception:
        return None


def check_nerfacc_cuda(device: str) -> Check:
    """Whether nerfacc's CUDA kernels (occupancy-grid sampling) load. Never builds them: on a CPU machine
    nothing is imported; on CUDA the kernels are imported only if prebuilt or already JIT-built."""
    name = "nerfacc CUDA extension"
    if not _is_cuda(device):
        return Check(name, "info", "CUDA extension not needed on CPU (the PyTorch occupancy grid is used)")
    prebuilt = importlib.util.find_spec("nerfacc") is not None and \
        importlib.util.find_spec("nerfacc.csrc") is not None
    jit_dir = _nerfacc_jit_dir()
    jit_built = jit_dir is not None and jit_dir.is_dir() and any(jit_dir.iterdir())
    if not prebuilt and not jit_built:
        if shutil.which("nvcc"):
            return Check(name, "warn", "no prebuilt kernels: the first occupancy-grid run JIT-builds them with "
                                       "nvcc (several minutes; doctor does not build them)")
        return Check(name, "warn", "no prebuilt kernels and no nvcc: render.sampler=auto falls back to the "
                                   "PyTorch occupancy grid (slower); install a prebuilt nerfacc wheel for your "
                                   "torch/CUDA or the CUDA toolkit")
    try:
        with _quiet():
            from nerfacc.cuda._backend import _C
    except Exception as exc:
        return Check(name, "fail", f"kernels do not load: {_first_line(exc)}")
    if _C is None:
        return Check(name, "warn", "kernels did not load (nerfacc disabled them); the PyTorch occupancy grid is used")
    return Check(name, "ok", "prebuilt kernels load" if prebuilt else f"JIT-built kernels load ({jit_dir})")


def check_ffmpeg() -> Check:
    """The ffmpeg binary imageio-ffmpeg provides (turntable videos), and its version line."""
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=20)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return Check("ffmpeg", "fail", f"{exe} -version exited with {out.returncode}")
    version = lines[0].split(" Copyright")[0]
    return Check("ffmpeg", "ok", f"{version} ({exe})")


def check_fp16(device: str) -> Check:
    """Half precision: a small fp16 matmul on CUDA (prior.dtype=auto uses fp16 there); fp32 on the CPU."""
    import torch

    if not _is_cuda(device):
        return Check("fp16", "info", "fp32 on CPU (prior.dtype=auto picks fp32 there)")
    a = torch.randn(64, 64, device=device)
    b = torch.randn(64, 64, device=device)
    half = (a.half() @ b.half()).float()
    torch.cuda.synchronize()
    error = ((half - a @ b).abs().max() / (a @ b).abs().max()).item()
    if not torch.isfinite(half).all() or error > 1e-2:
        return Check("fp16", "fail", f"fp16 matmul is wrong (relative error {error:.2g}); use prior.dtype=fp32")
    return Check("fp16", "ok", f"fp16 matmul works (relative error {error:.1e}); prior.dtype=auto uses fp16")


def check_bf16(device: str) -> Check:
    """bf16 support (informational: the prior runs in fp16 on CUDA and fp32 on the CPU)."""
    import torch

    if _is_cuda(device):
        if torch.cuda.is_bf16_supported():
            return Check("bf16", "ok", "supported on this GPU (not used by default)")
        return Check("bf16", "info", "not supported on this GPU (not needed)")
    a = torch.randn(8, 8, dtype=torch.bfloat16)
    (a @ a).float().sum().item()
    return Check("bf16", "info", "CPU bf16 matmul works (not used: the prior runs in fp32 on CPU)")


def check_prior_model(model: str = DEFAULT_SD_MODEL) -> Check:
    """Whether the prior model resolves without the network (``hub.cached_model_status``)."""
    return Check("prior model", *cached_model_status(model))


# ------------------------------------------------------------------------------------------------ report

def _safe(name: str, fn: Callable[..., Check], *args: str, on_error: str = "fail") -> Check:
    """Run one check; an exception becomes a row with status ``on_error`` and the error's first line."""
    try:
        return fn(*args)
    except Exception as exc:
        return Check(name, on_error, f"check crashed: {_first_line(exc)}")


def run_checks(model: str = DEFAULT_SD_MODEL, device: str = "auto") -> list[Check]:
    """Run every check in order and return the rows. Never raises for a broken environment."""
    try:
        from sdsbridge.common.devices import resolve_device

        resolved = str(resolve_device(device))
    except Exception:  # torch itself is broken (the torch row says why) or a bad name (the device row does)
        resolved = "cpu"
    return [
        _safe("python", check_python),
        _safe("platform", check_platform),
        _safe("torch", check_torch),
        _safe("CUDA device", check_cuda_device),
        _safe("device", check_device, device),
        _safe("GPU memory", check_gpu_memory, resolved, model, on_error="warn"),
        _safe("tinycudann", check_tinycudann, on_error="warn"),
        _safe("nerfacc", check_nerfacc),
        _safe("nerfacc CUDA extension", check_nerfacc_cuda, resolved, on_error="warn"),
        _safe("ffmpeg", check_ffmpeg),
        _safe("fp16", check_fp16, resolved),
        _safe("bf16", check_bf16, resolved, on_error="info"),
        _safe("prior model", check_prior_model, model, on_error="warn"),
    ]


def format_table(checks: list[Check]) -> str:
    """An aligned plain-text table: a header line, then one line per check."""
    rows = [("check", "status", "detail")] + [
        (c.name, c.status, " ".join(str(c.detail).split())) for c in checks]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)


def summary(checks: list[Check]) -> str:
    """One line, e.g. "12 checks: 1 warning, 0 failures"."""
    warn = sum(c.status == "warn" for c in checks)
    fail = sum(c.status == "fail" for c in checks)
    return (f"{len(checks)} checks: {warn} warning{'s' * (warn != 1)}, "
            f"{fail} failure{'s' * (fail != 1)}")


def exit_code(checks: list[Check]) -> int:
    """0 if no check failed, else 1 (warnings do not fail)."""
    return 1 if any(c.status == "fail" for c in checks) else 0


def to_json(checks: list[Check]) -> str:
    """The checks as a JSON list of {"name", "status", "detail"} objects."""
    return json.dumps([asdict(c) for c in checks], indent=2)


def from_json(text: str) -> list[Check]:
    """Inverse of ``to_json``."""
    return [Check(**row) for row in json.loads(text)]
