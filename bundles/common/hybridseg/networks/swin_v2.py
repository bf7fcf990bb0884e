"""Swin Transformer V2 (T/S/B) feature stages with torchvision's parameter layout, and its ImageNet loader.

Everything inside works on NHWC tensors. ``SwinV2Features.features`` is torchvision's ``features``
Sequential: ``0`` patch embedding, odd indices the block stages, ``2/4/6`` patch merging; the final
norm, pooling and classifier are not registered (they never run in a feature extractor).

Numerics follow torchvision's ``ShiftedWindowAttentionV2`` exactly: zero padding to a multiple of
the window (padded tokens are NOT masked; they take part as keys), the shift switched off on an axis
whose padded size fits in one window, cyclic shift by ``-shift``, cosine attention scaled by
``exp(min(logit_scale, ln 100))``, the continuous position bias ``16 * sigmoid(cpb_mlp(table))``, the
-100 mask between shift regions, and the k third of the qkv bias held at zero in the forward pass.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hybridseg.io import InputDataError
from hybridseg.networks.blocks import DropPath, init_linear_and_layer_norm_
from hybridseg.weights import check_state_dict, load_weights_file, stem_weight_for_channels

WINDOW = 8
# Checkpoint keys of torchvision's classifier model that the feature extractor does not register.
TORCHVISION_SWIN_IGNORED_PREFIXES = ("norm.", "head.")


@dataclass(frozen=True)
class SwinV2Config:
    """Hyper-parameters of one torchvision Swin-V2 model (patch 4, window 8, MLP ratio 4)."""

    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    stochastic_depth_prob: float

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the four stage outputs."""
        return tuple(self.embed_dim * 2**i for i in range(4))


