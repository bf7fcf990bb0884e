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


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory) -> dict[str, Path]:
    """The same four cases generated easy and hard."""
    root = tmp_path_factory.mktemp("realism")
    return {r: Path(synth_synapse(root / r, n=4, shape=(64, 64, 24), seed=0, realism=r)) for r in ("easy", "hard")}


def _cases(root: Path):
    for img in sorted((root / "img").glob("*.nii.gz")):
        image, nii = _load(img)
        label, _ = _load(root / "label" / img.name.replace("img", "label"))
        yield image.astype(float), label, nii.affine


def test_hard_realism_keeps_the_raw_btcv_layout_and_all_labels(ct_pair):
    hard = ct_pair["hard"]
    assert sorted(p.relative_to(hard).as_posix() for p in hard.rglob("*.nii.gz")) == sorted(
        p.relative_to(ct_pair["easy"]).as_posix() for p in ct_pair["easy"].rglob("*.nii.gz")
    )
    for image, label, _ in _cases(hard):
        assert image.dtype == float and np.unique(label).tolist() == list(range(14))


def test_hard_organ_positions_vary_more_between_cases(ct_pair):
    def spread(root: Path) -> float:
        """Mean over organs of the between-case standard deviation of the organ's centroid (mm)."""
        centroids = [[_centroid_world(lab, aff, k) for k in (1, 2, 3, 6, 7)] for _, lab, aff in _cases(root)]
        return float(np.std(np.asarray(centroids), axis=0).mean())

    assert spread(ct_pair["hard"]) > 1.8 * spread(ct_pair["easy"])


def test_hard_volumes_are_noisier_and_non_uniform(ct_pair):
    from scipy import ndimage

    def liver_stats(root: Path) -> tuple[float, float]:
        """(noise: std of the liver minus its local mean, non-uniformity: spread of slab means of the liver)."""
        noise, drift = [], []
        for image, label, _ in _cases(root):
            liver = ndimage.binary_erosion(label == 6, iterations=2)
            noise.append((image - ndimage.uniform_filter(image, 3))[liver].std())
            slabs = [image[:, :, k][liver[:, :, k]].mean() for k in range(image.shape[2]) if liver[:, :, k].sum() > 20]
            drift.append(np.ptp(slabs))
        return float(np.mean(noise)), float(np.mean(drift))

    (easy_noise, easy_drift), (hard_noise, hard_drift) = liver_stats(ct_pair["easy"]), liver_stats(ct_pair["hard"])
    assert hard_noise > 1.5 * easy_noise and hard_drift > easy_drift + 10, (
        easy_noise,
        hard_noise,
        easy_drift,
        hard_drift,
    )


def test_hard_organ_edges_are_blurred_by_partial_volume(ct_pair):
    """The liver's outermost voxels already carry part of the step to the tissue outside it (labels stay
    sharp): the fraction of the step is larger in hard volumes."""
    from scipy import ndimage

    def step_fraction(root: Path) -> float:
        fractions = []
        for image, label, _ in _cases(root):
            liver = label == 6
            interior = ndimage.binary_erosion(liver, iterations=3)
            boundary = liver & ~ndimage.binary_erosion(liver)
            outside = ndimage.binary_dilation(liver) & ~liver & (label == 0)
            inside_mean = image[interior].mean()
            fractions.append((inside_mean - image[boundary].mean()) / (inside_mean - image[outside].mean()))
        return float(np.mean(fractions))

    assert step_fraction(ct_pair["hard"]) > step_fraction(ct_pair["easy"]) + 0.05


def test_unknown_realism_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="realism"):
        synth_synapse(tmp_path / "x", n=1, shape=(32, 32, 8), realism="real")
    assert not (tmp_path / "x").exists()
