"""BRAU-Net++ (Lan et al., 2024): a U-shaped hybrid CNN-Transformer built from bi-level routing attention.

The network that the official code (``Caipengzhou/BRAU-Netplusplus``) actually runs, Synapse
configuration by default (facts and sources: ``docs/networks.md``): 50,763,648 parameters with SCCSA,
31,403,328 without. The official model also builds a bottleneck stage (``stages.3``) that its forward
never calls; it is not built here, and :func:`convert_official_state_dict` drops its weights.

Layout: the image is NCHW; every feature map inside the network is NHWC (B, H, W, C), which is the
layout of the per-pixel Linear/LayerNorm layers, and whose NCHW view is channels-last for the convs.
The logits are NCHW (B, num_classes, H, W) in channels-last memory.

Any input whose sides are multiples of 32 works; bi-level routing attention pads maps that do not
split into ``n_win`` x ``n_win`` regions (see :mod:`hybridseg.networks.bra`). Maps that do split
(224 with n_win 7, 256 with n_win 8) compute exactly what the official code computes.

Module names differ from the official ones (they say what the module is); the mapping is
:func:`official_to_ours_key`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridseg.io import InputDataError, shape_str
from hybridseg.networks.blocks import DropPath, init_linear_and_layer_norm_
from hybridseg.networks.bra import DEFAULT_KV_CHUNK_BYTES, BiLevelRoutingAttention
from hybridseg.weights import LoadReport, read_state_dict

__all__ = [
    "BRAUNetPP",
    "braunetpp",
    "BRAUBlock",
    "BiLevelRoutingAttention",
    "SCCSA",
    "PatchExpand",
    "FinalPatchExpandX4",
    "Stem",
    "ConvDownsample",
    "convert_official_state_dict",
    "official_to_ours_key",
    "load_official_checkpoint",
    "load_biformer_weights",
    "BiFormerLoadReport",
]


def _pixel_shuffle_nhwc(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W, r*r*C) -> (B, r*H, r*W, C), channel (p1*r + p2)*C + c to pixel (r*h + p1, r*w + p2).

    This is einops ``b h w (p1 p2 c) -> b (h p1) (w p2) c``, not ``nn.PixelShuffle`` (order (c p1 p2)).
    """
    b, h, w, c = x.shape
    c = c // (r * r)  # not //=, which TorchScript does not parse
    return x.view(b, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c)


class Stem(nn.Module):
    """Two-conv stem, image (B, C_in, H, W) -> NHWC (B, H/4, W/4, C): Conv3x3 s2, BN, GELU, Conv3x3 s2, BN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, out_channels, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return x.permute(0, 2, 3, 1)


class ConvDownsample(nn.Module):
    """Halve the resolution: NHWC (B, H, W, C_in) -> (B, H/2, W/2, C_out) by Conv3x3 stride 2 and BN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Per-pixel MLP on (..., C): Linear(C -> hidden), GELU, Linear(hidden -> C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BRAUBlock(nn.Module):
    """BiFormer block in BRAU-Net++'s order, NHWC (B, H, W, C) -> (B, H, W, C).

    ``a = norm1(x); a = a + dwconv3x3(a); a = a + attn(norm1(a)); a = a + mlp(norm2(a))``: the input
    itself is not added back (the official block keeps a shortcut it never uses) and ``norm1`` runs twice.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int,
        topk: int,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        kv_chunk_bytes: int | None = DEFAULT_KV_CHUNK_BYTES,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, kv_chunk_bytes=kv_chunk_bytes)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # NCHW conv on the channels-last view
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SCCSA(nn.Module):
    """Skip-connection channel-spatial attention, NHWC (B, H, W, C) -> (B, H, W, C).

    ``x1 = x * mlp(x)`` (per-pixel MLP C -> C/r -> C, no sigmoid), then
    ``y = x1 * sigmoid(BN(Conv7x7(ReLU(BN(Conv7x7(x1))))))`` with C -> C/r -> C channels.
    """

    def __init__(self, channels: int, rate: int = 4):
        super().__init__()
        mid = channels // rate
        self.channel_fc1 = nn.Linear(channels, mid)
        self.channel_fc2 = nn.Linear(mid, channels)
        self.spatial_conv1 = nn.Conv2d(channels, mid, 7, padding=3)
        self.spatial_bn1 = nn.BatchNorm2d(mid)
        self.spatial_conv2 = nn.Conv2d(mid, channels, 7, padding=3)
        self.spatial_bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_fc2(F.relu(self.channel_fc1(x)))
        s = F.relu(self.spatial_bn1(self.spatial_conv1(x.permute(0, 3, 1, 2))))
        s = self.spatial_bn2(self.spatial_conv2(s))
        return x * torch.sigmoid(s).permute(0, 2, 3, 1)


class PatchExpand(nn.Module):
    """Double the resolution, halve the width: NHWC (B, H, W, C) -> (B, 2H, 2W, C/2).

    Linear(C -> 2C, no bias), 2x2 pixel shuffle (channel order (p1 p2 c)), LayerNorm(C/2, eps 1e-5).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_shuffle_nhwc(self.expand(x), 2))


