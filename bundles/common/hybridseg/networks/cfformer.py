"""CFFormer: ResNet34 and Swin-V2 encoders exchanging features at four stages (CFCA + XFF), U-Net decoder.

Built as published (the authors' code; facts and sources: ``docs/networks.md``): at every stage k the two
branches run side by side, CFCA swaps channel information between them, both fused tensors feed the
next stage of their own branch, and XFF fuses them spatially into the decoder's skip k (with the
transformer's channel count). Tensors are NCHW except inside the Swin stages (NHWC).

Variants: ``s`` = ResNet34 + Swin-V2-T, ``b`` (default) = ResNet34 + Swin-V2-S, ``l`` = ResNet34 + Swin-V2-B;
built by :func:`cfformer_s`, :func:`cfformer_b`, :func:`cfformer_l` (the model's ``variant`` and ``swin_name``
say which ImageNet Swin-V2 file fits it).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridseg.io import InputDataError, shape_str
from hybridseg.networks.blocks import init_linear_and_layer_norm_
from hybridseg.networks.resnet import ResNet34Features, resnet34_state_dict_from_torchvision
from hybridseg.networks.swin_v2 import (
    PRETTY_NAMES,
    SwinV2Features,
    equal_constant,
    relative_coords_table,
    relative_position_index,
    swin_v2_name_of,
    swin_v2_shape_of,
    swin_v2_state_dict_from_torchvision,
)
from hybridseg.weights import LoadReport, load_weights_file

log = logging.getLogger(__name__)

# CPU capabilities on which the network runs its convolutions NCHW rather than channels_last (see
# :func:`default_channels_last`).
NCHW_CPU_CAPABILITIES = ("AVX2",)


def default_channels_last() -> bool:
    """The convolution layout for a network built here: channels_last, except NCHW on an AVX2-class CPU without GPU.

    Measured on CFFormer-B at 224 (docs/performance.md): with oneDNN's AVX2 kernels an NCHW training step takes
    0.92x the channels_last one (a forward pass 1.04x); with AVX-512 channels_last is as fast to train and faster
    to infer.
    """
    return torch.cuda.is_available() or torch.backends.cpu.get_cpu_capability() not in NCHW_CPU_CAPABILITIES


VARIANTS: dict[str, str] = {"s": "swin_v2_t", "b": "swin_v2_s", "l": "swin_v2_b"}
CNN_CHANNELS = (64, 128, 256, 512)
STEM_CHANNELS = 64
# Input sides must be multiples of the deepest stride so both branches meet at equal sizes.
SIZE_MULTIPLE = 32


class SqueezeExcite(nn.Module):
    """SE gates without shortcut: (B, C, H, W) -> spatial mean -> Linear-ReLU-Linear -> sigmoid -> (B, C)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C) gates in (0, 1)."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))


