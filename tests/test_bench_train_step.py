"""scripts/bench_train_step.py on the CPU with the tiny random pipeline: a table with finite numbers."""

import json
import math

import pytest

from scripts_loader import load_script

SMALL_SCENE = ["scene.n_levels=4", "scene.log2_hashmap_size=12", "scene.base_resolution=8", "scene.mlp_width=16",
               "render.sampler=stratified", "render.num_samples=16"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_train_step")


def check_report(printed: str, rows: list[dict], resolutions: list[int], steps: int) -> None:
    """The printed table and the JSON rows: one 3D case per resolution and the 2D case, finite numbers."""
    table = [line for line in printed.splitlines() if line.startswith(("3D ", "2D "))]
    cases = len(resolutions) + 1
    assert len(table) == 2 * cases  # the table, then the breakdown
    for line, r in zip(table, resolutions):
        assert line.split()[:2] == ["3D", f"{r}x{r}"]
    assert table[cases - 1].split()[:2] == ["2D", "latent"]
    for line in table:
        numbers = [float(x) for x in line.split()[2:] if x.replace(".", "").replace("-", "").isdigit()]
        assert len(numbers) >= 3 and all(math.isfinite(x) for x in numbers)

    assert [r["case"] for r in rows] == ["3D"] * len(resolutions) + ["2D"]
    for row in rows:
        assert len(row["ms"]) == steps and all(ms > 0 and math.isfinite(ms) for ms in row["ms"])
        assert row["peak_bytes"] > 0
        sections = row["sections"][0]
        assert sections["unet"] > 0 and sections["backward"] > 0
        assert abs(sum(v for k, v in sections.items() if k != "total") - sections["total"]) < 1e-6
    assert rows[0]["sections"][0]["render"] > 0 and rows[0]["sections"][0]["vae encode"] > 0
    assert rows[0]["samples_per_ray"] == 16  # stratified, render.num_samples


def test_bench_prints_a_table_with_finite_numbers(bench, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--model", str(tiny_sd_dir), "--device", "cpu", "--steps", "1", "--warmup", "0",
            "--resolutions", "16", "--json", str(out), "--set", *SMALL_SCENE]
    assert bench.main(argv) == 0
    check_report(capsys.readouterr().out, json.loads(out.read_text())["rows"], [16], steps=1)


@pytest.mark.slow
def test_bench_default_model_options_and_two_resolutions(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--resolutions", "16,32", "--attention", "default",
            "--method", "bridge", "--channels-last", "--json", str(out), "--set", *SMALL_SCENE]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "model tiny random pipeline" in printed and "method bridge" in printed
    check_report(printed, json.loads(out.read_text())["rows"], [16, 32], steps=2)


def test_bench_rejects_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--resolutions", "64,abc"])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])


def test_bench_times_the_vsd_step_with_its_lora_calls(bench, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--model", str(tiny_sd_dir), "--device", "cpu", "--steps", "1", "--warmup", "0", "--resolutions", "16",
            "--method", "vsd", "--json", str(out), "--set", *SMALL_SCENE]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "method vsd" in printed and "lora unet" in printed
    rows = json.loads(out.read_text())["rows"]
    check_report(printed, rows, [16], steps=1)
    assert all(row["sections"][0]["lora unet"] > 0 for row in rows)  # 3D and 2D both train the LoRA


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_one_vsd_step_with_full_size_sd21_base_in_fp16(bench, tmp_path, capsys):
    """The full-size SD-2.1-base architecture (random weights, fp16): one VSD step at 64 px renders fits and
    is finite; the benchmark prints its time and peak memory."""
    import torch

    from sdsbridge.testing.random_sd import build_random_pipeline

    model = build_random_pipeline(tmp_path / "sd21", arch="sd21-base", seed=0, dtype=torch.float16)
    out = tmp_path / "bench.json"
    argv = ["--model", str(model), "--device", "cuda", "--dtype", "fp16", "--steps", "1", "--warmup", "1",
            "--resolutions", "64", "--method", "vsd", "--json", str(out), "--set", "render.sampler=stratified",
            "render.num_samples=16"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    print(printed)
    rows = json.loads(out.read_text())["rows"]
    check_report(printed, rows, [64], steps=1)
    assert all(row["sections"][0]["lora unet"] > 0 for row in rows)