class FinalPatchExpandX4(nn.Module):
    """Quadruple the resolution, keep the width: NHWC (B, H, W, C) -> (B, 4H, 4W, C).

    Linear(C -> 16C, no bias), 4x4 pixel shuffle (channel order (p1 p2 c)), LayerNorm(C, eps 1e-5).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_shuffle_nhwc(self.expand(x), 4))


class EncoderLevel(nn.Module):
    """One encoder level: downsampling (the stem at level 0) then BRAU blocks; output NHWC (the skip)."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class DecoderLevel(nn.Module):
    """One decoder level, NHWC: concat(x, skip) -> SCCSA(2C) -> Linear(2C -> C) -> blocks -> PatchExpand.

    ``x`` and ``skip`` are (B, H, W, C); the output is (B, 2H, 2W, C/2), or (B, H, W, C) at level 0.
    Without a skip connection (``use_skip=False``, the skip-count ablation) ``x`` goes straight to the blocks.
    """

    def __init__(self, dim: int, blocks: Sequence[nn.Module], use_sccsa: bool, expand: bool, use_skip: bool = True):
        super().__init__()
        self.use_skip = use_skip
        self.skip_attention = SCCSA(2 * dim) if use_sccsa and use_skip else nn.Identity()
        self.skip_fuse = nn.Linear(2 * dim, dim) if use_skip else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.expand = PatchExpand(dim) if expand else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.use_skip:
            x = self.skip_fuse(self.skip_attention(torch.cat([x, skip], dim=-1)))
        for block in self.blocks:
            x = block(x)
        return self.expand(x)


