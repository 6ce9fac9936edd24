"""Textured mesh export: UV rasteriser, dilation, baked colours equal the field's at surface points, the files
(glb with a PBR base-colour texture, obj + mtl + png) reload, and the CLI's --texture."""

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from torch import nn

from cli_helpers import ROOT, run_cli, temp_files, train_tiny_run
from sdsbridge.common.errors import UserError
from sdsbridge.outputs.export.mesh import extract_mesh
from sdsbridge.outputs.export.texture import bake_texture, dilate, rasterize_uv, save_textured

TOLERANCE = 0.02
"""Largest colour error (in [0, 1]) between a texel and the field at 99% of sampled surface points: the
texel holds the colour at its centre, up to half a texel (~0.003 scene units at 256 texels) away."""


class PaintedBall(nn.Module):
    """A solid ball of radius 0.5 (density level 5 on its surface) whose colour varies smoothly with position,
    so a texel at the wrong surface point shows up."""

    device = torch.device("cpu")  # the scene contract's queries: density, colour, device

    def colour(self, x):
        return self(x)[1]

    def density(self, x):
        return (100.0 * (0.05 - (x.norm(dim=-1) - 0.5))).clamp_min(0.0)

    def forward(self, x):
        return self.density(x), painted(x)


def painted(x):
    """[N, 3] points -> [N, 3] colours in [0, 1]: one smooth wave per channel."""
    return 0.5 + 0.45 * torch.sin(torch.stack([3.0 * x[:, 0] + 1.0, 4.0 * x[:, 1], 2.0 * x[:, 2] - 3.0 * x[:, 0]], -1))


def surface_samples(mesh, n, seed=0):
    """n random points on the textured mesh's faces: (3D points [n, 3], uv [n, 2])."""
    rng = np.random.default_rng(seed)
    face = rng.integers(0, mesh.faces.shape[0], n)
    bary = rng.dirichlet([2.0, 2.0, 2.0], n)[..., None]
    return (bary * mesh.vertices[mesh.faces[face]]).sum(1), (bary * mesh.uv[mesh.faces[face]]).sum(1)


def texel_lookup(texture, uv):
    """Nearest texel of [n, 2] uv (v up, row 0 at v = 1) in an [S, S, 3] uint8 texture -> [n, 3] in [0, 1]."""
    size = texture.shape[0]
    col = np.clip(np.floor(uv[:, 0] * size), 0, size - 1).astype(int)
    row = np.clip(np.floor((1.0 - uv[:, 1]) * size), 0, size - 1).astype(int)
    return texture[row, col].astype(np.float64) / 255.0


@pytest.fixture(scope="module")
def baked():
    mesh = extract_mesh(PaintedBall(), 1.0, 48)
    return bake_texture(PaintedBall(), mesh.vertices, mesh.faces, 256)


def test_baked_texture_matches_the_field_at_surface_points(baked):
    points, uv = surface_samples(baked, 4000)
    expected = painted(torch.from_numpy(points).float()).numpy()
    error = np.abs(texel_lookup(baked.texture, uv) - expected).max(axis=1)
    assert np.percentile(error, 99) < TOLERANCE, np.percentile(error, [50, 90, 99, 100])
    assert np.median(error) < 0.006
    assert 0.2 < baked.coverage < 1.0 and baked.texture.shape == (256, 256, 3)


def test_seam_texels_are_dilated_so_bilinear_reads_stay_on_the_chart(baked):
    """Texels next to a chart (the four a bilinear read at a surface point touches) hold the chart's colours,
    not the empty atlas's."""
    points, uv = surface_samples(baked, 4000, seed=1)
    size = baked.texture.shape[0]
    x, y = uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5
    c0, r0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - c0)[:, None], (y - r0)[:, None]
    tex = baked.texture.astype(np.float64) / 255.0
    at = lambda r, c: tex[np.clip(r, 0, size - 1), np.clip(c, 0, size - 1)]  # noqa: E731
    bilinear = ((1 - fy) * ((1 - fx) * at(r0, c0) + fx * at(r0, c0 + 1))
                + fy * ((1 - fx) * at(r0 + 1, c0) + fx * at(r0 + 1, c0 + 1)))
    expected = painted(torch.from_numpy(points).float()).numpy()
    assert np.percentile(np.abs(bilinear - expected).max(axis=1), 99) < 2 * TOLERANCE


