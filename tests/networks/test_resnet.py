"""ResNet34 features against the torchvision reference fixture, and the ImageNet loader."""

from __future__ import annotations

import math

import pytest
import torch

from hybridseg.io import InputDataError
from hybridseg.networks.resnet import (
    BasicBlock,
    ResNet34Features,
    load_resnet34_imagenet,
    resnet34_state_dict_from_torchvision,
)
from tests.reference import assert_close, crc32_state_dict, load_fixture, max_abs_diff

NET = "cfformer"


def meta_model(in_channels: int = 3) -> ResNet34Features:
    """Shapes only: enough for loader checks that fail before any tensor is copied."""
    with torch.device("meta"):
        return ResNet34Features(in_channels)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_fixture(NET, "resnet34_features.pt")


@pytest.fixture(scope="module")
def torchvision_sd(fixture) -> dict[str, torch.Tensor]:
    """The fixture's torchvision resnet34 key table filled with crc32-v1 values (``fc`` included)."""
    return crc32_state_dict(fixture["keys"])


@pytest.fixture(scope="module")
def checkpoint(torchvision_sd, tmp_path_factory):
    """The filled torchvision-layout state dict saved as a checkpoint file."""
    path = tmp_path_factory.mktemp("resnet") / "resnet34.pth"
    torch.save(torchvision_sd, path)
    return path


def test_fill_checksums_match_the_reference_fill(fixture, torchvision_sd):
    for name, (s, a, first, last) in fixture["fill_checksums"].items():
        t = torchvision_sd[name].double().flatten()
        assert math.isclose(t.sum().item(), s, rel_tol=1e-9, abs_tol=1e-9), name
        assert math.isclose(t.abs().sum().item(), a, rel_tol=1e-9, abs_tol=1e-12), name
        assert (t[0].item(), t[-1].item()) == (first, last), name


def test_resnet34_features_match_reference_stem_maxpool_and_every_layer(fixture, torchvision_sd):
    model = ResNet34Features().eval()
    model.load_state_dict(resnet34_state_dict_from_torchvision(torchvision_sd, model), strict=True)
    refs = fixture["outputs"]
    with torch.no_grad():
        stem = model.stem(fixture["input"])
        assert_close(stem, refs["relu_64x112x112"], "stem")
        y = model.maxpool(stem)
        assert_close(y, refs["maxpool_64x56x56"], "maxpool")
        for i, (stage, name) in enumerate(zip(model.stages(), list(refs)[2:], strict=True)):
            y = stage(y)
            assert name.startswith(f"layer{i + 1}_")
            assert_close(y, refs[name], name)
        feats = model(fixture["input"])
    assert len(feats) == 5 and torch.equal(feats[-1], y)


def test_parameter_count_equals_reference_used_in_forward(fixture):
    with torch.device("meta"):
        model = ResNet34Features()
    assert sum(p.numel() for p in model.parameters()) == fixture["param_counts"]["params_used_in_forward"]
    assert (
        sum(p.numel() for p in model.parameters()) == 21_284_672
    )  # torchvision resnet34 without fc, independent of the fixture


def test_first_block_of_layers_2_to_4_downsamples_with_stride_on_the_first_3x3():
    model = meta_model()
    for stage in model.stages()[1:]:
        block = stage[0]
        assert isinstance(block, BasicBlock) and block.conv1.stride == (2, 2) and block.downsample is not None
        assert block.downsample[0].stride == (2, 2) and block.downsample[0].kernel_size == (1, 1)
    assert all(b.downsample is None for b in model.layer1)


def test_loader_reads_torchvision_checkpoint_and_ignores_fc(checkpoint, torchvision_sd):
    model = ResNet34Features()
    assert load_resnet34_imagenet(model, checkpoint) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.layer3[5].bn2.running_var, torchvision_sd["layer3.5.bn2.running_var"])


def test_loader_accepts_old_checkpoints_without_batchnorm_counters(torchvision_sd, tmp_path):
    sd = {k: v for k, v in torchvision_sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    model = ResNet34Features()
    load_resnet34_imagenet(model, tmp_path / "old.pth")
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])


def test_gray_model_with_summed_stem_equals_rgb_model_on_repeated_gray_image(checkpoint):
    rgb, gray = ResNet34Features(3).eval(), ResNet34Features(1).eval()
    load_resnet34_imagenet(rgb, checkpoint)
    load_resnet34_imagenet(gray, checkpoint)
    g = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = rgb.stem(g.repeat(1, 3, 1, 1)), gray.stem(g)
    assert max_abs_diff(a, b) <= 1e-5 * a.abs().max().item()


def test_loader_error_lists_missing_unexpected_and_misshapen_keys(torchvision_sd, tmp_path):
    sd = dict(torchvision_sd)
    del sd["layer2.0.downsample.1.running_mean"]
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    sd["layer4.2.conv2.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(InputDataError) as err:
        load_resnet34_imagenet(meta_model(), tmp_path / "bad.pth")
    msg = str(err.value)
    assert str(tmp_path / "bad.pth") in msg
    for part in (
        "layer2.0.downsample.1.running_mean",
        "layer5.0.conv1.weight",
        "layer4.2.conv2.weight [512, 512, 1, 1]",
    ):
        assert part in msg


def test_loader_refuses_a_stem_that_cannot_be_adapted(torchvision_sd, tmp_path):
    torch.save(torchvision_sd, tmp_path / "rgb.pth")
    with pytest.raises(InputDataError, match="conv1.weight has 3 input channels"):
        load_resnet34_imagenet(meta_model(in_channels=2), tmp_path / "rgb.pth")


def test_loader_rejects_missing_file_and_non_tensor_entries(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        load_resnet34_imagenet(meta_model(), tmp_path / "absent.pth")
    torch.save({"conv1.weight": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(InputDataError, match="not a plain state dict"):
        load_resnet34_imagenet(meta_model(), tmp_path / "list.pth")
