"""Half precision on the CPU: the tiny random Stable Diffusion pipeline loaded in float16 and in bfloat16 through
the same loading code and dtype handling as CUDA (fp16/bf16 UNet and VAE, fp32 CLIP, fp32 LoRA and camera
embedding, fp32 renders, latents handed to the methods and gradients), for every method and option, in 3D
(`train`) and 2D (`image`): no dtype error, finite losses and gradients, the LoRA trains (that it learns in each
dtype: ``test_vsd.test_the_lora_learns_the_renders``), resume bit-exact.

torch 2.13's CPU build has fp16 and bf16 kernels for every op these steps use (convolutions, group norm,
attention, GELU/SiLU, their backward), so both dtypes run here; none had to fall back to bfloat16. fp16 runs
about 10x slower than bf16 on this CPU (no fast fp16 convolutions), so the default suite runs every case in bf16
and one in fp16, and the slow suite the rest in fp16."""

import json

import pytest
import torch

from sdsbridge.scene.cameras import orbit_cameras
from sdsbridge.training.checkpoint import find_checkpoint, load_checkpoint
from sdsbridge.scene.cameras import CameraConfig
from sdsbridge.priors.stable_diffusion import StableDiffusionSettings
from sdsbridge.config.loader import load_config
from sdsbridge.distill.methods import make_method
from sdsbridge.priors import load_prior
from sdsbridge.training.loop import train

from cli_helpers import run_cli

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SMALL_3D = [
    "scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
    "scene.background_width=8", "render.resolution=16", "render.num_samples=16", "log.val_every=0",
    "log.log_every=1", "log.checkpoint_every=1000", "export.mesh=false", "export.video=false", "device=cpu",
    "prompt=a DSLR photo of a pineapple",
]
OPTIONS = {
    "sds": ["method=sds"],
    "bridge": ["method=bridge", "guidance.stage2_start_step=2"],
    "nfsd": ["method=nfsd"],
    "vsd": ["method=vsd"],
    "bridge-vsd": ["method=bridge-vsd", "guidance.stage2_start_step=2"],
    "perp_neg": ["method=vsd", "guidance.perp_neg=true"],
    "view_interpolation": ["method=bridge", "guidance.view_interpolation=true", "guidance.stage2_start_step=2"],
    "cfg_on_target": ["method=sds", "guidance.cfg_on_target=false"],
}
"""Each method, and each option on a method it changes (Perp-Neg on VSD's pretrained branch; view interpolation
on both bridge stages; CFG on the plain prompt instead of the default target prompt)."""
STEPS = 4


def half_cases(fast_fp16=()):
    """pytest params (dtype, option) for every option in both half types; fp16 ones are ``slow`` except those
    named in ``fast_fp16``."""
    return [pytest.param(dtype, option, marks=() if dtype == "bf16" or option in fast_fp16 else pytest.mark.slow)
            for dtype in DTYPES for option in OPTIONS]


SLOW_FP16 = [pytest.param("bf16"), pytest.param("fp16", marks=pytest.mark.slow)]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def config_for(tmp_path, tiny_sd_dir, dtype, options, steps):
    return load_config(None, [*SMALL_3D, *options, f"prior.model={tiny_sd_dir}", f"prior.dtype={dtype}",
                              f"train.steps={steps}", f"log.runs_dir={tmp_path / 'runs'}"])


