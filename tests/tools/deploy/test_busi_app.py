"""The CFFormer MONAI Deploy app on a generated ultrasound image (PNG and DICOM), against the bundle's own
inference on the same image with the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bundles.conftest import infer
from tests.tools.deploy.conftest import bf16_app_env, deploy_python, export_tiny_bundle, run_app, write_us_image

pytestmark = pytest.mark.slow

# CPU-sized CFFormer-s at 64 px, fp32: the same masks on every CPU (bf16 runs only where the CPU has it, below).
TINY = {"variant": "s", "image_size": [64, 64], "amp": False, "write_overlays": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One generated 80 x 96 image (not square, so a transposed axis shows) as PNG and as DICOM US; one tiny
    exported network; the app's outputs for both inputs and the bundle's for the PNG."""
    from hybridseg.tools.synth_busi import make_busi_image

    deploy_python()
    work = tmp_path_factory.mktemp("busi_deploy")
    gray, _ = make_busi_image(np.random.default_rng(1), 80, 96, "benign", 1)
    (work / "png").mkdir()
    Image.fromarray(gray).save(work / "png" / "case1.png")
    series_uid = write_us_image(work / "dicom" / "case1.dcm", gray)
    exported = export_tiny_bundle("cfformer_busi", work / "bundle", TINY)
    outs = {}
    for kind in ("png", "dicom", "onnxruntime"):
        outs[kind] = work / f"app_{kind}"
        outs[kind].mkdir()
        backend = {"HYBRIDSEG_BACKEND": kind} if kind == "onnxruntime" else {}
        folder = work / ("png" if kind == "onnxruntime" else kind)
        run_app("hybridseg.tools.deploy.busi_app", folder, exported["ts"], outs[kind], env=backend)
    infer("cfformer_busi", work / "png", work / "bundle_out", exported["ckpt"], **TINY)
    bundle_mask = np.asarray(Image.open(work / "bundle_out" / "case1_mask.png"))
    onnx = sorted(p.name for p in exported["ts"].parent.glob("*.onnx"))
    return {"gray": gray, "series": series_uid, "app": outs, "bundle_mask": bundle_mask, "onnx": onnx}


def test_png_input_gives_a_mask_png_at_input_size_equal_to_the_bundle_inference(run):
    mask = np.asarray(Image.open(run["app"]["png"] / "case1_mask.png"))
    assert mask.shape == run["gray"].shape
    assert set(np.unique(mask)) <= {0, 255}
    assert 0 < (run["bundle_mask"] > 0).mean() < 1, "degenerate check: the bundle's mask is uniform"
    np.testing.assert_array_equal(mask, run["bundle_mask"])


def test_onnxruntime_backend_runs_a_scripted_export_and_agrees_with_the_bundle_inference(run):
    """HYBRIDSEG_BACKEND=onnxruntime on the default (scripted) export: the app rebuilds the network from the
    embedded config with the file's weights, exports it once (cached beside the model) and gives the bundle's
    fp32 torch mask (ONNX Runtime's fp32 kernels may flip a boundary pixel: at most 0.5 % may differ)."""
    mask = np.asarray(Image.open(run["app"]["onnxruntime"] / "case1_mask.png"))
    assert mask.shape == run["gray"].shape and len(run["onnx"]) == 1, run["onnx"]
    assert (mask == run["bundle_mask"]).mean() >= 0.995


def test_dicom_input_gives_the_same_mask_png_and_a_dicom_seg_of_it(run):
    import highdicom as hd

    out = run["app"]["dicom"]
    mask = np.asarray(Image.open(out / f"{run['series']}_mask.png"))
    np.testing.assert_array_equal(mask, run["bundle_mask"])
    files = list(out.glob("*.dcm"))
    assert len(files) == 1, f"expected one DICOM SEG, found {files}"
    seg = hd.seg.segread(files[0])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    assert {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence} == {run["series"]}
    frame = seg.pixel_array if seg.pixel_array.ndim == 2 else seg.pixel_array[0]
    np.testing.assert_array_equal(frame > 0, mask > 0)


def test_an_input_folder_without_dicom_or_images_fails_naming_the_folder(tmp_path):
    import subprocess

    from tests.tools.deploy.conftest import deploy_python

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [str(deploy_python()), "-m", "hybridseg.tools.deploy.busi_app"]
    cmd += ["-i", str(empty), "-m", str(empty / "notes.txt"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{empty}: folder contains no DICOM files and no images" in proc.stderr
    assert not any(out.iterdir())


def _amp_export(work) -> tuple[np.ndarray, dict]:
    """The fixture's generated image as ``work/png/case1.png`` and a tiny export whose config keeps ``amp`` on."""
    from hybridseg.tools.synth_busi import make_busi_image

    gray, _ = make_busi_image(np.random.default_rng(1), 80, 96, "benign", 1)
    (work / "png").mkdir()
    Image.fromarray(gray).save(work / "png" / "case1.png")
    (work / "app").mkdir()
    return gray, export_tiny_bundle("cfformer_busi", work / "bundle", {**TINY, "amp": True})


def test_mixed_precision_app_gives_the_bundles_mixed_precision_mask_bit_for_bit(tmp_path):
    """An export whose config keeps ``amp`` on: the app runs the eager network rebuilt from the embedded config
    (weights cast to bf16 once), so its mask is the bundle's bf16 inference mask exactly; the TorchScript module
    under autocast rounds differently (0.14 % of this image's pixels flip with random weights)."""
    env = bf16_app_env()
    _, exported = _amp_export(tmp_path)
    run_app("hybridseg.tools.deploy.busi_app", tmp_path / "png", exported["ts"], tmp_path / "app", env=env)
    infer("cfformer_busi", tmp_path / "png", tmp_path / "bundle_out", exported["ckpt"], **{**TINY, "amp": True})
    mask = np.asarray(Image.open(tmp_path / "app" / "case1_mask.png"))
    bundle_mask = np.asarray(Image.open(tmp_path / "bundle_out" / "case1_mask.png"))
    assert 0 < (bundle_mask > 0).mean() < 1, "degenerate check: the bundle's mask is uniform"
    np.testing.assert_array_equal(mask, bundle_mask)


def test_mixed_precision_app_runs_the_torchscript_module_when_its_config_cannot_rebuild_the_network(tmp_path):
    """An export whose embedded config no longer builds ``network_def``: under ``amp`` the app says why in its
    log and runs the TorchScript module under autocast, as it did before it ran the eager network."""
    env = bf16_app_env()
    gray, exported = _amp_export(tmp_path)
    extra = {"inference.json": "", "metadata.json": ""}
    module = torch.jit.load(str(exported["ts"]), _extra_files=extra)
    config = json.loads(extra["inference.json"])
    config["network_def"] = "$hybridseg.bundle.select_network(@network_defs, 'renamed')"
    extra["inference.json"] = json.dumps(config)
    torch.jit.save(module, str(exported["ts"]), _extra_files=extra)
    proc = run_app("hybridseg.tools.deploy.busi_app", tmp_path / "png", exported["ts"], tmp_path / "app", env=env)
    log = proc.stdout + proc.stderr
    assert f"{exported['ts']}: cannot rebuild the network from its embedded inference config" in log, log[-3000:]
    mask = np.asarray(Image.open(tmp_path / "app" / "case1_mask.png"))
    assert mask.shape == gray.shape and set(np.unique(mask)) <= {0, 255}
