"""The bundles' inferers: resized slice-by-slice volume inference and mixed precision on any device."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, NormalizeIntensityd, ScaleIntensityRanged

from hybridseg.inferers import AutocastInferer, ResizedSliceInferer
from hybridseg.transforms import LoadVolumed


class _SliceNet(torch.nn.Module):
    """A fixed 2D "network": 3 logits per pixel from one input channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x, 0.5 * x * x], dim=1)


def _protocol_reference(volume: torch.Tensor, roi: tuple[int, int]) -> torch.Tensor:
    """The papers' test code: each slice resized to the ROI (cubic), argmax, resized back (nearest)."""
    h, w, d = volume.shape
    out = torch.empty((h, w, d), dtype=torch.long)
    for z in range(d):
        sl = F.interpolate(volume[None, None, :, :, z], size=roi, mode="bicubic", align_corners=False)
        lab = _SliceNet()(sl).argmax(1, keepdim=True).float()
        out[:, :, z] = F.interpolate(lab, size=(h, w), mode="nearest")[0, 0].long()
    return out


def test_slice_inferer_equals_the_per_slice_protocol_on_a_loaded_volume_batch(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(40, 36, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    # a collated batch of MetaTensors, as the bundle's DataLoader gives it
    pre = Compose(
        [
            LoadVolumed("image"),
            ScaleIntensityRanged("image", a_min=-3, a_max=3, b_min=0.0, b_max=1.0, clip=True),
            NormalizeIntensityd("image", subtrahend=0.5, divisor=0.5),
        ]
    )
    batch = next(iter(DataLoader(Dataset([{"image": str(tmp_path / "ct.nii.gz")}], pre))))
    inferer = ResizedSliceInferer(roi_size=(16, 16), sw_batch_size=3, output="labels")
    labels = inferer(batch["image"], _SliceNet())
    assert labels.shape == (1, 1, 40, 36, 7)
    expected = _protocol_reference((torch.from_numpy(vol).clamp(-3, 3) + 3) / 6 * 2 - 1, (16, 16))
    assert torch.equal(labels[0, 0].as_tensor().long(), expected)
    logits = ResizedSliceInferer(roi_size=(16, 16), sw_batch_size=4)(batch["image"], _SliceNet())
    assert logits.shape == (1, 3, 40, 36, 7)
    assert torch.equal(logits.argmax(1)[0].as_tensor(), expected)


def test_autocast_inferer_runs_bf16_and_returns_float32():
    seen = {}

    def net(x):
        y = torch.nn.functional.linear(x, torch.eye(4))
        seen["dtype"] = y.dtype
        return y

    out = AutocastInferer(dtype=torch.bfloat16)(torch.randn(2, 4), net)
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32
    assert AutocastInferer(dtype=None)(torch.randn(2, 4), net).dtype == torch.float32


def test_amp_picks_bf16_on_cpu_only_where_the_cpu_has_native_bf16(monkeypatch):
    import hybridseg.inferers as inf

    monkeypatch.setattr(inf, "cpu_has_native_bf16", lambda: True)
    assert inf.autocast_dtype("cpu", True) == torch.bfloat16
    # emulated bf16 (AVX2-only CPUs) is slower than float32: amp then means float32
    monkeypatch.setattr(inf, "cpu_has_native_bf16", lambda: False)
    assert inf.autocast_dtype("cpu", True) is None
    assert inf.autocast_dtype("cpu", False) is None


def test_native_bf16_query_agrees_with_onednn():
    import hybridseg.inferers as inf

    assert inf.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