class BRAUNetPP(nn.Module):
    """BRAU-Net++ segmentation network: image (B, in_channels, H, W) -> logits (B, num_classes, H, W).

    H and W must be multiples of 32. A 1-channel image is repeated to 3 channels (as the official
    wrapper does), so the stem always sees 3 channels unless ``in_channels`` is neither 1 nor 3.

    Args:
        in_channels: channels of the input image (1 or 3 for BiFormer/official weights).
        num_classes: output channels (Synapse: 9 including background).
        n_win: regions per side for bi-level routing attention (Synapse 224: 7; ISIC 256: 8).
        use_sccsa: SCCSA on the skip connections (the published 50.76M network); False gives 31.40M.
        num_skips: skip connections kept, 0..3 (the paper's skip-count ablation): the ``num_skips``
            highest-resolution ones, 1/4 first, then 1/8 and 1/16 (3, the default, is the published network).
        embed_dims: widths of levels 0..3 (level 3 is the bottleneck).
        encoder_depths / decoder_depths: BRAU blocks per level 0..2 (shallow to deep).
        topks: routed regions per level 0..2.
        head_dim: channels per attention head (heads = width / head_dim).
        mlp_ratio: hidden width of the block MLPs relative to the level width.
        drop_path_rate: stochastic depth; encoder rates rise linearly over the official 14 encoder
            blocks (including the 2 never-run bottleneck blocks, as the reference), decoder rates
            over each level's blocks.
        kv_chunk_bytes: inference memory bound for the gathered keys/values of one attention layer
            (None: gather all at once).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 9,
        n_win: int = 7,
        use_sccsa: bool = True,
        num_skips: int = 3,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        encoder_depths: Sequence[int] = (2, 2, 8),
        decoder_depths: Sequence[int] = (2, 2, 8),
        topks: Sequence[int] = (2, 4, 8),
        head_dim: int = 32,
        mlp_ratio: float = 3.0,
        drop_path_rate: float = 0.2,
        kv_chunk_bytes: int | None = DEFAULT_KV_CHUNK_BYTES,
    ):
        super().__init__()
        if len(embed_dims) != 4 or len(encoder_depths) != 3 or len(decoder_depths) != 3 or len(topks) != 3:
            raise ValueError("embed_dims needs 4 entries; encoder_depths, decoder_depths and topks need 3")
        if not 0 <= num_skips <= 3:
            raise ValueError(f"num_skips must be 0, 1, 2 or 3 (skip connections at 1/4, 1/8, 1/16), got {num_skips}")
        if any(d % head_dim for d in embed_dims[:3]):
            raise ValueError(f"embed_dims {tuple(embed_dims)} must be multiples of head_dim {head_dim}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.n_win = n_win
        dims = list(embed_dims)
        stem_channels = 3 if in_channels == 1 else in_channels

        # The official schedule spans 14 encoder blocks, the last 2 being the never-run bottleneck stage.
        enc_rates = _linspace(drop_path_rate, sum(encoder_depths) + 2)

        def blocks(level: int, depth: int, rates: list[float]) -> list[BRAUBlock]:
            return [
                BRAUBlock(
                    dims[level], dims[level] // head_dim, n_win, topks[level], mlp_ratio, rates[j], kv_chunk_bytes
                )
                for j in range(depth)
            ]

        levels, cur = [], 0
        for i in range(3):
            down = Stem(stem_channels, dims[0]) if i == 0 else ConvDownsample(dims[i - 1], dims[i])
            levels.append(EncoderLevel(down, blocks(i, encoder_depths[i], enc_rates[cur:])))
            cur += encoder_depths[i]
        self.encoder = nn.ModuleList(levels)
        self.bottleneck = ConvDownsample(dims[2], dims[3])
        self.bottleneck_expand = PatchExpand(dims[3])
        self.decoder = nn.ModuleList(
            DecoderLevel(
                dims[i],
                blocks(i, decoder_depths[i], _linspace(drop_path_rate, decoder_depths[i])),
                use_sccsa,
                expand=i > 0,
                use_skip=i < num_skips,
            )
            for i in range(3)
        )
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = FinalPatchExpandX4(dims[0])
        self.head = nn.Conv2d(dims[0], num_classes, 1, bias=False)
        self.apply(init_linear_and_layer_norm_)  # the official initialisation
        # Conv weights stored channels_last like the activations' NCHW views: otherwise oneDNN copies
        # every weight into that layout on every call (~16 % of the fp32 forward, mostly SCCSA's 7x7s).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BRAUNetPP expects (B, {self.in_channels}, H, W) images, got shape {shape_str(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"BRAUNetPP needs H and W that are multiples of 32, got {shape_str(x.shape[2:])}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = self.bottleneck_expand(self.bottleneck(x))
        # Deepest level first, written out: TorchScript indexes submodules by literal positions only.
        x = self.decoder[2](x, skips[2])
        x = self.decoder[1](x, skips[1])
        x = self.decoder[0](x, skips[0])
        x = self.final_expand(self.norm_up(x))
        # The 1x1 head conv as a per-pixel Linear on NHWC; its NCHW view is channels-last memory.
        return F.linear(x, self.head.weight.flatten(1)).permute(0, 3, 1, 2)


def braunetpp(in_channels: int = 1, num_classes: int = 9, n_win: int = 7, **kwargs: Any) -> BRAUNetPP:
    """BRAU-Net++ as published for Synapse (50.76 M parameters); ``n_win`` = image side / 32 (7 at 224).

    The encoder fits BiFormer-base ImageNet weights (``biformer_base_best.pth``, :func:`load_biformer_weights`).
    """
    return BRAUNetPP(in_channels, num_classes, n_win, **kwargs)


def _linspace(end: float, n: int) -> list[float]:
    """``n`` evenly spaced stochastic-depth rates from 0 to ``end`` (as ``torch.linspace``; works on meta)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Official names -> ours. One table of rules, reused by the full-model converter, the BiFormer loader
# and (through ``official_to_ours_key`` with a submodule kind) the per-submodule fixtures.

