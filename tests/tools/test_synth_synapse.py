"""Synthetic BTCV-like CT: raw BTCV layout, dtypes, spacing, anatomy, all 13 labels, determinism."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridseg.io import InputDataError
from hybridseg.tools.synth_synapse import ORGAN_HU, case_ids, make_ct_case, synth_synapse


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return Path(synth_synapse(tmp_path_factory.mktemp("ct") / "set", n=2, shape=(64, 64, 24), seed=0))


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def _centroid_world(label: np.ndarray, affine: np.ndarray, organ: int) -> np.ndarray:
    ijk = np.argwhere(label == organ).mean(axis=0)
    return nib.affines.apply_affine(affine, ijk)


def test_case_ids_follow_btcv_training_ids():
    assert case_ids(3) == [1, 2, 3]
    ids = case_ids(32)
    assert ids[9:12] == [10, 21, 22] and ids[-3:] == [40, 41, 42] and len(set(ids)) == 32


def test_layout_dtypes_and_shape_match_raw_btcv(ct: Path):
    assert sorted(p.name for p in (ct / "img").iterdir()) == ["img0001.nii.gz", "img0002.nii.gz"]
    assert sorted(p.name for p in (ct / "label").iterdir()) == ["label0001.nii.gz", "label0002.nii.gz"]
    image, img = _load(ct / "img" / "img0001.nii.gz")
    label, lab = _load(ct / "label" / "label0001.nii.gz")
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.shape == label.shape == (64, 64, 24)
    assert np.array_equal(img.affine, lab.affine)


def test_affine_has_realistic_ct_spacing_and_orientation(ct: Path):
    _, img = _load(ct / "img" / "img0002.nii.gz")
    sx, sy, sz = img.header.get_zooms()
    assert sx == pytest.approx(sy) and 330 <= sx * 64 <= 390 and 240 <= sz * 24 <= 300
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")


def test_every_volume_has_all_thirteen_btcv_labels(ct: Path):
    for path in (ct / "label").iterdir():
        label, _ = _load(path)
        assert np.unique(label).tolist() == list(range(14)), path


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_smallest_grid_still_has_all_labels(seed: int):
    _, label, _ = make_ct_case((32, 32, 8), np.random.default_rng(seed))
    assert np.unique(label).tolist() == list(range(14))


def test_organs_sit_at_their_anatomical_positions(ct: Path):
    label, img = _load(ct / "label" / "label0001.nii.gz")
    c = {k: _centroid_world(label, img.affine, k) for k in range(1, 14)}
    # RAS world: +x patient left->right, +y posterior->anterior, +z inferior->superior.
    assert c[6][0] > 0 > c[1][0]  # liver on the right, spleen on the left
    assert c[2][0] > 0 > c[3][0]  # right and left kidney
    assert c[9][0] > c[8][0]  # IVC right of the aorta
    assert c[2][1] < c[8][1] and c[3][1] < c[8][1]  # kidneys posterior to the aorta
    assert c[7][1] > c[1][1]  # stomach anterior to the spleen
    assert c[6][2] > c[2][2] and c[5][2] > c[11][2]  # liver above kidneys, esophagus above pancreas
    assert c[12][2] > c[2][2] and c[13][2] > c[3][2]  # adrenals above their kidneys


def test_intensities_are_hu_with_air_outside_and_distinct_organs(ct: Path):
    image, _ = _load(ct / "img" / "img0001.nii.gz")
    label, _ = _load(ct / "label" / "label0001.nii.gz")
    assert np.median(image[:4, :4, :]) < -900  # air in the corners
    means = {k: float(image[label == k].mean()) for k in (1, 4, 6, 7, 8)}
    assert means[8] > means[1] > means[6] > means[7] > means[4] - 30  # aorta > spleen > liver > stomach
    assert abs(means[6] - ORGAN_HU[6]) < 30


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path):
    def files(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.nii.gz"))}

    a = files(Path(synth_synapse(tmp_path / "a", n=2, shape=(32, 32, 8), seed=5)))
    b = files(Path(synth_synapse(tmp_path / "b", n=2, shape=(32, 32, 8), seed=5)))
    c = files(Path(synth_synapse(tmp_path / "c", n=2, shape=(32, 32, 8), seed=6)))
    assert a == b
    assert a.keys() == c.keys() and a["img/img0001.nii.gz"] != c["img/img0001.nii.gz"]


def test_cases_differ_from_each_other(ct: Path):
    a, _ = _load(ct / "label" / "label0001.nii.gz")
    b, _ = _load(ct / "label" / "label0002.nii.gz")
    assert not np.array_equal(a, b)


def test_refuses_non_empty_output_and_too_small_shapes(tmp_path: Path):
    (tmp_path / "x.txt").write_text("keep")
    with pytest.raises(InputDataError, match="not empty"):
        synth_synapse(tmp_path, n=1, shape=(32, 32, 8))
    with pytest.raises(ValueError, match="at least 32 32 8"):
        synth_synapse(tmp_path / "new", n=1, shape=(16, 32, 8))
    assert not (tmp_path / "new").exists()
