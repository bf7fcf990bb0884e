"""The ONNX Runtime inference backends against eager torch, on a CPU-sized BRAU-Net++."""

from __future__ import annotations

import pytest
import torch

from hybridseg.backends import BACKENDS, BackendInferer, OnnxRuntimeNetwork, check_backend
from hybridseg.inferers import AutocastInferer, ResizedSliceInferer
from hybridseg.networks.braunetpp import BRAUNetPP

# a few-layer BRAU-Net++ with the full network's code paths (routing padding, SCCSA skips), 64 px slices
TINY = dict(
    in_channels=1,
    num_classes=4,
    embed_dims=(32, 64, 128, 256),
    encoder_depths=(1, 1, 1),
    decoder_depths=(1, 1, 1),
    topks=(1, 2, 4),
    n_win=4,
)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return BRAUNetPP(**TINY).eval()


def _volume(seed: int, depth: int = 6) -> torch.Tensor:
    # smooth blobs rather than noise: labels with margins, as in images
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.randn(1, 1, 10, 10, depth, generator=g), size=(80, 72, depth))
    return x * 2


def _slices(output: str = "labels") -> ResizedSliceInferer:
    return ResizedSliceInferer(roi_size=(64, 64), sw_batch_size=4, output=output)


@pytest.mark.slow
def test_onnxruntime_logits_match_eager_and_labels_agree(net, tmp_path):
    vol = _volume(0)
    with torch.no_grad():
        ref = _slices("logits")(vol, net)
        got = BackendInferer(_slices("logits"), "onnxruntime", cache_dir=tmp_path)(vol, net)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # depth 6 with 4 slices per batch: batches of 4 and 2 share one graph (dynamic batch axis)
    assert [p.name.split("-")[-1] for p in tmp_path.glob("*.onnx")] == ["1x64x64.onnx"]


@pytest.mark.slow
def test_onnxruntime_int8_labels_agree_with_eager_on_most_voxels(net, tmp_path):
    calibration = [_volume(s)[0] for s in (1, 2)]
    vol = _volume(3)
    with torch.no_grad():
        ref = _slices()(vol, net)
        got = BackendInferer(_slices(), "onnxruntime_int8", cache_dir=tmp_path, calibration_data=calibration)(vol, net)
    assert got.shape == ref.shape
    agreement = (got == ref).float().mean().item()
    assert agreement > 0.9, f"int8 labels agree with eager on {agreement:.1%} of voxels only"
    assert sorted(p.name.split("-")[-1] for p in tmp_path.glob("*.onnx")) == ["1x64x64.onnx", "int8.onnx"]


@pytest.mark.slow
def test_exported_graph_is_reused_from_the_cache_and_redone_when_the_weights_change(net, tmp_path, monkeypatch):
    x = torch.randn(2, 1, 64, 64)
    first = OnnxRuntimeNetwork(net, "onnxruntime", tmp_path)
    ref = first(x)
    (path,) = tmp_path.glob("*.onnx")
    mtime = path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this network and size")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    torch.testing.assert_close(OnnxRuntimeNetwork(net, "onnxruntime", tmp_path)(x), ref)
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    changed = BRAUNetPP(**TINY).eval()
    changed.load_state_dict(net.state_dict())
    weight = list(changed.parameters())[-1]
    with torch.no_grad():
        weight.mul_(2)  # a write after the first hash: the same runner must notice it
    runner = OnnxRuntimeNetwork(changed, "onnxruntime", tmp_path)
    h0 = runner.weights_hash
    with torch.no_grad():
        weight.mul_(0.5)
    assert runner.weights_hash != h0 and runner.model_path((1, 64, 64)) == path
    with torch.no_grad():
        weight.add_(1)
    runner(x)
    assert len(list(tmp_path.glob("*.onnx"))) == 2


def test_torch_backend_passes_the_network_through_unchanged(net):
    seen = []
    BackendInferer(AutocastInferer(dtype=None), "torch")(torch.zeros(1, 1, 64, 64), lambda x: seen.append(x) or x)
    assert len(seen) == 1


@pytest.mark.parametrize("name", ["tensorrt", "ONNXRuntime", ""])
def test_unknown_backend_name_fails_listing_the_choices(name):
    with pytest.raises(ValueError, match="choose one of torch, onnxruntime, onnxruntime_int8"):
        check_backend(name)
    with pytest.raises(ValueError, match=repr(name)):
        BackendInferer(AutocastInferer(dtype=None), name)
    assert BACKENDS == ("torch", "onnxruntime", "onnxruntime_int8")
