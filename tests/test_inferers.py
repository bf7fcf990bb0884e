"""The bundles' inferers: resized slice-by-slice volume inference and mixed precision on any device."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, NormalizeIntensityd, ScaleIntensityRanged

from hybridseg.inferers import AutocastInferer, CastWeights, ResizedSliceInferer
from hybridseg.networks.braunetpp import BRAUNetPP
from hybridseg.networks.cfformer import CFFormer
from hybridseg.transforms import LoadVolumed
from tests.networks.test_script import TINY_BRAUNETPP


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


def _plain_autocast(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return network(x).float()


@pytest.mark.parametrize("name", ["cfformer", "braunetpp"])
def test_inference_on_weights_cast_once_equals_autocast_casting_them_per_call(name):
    torch.manual_seed(0)
    if name == "cfformer":
        network, x = CFFormer("s", in_channels=3, num_classes=2).eval(), torch.randn(1, 3, 64, 64)
    else:
        network, x = BRAUNetPP(**TINY_BRAUNETPP).eval(), torch.randn(2, 1, 64, 64)
    inferer = AutocastInferer(dtype=torch.bfloat16)
    with torch.no_grad():
        got = inferer(x, network)
        assert torch.equal(got, _plain_autocast(network, x))  # bitwise: the same bf16 weights reach each op
        copies = inferer.cast_weights._copies
        assert copies and all(t.dtype == torch.bfloat16 for t in copies.values())
        assert inferer(x, network) is not None and inferer.cast_weights._copies is copies  # made once
        # The copies follow the weights: an in-place update (an optimizer step, a reload) makes new ones.
        weight = next(p for n, p in network.named_parameters() if n in copies)
        weight.mul_(1.5)
        assert torch.equal(inferer(x, network), _plain_autocast(network, x))
        assert inferer.cast_weights._copies is not copies
    if name == "braunetpp":  # routing reads BRA's q/k/v weight in float64: it keeps its own
        assert not any(n.endswith("attn.qkv.weight") for n in copies)
        assert any(n.endswith("qkv.weight") for n, m in network.named_parameters() if "attn" in n)


def test_weights_are_cast_per_call_when_training_or_recording_gradients_or_scripted():
    network = torch.nn.Conv2d(1, 2, 3)
    cast = CastWeights()
    with torch.no_grad():
        assert cast(network.train(), torch.bfloat16) is network  # training: the weights change every step
        scripted = torch.jit.script(network.eval())
        assert cast(scripted, torch.bfloat16) is scripted  # a graph cannot be reparametrised
        assert cast(network, None) is network  # no autocast
        assert cast(network, torch.bfloat16) is not network
    assert cast(network, torch.bfloat16) is network  # autograd on: the network's own parameters must be used