def run_in(folder, config, checkpoint=None):
    folder.mkdir(exist_ok=True)
    return train(config, folder, torch.device("cpu"), checkpoint=checkpoint, show_progress=False)


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_states_equal(expected, got, where=""):
    """Nested checkpoint parts (dicts, lists, tensors, numbers) equal, tensors bit for bit and of the same dtype."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and expected.dtype == got.dtype and torch.equal(expected, got), where
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys(), where
        for key in expected:
            assert_states_equal(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_states_equal(a, b, f"{where}[{i}]")
    else:
        assert expected == got, where


def test_the_prior_loads_half_weights_and_keeps_the_rest_float32(tiny_sd_dir):
    """What CUDA's fp16 does, on the CPU in both half types: UNet and VAE in the half type, CLIP in fp32; text
    embeddings, latents, noise predictions and the images' gradient in fp32; VSD's LoRA and camera embedding
    fp32 after the adapter is added to the half UNet."""
    for name, dtype in DTYPES.items():
        prior = load_prior(StableDiffusionSettings(model=str(tiny_sd_dir), dtype=name), "cpu")
        assert prior.dtype == dtype
        assert {p.dtype for p in prior.unet.parameters()} == {p.dtype for p in prior.vae.parameters()} == {dtype}
        assert {p.dtype for p in prior.text_encoder.parameters()} == {torch.float32}
        embeddings = prior.embed_prompts(["a red torus", ""])
        assert embeddings.dtype == torch.float32
        images = torch.rand(2, 3, 64, 64, requires_grad=True)
        latents = prior.encode_images(images)
        assert latents.dtype == torch.float32
        latents.sum().backward()
        assert images.grad.dtype == torch.float32 and torch.isfinite(images.grad).all()
        eps = prior.predict_noise(latents.detach(), torch.tensor([30, 800]), embeddings)
        assert eps.dtype == torch.float32 and torch.isfinite(eps).all()

        vsd = make_method("vsd", dict(), prior)
        assert {p.dtype for p in vsd.source.parameters()} == {torch.float32}
        base = [p for n, p in prior.unet.named_parameters() if ".lora_" not in n]
        assert {p.dtype for p in base} == {dtype}  # the adapter did not cast the UNet


@pytest.mark.parametrize("dtype, option", half_cases(fast_fp16=("vsd",)))
def test_train_in_half_precision_gives_finite_steps(tmp_path, tiny_sd_dir, dtype, option):
    run_dir = tmp_path / "run"
    result = run_in(run_dir, config_for(tmp_path, tiny_sd_dir, dtype, OPTIONS[option], STEPS))
    assert result.bad_steps == 0
    rows = rows_of(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        numbers = [v for k, v in row.items() if k.startswith("loss") or k == "grad_norm"]
        assert all(torch.isfinite(torch.tensor(v)) for v in numbers), row
        assert row["grad_norm"] > 0, row
    if "guidance.stage2_start_step=2" in OPTIONS[option]:
        assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    checkpoint = load_checkpoint(find_checkpoint(run_dir))
    field = checkpoint["field"]
    assert {v.dtype for v in field.values() if v.is_floating_point()} == {torch.float32}
    for state in checkpoint["optimizer"]["state"].values():  # AdamW's moments stayed fp32 and finite
        assert state["exp_avg"].dtype == torch.float32 and torch.isfinite(state["exp_avg_sq"]).all()
    if option in ("vsd", "bridge-vsd", "perp_neg"):
        lora = checkpoint["method"]["lora"]
        assert {v.dtype for v in lora.values()} == {torch.float32}
        assert any(torch.count_nonzero(v) for n, v in lora.items() if ".lora_B." in n)  # it trained


def resume_is_bit_exact(tmp_path, tiny_sd_dir, dtype, options):
    straight = run_in(tmp_path / "straight", config_for(tmp_path, tiny_sd_dir, dtype, options, STEPS))
    halves = tmp_path / "halves"
    run_in(halves, config_for(tmp_path, tiny_sd_dir, dtype, options, STEPS // 2))
    run_in(halves, config_for(tmp_path, tiny_sd_dir, dtype, options, STEPS),
           checkpoint=load_checkpoint(find_checkpoint(halves)))
    expected, got = load_checkpoint(find_checkpoint(straight.run_dir)), load_checkpoint(find_checkpoint(halves))
    assert got["step"] == STEPS
    for part in ("field", "background", "method", "optimizer", "rng"):
        if part in expected:
            assert_states_equal(expected[part], got[part], part)
    assert [r["loss"] for r in rows_of(straight.run_dir)] == [r["loss"] for r in rows_of(halves)]


@pytest.mark.parametrize("dtype", SLOW_FP16)
@pytest.mark.parametrize("option", ["bridge-vsd", "perp_neg"])
def test_resume_in_half_precision_is_bit_exact(tmp_path, tiny_sd_dir, dtype, option):
    """The LoRA (fp32 on a half UNet) and the bridge's stage two across the resume point."""
    resume_is_bit_exact(tmp_path, tiny_sd_dir, dtype, OPTIONS[option])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", [o for o in OPTIONS if o not in ("bridge-vsd", "perp_neg")])
