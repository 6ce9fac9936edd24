"""2D score distillation (`sdsbridge image`): outputs on the tiny random SD pipeline for every method,
determinism per seed, convergence towards the named shape on the reference prior, batch mode with
resume, and the seed / prompt-file parsers."""

import json

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sdsbridge.config.loader import load_config
from sdsbridge.common.errors import UserError
from sdsbridge.training.image2d import image_guidance_config, load_image_prior, optimise_image, parse_seeds, run_image
from sdsbridge.training.image_batch import read_prompts, run_image_batch
from sdsbridge.distill.methods import make_method
from sdsbridge.distill.prompts import PromptEmbeddings


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny workloads: far faster on one thread on a shared CPU


def sd_config(tiny_sd_dir, method, *overrides):
    return load_config(None, ["prompt=a red torus", f"method={method}", f"prior.model={tiny_sd_dir}",
                              "image.resolution=64", "image.steps=4", "image.stage2_start_step=2",
                              "image.video_every=2", "log.log_every=1", *overrides])


@pytest.fixture(scope="module")
def sd_prior(tiny_sd_dir):
    return load_image_prior(sd_config(tiny_sd_dir, "sds"), "cpu")


# --- Stable Diffusion (tiny random pipeline) ---------------------------------------------------------
@pytest.mark.parametrize("method", ["bridge", "sds", "nfsd", "vsd"])
def test_each_method_writes_png_video_metrics_config(tiny_sd_dir, sd_prior, tmp_path, method):
    config = sd_config(tiny_sd_dir, method)
    prior = None if method == "bridge" else sd_prior  # the bridge case also loads the prior itself
    result = run_image(config, tmp_path, "cpu", [0], progress=False, prior=prior)

    image = iio.imread(tmp_path / "seed-0.png")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert result.images == {0: tmp_path / "seed-0.png"} and result.grid == tmp_path / "grid.png"
    assert np.array_equal(iio.imread(result.grid), image)  # one seed: the grid is its image
    reader = imageio_v2.get_reader(result.videos[0], format="FFMPEG")
    assert reader.count_frames() == 1 + 4 // 2  # the initial image, then every video_every steps
    frame = reader.get_data(0)
    assert frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0 and min(frame.shape[:2]) >= 64
    reader.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(4))
    assert all({"seed", "step", "loss", "grad_norm", "t", "stage"} <= set(r) for r in rows)
    assert all(20 <= r["t"] <= 980 and np.isfinite(r["loss"]) for r in rows)
    expected_stages = [1, 1, 2, 2] if method == "bridge" else [1] * 4
    assert [r["stage"] for r in rows] == expected_stages
    assert load_config(tmp_path / "config.yaml").method == method
    assert result.steps == 4 and result.ms_per_step > 0
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_same_seed_same_image_and_grid(tiny_sd_dir, sd_prior, tmp_path):
    config = sd_config(tiny_sd_dir, "bridge", "image.steps=3", "image.stage2_start_step=2", "image.video_every=0")
    both = run_image(config, tmp_path / "a", "cpu", [0, 1], progress=False, prior=sd_prior)
    alone = run_image(config, tmp_path / "b", "cpu", [1], progress=False, prior=sd_prior)
    seed0, seed1 = iio.imread(both.images[0]), iio.imread(both.images[1])
    assert np.array_equal(seed1, iio.imread(alone.images[1]))  # independent of the other seeds run
    assert not np.array_equal(seed0, seed1)
    assert np.array_equal(iio.imread(both.grid), np.concatenate([seed0, seed1], axis=1))
    assert both.videos == {} and not list((tmp_path / "a").glob("*.mp4"))


def test_vsd_seeds_are_independent_a_fresh_lora_each(tiny_sd_dir, sd_prior, tmp_path):
    """The LoRA is re-initialised from each seed: seed 1 after seed 0 gives the image seed 1 gives alone."""
    config = sd_config(tiny_sd_dir, "vsd", "image.steps=3", "image.video_every=0", "image.lora_lr=0.05")
    both = run_image(config, tmp_path / "a", "cpu", [0, 1], progress=False, prior=sd_prior)
    alone = run_image(config, tmp_path / "b", "cpu", [1], progress=False, prior=sd_prior)
    assert np.array_equal(iio.imread(both.images[1]), iio.imread(alone.images[1]))
    assert not np.array_equal(iio.imread(both.images[0]), iio.imread(both.images[1]))


def test_resolution_must_fit_the_latent_factor(tiny_sd_dir, sd_prior, tmp_path):
    config = sd_config(tiny_sd_dir, "sds", "image.resolution=63")
    with pytest.raises(UserError, match="image.resolution"):
        run_image(config, tmp_path, "cpu", [0], progress=False, prior=sd_prior)


# --- reference prior: the image approaches the named shape ------------------------------------------
REF_STEPS = 80


def ref_config(method, *overrides):
    return load_config(None, ["prompt=a red torus", f"method={method}", "prior.kind=reference",
                              "prior.views_per_label=25", "image.resolution=16", f"image.steps={REF_STEPS}",
                              f"image.stage2_start_step={REF_STEPS // 2}", "image.lr=0.1",
                              f"image.video_every={REF_STEPS // 8}", *overrides])


@pytest.fixture(scope="module")
def ref_prior():
    return load_image_prior(ref_config("sds"), "cpu")


def nearest_distance(frames, references):
    """RMS distance (in [0, 1] units) of each [H, W, 3] uint8 frame to its nearest reference image."""
    flat = references.reshape(references.shape[0], -1)
    out = []
    for frame in frames:
        x = torch.from_numpy(frame).permute(2, 0, 1).float().reshape(1, -1) / 255.0
        out.append(float(((flat - x) ** 2).mean(1).min().sqrt()))
    return np.array(out)


