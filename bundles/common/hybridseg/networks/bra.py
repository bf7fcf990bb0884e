"""Bi-Level Routing Attention (BiFormer), memory-lean and for any map size.

Same numbers as the official formulation (BiFormer ``ops/bra_legacy.py`` as BRAU-Net++ runs it,
``kv_downsample_mode='identity'``, ``param_attention='qkvo'``, no router parameters):

1. q, k, v from one per-pixel Linear (q: qk_dim, k: qk_dim, v: dim), on n_win x n_win regions.
2. Region descriptors: means of q and k over each region's pixels, over the full qk_dim width.
3. Routing logits ``(q_r * s) @ k_r^T`` with ``s = qk_dim ** -0.5``; ``topk`` regions per query
   region, one index set shared by all heads, computed without gradient.
4. Per query region and head: softmax attention (same scale ``s``) over the pixels of its top-k
   regions, keys ordered by (routing rank, pixel row-major).
5. LCE: depthwise 5x5 conv on v over the whole map, added to the attention output before ``wo``.

What differs from the reference is how it is computed, not what:

* No attention matrix: :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels).
* Region means of q and k are computed as the projection of the region mean of x (q and k are
  affine in x, so this is the same quantity up to float rounding).
* No top-k copy of all keys/values at once: at inference, query regions are processed in chunks
  whose gathered keys/values fit ``kv_chunk_bytes`` (16 MiB by default; at a 512x512 input this
  keeps one level-0 layer at ~62 MiB for any topk, against 0.24-0.89 GiB for the plain gather,
  see ``ci/bench_bra_memory.py``). Under autograd the gathered chunk is needed
  for the backward pass anyway; ``checkpoint_chunks=True`` recomputes it there instead of storing it.
* Maps whose sides are not multiples of ``n_win`` are zero-padded at the bottom/right to the next
  multiple (regions of ``ceil(H / n_win)`` x ``ceil(W / n_win)`` pixels). Padded pixels are left out
  of the region means, are masked as keys, are never routed to when a region holds no real pixel,
  and their outputs are cropped; LCE runs on the unpadded v. A map that needs no padding takes the
  unmasked path, so the 224 / n_win 7 and 256 / n_win 8 networks compute exactly the reference.
* Routing (region means and logits) runs in float64, the one float type autocast never casts: eager,
  TorchScript and mixed-precision runs all pick the same regions (a graph cannot switch autocast off,
  and float32 routing in eager against float64 in script flipped near-tied regions). The tensors are
  (N*S*S, C) region means, so this costs nothing measurable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

DEFAULT_KV_CHUNK_BYTES = 16 * 2**20


def partition_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """(N, S*h, S*w, C) -> (N*S*S, h*w, C): regions row-major, pixels row-major inside each region."""
    n, hp, wp, c = x.shape
    h, w = hp // n_win, wp // n_win
    x = x.view(n, n_win, h, n_win, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * n_win * n_win, h * w, c)


def regions_to_image(x: torch.Tensor, n: int, n_win: int, h: int, w: int) -> torch.Tensor:
    """(N*S*S, h*w, C) -> strided view (N, S, h, S, w, C); ``.reshape(N, S*h, S*w, C)`` gives the image."""
    c = x.shape[-1]
    return x.view(n, n_win, n_win, h, w, c).permute(0, 1, 3, 2, 4, 5)


class TopkRouting(nn.Module):
    """Region-to-region routing: (N, R, dk) region queries/keys -> (N, R, topk) int64 region indices.

    Parameter-free. Logits are ``(q_r * scale) @ k_r^T`` in float64 (autocast never casts it, so
    low-precision and scripted runs pick the same regions as float32 ones); indices in descending-logit order.
    ``key_valid`` (R,) bool marks key regions that contain at least one real (unpadded) pixel.
    """

    def __init__(self, topk: int, scale: float):
        super().__init__()
        self.topk = topk
        self.scale = scale

    def forward(
        self, q_region: torch.Tensor, k_region: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            # float64: autocast leaves it alone, in eager and in a scripted graph alike (module docstring).
            logits = (q_region.double() * self.scale) @ k_region.double().transpose(-2, -1)
            if key_valid is not None:
                logits = logits.masked_fill(~key_valid, float("-inf"))
            return torch.topk(logits, k=self.topk, dim=-1).indices


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on an NHWC map: (N, H, W, C) -> (N, H, W, C).

    ``dim`` channels, ``num_heads`` heads, ``n_win`` x ``n_win`` regions, ``topk`` routed regions per
    query region, ``qk_dim`` query/key width (default ``dim``), LCE kernel ``side_dwconv``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int,
        topk: int,
        qk_dim: int | None = None,
        side_dwconv: int = 5,
        kv_chunk_bytes: int | None = DEFAULT_KV_CHUNK_BYTES,
        checkpoint_chunks: bool = False,
    ):
        super().__init__()
        qk_dim = qk_dim or dim
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim {qk_dim} and dim {dim} must both be divisible by num_heads {num_heads}")
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk must be in [1, n_win**2 = {n_win * n_win}], got {topk}")
        self.dim, self.qk_dim, self.num_heads, self.n_win, self.topk = dim, qk_dim, num_heads, n_win, topk
        self.scale = qk_dim**-0.5  # full qk width, not the head width (as the reference)
        self.kv_chunk_bytes = kv_chunk_bytes
        self.checkpoint_chunks = checkpoint_chunks
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        # Routing reads this weight in float64: inference must not hand it a bf16 copy (inferers.CastWeights).
        self.qkv.weights_read_in_full_precision = True
        self.lce = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.router = TopkRouting(topk, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, height, width, c = x.shape
        s = self.n_win
        hr, wr = -(-height // s), -(-width // s)  # region size: ceil(side / n_win)
        pad_h, pad_w = hr * s - height, wr * s - width
        padded = pad_h > 0 or pad_w > 0
        if padded:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        dk = self.qk_dim
        xr = partition_regions(x, s)  # (N*S*S, hr*wr, C)
        qkv = self.qkv(xr)  # (N*S*S, hr*wr, 2dk + C), region order
        q, kv = qkv[..., :dk], qkv[..., dk:]

        # Which pixels of the padded map are real: (S*S, hr*wr) bool, shared by the whole batch.
        valid: torch.Tensor | None = None
        if padded:
            grid = torch.zeros(hr * s, wr * s, 1, dtype=torch.bool, device=x.device)
            grid[:height, :width] = True
            valid = partition_regions(grid.unsqueeze(0), s).squeeze(-1)
        with torch.no_grad():  # routing is not differentiated (module docstring, step 3)
            q_region, k_region, key_valid = self._region_descriptors(xr, n, valid)
        r_idx = self.router(q_region, k_region, key_valid)

        out = regions_to_image(self._attend(q, kv, r_idx, valid), n, s, hr, wr)  # (N, S, hr, S, wr, C) view
        v = regions_to_image(kv[..., dk:], n, s, hr, wr).reshape(n, hr * s, wr * s, c)
        if padded:
            v = v[:, :height, :width]
        # LCE over the whole (unpadded) map, zero padding at its border; channels-last conv.
        lce = self.lce(v.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        if padded:
            out = out.reshape(n, hr * s, wr * s, c)[:, :height, :width] + lce
        else:
            # One pass that both restores image order and adds the LCE term.
            out = (lce.view(n, s, hr, s, wr, c) + out).reshape(n, height, width, c)
        return self.proj(out)

    def _region_descriptors(
        self, xr: torch.Tensor, n: int, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Region means of q and k, (N, S*S, dk) float64 each, and the key-region validity (1, 1, S*S).

        q and k are affine in x, so the mean of the projections is the projection of the mean of x:
        one small float64 Linear on (N*S*S, C) region means instead of reductions over q and k.
        Padded pixels of x are zero, so dividing the region sum by the number of real pixels leaves
        them out of the mean. Pixel sums in float32, the rest in float64 (module docstring).
        """
        r = self.n_win * self.n_win
        dtype = torch.float64
        x_sum = xr.sum(1, dtype=torch.float32).to(dtype)  # (N*S*S, C)
        key_valid: torch.Tensor | None = None
        if valid is None:
            x_mean = x_sum / xr.shape[1]
        else:
            count = valid.sum(1, keepdim=True)  # (S*S, 1) real pixels per region
            x_mean = (x_sum.view(n, r, -1) / count.clamp(min=1)).view(n * r, -1)
            key_valid = (count.squeeze(1) > 0).view(1, 1, r)  # a region without any is never routed to
        dk = self.qk_dim
        qk = F.linear(x_mean, self.qkv.weight[: 2 * dk].to(dtype), self.qkv.bias[: 2 * dk].to(dtype))
        return qk[:, :dk].view(n, r, dk), qk[:, dk:].view(n, r, dk), key_valid

    def _attend(
        self, q: torch.Tensor, kv: torch.Tensor, r_idx: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Token attention of every query region over its routed regions, chunked over query regions.

        q (B, T, dk) and kv (B, T, dk + C) in region order, B = N*S*S regions of T pixels;
        r_idx (N, S*S, topk) -> (B, T, C).
        """
        b, t, _ = q.shape
        r = self.n_win * self.n_win
        # Flat row of kv for each (query region, slot): region index plus the batch item's offset.
        offsets = torch.arange(0, b, r, device=q.device).view(-1, 1, 1)
        flat_idx = (r_idx + offsets).reshape(b, self.topk)

        grad = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
        per_region = self.topk * t * kv.shape[-1] * kv.element_size()
        chunk = b
        if self.kv_chunk_bytes is not None and (not grad or self.checkpoint_chunks):
            chunk = max(1, min(b, self.kv_chunk_bytes // per_region))
        if chunk >= b:
            return self._attend_chunk(q, kv, flat_idx, valid)
        outs: list[torch.Tensor] = []
        for start in range(0, b, chunk):
            end = min(b, start + chunk)
            if grad and not torch.jit.is_scripting():
                outs.append(self._attend_chunk_checkpointed(q[start:end], kv, flat_idx[start:end], valid))
            else:
                outs.append(self._attend_chunk(q[start:end], kv, flat_idx[start:end], valid))
        return torch.cat(outs, 0)

    @torch.jit.unused
    def _attend_chunk_checkpointed(
        self, q: torch.Tensor, kv: torch.Tensor, flat_idx: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """``_attend_chunk`` recomputed in the backward pass instead of storing the gathered keys/values."""
        return torch.utils.checkpoint.checkpoint(self._attend_chunk, q, kv, flat_idx, valid, use_reentrant=False)

    def _attend_chunk(
        self, q: torch.Tensor, kv: torch.Tensor, flat_idx: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Gather the routed regions' k/v for a chunk of query regions and run fused attention.

        q (b, T, dk), kv (B, T, dk + C) for all regions, flat_idx (b, topk) rows of kv -> (b, T, C).
        """
        b, t, dk = q.shape
        m, c = self.num_heads, self.dim
        length = self.topk * t
        kv_sel = kv.index_select(0, flat_idx.reshape(-1)).view(b, length, dk + c)
        # Head split as strided views: channel j of q/k goes to head j // (dk/m), of v to j // (C/m).
        qh = q.view(b, t, m, dk // m).transpose(1, 2)
        kh = kv_sel[..., :dk].view(b, length, m, dk // m).transpose(1, 2)
        vh = kv_sel[..., dk:].view(b, length, m, c // m).transpose(1, 2)
        mask: torch.Tensor | None = None
        if valid is not None:
            r = self.n_win * self.n_win
            mask = valid[flat_idx % r].view(b, 1, 1, length)  # padded pixels never act as keys
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2).reshape(b, t, c)