_BLOCK_RULES = [
    (r"attn\.qkv\.qkv\.", "attn.qkv."),
    (r"attn\.wo\.", "attn.proj."),
    (r"attn\.lepe\.", "attn.lce."),
    (r"mlp\.0\.", "mlp.fc1."),
    (r"mlp\.3\.", "mlp.fc2."),
]
_BLOCK_KEEP = re.compile(r"(pos_embed|norm1|norm2)\.")
_SUBMODULE_RULES: dict[str, list[tuple[str, str]]] = {
    "bra": [(r"qkv\.qkv\.", "qkv."), (r"wo\.", "proj."), (r"lepe\.", "lce.")],
    "block": _BLOCK_RULES,
    "sccsa": [
        (r"channel_attention\.0\.", "channel_fc1."),
        (r"channel_attention\.2\.", "channel_fc2."),
        (r"spatial_attention\.0\.", "spatial_conv1."),
        (r"spatial_attention\.1\.", "spatial_bn1."),
        (r"spatial_attention\.3\.", "spatial_conv2."),
        (r"spatial_attention\.4\.", "spatial_bn2."),
    ],
    "stem": [(r"0\.", "conv1."), (r"1\.", "bn1."), (r"3\.", "conv2."), (r"4\.", "bn2.")],
    "downsample": [(r"0\.", "conv."), (r"1\.", "bn.")],
    "patch_expand": [(r"(expand|norm)\.", r"\1.")],
    "final_patch_expand_x4": [(r"(expand|norm)\.", r"\1.")],
}


def _rename(kind: str, key: str) -> str | None:
    """Rename a key relative to an official submodule of ``kind``; None if no rule matches."""
    for pattern, repl in _SUBMODULE_RULES[kind]:
        m = re.match(pattern, key)
        if m:
            return m.expand(repl) + key[m.end() :]
    if kind == "block" and _BLOCK_KEEP.match(key):
        return key
    return None


_UNUSED_OFFICIAL = re.compile(r"stages\.3\.")  # the bottleneck blocks the official forward never runs
# Official BRAUnetSystem modules -> ours: (pattern whose last group is the key below the module, the submodule
# kind that renames that part (None: kept as is), our module prefix from the match). First match that renames wins.
_MODEL_RULES: tuple[tuple[re.Pattern[str], str | None, Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"downsample_layers\.0\.(.*)"), "stem", lambda m: "encoder.0.downsample."),
    (re.compile(r"downsample_layers\.3\.(.*)"), "downsample", lambda m: "bottleneck."),
    (re.compile(r"downsample_layers\.(\d)\.(.*)"), "downsample", lambda m: f"encoder.{m[1]}.downsample."),
    (re.compile(r"stages\.([0-2])\.(\d+)\.(.*)"), "block", lambda m: f"encoder.{m[1]}.blocks.{m[2]}."),
    (re.compile(r"layers_up\.0\.(.*)"), "patch_expand", lambda m: "bottleneck_expand."),
    (
        re.compile(r"layers_up\.([1-3])\.blocks\.(\d+)\.(.*)"),
        "block",
        lambda m: f"decoder.{3 - int(m[1])}.blocks.{m[2]}.",
    ),
    (re.compile(r"layers_up\.([12])\.upsample\.(.*)"), "patch_expand", lambda m: f"decoder.{3 - int(m[1])}.expand."),
    (re.compile(r"sccsa([1-3])\.(.*)"), "sccsa", lambda m: f"decoder.{int(m[1]) - 1}.skip_attention."),
    (re.compile(r"concat_back_dim\.([1-3])\.(weight|bias)$"), None, lambda m: f"decoder.{3 - int(m[1])}.skip_fuse."),
    (re.compile(r"(norm_up\.(?:weight|bias))$"), None, lambda m: ""),
    (re.compile(r"up4\.(.*)"), "final_patch_expand_x4", lambda m: "final_expand."),
    (re.compile(r"output\.(weight)$"), None, lambda m: "head."),
)