SWIN_V2_CONFIGS: dict[str, SwinV2Config] = {
    "swin_v2_t": SwinV2Config(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "swin_v2_s": SwinV2Config(96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "swin_v2_b": SwinV2Config(128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
}


def relative_coords_table(window: int = WINDOW) -> torch.Tensor:
    """Log-spaced relative coordinates fed to the position-bias MLP: (1, 2w-1, 2w-1, 2) float32."""
    r = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).unsqueeze(0)
    table = table / (window - 1) * 8  # normalise to [-8, 8] (same op order as torchvision)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0


def relative_position_index(window: int = WINDOW) -> torch.Tensor:
    """Index into the (2w-1)^2 bias table for every (query, key) token pair of a window: (w^4,) int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten()


def shift_region_mask(pad_h: int, pad_w: int, window: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """Additive mask (num_windows, w*w, w*w): -100 between tokens of different shift regions, else 0.

    Regions are torchvision's slices ``[0, P-window)``, ``[P-window, P-shift)``, ``[P-shift, P)`` of the
    padded, rolled grid on each axis (a zero shift leaves the axis undivided within any window). Written
    as tensor arithmetic, so a trace built with traced sizes follows the input size.
    """
    rows, cols = torch.arange(pad_h), torch.arange(pad_w)
    region_h = (rows >= pad_h - window).long() + (rows >= pad_h - shift_h).long()
    region_w = (cols >= pad_w - window).long() + (cols >= pad_w - shift_w).long()
    region = (3 * region_h[:, None] + region_w[None, :]).float()
    region = region.view(pad_h // window, window, pad_w // window, window).transpose(1, 2)
    region = region.reshape(-1, window * window)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.where(diff != 0, -100.0, 0.0)


def equal_constant(value: torch.Tensor, const: torch.Tensor) -> bool:
    """True when a stored constant buffer has the shape and exact values of ours."""
    return value.shape == const.shape and torch.equal(value.detach().cpu().to(const.dtype), const)


# Functional form: TorchScript cannot resolve the string annotations that ``from __future__`` makes.
WindowLayout = NamedTuple(  # noqa: UP014 - see above
    "WindowLayout",
    [("gather", torch.Tensor), ("scatter", torch.Tensor), ("shift_mask", torch.Tensor | None), ("padded", bool)],
)
WindowLayout.__doc__ = """Where each token goes for (shifted) window attention on one (H, W) map.

``gather`` (nW*N,): for every window slot (windows row-major, tokens row-major inside) the flat
index ``y*W + x`` of its source token after the cyclic shift, or ``H*W`` for a zero padding token.
``scatter`` (H*W,): the window slot of every original token (inverse of ``gather``).
``shift_mask`` (nW, 1, N, N) additive float mask, or None when the shift is off on both axes.
"""


def window_layout(
    h: int, w: int, window: int, shift: int, device: torch.device | None = None, traced: bool = False
) -> WindowLayout:
    """Index maps equal to torchvision's zero pad to the window, ``roll(-shift)`` and partition (and back).

    The shift is dropped on an axis whose padded size fits in one window, as torchvision does. With
    ``traced`` (sizes are traced tensors inside ``torch.jit.trace``) nothing depends on a Python
    decision about the size: the layout always has a zero token and, for shifted blocks, a mask (all
    zeros where the shift is dropped), so the traced graph stays right for every input size.
    ``device`` None means the CPU.
    """
    if device is None:
        device = torch.device("cpu")
    ph, pw = h + (window - h % window) % window, w + (window - w % window) % window
    # shift * (P > window): arithmetic rather than a branch, so it also holds for traced sizes.
    sh, sw = _shift_if(shift, ph > window), _shift_if(shift, pw > window)
    rows = (torch.arange(ph) + sh) % ph  # roll(-s): rolled row r holds source row (r + s) mod size
    cols = (torch.arange(pw) + sw) % pw
    nwh, nww = ph // window, pw // window
    r = rows.view(nwh, 1, window, 1).expand(nwh, nww, window, window)
    c = cols.view(1, nww, 1, window).expand(nwh, nww, window, window)
    real = (r < h) & (c < w)
    gather = torch.where(real, r * w + c, h * w).flatten()
    # Inverse permutation by a scatter (not a stable argsort, which the ONNX exporter cannot convert):
    # padding slots get distinct keys past h*w, so every key is unique and the first h*w are the tokens.
    slots = torch.arange(ph * pw)
    keys = torch.where(real.flatten(), gather, h * w + slots)
    scatter = torch.zeros(h * w + ph * pw, dtype=torch.long).scatter_(0, keys, slots)[: h * w]
    if traced:
        needs_mask, padded = shift > 0, True
    else:
        needs_mask, padded = bool(sh or sw), bool(ph != h or pw != w)
    mask = shift_region_mask(ph, pw, window, sh, sw).unsqueeze(1).to(device) if needs_mask else None
    return WindowLayout(gather.to(device), scatter.to(device), mask, padded)


def _shift_if(shift: int, fits: bool) -> int:
    """``shift`` if ``fits`` else 0; a product in eager mode (traced sizes make ``fits`` a tensor)."""
    if torch.jit.is_scripting():
        return shift if fits else 0
    return shift * fits


@functools.lru_cache(maxsize=128)
def _cached_window_layout(device: str, h: int, w: int, window: int, shift: int) -> WindowLayout:
    """``window_layout`` built once per (device, size, window, shift); constants only, no parameters."""
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, reusable in training
        return window_layout(h, w, window, shift, torch.device(device))


class QKVLinear(nn.Linear):
    """The joint q/k/v projection (B, N, C) -> (B, N, 3C) with the k third of the bias held at zero."""

    def effective_bias(self) -> torch.Tensor | None:
        """The bias used in the forward pass (3C,): the stored one with its k third replaced by zeros."""
        b = self.bias
        if b is None:
            return None
        c = self.out_features // 3
        return torch.cat([b[:c], torch.zeros_like(b[c : 2 * c]), b[2 * c :]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Swin-V2 has no key bias: the stored k-bias entries (torchvision keeps them) are ignored."""
        return F.linear(x, self.weight, self.effective_bias())


class ShiftedWindowAttentionV2(nn.Module):
    """Swin-V2 (shifted) window cosine self-attention on NHWC: (B, H, W, C) -> (B, H, W, C).

    Parameter names match torchvision (``logit_scale``, ``qkv``, ``proj``, ``cpb_mlp.0``, ``cpb_mlp.2``).
    The coordinate table and index are non-persistent buffers: fixed functions of the window size.
    """

    def __init__(self, dim: int, num_heads: int, window: int = WINDOW, shift: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window, self.shift = dim, num_heads, window, shift
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.qkv = QKVLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.register_buffer("relative_coords_table", relative_coords_table(window), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """Continuous position bias ``16 * sigmoid(cpb_mlp(table))`` per token pair: (1, heads, N, N)."""
        n = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index].view(n, n, self.num_heads).permute(2, 0, 1)
        return (16 * torch.sigmoid(bias)).unsqueeze(0)

    def layout(self, h: int, w: int, device: torch.device) -> WindowLayout:
        """Window layout of an (h, w) map: cached per (device, size) in eager mode, built per call in graphs."""
        if torch.jit.is_scripting():
            return window_layout(h, w, self.window, self.shift, device)  # a scripted module sees real sizes
        if torch.jit.is_tracing():
            # Built inside the graph, so a trace follows the input size instead of freezing it.
            return window_layout(h, w, self.window, self.shift, device, traced=True)
        if torch.compiler.is_compiling():
            return window_layout(h, w, self.window, self.shift, device)  # sizes are static here
        return _cached_window_layout(str(device), h, w, self.window, self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): attention within (shifted, zero-padded) windows, as torchvision."""
        b, h, w, c = x.shape
        n = self.window * self.window
        hd = c // self.num_heads
        layout = self.layout(h, w, x.device)
        # q/k/v of the real tokens only: torchvision projects the zero padding too, and a zero token's
        # projection is just the bias, so one bias row stands in for every padded slot.
        qkv = self.qkv(x.reshape(b, h * w, c))  # (B, HW, 3C)
        if layout.padded:
            pad = self.qkv.effective_bias()
            pad = torch.zeros(3 * c, dtype=qkv.dtype, device=qkv.device) if pad is None else pad.to(qkv.dtype)
            qkv = torch.cat([qkv, pad.expand(b, 1, 3 * c)], dim=1)
        # One gather does torchvision's pad + roll + window partition: (B, HW(+1), 3C) -> (B*nW, N, 3C).
        qkv = qkv.index_select(1, layout.gather).view(-1, n, 3, self.num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, hd)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        # Cosine attention with the scale folded into q; casts keep q/k/v one dtype under autocast.
        q = (F.normalize(q, dim=-1) * scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        mask = self.relative_position_bias()  # (1, heads, N, N)
        shift_mask = layout.shift_mask  # a local, so TorchScript can refine the Optional
        if shift_mask is not None:
            mask = (mask + shift_mask).repeat(b, 1, 1, 1)  # windows vary fastest within B*nW
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=1.0)
        # One gather undoes the partition and the roll and drops the padding; the output projection
        # then runs on the real tokens only (torchvision projects the padded slots and drops them after).
        out = out.transpose(1, 2).reshape(b, -1, c).index_select(1, layout.scatter)
        return self.proj(out).view(b, h, w, c)


class SwinMLP(nn.Sequential):
    """Linear(C -> 4C), exact GELU, Linear(4C -> C) on NHWC; indices 0 and 3 as in torchvision's MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        # torchvision's MLP has Dropout(0) at 2 and 4; Identity keeps the key indices without dead modules.
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))


class SwinTransformerBlockV2(nn.Module):
    """Post-norm Swin-V2 block on NHWC: ``x + sd(norm1(attn(x)))``, then ``x + sd(norm2(mlp(x)))``."""

    def __init__(self, dim: int, num_heads: int, shift: int = 0, drop_path: float = 0.0, window: int = WINDOW):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttentionV2(dim, num_heads, window, shift)
        self.stochastic_depth = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = SwinMLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.stochastic_depth(self.norm1(self.attn(x)))
        return x + self.stochastic_depth(self.norm2(self.mlp(x)))


class PatchMergingV2(nn.Module):
    """Swin-V2 downsampling on NHWC: zero-pad to even, gather 2x2, Linear(4C -> 2C, no bias), LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=1e-5)

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 4C); (row,col) chunks (even,even) (odd,even) (even,odd) (odd,odd)."""
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        return self.norm(self.reduction(self.gather(x)))


class Permute(nn.Module):
    """Reorders tensor dimensions (the NCHW -> NHWC step of the patch embedding)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x.permute(dims)`` (a view)."""
        return x.permute(self.dims)


class PatchEmbed(nn.Sequential):
    """Conv 4x4/4 (C_in -> D), permute to NHWC, LayerNorm(D): (B, C_in, H, W) -> (B, H/4, W/4, D)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__(nn.Conv2d(in_channels, dim, kernel_size=4, stride=4), Permute((0, 2, 3, 1)), nn.LayerNorm(dim))


class SwinV2Features(nn.Module):
    """Swin Transformer V2 feature stages (``features.0..7``) without final norm/head; NHWC outputs.

    ``forward`` returns the four stage outputs (B, H/4, W/4, D), (B, H/8, W/8, 2D), ..., (B, H/32, W/32, 8D).
    Stage k (1-based) is ``features[2k-2]`` (patch embedding or merging) then ``features[2k-1]`` (blocks).
    """

    __jit_unused_properties__ = ["channels"]  # construction-time information, not part of a scripted forward

    def __init__(self, name: str = "swin_v2_s", in_channels: int = 3, stochastic_depth_prob: float | None = None):
        super().__init__()
        if name not in SWIN_V2_CONFIGS:
            raise ValueError(f"unknown Swin-V2 model {name!r}; choose one of {sorted(SWIN_V2_CONFIGS)}")
        cfg = SWIN_V2_CONFIGS[name]
        self.name, self.config, self.in_channels = name, cfg, in_channels
        sd_prob = cfg.stochastic_depth_prob if stochastic_depth_prob is None else stochastic_depth_prob
        total = sum(cfg.depths)
        layers: list[nn.Module] = [PatchEmbed(in_channels, cfg.embed_dim)]
        block_id = 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            dim = cfg.channels[i]
            if i > 0:
                layers.append(PatchMergingV2(dim // 2))
            blocks = []
            for j in range(depth):
                # Drop probability rises linearly over all blocks, 0 for the first, sd_prob for the last.
                p = sd_prob * block_id / (total - 1)
                blocks.append(SwinTransformerBlockV2(dim, heads, shift=0 if j % 2 == 0 else WINDOW // 2, drop_path=p))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*layers)
        self.reset_parameters()

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the four stage outputs."""
        return self.config.channels

    def reset_parameters(self) -> None:
        """torchvision's initialisation: every Linear trunc-normal(0.02) with zero bias, logit scale ln 10."""
        if self.features[0][0].weight.is_meta:
            return  # shape-only model (parameter counting)
        for m in self.modules():
            init_linear_and_layer_norm_(m)
            if isinstance(m, ShiftedWindowAttentionV2):
                with torch.no_grad():
                    m.logit_scale.fill_(math.log(10.0))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) NCHW image -> four NHWC stage outputs."""
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 1:
                outs.append(x)
        return outs


PRETTY_NAMES = {"swin_v2_t": "Swin-V2-T", "swin_v2_s": "Swin-V2-S", "swin_v2_b": "Swin-V2-B"}


def swin_v2_shape_of(sd: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]] | None:
    """(embedding width, blocks per stage) of a torchvision-layout Swin-V2 state dict, read from its
    tensors (patch-embedding kernel and the block indices of ``features.1/3/5/7``); None if it is not one."""
    stem = sd.get("features.0.0.weight")
    if stem is None or stem.ndim != 4:
        return None
    depths = []
    for stage in (1, 3, 5, 7):
        prefix = f"features.{stage}."
        blocks = {k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)}
        depths.append(len(blocks))
    return int(stem.shape[0]), tuple(depths)


def swin_v2_name_of(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Which torchvision Swin-V2 (``swin_v2_t/s/b``) a state dict holds, by its shapes; None if none fits."""
    shape = swin_v2_shape_of(sd)
    for name, cfg in SWIN_V2_CONFIGS.items():
        if shape == (cfg.embed_dim, cfg.depths):
            return name
    return None


