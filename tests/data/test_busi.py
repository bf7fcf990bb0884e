"""BUSI / Dataset B readers and datalist: pairing, mask union, seeded stratified split, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from hybridseg.data.busi import (
    build_busi_datalist,
    datalist_busi,
    read_busi_image,
    read_busi_mask,
    split_counts,
    stratified_split,
)
from hybridseg.io import InputDataError
from hybridseg.tools.synth_busi import synth_busi


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return Path(synth_busi(tmp_path_factory.mktemp("busi") / "set", n=12, size=48, seed=0))


@pytest.fixture
def busi(generated: Path, tmp_path: Path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(generated, tmp_path / "busi"))


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _entries(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"] + datalist["test"]


# --- readers ---------------------------------------------------------------------------------------


def test_read_busi_image_converts_rgb_with_bt601_luma(tmp_path: Path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (100, 100, 100)
    gray = read_busi_image(_png(tmp_path / "x.png", rgb))
    assert gray.dtype == np.uint8 and gray.shape == (2, 3)
    assert gray[0].tolist() == [76, 150, 29]  # round(0.299*255), round(0.587*255), round(0.114*255)
    assert gray[1].tolist() == [100, 100, 100]  # gray stored as RGB comes back unchanged


def test_read_busi_image_keeps_gray_and_drops_alpha(tmp_path: Path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(read_busi_image(_png(tmp_path / "g.png", gray)), gray)
    rgba = np.dstack([gray, gray, gray, np.zeros_like(gray)])
    assert np.array_equal(read_busi_image(_png(tmp_path / "a.png", rgba)), gray)


def test_read_busi_mask_returns_the_union_of_all_masks(tmp_path: Path):
    a = np.zeros((4, 5), dtype=np.uint8)
    b = np.zeros((4, 5), dtype=np.uint8)
    a[0, :2] = 255
    b[3, 3:] = 1  # {0, 1} masks are accepted too
    union = read_busi_mask([_png(tmp_path / "a.png", a), _png(tmp_path / "b.png", b)])
    assert union.dtype == bool
    assert np.array_equal(union, (a > 0) | (b > 0))
    assert np.array_equal(read_busi_mask(tmp_path / "a.png"), a > 0)


def test_read_busi_mask_rejects_values_other_than_0_and_255(tmp_path: Path):
    m = np.zeros((4, 4), dtype=np.uint8)
    m[0, 0], m[1, 1] = 255, 128
    path = _png(tmp_path / "soft_mask.png", m)
    with pytest.raises(InputDataError, match=r"soft_mask\.png.*mask values.*128"):
        read_busi_mask(path)


def test_read_busi_mask_rejects_masks_of_different_sizes(tmp_path: Path):
    a = _png(tmp_path / "a.png", np.zeros((4, 5), dtype=np.uint8))
    b = _png(tmp_path / "b.png", np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(InputDataError, match=r"b\.png.*5x5.*differs"):
        read_busi_mask([a, b])
    with pytest.raises(InputDataError, match=r"a\.png.*4x5.*differs from its image's 6x6"):
        read_busi_mask([a], shape=(6, 6))


# --- datalist -------------------------------------------------------------------------------------


def test_datalist_pairs_each_image_with_all_its_masks(busi: Path, tmp_path: Path):
    out = tmp_path / "datalist.json"
    datalist_busi(busi, out)
    data = json.loads(out.read_text())
    assert data["paths"] == "relative" and data["classes"] == ["benign", "malignant"]
    assert data["seed"] == 0 and data["split"] == [0.7, 0.1, 0.2]
    entries = _entries(data)
    assert len(entries) == 10  # 7 benign + 3 malignant; normal is excluded by default
    for e in entries:
        assert e["image"] == f"{e['class']}/{e['id']}.png"
        masks = sorted(p.relative_to(busi).as_posix() for p in (busi / e["class"]).glob(f"{e['id']}_mask*.png"))
        assert sorted(e["label"]) == masks and e["label"][0].endswith("_mask.png")
    assert any(len(e["label"]) == 2 for e in entries), "the second-lesion mask is listed"
    # MONAI resolves the root-relative paths.
    loaded = load_decathlon_datalist(out, data_list_key="test", base_dir=busi)
    assert all(Path(d["image"]).is_file() and all(Path(m).is_file() for m in d["label"]) for d in loaded)


def test_datalist_can_include_normal_and_write_absolute_paths(busi: Path, tmp_path: Path):
    out = tmp_path / "dl.json"
    datalist_busi(busi, out, classes=("benign", "malignant", "normal"), absolute=True)
    data = json.loads(out.read_text())
    entries = _entries(data)
    assert data["paths"] == "absolute" and len(entries) == 12
    assert {e["class"] for e in entries} == {"benign", "malignant", "normal"}
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in entries)
    assert all(Path(m).is_absolute() for e in entries for m in e["label"])


def test_split_is_deterministic_per_seed(busi: Path):
    a = build_busi_datalist(busi, seed=3)
    b = build_busi_datalist(busi, seed=3)
    c = build_busi_datalist(busi, seed=4)
    assert a == b
    assert [e["id"] for e in _entries(a)] != [e["id"] for e in _entries(c)]


def _fake_entries(counts: dict[str, int]) -> list[dict]:
    return [{"id": f"{c} ({k})", "class": c} for c, n in counts.items() for k in range(1, n + 1)]


def test_split_is_stratified_by_class_at_busi_scale():
    entries = _fake_entries({"benign": 437, "malignant": 210})
    parts = stratified_split(entries, (0.7, 0.1, 0.2), seed=0)
    per_class = {
        part: {c: sum(e["class"] == c for e in items) for c in ("benign", "malignant")} for part, items in parts.items()
    }
    assert per_class == {
        "training": {"benign": 306, "malignant": 147},
        "validation": {"benign": 44, "malignant": 21},
        "test": {"benign": 87, "malignant": 42},
    }
    ids = [e["id"] for items in parts.values() for e in items]
    assert sorted(ids) == sorted(e["id"] for e in entries)  # a partition: nothing lost or repeated


def test_adding_normal_leaves_the_benign_and_malignant_split_unchanged():
    without = stratified_split(_fake_entries({"benign": 40, "malignant": 20}), (0.7, 0.1, 0.2), seed=5)
    with_normal = stratified_split(
        _fake_entries({"benign": 40, "malignant": 20, "normal": 12}), (0.7, 0.1, 0.2), seed=5
    )
    for part in without:
        assert [e["id"] for e in without[part]] == [e["id"] for e in with_normal[part] if e["class"] != "normal"]


def test_split_counts_round_to_totals_and_keep_tiny_parts_non_empty():
    assert split_counts(437, (0.7, 0.1, 0.2)) == (306, 44, 87)
    assert split_counts(3, (0.7, 0.1, 0.2)) == (1, 1, 1)
    assert split_counts(10, (0.0, 0.0, 1.0)) == (0, 0, 10)
    with pytest.raises(ValueError, match="summing to 1"):
        split_counts(10, (0.7, 0.2, 0.2))


def test_datasetb_reader_pairs_original_with_gt_and_puts_all_in_test(tmp_path: Path):
    root = tmp_path / "B"
    for k in range(1, 4):
        img = np.full((20, 30), 100, dtype=np.uint8)
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[5:10, 5 + k : 12 + k] = 255
        _png(root / "original" / f"{k:06d}.png", img)
        _png(root / "GT" / f"{k:06d}.png", mask)
    out = tmp_path / "b.json"
    datalist_busi(root, out, layout="datasetb")
    data = json.loads(out.read_text())
    assert data["training"] == [] and data["validation"] == []
    assert data["test"][0] == {
        "image": "original/000001.png",
        "label": ["GT/000001.png"],
        "class": "unknown",
        "id": "000001",
    }
    assert len(data["test"]) == 3


# --- bad input: each error names the file and the problem; nothing is written ----------------------


def _fails(root: Path, tmp_path: Path, pattern: str, **kwargs) -> None:
    out = tmp_path / "never.json"
    with pytest.raises(InputDataError, match=pattern):
        datalist_busi(root, out, **kwargs)
    assert not out.exists()


def test_image_without_mask_is_an_error(busi: Path, tmp_path: Path):
    (busi / "benign" / "benign (2)_mask.png").unlink()
    _fails(busi, tmp_path, r"benign \(2\)\.png: image without mask")


def test_mask_without_image_is_an_error(busi: Path, tmp_path: Path):
    (busi / "malignant" / "malignant (1).png").unlink()
    _fails(busi, tmp_path, r"malignant \(1\)_mask.*\.png: mask without image")


def test_mask_of_a_different_size_than_its_image_is_an_error(busi: Path, tmp_path: Path):
    _png(busi / "benign" / "benign (3)_mask.png", np.zeros((40, 48), dtype=np.uint8))
    _fails(busi, tmp_path, r"benign \(3\)_mask\.png: mask size 40x48 \(HxW\) differs from its image's 48x48")


def test_unreadable_png_is_an_error(busi: Path, tmp_path: Path):
    (busi / "benign" / "benign (4).png").write_bytes(b"this is not a PNG")
    _fails(busi, tmp_path, r"benign \(4\)\.png: unreadable or corrupt")


def test_truncated_png_is_an_error(busi: Path, tmp_path: Path):
    path = busi / "malignant" / "malignant (2).png"
    path.write_bytes(path.read_bytes()[:200])
    _fails(busi, tmp_path, r"malignant \(2\)\.png: unreadable or corrupt")


def test_mask_with_unexpected_values_is_an_error(busi: Path, tmp_path: Path):
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[10:20, 10:20] = 200
    _png(busi / "benign" / "benign (5)_mask.png", mask)
    _fails(
        busi, tmp_path, r"benign \(5\)_mask\.png: mask values must be only \{0, 255\} or only \{0, 1\}; found 0, 200"
    )


def test_missing_class_folder_is_an_error(busi: Path, tmp_path: Path):
    shutil.rmtree(busi / "malignant")
    _fails(busi, tmp_path, r"malignant: class folder is missing")


def test_empty_class_folder_is_an_error(busi: Path, tmp_path: Path):
    shutil.rmtree(busi / "normal")
    (busi / "normal").mkdir()
    _fails(busi, tmp_path, r"normal: folder contains no PNG files", classes=("benign", "normal"))


def test_missing_root_and_nested_busi_folder_are_explained(tmp_path: Path, busi: Path):
    _fails(tmp_path / "nowhere", tmp_path, r"nowhere: dataset root folder is missing")
    parent = tmp_path / "download"
    parent.mkdir()
    shutil.move(busi, parent / "Dataset_BUSI_with_GT")
    _fails(parent, tmp_path, r"class folder is missing \(the data seem to be in .*Dataset_BUSI_with_GT")


def test_duplicate_image_ids_are_an_error(busi: Path, tmp_path: Path):
    shutil.copy(busi / "benign" / "benign (1).png", busi / "benign" / "benign (1).PNG")
    _fails(busi, tmp_path, r"benign \(1\)\.(png|PNG): duplicate image id 'benign \(1\)'")


def test_duplicate_ids_across_classes_are_an_error(busi: Path, tmp_path: Path):
    for name in ("benign (1).png", "benign (1)_mask.png"):
        shutil.copy(busi / "benign" / name, busi / "malignant" / name)
    _fails(busi, tmp_path, r"malignant/benign \(1\)\.png: duplicate image id 'benign \(1\)'")


def test_datasetb_image_without_gt_is_an_error(tmp_path: Path):
    root = tmp_path / "B"
    _png(root / "original" / "000001.png", np.zeros((8, 8), dtype=np.uint8))
    _png(root / "original" / "000002.png", np.zeros((8, 8), dtype=np.uint8))
    _png(root / "GT" / "000001.png", np.zeros((8, 8), dtype=np.uint8))
    _fails(root, tmp_path, r"original/000002\.png: image without mask", layout="datasetb")


def test_output_never_overwrites_an_input_file(busi: Path):
    target = busi / "benign" / "benign (1).png"
    before = target.read_bytes()
    with pytest.raises(InputDataError, match="refusing to overwrite an input"):
        datalist_busi(busi, target)
    assert target.read_bytes() == before


@pytest.mark.parametrize("kwargs", [{"classes": ("benign", "cyst")}, {"split": (0.5, 0.5, 0.5)}, {"layout": "x"}])
def test_invalid_options_are_rejected(busi: Path, tmp_path: Path, kwargs: dict):
    with pytest.raises(ValueError):
        datalist_busi(busi, tmp_path / "o.json", **kwargs)
    assert not (tmp_path / "o.json").exists()