def official_to_ours_key(key: str, kind: str = "model") -> str | None:
    """Map one official key (without the ``bra_unet.`` prefix) to ours.

    ``kind`` is ``'model'`` for ``BRAUnetSystem`` keys, or a submodule kind (``'bra'``, ``'block'``,
    ``'sccsa'``, ``'stem'``, ``'downsample'``, ``'patch_expand'``, ``'final_patch_expand_x4'``) for keys
    relative to that submodule. Returns None for keys of modules that never run (``stages.3.*``);
    raises KeyError for keys it does not know.
    """
    if kind != "model":
        out = _rename(kind, key)
        if out is None:
            raise KeyError(f"unknown key {key!r} for an official {kind} module")
        return out
    if _UNUSED_OFFICIAL.match(key):
        return None
    for pattern, kind_, prefix in _MODEL_RULES:
        m = pattern.match(key)
        if m:
            tail = m.group(pattern.groups)  # the part below the matched module
            out = tail if kind_ is None else _rename(kind_, tail)
            if out is not None:
                return prefix(m) + out
    raise KeyError(f"unknown official BRAU-Net++ key {key!r}")


def _strip_prefixes(key: str, prefixes: Sequence[str]) -> str:
    """Remove any of ``prefixes`` from the front of ``key``, repeatedly (e.g. ``module.bra_unet.``)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official BRAU-Net++ state dict (``BRAUnet`` wrapper keys ``bra_unet.*``) -> ours.

    Also accepts ``BRAUnetSystem`` keys without the prefix and a DataParallel ``module.`` prefix.
    Drops the weights of the never-run bottleneck stage (``stages.3.*``). Raises ValueError naming
    every key it does not recognise.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        try:
            new = official_to_ours_key(_strip_prefixes(key, ("module.", "bra_unet.")))
        except KeyError:
            unknown.append(key)
            continue
        if new is not None:
            if new in out:
                raise ValueError(f"official keys map twice onto {new!r} (e.g. {key!r})")
            out[new] = value
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise ValueError(f"not an official BRAU-Net++ state dict: unknown keys {shown}")
    return out


def load_official_checkpoint(model: BRAUNetPP, path: str | os.PathLike) -> LoadReport:
    """Load an official BRAU-Net++ checkpoint file (e.g. the authors' Synapse weights) into ``model``.

    Strict: every weight of ``model`` must be present with the right shape, otherwise InputDataError. The
    report lists the entries of the never-run bottleneck stage as skipped.
    """
    sd = read_state_dict(path, ("state_dict", "model"))
    try:
        converted = convert_official_state_dict(sd)
        model.load_state_dict(converted, strict=True)
    except (ValueError, RuntimeError) as err:
        raise InputDataError(path, f"does not fit this BRAU-Net++ configuration: {err}") from err
    kept = len(converted)
    skipped = {k: "never-run bottleneck stage" for k in sd if k not in converted} if len(sd) > kept else {}
    return LoadReport(loaded=sorted(converted), skipped=skipped, files=[str(path)])


# The name earlier releases exported; the report is the shared one.
BiFormerLoadReport = LoadReport


def load_biformer_weights(model: BRAUNetPP, path: str | os.PathLike) -> LoadReport:
    """Load BiFormer ImageNet weights (``biformer_base_best.pth`` layout) into the encoder.

    The checkpoint is a dict whose ``model`` entry holds ``downsample_layers.{0..3}.*``,
    ``stages.{0..3}.{j}.*`` (BiFormer-base depths 4, 4, 18, 4), ``norm.*`` and ``head.*``. As the
    official loader does, every entry whose name exists in the encoder with the same shape is loaded
    (stem, downsampling layers including the bottleneck one, the first encoder_depths[i] blocks of
    stages 0-2); the rest is skipped and the decoder and SCCSA keep their initialisation.
    """
    sd = read_state_dict(path, ("model", "state_dict"))
    own = model.state_dict()
    report = LoadReport(files=[str(path)])
    to_load: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        bare = _strip_prefixes(key, ("module.",)).replace("_checkpoint_wrapped_module.", "")
        if not bare.startswith(("downsample_layers.", "stages.")):
            report.skipped[key] = "not part of the encoder"
            continue
        try:
            ours = official_to_ours_key(bare)
        except KeyError:
            ours = None
        if ours is None:
            report.skipped[key] = "no counterpart (bottleneck-stage block or unknown name)"
        elif ours not in own:
            report.skipped[key] = f"{ours} does not exist in this model (deeper than its encoder)"
        elif own[ours].shape != value.shape:
            report.skipped[key] = f"shape {tuple(value.shape)} != model {tuple(own[ours].shape)} of {ours}"
        else:
            to_load[ours] = value
    if not to_load:
        raise InputDataError(path, "no BiFormer encoder weights in this file match BRAU-Net++")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.left_at_init = [k for k in own if k not in to_load]
    return report
