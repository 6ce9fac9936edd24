"""The GPU memory forecast (sdsbridge/training/memory.py) without a GPU: the meta-device trace of a step equals the same
step's live tensor bytes on real CPU tensors, the parts add up, the options move the parts where they go, the
advice names settings that fit, and ``bench_train_step.py --estimate`` prints its table."""

import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.config.loader import load_config
from sdsbridge.training.memory import (CUDA_CONTEXT_BYTES, GIB, LiveBytes, architecture_of, check_fit, forecast_step,
                              largest_render, meta_prior, random_architecture, render_bytes, trace_prior_step)
from sdsbridge.priors import load_prior

from scripts_loader import load_script


def plain_attention(prior):
    """The matmul-softmax attention on both (the CPU and the meta device have different fused kernels)."""
    prior.unet.set_attn_processor(AttnProcessor())
    prior.vae.set_attn_processor(AttnProcessor())
    return prior


@pytest.mark.parametrize("method", ["sds", "nfsd", "vsd", "bridge-vsd"])
def test_the_meta_trace_equals_the_real_step_on_the_cpu(tiny_sd_dir, method):
    """Every storage the real step allocates (encode with grad, the method's UNet calls, VSD's LoRA loss, the
    backward), counted on real CPU tensors, is what the meta-device trace of the same step counts."""
    config = load_config(None, ["prompt=a pineapple", f"method={method}", f"prior.model={tiny_sd_dir}",
                                "guidance.stage2_start_step=5", "train.batch_size=2"])
    arch = architecture_of(str(tiny_sd_dir))
    assert arch is not None and arch.tokens == 128 and arch.unet["block_out_channels"] == [32, 64]
    meta = plain_attention(meta_prior(arch, torch.float32))
    real = plain_attention(load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu"))
    traced, own = trace_prior_step(meta, config, 128, [0, 5], fused_attention=False)
    measured, own_real = trace_prior_step(real, config, 128, [0, 5], fused_attention=False)
    assert traced == measured and own == own_real
    assert traced > 3 * 128 * 128 * 2 * 4  # at least the two renders' VAE input, kept for the backward
    assert (own > 0) == method.endswith("vsd")


def test_live_bytes_counts_allocations_and_frees():
    with LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B -> 4096 (512-byte blocks)
        b = a.view(10, 100)  # a view: no new storage
        c = torch.empty(10)  # 40 B -> 512
        del c
        d = torch.empty(100)  # 400 B -> 512
    assert live.peak == 4096 + 512 and live.current == 4096 + 512
    del a, b, d


def test_fused_attention_traces_linear_memory_in_the_tokens():
    """Half-precision attention is traced as flash attention: no tokens x tokens matrix."""
    from sdsbridge.training.memory import FusedAttention

    q = torch.zeros(1, 1, 4096, 64, device="meta", dtype=torch.float16)
    with LiveBytes() as plain:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with LiveBytes() as fused, FusedAttention():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    assert plain.peak >= 4096 * 4096 * 2 > 10 * fused.peak


def test_the_forecast_parts_and_options():
    config = load_config(None, ["prompt=x", "method=vsd"])
    assert largest_render(config) == 512
    arch = random_architecture("small")
    costs = render_bytes(config)
    assert costs[0] > 0
    tcnn = render_bytes(config, "tcnn")
    assert 0 < tcnn[0] < costs[0] / 2  # tinycudann keeps its input and output, not per-corner indices and weights
    at64 = forecast_step(config, arch, torch.float16, 64, render_costs=costs)
    at128 = forecast_step(config, arch, torch.float16, 128, render_costs=costs)
    assert at128.parts["render"] > 3.5 * at64.parts["render"]  # rays x samples grow with the pixels
    assert at64.parts["method state"] > 0 and at64.devices == {"scene": list(at64.parts)}
    assert at64.gpu_bytes() > CUDA_CONTEXT_BYTES + sum(at64.parts.values())  # context and slack on top
    split = at64.with_options(prior_on_other_gpu=True)
    assert set(split.devices) == {"scene", "prior"} and "prior weights" in split.devices["prior"]
    assert split.gpu_bytes("scene") < at64.gpu_bytes()
    offload = at64.with_options(cpu_offload=True)
    assert offload.parts["prior weights"] < at64.parts["prior weights"]


def test_the_advice_names_settings_that_fit():
    config = load_config(None, ["prompt=x", "method=sds"])
    arch = random_architecture("small")
    assert check_fit(config, arch, 1000 * GIB)[1] is None
    need = forecast_step(config, arch, torch.float16, 512).peak_gpu_bytes()
    advice = check_fit(config, arch, need - 1, gpus=2)[1]
    assert advice is not None and "512px" in advice and "would fit" in advice
    assert "render.resolution stage of 384" in advice  # fewer pixels, less render memory
    hopeless = check_fit(config, arch, CUDA_CONTEXT_BYTES)[1]
    assert "no single setting" in hopeless


def test_bench_estimate_prints_a_table_for_every_method(tiny_sd_dir, tmp_path, capsys):
    bench = load_script("bench_train_step")
    out = tmp_path / "estimate.json"
    assert bench.main(["--estimate", "--model", str(tiny_sd_dir), "--resolutions", "64,128", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["resolution"]) for r in rows] == [(m, r) for m in ("sds", "bridge", "nfsd", "vsd", "bridge-vsd")
                                                             for r in (64, 128)]
    for r in rows:
        assert r["cpu_offload"]["scene"] <= r["one GPU"]["scene"]
        assert r["prior.device"]["scene"] < r["one GPU"]["scene"]
        assert f"{r['method']:<12}{r['resolution']:>6}px" in printed
    by = {(r["method"], r["resolution"]): r for r in rows}
    assert by[("vsd", 64)]["parts"]["prior activations"] > by[("sds", 64)]["parts"]["prior activations"]  # the LoRA's backward
    assert bench.main(["--estimate", "--model", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_bench_estimate_for_the_full_size_architecture(tmp_path, capsys):
    bench = load_script("bench_train_step")
    out = tmp_path / "estimate.json"
    assert bench.main(["--estimate", "--json", str(out)]) == 0
    rows = {(r["method"], r["resolution"]): r for r in json.loads(out.read_text())["rows"]}
    weights = rows[("sds", 64)]["parts"]["prior weights"]
    assert 2.9 < weights < 3.2  # UNet and VAE in fp16 (1.9 GB), OpenCLIP-H in fp32 (1.36 GB)
    assert 4 < rows[("sds", 64)]["one GPU"]["scene"] < 16


def test_doctor_weighs_the_gpu_against_the_forecast(tiny_sd_dir):
    """`doctor`'s GPU-memory row (its CUDA half needs a GPU; the verdict does not): the default run on the full-size
    architecture does not fit 8 GiB and the row names what would; 80 GiB fits."""
    from sdsbridge.cli.doctor import gpu_memory_fit

    small = gpu_memory_fit(8 * GIB, 7 * GIB, "no/such-model", 1)
    assert small.status == "warn" and "8.0 GiB total" in small.detail and "512px" in small.detail
    big = gpu_memory_fit(80 * GIB, 79 * GIB, "no/such-model", 1)
    assert big.status == "ok" and "forecast at ~" in big.detail
    # the tiny pipeline's own configs: its weights are MBs, so what does not fit 40 GiB is the 512 px render
    tiny = gpu_memory_fit(40 * GIB, 40 * GIB, str(tiny_sd_dir), 1)
    assert tiny.status == "warn" and "render.resolution stage of 384" in tiny.detail


def test_train_warns_before_loading_when_the_gpu_is_too_small(tiny_sd_dir, monkeypatch, caplog):
    """``train``'s check (its CUDA query stubbed: the rest is the real code): a GPU smaller than the forecast gets one
    warning naming what would fit; a large one, and any CPU run, none."""
    import logging
    from types import SimpleNamespace

    from sdsbridge.training.loop import warn_if_gpu_too_small

    config = load_config(None, ["prompt=x", f"prior.model={tiny_sd_dir}"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for total, warned in ((8 * GIB, True), (1000 * GIB, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, total=total: SimpleNamespace(
            total_memory=total))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sdsbridge"):
            advice = warn_if_gpu_too_small(config, torch.device("cuda"))
        assert (advice is not None) == warned and (advice in caplog.text if warned else not caplog.text)
    assert warn_if_gpu_too_small(config, torch.device("cpu")) is None
    reference = load_config(None, ["prompt=a red torus", "prior.kind=reference"])
    assert warn_if_gpu_too_small(reference, torch.device("cuda")) is None