@pytest.mark.parametrize("method", ["sds", "bridge"])
def test_reference_prior_image_approaches_the_shape(ref_prior, method):
    config = ref_config(method)
    distiller = make_method(method, image_guidance_config(config), ref_prior)
    embeddings = PromptEmbeddings(ref_prior, distiller.role_texts(config.prompt), view_dependent=False)
    torus = ref_prior.clean_renders("torus")
    for seed in (0, 1):
        trace = optimise_image(distiller, embeddings, config, seed, progress=False)
        d = nearest_distance(trace.frames + [trace.image], torus)  # frames at steps 0, 10, ..., 80
        assert d[0] > 0.45  # N(0, I) init: far from every torus render
        assert np.all(np.diff(d[:5]) < 0)  # stage one / SDS: steadily closer
        assert d[4] < 0.75 * d[0]
        assert d[-1] < 0.7 * d[0]
        if method == "sds":
            assert np.all(np.diff(d[:-1]) < 0) and d[-1] < 0.5 * d[0]
        # (the bridge's stage two with t up to 0.98 T drifts on this prior, see README; not asserted)
        assert d[-1] < nearest_distance([trace.image], ref_prior.clean_renders("box"))[0]


# --- batch mode --------------------------------------------------------------------------------------
def batch_config(*overrides):
    return load_config(None, ["method=sds", "prior.kind=reference", "prior.views_per_label=4",
                              "image.resolution=8", "image.steps=4", "image.video_every=2", "log.log_every=1", *overrides],
                       require_prompt=False)


def test_batch_makes_skips_and_redoes_half_done(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red torus\n\n   \na blue box\n")
    out = tmp_path / "out"
    items = run_image_batch(batch_config(), prompts, out, "cpu", [0, 1], progress=False)
    assert [i.status for i in items] == ["done", "done"]
    assert [i.out_dir.name for i in items] == ["0000-a-red-torus", "0001-a-blue-box"]
    for item in items:
        assert {p.name for p in item.out_dir.iterdir()} == {
            "config.yaml", "metrics.jsonl", "grid.png", "seed-0.png", "seed-1.png", "seed-0.mp4", "seed-1.mp4"}
    assert "2 made, 0 skipped" in capsys.readouterr().out
    torus_dir, box_dir = items[0].out_dir, items[1].out_dir
    box_image = iio.imread(box_dir / "seed-1.png")
    box_mtime = (box_dir / "seed-1.png").stat().st_mtime_ns
    torus_mtime = (torus_dir / "grid.png").stat().st_mtime_ns

    again = run_image_batch(batch_config(), prompts, out, "cpu", [0, 1], progress=False)
    assert [i.status for i in again] == ["skipped", "skipped"]
    assert "0 made, 2 skipped" in capsys.readouterr().out
    # settings that do not change the images (device, log.*) do not make a folder "different"
    quiet = run_image_batch(batch_config("device=cpu", "log.log_every=7"), prompts, out, "cpu", [0, 1], progress=False)
    assert [i.status for i in quiet] == ["skipped", "skipped"]

    # a half-finished prompt: seed 1 has no final PNG (its metrics and video may exist) -> only it is redone
    (box_dir / "seed-1.png").unlink()
    seed0_mtime = (box_dir / "seed-0.png").stat().st_mtime_ns
    third = run_image_batch(batch_config(), prompts, out, "cpu", [0, 1], progress=False)
    assert [i.status for i in third] == ["skipped", "done"]
    assert third[1].result.optimised == [1]
    assert (box_dir / "seed-0.png").stat().st_mtime_ns == seed0_mtime
    assert (torus_dir / "grid.png").stat().st_mtime_ns == torus_mtime
    assert (box_dir / "seed-1.png").stat().st_mtime_ns != box_mtime
    assert np.array_equal(iio.imread(box_dir / "seed-1.png"), box_image)  # deterministic redo
    rows = [json.loads(line) for line in (box_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["seed"], r["step"]) for r in rows) == [(s, k) for s in (0, 1) for k in range(4)]

    with pytest.raises(UserError, match="different settings"):
        run_image_batch(batch_config("image.steps=5"), prompts, out, "cpu", [0, 1], progress=False)


def test_batch_reports_rejected_prompts_and_goes_on(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple giraffe\na red torus\n")
    items = run_image_batch(batch_config(), prompts, tmp_path / "out", "cpu", [3], progress=False)
    assert [i.status for i in items] == ["failed", "done"]
    assert "names no built-in shape" in items[0].error and not items[0].out_dir.exists()
    assert (items[1].out_dir / "seed-3.png").is_file() and (items[1].out_dir / "grid.png").is_file()
    out = capsys.readouterr().out
    assert "1 made, 0 skipped (already done), 1 failed" in out and "a purple giraffe" in out


# --- parsers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, seeds", [
    ("3", [3]), ("0-7", list(range(8))), ("0,2,5", [0, 2, 5]), (" 0-2, 9 ", [0, 1, 2, 9]), ("4-4", [4]),
])
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec, message", [
    ("", "expected a seed"), ("a", "expected a seed"), ("-1", "expected a seed"), ("1,,2", "expected a seed"),
    ("1.5", "expected a seed"), ("7-0", "backwards"), ("0-3,2", "named twice"), ("0-100000000", "too many"),
])
def test_parse_seeds_errors(spec, message):
    with pytest.raises(UserError, match=message) as info:
        parse_seeds(spec)
    assert "\n" not in str(info.value)


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n a DSLR photo of a dog \n  # indented comment\nan owl, 4k\n")
    assert read_prompts(path) == ["a DSLR photo of a dog", "an owl, 4k"]
    path.write_text("# only comments\n\n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