class CFCA(nn.Module):
    """Cross feature channel attention between a transformer (B, Ct, H, W) and a CNN (B, Cc, H, W) tensor.

    ``attn = s_cnn s_trans^T`` (B, Cc, Ct) is the outer product of the two SE gate vectors (no scaling);
    ``out1 = softmax(attn, over Ct) @ trans`` goes to the CNN side (B, Cc, H, W) and
    ``out2 = softmax(attn, over Cc)^T @ cnn`` to the transformer side (B, Ct, H, W).
    """

    def __init__(self, trans_channels: int, cnn_channels: int) -> None:
        super().__init__()
        self.se_trans = SqueezeExcite(trans_channels, cnn_channels)
        self.se_cnn = SqueezeExcite(cnn_channels, trans_channels)

    def attention(self, trans: torch.Tensor, cnn: torch.Tensor) -> torch.Tensor:
        """Attention logits (B, Cc, Ct): ``attn[b, i, j] = s_cnn[b, i] * s_trans[b, j]``."""
        return self.se_cnn(cnn).unsqueeze(2) * self.se_trans(trans).unsqueeze(1)

    def forward(self, trans: torch.Tensor, cnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trans (B, Ct, H, W), cnn (B, Cc, H, W)) -> (out1 (B, Cc, H, W), out2 (B, Ct, H, W))."""
        b, ct, h, w = trans.shape
        cc = cnn.shape[1]
        attn = self.attention(trans, cnn)
        a1 = torch.softmax(attn, dim=2)
        a2 = torch.softmax(attn, dim=1)
        # Channel mixing as batched matmuls on (B, HW, C) token rows: views for channels_last inputs
        # (the network's layout), and the results come out channels_last too.
        t_rows = trans.permute(0, 2, 3, 1).reshape(b, h * w, ct)
        c_rows = cnn.permute(0, 2, 3, 1).reshape(b, h * w, cc)
        out1 = torch.bmm(t_rows, a1.transpose(1, 2).to(t_rows.dtype))  # (B, HW, Cc)
        out2 = torch.bmm(c_rows, a2.to(c_rows.dtype))  # (B, HW, Ct)
        return out1.view(b, h, w, cc).permute(0, 3, 1, 2), out2.view(b, h, w, ct).permute(0, 3, 1, 2)


class XFF(nn.Module):
    """X-spatial feature fusion: plain biased convs, no norm or activation.

    ``cnn_f = cnn + Conv3x3(trans)``, ``trans_f = trans + Conv5x5(cnn)``,
    ``out = Conv3x3(cat[cnn_f, trans_f])``; (trans (B, Ct, H, W), cnn (B, Cc, H, W)) -> (B, C_out, H, W).
    """

    def __init__(self, trans_channels: int, cnn_channels: int, out_channels: int) -> None:
        super().__init__()
        self.trans_conv = nn.Conv2d(trans_channels, cnn_channels, kernel_size=3, padding=1)
        self.cnn_conv = nn.Conv2d(cnn_channels, trans_channels, kernel_size=5, padding=2)
        self.out_conv = nn.Conv2d(cnn_channels + trans_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, trans: torch.Tensor, cnn: torch.Tensor) -> torch.Tensor:
        """(B, Ct, H, W), (B, Cc, H, W) -> (B, C_out, H, W); the CNN part comes first in the concat."""
        cnn_f = cnn + self.trans_conv(trans)
        trans_f = trans + self.cnn_conv(cnn)
        return self.out_conv(torch.cat([cnn_f, trans_f], dim=1))


class NoChannelExchange(nn.Module):
    """CFCA switched off (ablation): nothing crosses between the branches at the stage.

    (trans (B, Ct, H, W), cnn (B, Cc, H, W)) -> (zeros (B, Cc, H, W), zeros (B, Ct, H, W)), so each branch
    feeds its own next stage unchanged, as in the article's "CNN + Transformer" and "+ XFF only" rows.
    """

    def forward(self, trans: torch.Tensor, cnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Ct, H, W), (B, Cc, H, W) -> (B, Cc, H, W), (B, Ct, H, W) of zeros."""
        return torch.zeros_like(cnn), torch.zeros_like(trans)


