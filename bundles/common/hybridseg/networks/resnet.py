"""ResNet34 feature extractor with torchvision's parameter names (no classifier), and its ImageNet loader.

Layout is NCHW throughout. The stem (``conv1 -> bn1 -> relu``) gives 64 channels at 1/2 resolution,
``maxpool + layer1`` 64 at 1/4, then ``layer2..4`` 128/256/512 at 1/8, 1/16, 1/32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from hybridseg.weights import check_state_dict, fill_missing_bn_counters, load_weights_file, stem_weight_for_channels

RESNET34_LAYERS = (3, 4, 6, 3)
RESNET34_CHANNELS = (64, 128, 256, 512)
# torchvision's checkpoint has an ImageNet classifier that the feature extractor does not register.
TORCHVISION_RESNET_IGNORED = ("fc.weight", "fc.bias")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BatchNorm follows)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block on NCHW: conv3x3-BN-ReLU-conv3x3-BN, plus identity (or 1x1 projection), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            # torchvision puts the stride on the first 3x3 and projects the identity with a strided 1x1.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage: ``blocks`` BasicBlocks, the first one strided (keys ``0..blocks-1``)."""
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet34Features(nn.Module):
    """ResNet34 without ``avgpool``/``fc``; names equal torchvision's (``conv1``, ``layer1.0.conv1``...).

    ``forward`` returns the five NCHW feature maps ``[stem, layer1, layer2, layer3, layer4]``; the
    stages can also be called one by one (``stem``, ``maxpool`` + ``layer1``, ``layer2``...).
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        prev = 64
        for i, (blocks, ch) in enumerate(zip(RESNET34_LAYERS, RESNET34_CHANNELS, strict=True)):
            self.add_module(f"layer{i + 1}", make_stage(prev, ch, blocks, stride=1 if i == 0 else 2))
            prev = ch
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He-normal (fan_out) convolutions, BatchNorm weight 1 and bias 0."""
        if self.conv1.weight.is_meta:
            return  # shape-only model (parameter counting); random init on meta is slow and pointless
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 (7x7, stride 2) -> bn1 -> relu: (B, C_in, H, W) -> (B, 64, H/2, W/2)."""
        return self.relu(self.bn1(self.conv1(x)))

    def stages(self) -> list[nn.Module]:
        """The four residual stages ``[layer1, layer2, layer3, layer4]``."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [stem (64, H/2), layer1 (64, H/4), layer2 (128, H/8), ... (512, H/32)]."""
        feats = [self.stem(x)]
        # Stages by name, not through ``stages()``: TorchScript cannot iterate over a list of modules.
        feats.append(self.layer1(self.maxpool(feats[0])))
        feats.append(self.layer2(feats[-1]))
        feats.append(self.layer3(feats[-1]))
        feats.append(self.layer4(feats[-1]))
        return feats


def resnet34_state_dict_from_torchvision(
    sd: Mapping[str, torch.Tensor], model: ResNet34Features, source: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Check a torchvision ``resnet34`` state dict against ``model``; adapt it (drop ``fc``, stem channels).

    A 3-channel ``conv1`` is summed over its input channels for a 1-channel model, which is exactly
    equivalent to feeding the gray image repeated to three channels. Raises ``InputDataError`` naming
    ``source`` and listing missing, unexpected and misshapen keys.
    """
    out = {k: v for k, v in sd.items() if k not in TORCHVISION_RESNET_IGNORED}
    if "conv1.weight" in out:
        out["conv1.weight"] = stem_weight_for_channels(out["conv1.weight"], model.in_channels, "conv1.weight", source)
    expected = model.state_dict()
    fill_missing_bn_counters(out, expected)
    check_state_dict(out, expected, source, what="a torchvision resnet34 state dict")
    return out


def load_resnet34_imagenet(model: ResNet34Features, path: str | os.PathLike) -> list[str]:
    """Load torchvision-format ``resnet34`` ImageNet weights from ``path`` into ``model``.

    Returns the checkpoint keys that were deliberately ignored (the classifier ``fc.*``).
    """
    sd = load_weights_file(path)
    converted = resnet34_state_dict_from_torchvision(sd, model, path)
    model.load_state_dict(converted, strict=True)
    return sorted(k for k in sd if k in TORCHVISION_RESNET_IGNORED)
