"""Synapse (BTCV) datalist, split rules, the named 13 -> 8 organ mapping, and bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridseg.data.synapse import (
    LABEL_SCHEMES,
    ORGAN_MAPPINGS,
    STANDARD_TEST_CASES,
    LabelMapping,
    apply_label_mapping,
    datalist_synapse,
    get_label_mapping,
    split_cases,
    write_nifti,
)
from hybridseg.io import InputDataError
from hybridseg.tools.synth_synapse import synth_synapse

BTCV_IDS = [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return Path(synth_synapse(tmp_path_factory.mktemp("btcv") / "set", n=4, shape=(32, 32, 8), seed=0))


@pytest.fixture
def btcv(generated: Path, tmp_path: Path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(generated, tmp_path / "btcv"))


def _entries(data: dict) -> list[dict]:
    return data["training"] + data["validation"] + data["test"]


# --- organ mapping --------------------------------------------------------------------------------


def test_transunet_mapping_keeps_the_eight_benchmark_organs_under_their_names():
    m = ORGAN_MAPPINGS["transunet_8organ"]
    assert m.source == "btcv13" and m.name == "transunet_8organ"
    assert dict(m.map) == {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
    btcv, target = LABEL_SCHEMES["btcv13"], LABEL_SCHEMES["transunet_8organ"]
    for src, dst in m.map.items():
        assert btcv[src] == target[dst]  # every mapped id keeps its organ
    dropped = {btcv[i] for i in btcv if i not in m.map and i != 0}
    assert dropped == {
        "esophagus",
        "inferior vena cava",
        "portal and splenic vein",
        "right adrenal gland",
        "left adrenal gland",
    }


def test_apply_label_mapping_maps_every_btcv_id():
    labels = np.arange(14, dtype=np.int16).reshape(2, 7)
    mapped = apply_label_mapping(labels, "transunet_8organ")
    assert mapped.dtype == np.uint8
    assert mapped.ravel().tolist() == [0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0]
    assert np.array_equal(apply_label_mapping(labels, "btcv13"), labels)


def test_apply_label_mapping_accepts_torch_tensors_and_datalist_blocks():
    torch = pytest.importorskip("torch")
    labels = torch.tensor([[0.0, 8.0, 11.0], [1.0, 7.0, 5.0]])
    block = ORGAN_MAPPINGS["transunet_8organ"].to_json()
    mapped = apply_label_mapping(labels, json.loads(json.dumps(block)))
    assert mapped.dtype == labels.dtype
    assert mapped.tolist() == [[0.0, 1.0, 6.0], [7.0, 8.0, 0.0]]


@pytest.mark.parametrize("bad", [[0, 14], [-1, 2], [1.5, 2]])
def test_apply_label_mapping_rejects_ids_outside_the_source_scheme(bad):
    with pytest.raises(InputDataError, match=r"case9\.nii\.gz: .*(unexpected label ids|must be integers)"):
        apply_label_mapping(np.array(bad), "transunet_8organ", path="case9.nii.gz")


def test_label_mapping_round_trips_through_json_and_rejects_bad_configuration():
    m = ORGAN_MAPPINGS["transunet_8organ"]
    assert LabelMapping.from_json(json.loads(json.dumps(m.to_json()))) == m
    with pytest.raises(ValueError, match="source id 14"):
        LabelMapping("transunet_8organ", "btcv13", {14: 1})
    with pytest.raises(ValueError, match="target id 9"):
        LabelMapping("transunet_8organ", "btcv13", {1: 9})
    with pytest.raises(ValueError, match="unknown label mapping"):
        get_label_mapping("no_such_mapping")


# --- split ------------------------------------------------------------------------------------------


def test_standard_twelve_test_cases_are_used_when_all_exist():
    parts = split_cases(BTCV_IDS, seed=0, num_val=4)
    assert parts["test"] == list(STANDARD_TEST_CASES)
    assert len(parts["training"]) == 14 and len(parts["validation"]) == 4
    assert not set(parts["validation"]) & set(parts["test"])
    assert sorted(parts["training"] + parts["validation"] + parts["test"]) == BTCV_IDS
    assert split_cases(BTCV_IDS, seed=0) == parts
    assert split_cases(BTCV_IDS, seed=1)["validation"] != parts["validation"]


def test_fallback_split_is_seeded_when_standard_cases_are_missing():
    cases = [f"{i:04d}" for i in range(1, 11)]
    a, b = split_cases(cases, seed=2, num_val=2), split_cases(cases, seed=2, num_val=2)
    assert a == b
    assert len(a["test"]) == 4 and len(a["validation"]) == 2 and len(a["training"]) == 4
    assert sorted(a["training"] + a["validation"] + a["test"]) == cases
    tiny = split_cases(["0001", "0002"], seed=0, num_val=4)
    assert len(tiny["test"]) == 1 and len(tiny["training"]) == 1 and tiny["validation"] == []


# --- datalist ---------------------------------------------------------------------------------------


def test_datalist_lists_every_pair_with_mapping_and_intensity(btcv: Path, tmp_path: Path):
    out = tmp_path / "dl.json"
    datalist_synapse(btcv, out, num_val=1)
    data = json.loads(out.read_text())
    assert data["label_mapping"] == {
        "name": "transunet_8organ",
        "source": "btcv13",
        "map": {"8": 1, "4": 2, "3": 3, "2": 4, "6": 5, "11": 6, "1": 7, "7": 8},
    }
    assert data["labels"]["1"] == "aorta" and data["labels"]["8"] == "stomach" and len(data["labels"]) == 9
    assert data["intensity"] == {"windowed": False, "hu_window": [-125, 275]}
    assert data["paths"] == "relative"
    entries = _entries(data)
    assert sorted(e["case"] for e in entries) == ["0001", "0002", "0003", "0004"]
    assert len(data["validation"]) == 1 and len(data["test"]) == 2
    for e in entries:
        assert e["image"] == f"img/img{e['case']}.nii.gz" and e["label"] == f"label/label{e['case']}.nii.gz"


def test_datalist_accepts_the_rawdata_training_layout_and_absolute_paths(btcv: Path, tmp_path: Path):
    nested = tmp_path / "BTCV"
    (nested / "RawData").mkdir(parents=True)
    shutil.move(btcv, nested / "RawData" / "Training")
    out = tmp_path / "dl.json"
    datalist_synapse(nested, out, absolute=True)
    entries = _entries(json.loads(out.read_text()))
    assert len(entries) == 4
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in entries)
    assert "/RawData/Training/label/label" in entries[0]["label"]


def test_explicit_test_cases_are_honoured(btcv: Path, tmp_path: Path):
    out = tmp_path / "dl.json"
    datalist_synapse(btcv, out, test_cases=["0003"], num_val=1)
    data = json.loads(out.read_text())
    assert [e["case"] for e in data["test"]] == ["0003"]


# --- bad input --------------------------------------------------------------------------------------


def _fails(root: Path, tmp_path: Path, pattern: str) -> None:
    out = tmp_path / "never.json"
    with pytest.raises(InputDataError, match=pattern):
        datalist_synapse(root, out)
    assert not out.exists()


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    write_nifti(path, data, nib.load(path).affine if affine is None else affine)


def test_image_without_label_is_an_error(btcv: Path, tmp_path: Path):
    (btcv / "label" / "label0002.nii.gz").unlink()
    _fails(btcv, tmp_path, r"img0002\.nii\.gz: image without label")


def test_label_without_image_is_an_error(btcv: Path, tmp_path: Path):
    (btcv / "img" / "img0003.nii.gz").unlink()
    _fails(btcv, tmp_path, r"label0003\.nii\.gz: label without image")


def test_label_of_another_shape_is_an_error(btcv: Path, tmp_path: Path):
    _rewrite(btcv / "label" / "label0001.nii.gz", np.zeros((32, 32, 7), dtype=np.uint8))
    _fails(btcv, tmp_path, r"label0001\.nii\.gz: label shape \(32, 32, 7\) differs from its image's \(32, 32, 8\)")


def test_label_with_another_affine_is_an_error(btcv: Path, tmp_path: Path):
    path = btcv / "label" / "label0004.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[2, 3] += 5.0
    _rewrite(path, np.asanyarray(nib.load(path).dataobj), affine)
    _fails(btcv, tmp_path, r"label0004\.nii\.gz: label affine differs from its image's")


def test_corrupt_volume_is_an_error(btcv: Path, tmp_path: Path):
    path = btcv / "img" / "img0002.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti", mtime=0))
    _fails(btcv, tmp_path, r"img0002\.nii\.gz: unreadable or corrupt NIfTI")


def test_truncated_volume_is_an_error(btcv: Path, tmp_path: Path):
    path = btcv / "label" / "label0001.nii.gz"
    path.write_bytes(path.read_bytes()[:-40])
    _fails(btcv, tmp_path, r"label0001\.nii\.gz: unreadable or corrupt NIfTI")


def test_volume_that_is_not_3d_is_an_error(btcv: Path, tmp_path: Path):
    _rewrite(btcv / "img" / "img0001.nii.gz", np.zeros((32, 32), dtype=np.int16))
    _fails(btcv, tmp_path, r"img0001\.nii\.gz: expected a 3D volume, found shape \(32, 32\)")


def test_unexpected_label_ids_are_an_error(btcv: Path, tmp_path: Path):
    path = btcv / "label" / "label0003.nii.gz"
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[0, 0, 0] = 14
    _rewrite(path, data)
    _fails(btcv, tmp_path, r"label0003\.nii\.gz: unexpected label ids \[14\]")


def test_duplicate_case_ids_are_an_error(btcv: Path, tmp_path: Path):
    shutil.copy(btcv / "img" / "img0001.nii.gz", btcv / "img" / "img1.nii.gz")
    _fails(btcv, tmp_path, r"img.*\.nii\.gz: duplicate case id 0001")


def test_missing_or_empty_folders_are_errors(btcv: Path, tmp_path: Path):
    _fails(tmp_path / "absent", tmp_path, r"absent: dataset root folder is missing")
    shutil.rmtree(btcv / "label")
    _fails(btcv, tmp_path, r"label: folder is missing")
    (btcv / "label").mkdir()
    _fails(btcv, tmp_path, r"label: folder contains no labelNNNN")


def test_already_windowed_images_are_refused(btcv: Path, tmp_path: Path):
    _rewrite(btcv / "img" / "img0002.nii.gz", np.full((32, 32, 8), 0.5, dtype=np.float32))
    _fails(btcv, tmp_path, r"img0002\.nii\.gz: intensities lie in \[0, 1\]")


def test_output_never_overwrites_an_input_file(btcv: Path):
    target = btcv / "label" / "label0001.nii.gz"
    before = target.read_bytes()
    with pytest.raises(InputDataError, match="refusing to overwrite an input"):
        datalist_synapse(btcv, target)
    assert target.read_bytes() == before
