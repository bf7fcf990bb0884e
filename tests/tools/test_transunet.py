"""TransUNet release -> NIfTI: exact round trip, axis convention, datalist, lists, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from hybridseg.io import InputDataError
from hybridseg.tools.transunet import convert_transunet

TRAIN = {"0005": 3, "0006": 4, "0007": 2}  # case -> number of slices
TEST = {"0001": 3, "0002": 5}
H, W = 32, 24  # not square, so a transposed axis would show


def _slice(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = rng.random((H, W), dtype=np.float32)
    image[0, 0], image[0, 1], image[0, 2] = 0.0, 1.0, np.float32(1e-7)  # edges and a tiny value
    label = rng.integers(0, 9, (H, W)).astype(np.float32)  # the release stores labels as floats
    return image, label


@pytest.fixture
def release(tmp_path: Path) -> Path:
    root = tmp_path / "Synapse"
    rng = np.random.default_rng(0)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for case, n in TRAIN.items():
        for k in reversed(range(n)):  # written out of order: stacking must follow slice numbers
            image, label = _slice(rng)
            np.savez(root / "train_npz" / f"case{case}_slice{k:03d}.npz", image=image, label=label)
    for case, d in TEST.items():
        with h5py.File(root / "test_vol_h5" / f"case{case}.npy.h5", "w") as f:
            f["image"] = rng.random((d, H, W), dtype=np.float32)
            f["label"] = rng.integers(0, 9, (d, H, W)).astype(np.float32)
    return root


def _nifti(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def test_train_slices_round_trip_exactly_in_slice_order(release: Path, tmp_path: Path):
    out = tmp_path / "out"
    convert_transunet(release, out)
    for case, n in TRAIN.items():
        image, img = _nifti(out / "images" / f"case{case}.nii.gz")
        label, _ = _nifti(out / "labels" / f"case{case}.nii.gz")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == (H, W, n)
        assert np.array_equal(img.affine, np.eye(4))
        for k in range(n):
            with np.load(release / "train_npz" / f"case{case}_slice{k:03d}.npz") as z:
                assert np.array_equal(image[:, :, k], z["image"])  # bit-exact, no transpose
                assert np.array_equal(label[:, :, k], z["label"].astype(np.uint8))


def test_test_volumes_round_trip_exactly(release: Path, tmp_path: Path):
    out = tmp_path / "out"
    convert_transunet(release, out)
    for case in TEST:
        image, _ = _nifti(out / "images" / f"case{case}.nii.gz")
        label, _ = _nifti(out / "labels" / f"case{case}.nii.gz")
        with h5py.File(release / "test_vol_h5" / f"case{case}.npy.h5", "r") as f:
            src_image, src_label = f["image"][()], f["label"][()]
        for k in range(src_image.shape[0]):
            assert np.array_equal(image[:, :, k], src_image[k])
            assert np.array_equal(label[:, :, k], src_label[k].astype(np.uint8))


def test_float64_values_that_float32_cannot_hold_are_kept_exactly(release: Path, tmp_path: Path):
    with h5py.File(release / "test_vol_h5" / "case0001.npy.h5", "r+") as f:
        del f["image"]
        f["image"] = np.full((3, H, W), 0.1, dtype=np.float64)
    convert_transunet(release, tmp_path / "out")
    image, _ = _nifti(tmp_path / "out" / "images" / "case0001.nii.gz")
    assert image.dtype == np.float64 and np.all(image == 0.1)


def test_datalist_records_windowed_intensities_and_identity_8organ_labels(release: Path, tmp_path: Path):
    out = tmp_path / "out"
    path = Path(convert_transunet(release, out, num_val=1, seed=0))
    assert path == out / "datalist.json"
    data = json.loads(path.read_text())
    assert data["intensity"] == {"windowed": True, "hu_window": [-125, 275]}
    assert data["label_mapping"] == {
        "name": "transunet_8organ",
        "source": "transunet_8organ",
        "map": {str(i): i for i in range(1, 9)},
    }
    assert data["labels"]["1"] == "aorta" and data["labels"]["7"] == "spleen"
    assert [e["case"] for e in data["test"]] == list(TEST)
    assert len(data["validation"]) == 1
    assert sorted(e["case"] for e in data["training"] + data["validation"]) == sorted(TRAIN)
    for e in data["training"] + data["validation"] + data["test"]:
        assert (out / e["image"]).is_file() and (out / e["label"]).is_file()


def test_conversion_is_byte_for_byte_repeatable(release: Path, tmp_path: Path):
    convert_transunet(release, tmp_path / "a")
    convert_transunet(release, tmp_path / "b")
    for p in (tmp_path / "a").rglob("*.nii.gz"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


def test_lists_select_the_converted_slices_and_cases(release: Path, tmp_path: Path):
    lists = release / "lists" / "lists_Synapse"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("case0005_slice000\ncase0005_slice001\ncase0006_slice000\n")
    (lists / "test_vol.txt").write_text("case0002\n")
    out = tmp_path / "out"
    data = json.loads(Path(convert_transunet(release, out, num_val=0)).read_text())
    assert [e["case"] for e in data["training"]] == ["0005", "0006"]
    assert [e["case"] for e in data["test"]] == ["0002"]
    assert nib.load(out / "images" / "case0005.nii.gz").shape == (H, W, 2)
    assert not (out / "images" / "case0007.nii.gz").exists()
    assert "6 npz slices not in train.txt" in data["description"]
    assert "1 h5 volumes not in test_vol.txt" in data["description"]


# --- bad input: each error names the file and the problem; nothing is written ----------------------


def _fails(root: Path, tmp_path: Path, pattern: str, **kwargs) -> None:
    out = tmp_path / "never"
    with pytest.raises(InputDataError, match=pattern):
        convert_transunet(root, out, **kwargs)
    assert not out.exists()


def test_missing_slice_is_an_error(release: Path, tmp_path: Path):
    (release / "train_npz" / "case0006_slice002.npz").unlink()
    _fails(release, tmp_path, r"train_npz: case 0006 is missing slice\(s\) 2")


def test_duplicate_slice_is_an_error(release: Path, tmp_path: Path):
    src = release / "train_npz" / "case0005_slice001.npz"
    (release / "train_npz" / "case0005_slice01.npz").write_bytes(src.read_bytes())
    _fails(release, tmp_path, r"case0005_slice0?01\.npz: duplicate slice 1 of case 0005")


def test_missing_key_is_an_error(release: Path, tmp_path: Path):
    np.savez(release / "train_npz" / "case0007_slice001.npz", image=np.zeros((H, W), np.float32))
    _fails(release, tmp_path, r"case0007_slice001\.npz: missing key\(s\) \['label'\]")


def test_corrupt_npz_is_an_error(release: Path, tmp_path: Path):
    (release / "train_npz" / "case0005_slice002.npz").write_bytes(b"PK\x03\x04 broken")
    _fails(release, tmp_path, r"case0005_slice002\.npz: unreadable or corrupt npz")


def test_corrupt_h5_is_an_error(release: Path, tmp_path: Path):
    (release / "test_vol_h5" / "case0002.npy.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    _fails(release, tmp_path, r"case0002\.npy\.h5: unreadable or corrupt HDF5")


def test_unexpected_label_ids_are_an_error(release: Path, tmp_path: Path):
    image, label = _slice(np.random.default_rng(1))
    label[3, 3] = 9
    np.savez(release / "train_npz" / "case0005_slice000.npz", image=image, label=label)
    _fails(release, tmp_path, r"case0005_slice000\.npz: unexpected label ids \[9\]")


def test_image_outside_unit_range_is_an_error(release: Path, tmp_path: Path):
    with h5py.File(release / "test_vol_h5" / "case0001.npy.h5", "r+") as f:
        f["image"][0, 0, 0] = -125.0
    _fails(release, tmp_path, r"case0001\.npy\.h5: image values span \[-125, .*outside \[0, 1\]")


def test_label_of_another_shape_is_an_error(release: Path, tmp_path: Path):
    np.savez(
        release / "train_npz" / "case0006_slice001.npz",
        image=np.zeros((H, W), np.float32),
        label=np.zeros((H, W + 1), np.float32),
    )
    _fails(release, tmp_path, r"case0006_slice001\.npz: label shape \(32, 25\) differs from image shape \(32, 24\)")


def test_slices_of_different_sizes_are_an_error(release: Path, tmp_path: Path):
    z = np.zeros((H + 2, W), np.float32)
    np.savez(release / "train_npz" / "case0006_slice003.npz", image=z, label=z)
    _fails(release, tmp_path, r"case0006_slice003\.npz: slice shape \(34, 24\) differs")


def test_case_in_train_and_test_is_an_error(release: Path, tmp_path: Path):
    src = release / "test_vol_h5" / "case0001.npy.h5"
    (release / "test_vol_h5" / "case0005.npy.h5").write_bytes(src.read_bytes())
    _fails(release, tmp_path, r"case0005\.npy\.h5: case 0005 is in both train_npz and test_vol_h5")


def test_listed_file_that_does_not_exist_is_an_error(release: Path, tmp_path: Path):
    lists = release / "lists" / "lists_Synapse"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("case0005_slice000\ncase0099_slice000\n")
    _fails(release, tmp_path, r"train\.txt: lists slice 'case0099_slice000' but .* does not exist")


def test_missing_or_empty_folders_are_errors(release: Path, tmp_path: Path):
    for p in (release / "test_vol_h5").iterdir():
        p.unlink()
    _fails(release, tmp_path, r"test_vol_h5: folder contains no \*\.h5 files")
    (release / "test_vol_h5").rmdir()
    _fails(release, tmp_path, r"test_vol_h5: folder is missing")


def test_output_inside_the_input_folder_is_refused(release: Path):
    with pytest.raises(InputDataError, match="must not be inside the input folder"):
        convert_transunet(release, release / "nifti")
    assert not (release / "nifti").exists()