class PlainFusion(nn.Module):
    """XFF switched off (ablation): the article's plain convolution, ``Conv3x3(cat[cnn, trans])``.

    (trans (B, Ct, H, W), cnn (B, Cc, H, W)) -> (B, C_out, H, W); biased, no norm or activation, like XFF's
    own output conv.
    """

    def __init__(self, trans_channels: int, cnn_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(cnn_channels + trans_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, trans: torch.Tensor, cnn: torch.Tensor) -> torch.Tensor:
        """(B, Ct, H, W), (B, Cc, H, W) -> (B, C_out, H, W); the CNN part comes first in the concat."""
        return self.out_conv(torch.cat([cnn, trans], dim=1))


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    """[Conv3x3 (bias, padding 1), BatchNorm, ReLU] as three layers."""
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class DecoderBlock(nn.Sequential):
    """(Conv3x3, BN, ReLU) x 2, ConvT 2x2/2: (B, in, H, W) -> (B, out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            *conv_bn_relu(in_channels, in_channels),
            *conv_bn_relu(in_channels, out_channels),
            nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2),
        )


class SegmentationHead(nn.Sequential):
    """(Conv3x3, BN, ReLU) x 2, then Conv1x1 to raw class logits: (B, C, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(
            *conv_bn_relu(channels, channels),
            *conv_bn_relu(channels, channels),
            nn.Conv2d(channels, num_classes, kernel_size=1),
        )


class CFFormerDecoder(nn.Module):
    """U-Net decoder: skips (C0, H/2), (C1, H/4), (C2, H/8), (C3, H/16), (C4, H/32) -> (B, width, H, W).

    Each step concatenates the skip FIRST and the upsampled tensor second. CFFormer: C0 = width = 64; the
    Transformer-only ablation has no H/2 features (C0 = 0, an empty skip).
    """

    def __init__(self, channels: tuple[int, int, int, int, int], width: int = STEM_CHANNELS) -> None:
        super().__init__()
        c0, c1, c2, c3, c4 = channels
        self.upconv5 = DecoderBlock(c4, c3)
        self.upconv4 = DecoderBlock(2 * c3, c2)
        self.upconv3 = DecoderBlock(2 * c2, c1)
        self.upconv2 = DecoderBlock(2 * c1, width)
        self.upconv1 = DecoderBlock(c0 + width, width)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """[skip0 .. skip4] (NCHW) -> (B, 64, H, W) features at the input resolution."""
        s0, s1, s2, s3, s4 = skips
        up = self.upconv5(s4)
        up = self.upconv4(torch.cat([s3, up], dim=1))
        up = self.upconv3(torch.cat([s2, up], dim=1))
        up = self.upconv2(torch.cat([s1, up], dim=1))
        return self.upconv1(torch.cat([s0, up], dim=1))


class CFFormerEncoder(nn.Module):
    """The two backbones with CFCA and XFF at the four stages: (B, C_in, H, W) -> five NCHW skips.

    Skips: (64, H/2) from the ResNet stem, then (Ct_k, H/2^(k+1)) from XFF_k for k = 1..4.
    Ablations: ``cfca=False`` puts :class:`NoChannelExchange` in CFCA's place, ``xff=False``
    :class:`PlainFusion` in XFF's (the modules keep their names, so the forward is the same).
    ``channels_last=False``: the Swin stage outputs are copied to NCHW for the CNN side (see ``CFFormer``).
    """

    __jit_unused_properties__ = ["skip_channels"]  # construction-time information, not part of a scripted forward

    def __init__(
        self,
        swin_name: str,
        in_channels: int,
        stochastic_depth_prob: float | None = None,
        cfca: bool = True,
        xff: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.cnn = ResNet34Features(in_channels)
        self.transformer = SwinV2Features(swin_name, in_channels, stochastic_depth_prob)
        for k, (ct, cc) in enumerate(zip(self.transformer.channels, CNN_CHANNELS, strict=True), start=1):
            self.add_module(f"cfca{k}", CFCA(ct, cc) if cfca else NoChannelExchange())
            self.add_module(f"xff{k}", XFF(ct, cc, ct) if xff else PlainFusion(ct, cc, ct))

    @property
    def skip_channels(self) -> tuple[int, int, int, int, int]:
        """Channels of skip0..skip4."""
        c1, c2, c3, c4 = self.transformer.channels
        return (STEM_CHANNELS, c1, c2, c3, c4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [skip0, skip1, skip2, skip3, skip4]."""
        skips = [self.cnn.stem(x)]
        # The four stages written out: TorchScript indexes submodules by literal positions only. The Swin
        # branch starts from the raw image (patch embedding); its NHWC stage outputs go to the CNN's layout.
        c = self.cnn.layer1(self.cnn.maxpool(skips[0]))
        t = self._to_cnn_layout(self.transformer.features[1](self.transformer.features[0](x)))
        c, t = _exchange(c, t, self.cfca1(t, c))
        skips.append(self.xff1(t, c))
        c = self.cnn.layer2(c)
        t = self._to_cnn_layout(self.transformer.features[3](self.transformer.features[2](t.permute(0, 2, 3, 1))))
        c, t = _exchange(c, t, self.cfca2(t, c))
        skips.append(self.xff2(t, c))
        c = self.cnn.layer3(c)
        t = self._to_cnn_layout(self.transformer.features[5](self.transformer.features[4](t.permute(0, 2, 3, 1))))
        c, t = _exchange(c, t, self.cfca3(t, c))
        skips.append(self.xff3(t, c))
        c = self.cnn.layer4(c)
        t = self._to_cnn_layout(self.transformer.features[7](self.transformer.features[6](t.permute(0, 2, 3, 1))))
        c, t = _exchange(c, t, self.cfca4(t, c))
        skips.append(self.xff4(t, c))
        return skips

    def _to_cnn_layout(self, t: torch.Tensor) -> torch.Tensor:
        """A Swin stage output (B, H, W, C) as the CNN side's (B, C, H, W): a view, or an NCHW copy."""
        t = t.permute(0, 3, 1, 2)
        return t if self.channels_last else t.contiguous()


def _exchange(
    cnn: torch.Tensor, trans: torch.Tensor, cfca_out: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add CFCA's (to_cnn, to_trans) to the branches; both fused streams feed the next stage of their own."""
    return cnn + cfca_out[0], trans + cfca_out[1]


class CNNEncoder(nn.Module):
    """CNN-only ablation encoder, ResNet34 alone: (B, C_in, H, W) -> [stem (64, H/2), layer1..4 (64, 128,
    256, 512 at H/4 .. H/32)] as the decoder's five NCHW skips."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.cnn = ResNet34Features(in_channels)

    __jit_unused_properties__ = ["skip_channels"]

    @property
    def skip_channels(self) -> tuple[int, int, int, int, int]:
        """Channels of skip0..skip4."""
        return (STEM_CHANNELS, *CNN_CHANNELS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [skip0, skip1, skip2, skip3, skip4]."""
        return self.cnn(x)


class TransformerEncoder(nn.Module):
    """Transformer-only ablation encoder, Swin-V2 alone: (B, C_in, H, W) -> [empty (0, H/2), stage 1..4
    (Ct_k, H/4 .. H/32)] as NCHW skips; Swin has no H/2 features, so skip 0 holds no channels."""

    def __init__(self, swin_name: str, in_channels: int, stochastic_depth_prob: float | None = None) -> None:
        super().__init__()
        self.transformer = SwinV2Features(swin_name, in_channels, stochastic_depth_prob)

    __jit_unused_properties__ = ["skip_channels"]

    @property
    def skip_channels(self) -> tuple[int, int, int, int, int]:
        """Channels of skip0..skip4."""
        c1, c2, c3, c4 = self.transformer.channels
        return (0, c1, c2, c3, c4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [skip0 (empty), skip1, skip2, skip3, skip4]."""
        skips = [x.new_zeros((x.shape[0], 0, x.shape[2] // 2, x.shape[3] // 2))]
        for t in self.transformer(x):
            skips.append(t.permute(0, 3, 1, 2))  # NHWC -> NCHW view
        return skips


ENCODERS = ("hybrid", "cnn", "transformer")


def reference_init_(module: nn.Module) -> None:
    """The reference's fresh-network init (decoder, head, CFCA): Linear trunc-normal(0.02), conv He-normal."""
    for m in module.modules():
        init_linear_and_layer_norm_(m)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CFFormer(nn.Module):
    """CFFormer segmentation network: (B, in_channels, H, W) -> raw logits (B, num_classes, H, W).

    H and W must be multiples of 32 (Swin pads its maps to the 8x8 window itself). ``variant`` is
    ``s`` (Swin-V2-T), ``b`` (Swin-V2-S, default) or ``l`` (Swin-V2-B). ``stochastic_depth_prob``
    overrides the Swin drop-path maximum (0.2 / 0.3 / 0.5 by default). Fresh weights follow the
    reference: torchvision's init for the backbones, trunc-normal/He-normal for CFCA, decoder and
    head, PyTorch defaults for XFF. ImageNet backbones: ``load_imagenet_weights``.

    Ablations (the article's Table 3): ``cfca=False`` (no channel exchange between the branches),
    ``xff=False`` (skips fused by one plain 3x3 convolution instead of XFF), ``encoder="cnn"``
    (ResNet34 + decoder) or ``encoder="transformer"`` (Swin-V2 + decoder). The defaults build CFFormer.

    ``channels_last`` sets the memory layout of the convolutions' weights and activations (the same numbers up
    to float rounding); None picks the faster one for this machine (:func:`default_channels_last`).
    """

    def __init__(
        self,
        variant: str = "b",
        in_channels: int = 3,
        num_classes: int = 1,
        stochastic_depth_prob: float | None = None,
        encoder: str = "hybrid",
        cfca: bool = True,
        xff: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown CFFormer variant {variant!r}; choose one of {sorted(VARIANTS)}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        if encoder not in ENCODERS:
            raise ValueError(f"unknown CFFormer encoder {encoder!r}; choose one of {ENCODERS}")
        if encoder != "hybrid" and not (cfca and xff):
            raise ValueError(f"cfca and xff fuse the two branches of the hybrid encoder; encoder={encoder!r} has one")
        self.variant, self.in_channels, self.num_classes = variant, in_channels, num_classes
        self.swin_name = VARIANTS[variant]  # the torchvision ImageNet Swin-V2 model this variant is built on
        self.size_multiple = SIZE_MULTIPLE  # an attribute: scripted code reads no module globals
        self.channels_last = default_channels_last() if channels_last is None else channels_last
        if encoder == "cnn":
            self.encoder: nn.Module = CNNEncoder(in_channels)
        elif encoder == "transformer":
            self.encoder = TransformerEncoder(VARIANTS[variant], in_channels, stochastic_depth_prob)
        else:
            self.encoder = CFFormerEncoder(
                VARIANTS[variant], in_channels, stochastic_depth_prob, cfca, xff, channels_last=self.channels_last
            )
        self.decoder = CFFormerDecoder(self.encoder.skip_channels)
        self.head = SegmentationHead(STEM_CHANNELS, num_classes)
        attention = [m for m in self.encoder.modules() if isinstance(m, CFCA)]
        for module in (self.decoder, self.head, *attention):
            reference_init_(module)
        # Conv weights stored in the activations' layout; otherwise oneDNN reorders every weight on every
        # call (a quarter of the fp32 forward time).
        self.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, num_classes, H, W) raw logits (no sigmoid/softmax)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CFFormer expects (B, {self.in_channels}, H, W) input, got {shape_str(x.shape)}")
        multiple = self.size_multiple
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"CFFormer needs H and W that are multiples of {multiple}, got {shape_str(x.shape[2:])}")
        # channels_last: the Swin branch's native NHWC layout, so the hand-overs between the branches are
        # free views; oneDNN's AVX-512 convolutions run 2-5x faster in it than NCHW (default_channels_last).
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        return self.head(self.decoder(self.encoder(x))).contiguous()


def cfformer_s(in_channels: int = 3, num_classes: int = 1, **kwargs: Any) -> CFFormer:
    """CFFormer-S: ResNet34 + Swin-V2-T (ImageNet files ``resnet34`` and ``swin_v2_t``), 98.3 M parameters."""
    return CFFormer("s", in_channels, num_classes, **kwargs)


def cfformer_b(in_channels: int = 3, num_classes: int = 1, **kwargs: Any) -> CFFormer:
    """CFFormer-B (the paper's default): ResNet34 + Swin-V2-S (``resnet34``, ``swin_v2_s``), 119.7 M parameters."""
    return CFFormer("b", in_channels, num_classes, **kwargs)


def cfformer_l(in_channels: int = 3, num_classes: int = 1, **kwargs: Any) -> CFFormer:
    """CFFormer-L: ResNet34 + Swin-V2-B (ImageNet files ``resnet34`` and ``swin_v2_b``), 184.8 M parameters."""
    return CFFormer("l", in_channels, num_classes, **kwargs)


BUILDERS: dict[str, Callable[..., CFFormer]] = {"s": cfformer_s, "b": cfformer_b, "l": cfformer_l}


def builder(variant: str) -> Callable[..., CFFormer]:
    """The builder of a published variant (``s``, ``b`` or ``l``), e.g. a config's ``network_def`` target."""
    if variant not in BUILDERS:
        raise ValueError(f"unknown CFFormer variant {variant!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[variant]


# --- reference (U-Bench / authors' code) state dicts -------------------------------------------------

# Duplicate registrations of the backbones in the reference; each maps to the tensor's first name.
_ALIAS_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^encoder\.cnn_layer0\.0\.(.+)$"), r"encoder.cnn.conv1.\1"),
    (re.compile(r"^encoder\.cnn_layer0\.1\.(.+)$"), r"encoder.cnn.bn1.\1"),
    (re.compile(r"^encoder\.cnn_layer1\.1\.(.+)$"), r"encoder.cnn.layer1.\1"),
    (re.compile(r"^encoder\.cnn_layer([234])\.(.+)$"), r"encoder.cnn.layer\1.\2"),
)
_SWIN_ALIAS = re.compile(r"^encoder\.transformer_layer([1-4])\.([01])\.(.+)$")
# Registered but never run by the reference's forward: ResNet classifier, Swin final norm and head.
_UNUSED_PREFIXES = ("encoder.cnn.fc.", "encoder.transformer.norm.", "encoder.transformer.head.")
_RENAME_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^encoder\.cnn\.(.+)$"), r"encoder.cnn.\1"),
    (re.compile(r"^encoder\.transformer\.features\.(.+)$"), r"encoder.transformer.features.\1"),
    (
        re.compile(r"^encoder\.cdca([1-4])\.channel_self_attn1\.linear([12])\.(weight|bias)$"),
        r"encoder.cfca\1.se_trans.fc\2.\3",
    ),
    (
        re.compile(r"^encoder\.cdca([1-4])\.channel_self_attn2\.linear([12])\.(weight|bias)$"),
        r"encoder.cfca\1.se_cnn.fc\2.\3",
    ),
    (re.compile(r"^encoder\.X_spatial_([1-4])\.(cnn_conv|trans_conv)\.(weight|bias)$"), r"encoder.xff\1.\2.\3"),
    (re.compile(r"^encoder\.X_spatial_([1-4])\.out\.(weight|bias)$"), r"encoder.xff\1.out_conv.\2"),
    (re.compile(r"^decoder\.(upconv[1-5]\..+)$"), r"decoder.\1"),
    (re.compile(r"^decoder\.out\.(.+)$"), r"head.\1"),
)
_STEM_KEYS = ("encoder.cnn.conv1.weight", "encoder.transformer.features.0.0.weight")


def reference_seed_name(key: str) -> str | None:
    """Seed (first) name of a reference alias key such as ``encoder.cnn_layer2.0.conv1.weight``, else None."""
    for pattern, repl in _ALIAS_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    m = _SWIN_ALIAS.match(key)
    if m:
        stage, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"encoder.transformer.features.{2 * stage - 2 + part}.{rest}"
    return None


def convert_reference_state_dict(sd: Mapping[str, torch.Tensor], in_channels: int = 3) -> dict[str, torch.Tensor]:
    """Map a state dict of the reference implementation (``CDFormer`` in U-Bench) to ``CFFormer`` keys.

    - alias keys (``encoder.cnn_layer*``, ``encoder.transformer_layer*``) must hold the same tensor as
      their seed name; they are checked and dropped;
    - the 6 entries the reference never uses (``fc``, Swin ``norm`` and ``head``) are dropped;
    - Swin's constant coordinate buffers are checked against ours (computed, not stored) and dropped;
    - CFCA/XFF/head modules are renamed; for ``in_channels=1`` both 3-channel stems are summed over
      their input channels (exactly the network fed a gray image repeated to three channels).

    Raises ``ValueError`` naming every key it cannot place or that is inconsistent.
    """
    out: dict[str, torch.Tensor] = {}
    unknown, bad_alias, bad_const = [], [], []
    constants = {"relative_coords_table": relative_coords_table(), "relative_position_index": relative_position_index()}
    for key, value in sd.items():
        seed = reference_seed_name(key)
        if seed is not None:
            if seed not in sd:
                bad_alias.append(f"{key} (its seed {seed} is absent)")
            elif sd[seed].shape != value.shape or not torch.equal(sd[seed], value):
                bad_alias.append(f"{key} (differs from {seed})")
            continue
        if key.startswith(_UNUSED_PREFIXES):
            continue
        kind = key.rsplit(".", 1)[-1]
        if kind in constants:  # Swin's coordinate buffers: computed by us, so only checked
            if not equal_constant(value, constants[kind]):
                bad_const.append(key)
            continue
        for pattern, repl in _RENAME_RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    problems = []
    if unknown:
        problems.append(
            f"keys not in the reference CFFormer layout: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    if bad_alias:
        problems.append(f"alias keys inconsistent with their seed: {bad_alias[:20]}")
    if bad_const:
        problems.append(f"Swin constant buffers differ from a window-8 Swin-V2: {bad_const[:20]}")
    if problems:
        raise ValueError("cannot convert the reference state dict: " + "; ".join(problems))
    if in_channels != 3:
        for key in _STEM_KEYS:
            if key in out:
                if in_channels != 1:
                    msg = f"reference stems are 3-channel; in_channels must be 3 or 1, not {in_channels}"
                    raise ValueError(msg)
                out[key] = out[key].sum(dim=1, keepdim=True)
    return out


# --- ImageNet backbones (torchvision checkpoints) ----------------------------------------------------


def check_swin_variant(model: CFFormer, sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a Swin-V2 ImageNet file of another size than the variant's (read from the file's shapes), naming
    the file, the Swin-V2 (and CFFormer variant) it holds and the one this variant needs."""
    expected = model.encoder.transformer.name
    found = swin_v2_name_of(sd)
    if found == expected:
        return
    letters = {v: k for k, v in VARIANTS.items()}
    shape = swin_v2_shape_of(sd)
    if found is not None:
        held = f"{PRETTY_NAMES[found]} weights (CFFormer variant {letters[found]!r})"
    elif shape is not None:
        held = f"a Swin-V2 of width {shape[0]} and depths {list(shape[1])}, which no CFFormer variant uses"
    else:
        held = "no torchvision Swin-V2 weights (no features.0.0.weight patch embedding)"
    raise InputDataError(
        path,
        f"holds {held}, but this CFFormer is variant {model.variant!r}, which needs {PRETTY_NAMES[expected]} "
        f"({expected}) ImageNet weights; the variant letters s/b/l use Swin-V2-T/S/B",
    )


def load_imagenet_weights(
    model: CFFormer, resnet34: str | os.PathLike | None = None, swin: str | os.PathLike | None = None
) -> LoadReport:
    """Load torchvision ImageNet checkpoints into the backbones of ``model`` (all-or-nothing).

    ``resnet34`` is a torchvision ``resnet34`` state dict file and ``swin`` the ``swin_v2_{t,s,b}`` file
    matching the variant (t for ``s``, s for ``b``, b for ``l``; checked from the file's shapes). Files are
    read with ``weights_only=True``; both are checked before either is loaded, and a wrong or mismatched
    file raises ``InputDataError`` naming it and listing the offending keys. For a 1-channel model the RGB
    stem kernels are summed. The report lists the model tensors loaded, the checkpoint entries skipped
    (``<backbone>:<key>``: classifier, constants) and the model tensors left at initialisation (CFCA, XFF,
    decoder, and a backbone without a file).
    """
    enc = model.encoder
    staged = []
    if resnet34 is not None:
        sd = load_weights_file(resnet34)
        staged.append(
            ("resnet34", resnet34, "encoder.cnn.", sd, resnet34_state_dict_from_torchvision(sd, enc.cnn, resnet34))
        )
    if swin is not None:
        sd = load_weights_file(swin)
        check_swin_variant(model, sd, swin)
        converted = swin_v2_state_dict_from_torchvision(sd, enc.transformer, swin)
        staged.append((enc.transformer.name, swin, "encoder.transformer.", sd, converted))
    report = LoadReport()
    for name, path, prefix, raw, converted in staged:
        model.get_submodule(prefix.rstrip(".")).load_state_dict(converted, strict=True)
        report.loaded += [prefix + k for k in converted]
        report.skipped.update({f"{name}:{k}": "not used by CFFormer" for k in sorted(raw) if k not in converted})
        report.files.append(str(path))
        log.info("loaded %s ImageNet weights from %s (%d tensors)", name, path, len(converted))
    loaded = set(report.loaded)
    report.left_at_init = [k for k in model.state_dict() if k not in loaded]
    return report