def test_resume_in_half_precision_is_bit_exact_for_every_option(tmp_path, tiny_sd_dir, dtype, option):
    resume_is_bit_exact(tmp_path, tiny_sd_dir, dtype, OPTIONS[option])


@pytest.mark.parametrize("dtype", SLOW_FP16)
@pytest.mark.parametrize("method", ["sds", "bridge", "nfsd", "vsd", "bridge-vsd"])
def test_image_in_half_precision(tmp_path, tiny_sd_dir, capsys, dtype, method):
    prompt = tmp_path / "p.yaml"
    prompt.write_text("prompt: a red torus\n")
    out = tmp_path / "out"
    code, _, err = run_cli(["image", str(prompt), "--method", method, f"prior.model={tiny_sd_dir}",
                            f"prior.dtype={dtype}", "image.resolution=64", "image.steps=4", "image.stage2_start_step=2",
                            "image.video_every=0", "log.log_every=1", f"--out={out}", "--device", "cpu",
                            "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in rows), rows
    if method.startswith("bridge"):
        assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    assert (out / "seed-0.png").is_file()


def lora_gradients(prior, latents, cond, camera):
    """VSD's LoRA and camera-embedding gradients of one diffusion loss, with fixed non-zero LoRA weights (lora_B = 0
    would make lora_A's gradient exactly zero), t, noise and no condition dropout."""
    vsd = make_method("vsd", dict(lora_condition_dropout=0.0), prior)
    vsd.reset(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in sorted(vsd.source.lora):
            if ".lora_B." in name:
                p = vsd.source.lora[name]
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    vsd.source.diffusion_loss(latents, cond, camera, 0.0, torch.Generator().manual_seed(2)).backward()
    return {name: p.grad.clone() for name, p in zip(sorted(vsd.source.lora), vsd.source.parameters())}


def test_the_lora_gradients_of_an_fp16_unet_match_fp32s(tiny_sd_dir):
    """The LoRA's loss is scaled through an fp16 UNet: its gradients (fp32 weights) stay within 1% of the fp32
    UNet's in the median (measured 0.36%, worst 1.0%), where unscaled, the ~1e-4 per-element gradients partly
    underflow (1.4% in the median, 8% at worst here; 5.5% and 80% at 64x64 latents)."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    camera = orbit_cameras(CameraConfig(), 1).c2w.reshape(1, 16)
    grads = {}
    for name in ("fp32", "fp16"):
        prior = load_prior(StableDiffusionSettings(model=str(tiny_sd_dir), dtype=name), "cpu")
        cond = prior.embed_prompts(["a red torus"])
        grads[name] = lora_gradients(prior, latents, cond, camera)
    errors = sorted(float((grads["fp16"][n] - grads["fp32"][n]).norm() / grads["fp32"][n].norm().clamp_min(1e-30))
                    for n in grads["fp32"])
    assert errors[len(errors) // 2] < 0.01 and errors[-1] < 0.05, errors


def test_vsd_under_sequential_cpu_offload_trains_a_real_adapter(tiny_sd_dir):
    """accelerate's offload hooks keep the UNet's weights on the meta device between calls; peft would put the
    new LoRA there too (no values, a failing backward). The adapter is placed on the prior's device in fp32 and
    the offloaded UNet gives the same LoRA gradients as the plain one. (``prior.cpu_offload`` applies on CUDA; the
    CPU shows the same hooks with the CPU as the execution device.)"""
    from accelerate import cpu_offload

    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    camera = orbit_cameras(CameraConfig(), 1).c2w.reshape(1, 16)
    plain = load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu")
    offloaded = load_prior(StableDiffusionSettings(model=str(tiny_sd_dir)), "cpu")
    cpu_offload(offloaded.unet, execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in offloaded.unet.parameters())  # the hooks hold the weights elsewhere
    cond = plain.embed_prompts(["a red torus"])
    expected, got = lora_gradients(plain, latents, cond, camera), lora_gradients(offloaded, latents, cond, camera)
    lora = {n: p for n, p in offloaded.unet.named_parameters() if ".lora_" in n}
    assert lora and all(not p.is_meta and p.device.type == "cpu" and p.dtype == torch.float32 for p in lora.values())
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    assert any(torch.count_nonzero(g) for g in got.values())
