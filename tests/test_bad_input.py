"""Bad input where data enters: property-based tests of the readers (hypothesis), corrupt DICOM, and the
gaps the reader/datalist/bundle tests leave (NaN voxels at datalist time; broken files met by training
and evaluation). Every failure must be an InputDataError naming the file, never a crash deep inside.

Inventory of the other bad-input tests: tests/data/test_busi.py (corrupt/truncated PNG, masks with bad
values or sizes, missing/empty folders, duplicates), tests/data/test_synapse.py (corrupt/truncated NIfTI,
not 3D, label shape/affine/ids, empty folders), tests/tools/test_transunet.py (corrupt npz/h5, label ids,
range), tests/test_transforms.py (2D where 3D is expected, NaN HU, label ids), the bundle tests
(inference: unreadable PNG, empty folder, 3D NIfTI where 2D is expected, 2D/NaN volumes; DICOM series).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from hybridseg.image_io import read_2d, read_volume
from hybridseg.io import InputDataError

# file names a user might have: spaces, accents, non-Latin scripts (kept short for every file system)
NAMES = st.sampled_from(["scan", "my scan", "Bild-ä", "图像 1", "ecografía", "x"])
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _voxels(lo: float, hi: float) -> st.SearchStrategy:
    """Mostly finite float32 values, sometimes NaN or +-inf."""
    bad = st.sampled_from([np.nan, np.inf, -np.inf])
    return st.one_of(st.floats(lo, hi, width=32), st.floats(lo, hi, width=32), bad)


def _fresh(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "case dir é"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d / name


@PROPS
@given(img=arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12))), rgb=st.booleans(), name=NAMES)
def test_any_valid_8bit_png_reads_back_as_its_gray_values(tmp_path, img, rgb, name):
    path = _fresh(tmp_path, f"{name}.png")
    Image.fromarray(np.stack([img] * 3, -1) if rgb else img).save(path)
    arr, affine = read_2d(path)
    assert arr.dtype == np.float32 and np.array_equal(arr, img.astype(np.float32))
    assert np.array_equal(affine, np.eye(4))


@PROPS
@given(img=arrays(np.uint8, st.tuples(st.integers(2, 12), st.integers(2, 12))), cut=st.floats(0.0, 0.95), name=NAMES)
def test_any_truncated_png_is_refused_naming_the_file(tmp_path, img, cut, name):
    path = _fresh(tmp_path, f"{name}.png")
    Image.fromarray(img).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputDataError) as info:
        read_2d(path)
    assert info.value.path == str(path)


@PROPS
@given(
    arr=arrays(np.float32, st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), elements=_voxels(-1e4, 1e4)),
    name=NAMES,
)
def test_nifti_2d_reader_accepts_exactly_finite_2d_images(tmp_path, arr, name):
    """Valid: 2D after dropping singleton axes and all finite. Anything else: an error naming the file."""
    path = _fresh(tmp_path, f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    squeezed = arr.reshape([s for s in arr.shape if s != 1]) if arr.ndim > 2 else arr
    if squeezed.ndim == 2 and np.isfinite(arr).all():
        out, _ = read_2d(path)
        assert np.array_equal(out, squeezed)
    else:
        with pytest.raises(InputDataError) as info:
            read_2d(path)
        assert info.value.path == str(path)
        assert "2D image" in info.value.problem or "NaN" in info.value.problem


@PROPS
@given(
    arr=arrays(
        np.float32, st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple), elements=_voxels(-2000, 3000)
    ),
    truncate=st.booleans(),
    name=NAMES,
)
def test_volume_reader_accepts_exactly_finite_3d_volumes(tmp_path, arr, truncate, name):
    path = _fresh(tmp_path, f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    if truncate:
        path.write_bytes(path.read_bytes()[:-9])
    squeezed = arr[..., 0] if arr.ndim == 4 and arr.shape[-1] == 1 else arr
    if not truncate and squeezed.ndim == 3 and np.isfinite(arr).all():
        out, affine = read_volume(path)
        assert np.array_equal(out, squeezed) and affine[2, 2] == pytest.approx(2.5)
    else:
        with pytest.raises(InputDataError) as info:
            read_volume(path)
        assert info.value.path == str(path)


@PROPS
@given(data=st.binary(min_size=0, max_size=400), suffix=st.sampled_from([".png", ".nii", ".nii.gz"]))
def test_random_bytes_are_never_a_crash_only_an_error_naming_the_file(tmp_path, data, suffix):
    path = _fresh(tmp_path, "junk" + suffix)
    path.write_bytes(data)
    with pytest.raises(InputDataError) as info:
        read_2d(path)
    assert info.value.path == str(path)


@pytest.mark.slow
def test_a_corrupt_dicom_series_is_refused_naming_the_folder(tmp_path):
    series = tmp_path / "séries 1"
    series.mkdir()
    for i in range(3):
        (series / f"slice{i}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20)
    with pytest.raises(InputDataError, match="unreadable volume") as info:
        read_volume(series)
    assert info.value.path == str(series)


def test_datalist_builder_refuses_a_ct_volume_with_nan_voxels(tmp_path):
    from hybridseg.data.synapse import datalist_synapse
    from hybridseg.tools.synth_synapse import synth_synapse

    root = tmp_path / "Training"
    synth_synapse(out=str(root), n=2, shape=(32, 32, 8), seed=0)
    img_path = sorted((root / "img").glob("*.nii.gz"))[0]
    img = nib.load(str(img_path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(img_path))
    with pytest.raises(InputDataError, match="NaN") as info:
        datalist_synapse(root=str(root), out=str(tmp_path / "datalist.json"), seed=0, num_val=0)
    assert info.value.path == str(img_path)
    assert not (tmp_path / "datalist.json").exists()


def test_a_datalist_entry_broken_after_the_datalist_was_built_stops_training_naming_it(tmp_path):
    """The datalist was fine when written; a file then got truncated (a failed copy): training names it."""
    from hybridseg.data.busi import datalist_busi
    from hybridseg.tools.synth_busi import synth_busi
    from tests.bundles.conftest import workflow_error
    from tests.bundles.test_cfformer_busi import FILES, TINY

    root = tmp_path / "BUSI ünïcode"
    synth_busi(out=str(root), n=8, size=64, seed=0)
    datalist_busi(root=str(root), out=str(root / "datalist.json"), seed=0)
    entry = json.loads((root / "datalist.json").read_text())["training"][0]
    broken = root / entry["image"]
    broken.write_bytes(broken.read_bytes()[:60])
    text = workflow_error(
        FILES["train"],
        FILES["meta_file"],
        FILES["logging_file"],
        dataset_dir=str(root),
        ckpt_dir=str(tmp_path / "m"),
        output_dir=str(tmp_path / "e"),
        **TINY,
    )
    assert str(broken) in text and "unreadable or corrupt image file" in text
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir()), "a checkpoint was written"


def test_jpeg_and_tiff_inputs_read_as_gray_while_busi_stays_png_only(tmp_path):
    from hybridseg.data.busi import read_busi_image

    img = np.full((6, 9, 3), 120, np.uint8)
    for suffix in (".jpg", ".tif", ".bmp"):
        Image.fromarray(img).save(tmp_path / f"x{suffix}")
        arr, _ = read_2d(tmp_path / f"x{suffix}")
        assert arr.shape == (6, 9) and abs(float(arr.mean()) - 120) < 2
    with pytest.raises(InputDataError, match="expected a PNG file, found format JPEG"):
        read_busi_image(tmp_path / "x.jpg")


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: Image.fromarray(np.full((8, 8), 900, np.uint16)).save(p.with_suffix(".png")), "mode 'I;16'"),
        (lambda p: Image.new("CMYK", (8, 8)).save(p.with_suffix(".jpg")), "mode 'CMYK'"),
        (lambda p: Image.new("F", (8, 8)).save(p.with_suffix(".tif")), "mode 'F'"),
    ],
    ids=["16bit_png", "cmyk_jpeg", "float_tiff"],
)
def test_images_with_unsupported_channels_or_bit_depth_are_refused_naming_the_file(tmp_path, write, problem):
    write(tmp_path / "bad ä")
    (path,) = tmp_path.iterdir()
    with pytest.raises(InputDataError, match=re.escape(problem)) as info:
        read_2d(path)
    assert info.value.path == str(path)


def test_a_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="unreadable or corrupt") as info:
        read_2d(tmp_path / "a.jpg")
    assert info.value.path == str(tmp_path / "a.jpg")


def test_evaluation_stops_naming_a_test_label_of_another_shape(tmp_path):
    """A test label replaced after the datalist was built (other grid): evaluation names it, no report."""
    import torch

    from hybridseg.data.synapse import datalist_synapse
    from hybridseg.tools.synth_synapse import synth_synapse
    from tests.bundles.conftest import train_config, workflow_error
    from tests.bundles.test_training_robustness import FILES, TINY

    root = tmp_path / "CT set"
    synth_synapse(out=str(root), n=3, shape=(32, 32, 8), seed=0)
    datalist_synapse(root=str(root), out=str(root / "datalist.json"), seed=0, num_val=1)
    test = json.loads((root / "datalist.json").read_text())["test"][0]
    label = root / test["label"]
    nib.save(nib.Nifti1Image(np.zeros((32, 30, 8), np.uint8), nib.load(str(label)).affine), str(label))
    overrides = {**TINY, "dataset_dir": str(root), "ckpt_dir": str(tmp_path / "m")}
    net = train_config("braunetpp_synapse", **overrides).get_parsed_content("network")
    (tmp_path / "m").mkdir()
    torch.save(net.state_dict(), tmp_path / "m" / "model.pt")
    text = workflow_error(
        [FILES["train"], FILES["evaluate"]],
        FILES["meta_file"],
        FILES["logging_file"],
        output_dir=str(tmp_path / "out"),
        **overrides,
    )
    assert str(label) in text and "differs from its image's shape" in text
    assert not (tmp_path / "out" / "metrics_per_case.csv").exists()