def test_rasterizer_covers_each_texel_centre_once_with_exact_barycentrics():
    # two triangles splitting the unit square along its diagonal: every texel centre is inside exactly one
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    face, bary = rasterize_uv(uv, faces, 8)
    assert (face >= 0).all()
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    centre = torch.stack([(cols + 0.5) / 8, 1.0 - (rows + 0.5) / 8], -1)  # [8, 8, 2] uv of each texel centre
    rebuilt = (bary[..., None] * uv[faces[face]]).sum(-2)
    assert torch.allclose(rebuilt, centre, atol=1e-6) and torch.allclose(bary.sum(-1), torch.ones(8, 8))


def test_dilate_grows_charts_and_fills_the_rest():
    image = torch.zeros(9, 9, 3)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    image[4, 4], mask[4, 4] = torch.tensor([1.0, 0.5, 0.0]), True
    out = dilate(image, mask, 2)
    assert torch.allclose(out[2:7, 2:7], torch.tensor([1.0, 0.5, 0.0]).expand(5, 5, 3))
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 0.5, 0.0]))  # beyond the rings: the mean colour


def test_bad_texture_size_is_a_user_error():
    with pytest.raises(UserError, match="texture size"):
        bake_texture(PaintedBall(), np.zeros((3, 3), np.float32), np.array([[0, 1, 2]]), 8)


def glb_json(path):
    """The JSON chunk of a .glb file."""
    data = Path(path).read_bytes()
    magic, _, _ = struct.unpack("<4sII", data[:12])
    length, kind = struct.unpack("<I4s", data[12:20])
    assert magic == b"glTF" and kind == b"JSON"
    return json.loads(data[20:20 + length])


def test_files_reload_with_their_texture(baked, tmp_path):
    paths = save_textured(baked, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.png"]
    assert paths[0].name == "mesh.glb" and not temp_files(tmp_path)
    gltf = glb_json(paths[0])
    material = gltf["materials"][0]["pbrMetallicRoughness"]
    assert "baseColorTexture" in material and gltf["images"][0]["mimeType"] == "image/png"
    assert "TEXCOORD_0" in gltf["meshes"][0]["primitives"][0]["attributes"]
    scene = trimesh.load(paths[0], force="mesh", process=False)
    image = np.asarray(scene.visual.material.baseColorTexture.convert("RGB"))
    assert np.array_equal(image, baked.texture)
    assert np.allclose(scene.visual.uv, baked.uv, atol=1e-6)  # trimesh undoes glTF's flipped v
    obj = trimesh.load(tmp_path / "mesh.obj", force="mesh", process=False)
    assert len(obj.faces) == len(baked.faces) and np.allclose(obj.visual.uv, baked.uv, atol=1e-5)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "mesh.png").convert("RGB")), baked.texture)


def _gltf_validator():
    """A command that runs the Khronos glTF validator (npm package gltf-validator) on a .glb, or None."""
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run([node, "-e", "require('gltf-validator')"], capture_output=True)
    return [node, str(ROOT / "tests" / "data" / "validate_gltf.js")] if probe.returncode == 0 else None


def test_textured_glb_passes_the_khronos_gltf_validator(baked, tmp_path):
    command = _gltf_validator()
    if command is None:
        pytest.skip("needs node and the npm package gltf-validator on NODE_PATH (.ci/run installs them)")
    glb = save_textured(baked, tmp_path)[0]
    result = subprocess.run([*command, str(glb)], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["errors"] == 0 and report["warnings"] == 0, result.stdout


def test_train_exports_a_textured_mesh_when_asked(tmp_path):
    run = train_tiny_run(tmp_path, "train.steps=2", "export.mesh=true", "export.texture=true", "export.texture_size=32")
    stem = "mesh-step0000002-textured"
    assert sorted(p.name for p in (run / "mesh").iterdir()) == [f"{stem}.{ext}" for ext in ("glb", "mtl", "obj", "png")]


def test_cli_export_texture_on_a_trained_run(tmp_path, capsys):
    run = train_tiny_run(tmp_path, "train.steps=4")
    capsys.readouterr()
    code, out, err = run_cli(["export", run, "--texture", "--texture-size", "64", "--device", "cpu"], capsys)
    assert code == 0, err
    stem = "mesh-step0000004-textured-tex64"  # named by the step and the settings that differ from the run's
    assert out.strip() == f"mesh: {run / 'mesh' / (stem + '.glb')}"
    assert sorted(p.name for p in (run / "mesh").iterdir()) == [f"{stem}.{ext}" for ext in ("glb", "mtl", "obj", "png")]
    assert Image.open(run / "mesh" / f"{stem}.png").size == (64, 64)
    code, _, err = run_cli(["export", run, "--texture", "--format", "ply"], capsys)
    assert code == 2 and "--format ply" in err
    code, _, err = run_cli(["export", run, "--texture", "--texture-size", "8"], capsys)
    assert code == 2 and "--texture-size" in err
