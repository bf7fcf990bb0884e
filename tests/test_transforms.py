"""The bundles' own transforms: validated loading, windowing, organ mapping, writers on the input grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import MapLabelValued
from PIL import Image

from hybridseg.data.synapse import get_label_mapping
from hybridseg.image_io import read_volume
from hybridseg.io import InputDataError
from hybridseg.transforms import CheckVolumePaird, LoadImage2Dd, LoadVolumed, SaveLabelVolumed


def _volume(shape, name="img.nii.gz"):
    return MetaTensor(torch.zeros((1, *shape)), meta={"filename_or_obj": name})


def test_check_volume_pair_names_the_label_whose_shape_differs():
    data = {"image": _volume((8, 8, 4)), "label": _volume((8, 8, 5), "label0001.nii.gz")}
    with pytest.raises(InputDataError, match=r"label0001.nii.gz: shape \(8, 8, 5\) differs"):
        CheckVolumePaird()(data)


def test_check_volume_pair_refuses_a_2d_image_where_3d_is_expected():
    with pytest.raises(InputDataError, match="img.nii.gz: expected a single-channel 3D volume"):
        CheckVolumePaird()({"image": MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "img.nii.gz"})})


def test_monai_label_mapping_with_the_named_ids_maps_btcv_to_synapse_organs():
    """The bundle's MapLabelValued arguments (the mapping's source ids -> target ids), as train.json passes them."""
    m = get_label_mapping("transunet_8organ")
    label = MetaTensor(torch.tensor([[[0.0, 8.0, 4.0, 11.0, 1.0, 9.0]]]), meta={"filename_or_obj": "l.nii.gz"})
    out = MapLabelValued("label", m.source_ids, m.target_ids, dtype=torch.float32)({"label": label})["label"]
    # aorta 8->1, gallbladder 4->2, pancreas 11->6, spleen 1->7, inferior vena cava 9 -> background
    assert out.tolist() == [[[0, 1, 2, 6, 7, 0]]]
    assert out.meta["filename_or_obj"] == "l.nii.gz"


def test_check_volume_pair_refuses_label_ids_outside_the_scheme_naming_the_file():
    ids = get_label_mapping("transunet_8organ").source_ids
    label = MetaTensor(torch.tensor([[[[0.0, 14.0]]]]), meta={"filename_or_obj": "label0007.nii.gz"})
    with pytest.raises(InputDataError, match=r"label0007.nii.gz.*unexpected label ids \[14\]"):
        CheckVolumePaird(label_ids=ids)({"label": label})
    fraction = MetaTensor(torch.tensor([[[[0.0, 2.5]]]]), meta={"filename_or_obj": "label0008.nii.gz"})
    with pytest.raises(InputDataError, match=r"label0008.nii.gz.*must be integers"):
        CheckVolumePaird(label_ids=ids)({"label": fraction})
    CheckVolumePaird(label_ids=ids)({"label": MetaTensor(torch.tensor([[[[0.0, 13.0]]]]))})


def test_check_volume_pair_refuses_nan_voxels_naming_the_file():
    x = {"image": MetaTensor(torch.tensor([[[[0.0, float("nan")]]]]), meta={"filename_or_obj": "ct.nii.gz"})}
    with pytest.raises(InputDataError, match="ct.nii.gz: volume contains NaN"):
        CheckVolumePaird()(x)


def test_load_2d_unions_masks_and_refuses_a_mask_of_another_size(tmp_path):
    Image.fromarray(np.full((20, 30), 100, np.uint8)).save(tmp_path / "a.png")
    m1, m2 = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    m1[2:5, 2:5], m2[10:12, 20:25] = 255, 255
    Image.fromarray(m1).save(tmp_path / "a_mask.png")
    Image.fromarray(m2).save(tmp_path / "a_mask_1.png")
    out = LoadImage2Dd()(
        {"image": str(tmp_path / "a.png"), "label": [str(tmp_path / "a_mask.png"), str(tmp_path / "a_mask_1.png")]}
    )
    assert out["image"].shape == (1, 20, 30) and out["label"].sum().item() == 9 + 10
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "b_mask.png")
    with pytest.raises(InputDataError, match="b_mask.png"):
        LoadImage2Dd()({"image": str(tmp_path / "a.png"), "label": [str(tmp_path / "b_mask.png")]})


def test_volume_written_back_on_the_input_grid_with_its_affine(tmp_path):
    affine = np.diag([-0.7, -0.7, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), affine), str(src))
    data = LoadVolumed("image")({"image": str(src)})
    assert data["image"].shape == (1, 6, 5, 4)
    data["pred"] = torch.ones((1, 6, 5, 4), dtype=torch.uint8)
    SaveLabelVolumed("pred", output_dir=str(tmp_path / "out"), labels={0: "background", 1: "aorta"})(data)
    seg = nib.load(tmp_path / "out" / "ct_seg.nii.gz")
    assert seg.shape == (6, 5, 4) and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, affine)


def test_read_volume_names_a_truncated_file(tmp_path):
    src = tmp_path / "ct.nii.gz"
    noise = np.random.default_rng(0).integers(-1000, 1000, (32, 32, 16)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), str(src))
    data = src.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="cut.nii.gz: unreadable volume"):
        read_volume(tmp_path / "cut.nii.gz")
