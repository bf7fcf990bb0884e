"""metadata.json tells the truth: the inference preprocessing and the network, run on generated inputs, produce
what ``network_data_format`` says (channels, shape, dtype, value ranges; the outputs are unbounded logits)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.bundles.conftest import bundle_files


def _inference_parser(bundle: str, input_dir, output_dir):
    from monai.bundle import ConfigParser

    files = bundle_files(bundle)
    parser = ConfigParser()
    parser.read_config(files["inference"])
    parser.update({"input_dir": str(input_dir), "output_dir": str(output_dir), "device": "$torch.device('cpu')"})
    return parser, json.loads(open(files["meta_file"]).read())


def _check_logits(meta: dict, net: torch.nn.Module, x: torch.Tensor) -> None:
    out_fmt = meta["network_data_format"]["outputs"]["pred"]
    with torch.no_grad():
        out = net.eval()(x)
    assert out.shape == (1, out_fmt["num_channels"], *out_fmt["spatial_shape"])
    assert str(out.dtype) == f"torch.{out_fmt['dtype']}"
    assert len(out_fmt["channel_def"]) == out_fmt["num_channels"]
    # logits are unbounded: the metadata must not promise a range (a fresh network already leaves [0, 1])
    assert out_fmt["value_range"] == [] and "logits" in meta["pred_classes"]
    assert bool((out < 0).any() or (out > 1).any())


@pytest.mark.slow
def test_cfformer_metadata_matches_preprocessing_and_network_output(tmp_path):
    gray = np.zeros((300, 400), np.uint8)
    gray[100:200, 150:300] = 255  # both ends of the 8-bit range
    (tmp_path / "in").mkdir()
    Image.fromarray(gray).save(tmp_path / "in" / "us.png")
    parser, meta = _inference_parser("cfformer_busi", tmp_path / "in", tmp_path / "out")
    fmt = meta["network_data_format"]["inputs"]["image"]
    item = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "in" / "us.png")})
    x = torch.as_tensor(item["image"])
    assert x.shape == (fmt["num_channels"], *fmt["spatial_shape"]) and str(x.dtype) == f"torch.{fmt['dtype']}"
    lo, hi = fmt["value_range"]
    assert x.min().item() == pytest.approx(lo, abs=1e-4) and x.max().item() == pytest.approx(hi, abs=1e-4)
    torch.manual_seed(0)
    _check_logits(meta, parser.get_parsed_content("network_def"), x[None])


@pytest.mark.slow
def test_braunetpp_metadata_matches_preprocessing_and_network_output(tmp_path):
    hu = np.linspace(-1000, 1500, 64 * 64 * 4).reshape(64, 64, 4).astype(np.int16)  # beyond both window ends
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 3.0, 1.0])), str(tmp_path / "in" / "ct.nii.gz"))
    parser, meta = _inference_parser("braunetpp_synapse", tmp_path / "in", tmp_path / "out")
    fmt = meta["network_data_format"]["inputs"]["image"]
    assert fmt["format"] != "hounsfield"  # the network never sees HU: the window is applied first
    vol = torch.as_tensor(
        parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "in" / "ct.nii.gz")})["image"]
    )
    assert vol.shape[0] == fmt["num_channels"] and str(vol.dtype) == f"torch.{fmt['dtype']}"
    assert [vol.min().item(), vol.max().item()] == fmt["value_range"] == [-1, 1]
    # the slice inferer feeds each axial slice resized to the network grid
    x = F.interpolate(vol[None, ..., 2], size=tuple(fmt["spatial_shape"]), mode="bicubic").clamp(-1, 1)
    torch.manual_seed(0)
    _check_logits(meta, parser.get_parsed_content("network_def"), x)