def swin_v2_state_dict_from_torchvision(
    sd: Mapping[str, torch.Tensor], model: SwinV2Features, source: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Check a torchvision ``swin_v2_*`` state dict against ``model`` and adapt it.

    Drops the classifier (``norm.*``, ``head.*``); checks the saved coordinate buffers equal the ones we
    compute (a different window size would not) and drops them; sums a 3-channel patch-embedding kernel
    for a 1-channel model. Raises ``InputDataError`` naming ``source`` and listing offending keys.
    """
    out: dict[str, torch.Tensor] = {}
    expected = model.state_dict()
    buffers = dict(model.named_buffers())
    constants = {"relative_coords_table": relative_coords_table(), "relative_position_index": relative_position_index()}
    bad_constants = []
    for key, value in sd.items():
        if key.startswith(TORCHVISION_SWIN_IGNORED_PREFIXES):
            continue
        kind = key.rsplit(".", 1)[-1]
        if kind in constants and key in buffers:
            if not equal_constant(value, constants[kind]):
                bad_constants.append(key)
            continue
        out[key] = value
    if bad_constants:
        raise InputDataError(
            source, f"constant buffers differ from a window-{WINDOW} Swin-V2 (wrong model?): {bad_constants[:10]}"
        )
    key = "features.0.0.weight"
    if key in out:
        out[key] = stem_weight_for_channels(out[key], model.in_channels, key, source)
    check_state_dict(out, expected, source, what=f"a torchvision {model.name} state dict")
    return out


def load_swin_v2_imagenet(model: SwinV2Features, path: str | os.PathLike) -> list[str]:
    """Load torchvision-format ``swin_v2_{t,s,b}`` ImageNet weights from ``path`` into ``model``.

    Returns the checkpoint keys deliberately ignored (final ``norm.*``/``head.*`` and the constant
    coordinate buffers, which are verified first).
    """
    sd = load_weights_file(path)
    converted = swin_v2_state_dict_from_torchvision(sd, model, path)
    model.load_state_dict(converted, strict=True)
    return sorted(k for k in sd if k not in converted)
