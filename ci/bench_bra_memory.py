"""Peak memory (and time) of one bi-level routing attention layer, ours against a straightforward gather.

The layer is BRAU-Net++'s level-0 attention at a 512x512 input: a 128x128 map of 96 channels,
3 heads, n_win 8 (regions of 16x16 = 256 pixels; 512 / 32 = 16 is divisible by 8, so no padding),
topk 2, 4, 8. Each formulation runs once, batch 1, float32, inference mode, in a fresh subprocess,
and the peak resident-set growth over the forward call is reported (the kernel's peak-RSS mark, reset
just before the call, minus the resident set at that moment; glibc returns big blocks to the system,
so this is the peak working set of the call). The children run with ``MALLOC_MMAP_THRESHOLD_`` fixed
at 128 KiB so that every big tensor is its own mapping and RSS follows the live tensors.

Formulations:

* ``gather``: what the official code does, written out here: gather the top-k regions' keys and
  values for every query region into one (N, S^2, topk, region_pixels, C_kv) tensor, split heads
  with copies, materialise the attention logits and probabilities, softmax, multiply.
* ``sdpa-one-shot``: ours with chunking off (``kv_chunk_bytes=None``): one full top-k gather, but
  fused attention (no probabilities stored).
* ``ours``: ours as shipped (default ``kv_chunk_bytes``, 16 MiB): the gather is done per chunk of
  query regions, each chunk's gathered keys/values at most 16 MiB.

``--latency`` also prints the whole network's latency with ``hybridseg.tools.bench`` (batch 1 at 224 in
float32 and bf16 autocast, and a batch-2 training step).

Usage: ``.venv/bin/python ci/bench_bra_memory.py [--topk 2 4 8] [--threads 2] [--latency]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hybridseg.networks.bra import DEFAULT_KV_CHUNK_BYTES, BiLevelRoutingAttention, partition_regions

MAP, DIM, HEADS, N_WIN = 128, 96, 3, 8
FORMULATIONS = ("gather", "sdpa-one-shot", "ours")


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gather_bra(bra: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The straightforward formulation, (N, H, W, C) -> (N, H, W, C), same weights and numbers as ``bra``.

    Materialises the top-k copy of keys/values for every query region and the full attention matrix.
    """
    n, h, w, c = x.shape
    s, dk, m = bra.n_win, bra.qk_dim, bra.num_heads
    hr, wr = h // s, w // s
    t = hr * wr
    qkv = bra.qkv(partition_regions(x, s)).view(n, s * s, t, 2 * dk + c)
    q, kv = qkv[..., :dk], qkv[..., dk:]
    logits = (q.mean(2) * bra.scale) @ kv[..., :dk].mean(2).transpose(-2, -1)  # (N, S^2, S^2)
    r_idx = torch.topk(logits, bra.topk, dim=-1).indices  # (N, S^2, topk)
    ckv = kv.shape[-1]
    # The gather: (N, S^2, topk, T, dk + C), a full copy of the keys/values per routed slot.
    kv_sel = torch.gather(
        kv.unsqueeze(1).expand(-1, s * s, -1, -1, -1),
        2,
        r_idx.view(n, s * s, bra.topk, 1, 1).expand(-1, -1, -1, t, ckv),
    )
    k_sel = kv_sel[..., :dk].reshape(n * s * s, bra.topk * t, m, dk // m).permute(0, 2, 3, 1)
    v_sel = kv_sel[..., dk:].reshape(n * s * s, bra.topk * t, m, c // m).transpose(1, 2)
    qh = q.reshape(n * s * s, t, m, dk // m).transpose(1, 2)
    attn = torch.softmax((qh * bra.scale) @ k_sel, dim=-1)  # (N*S^2, m, T, topk*T) materialised
    out = (attn @ v_sel).transpose(1, 2).reshape(n, s, s, hr, wr, c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(n, h, w, c)
    v = kv[..., dk:].reshape(n, s, s, hr, wr, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
    lce = F.conv2d(v.permute(0, 3, 1, 2), bra.lce.weight, bra.lce.bias, padding=bra.lce.padding, groups=c)
    return bra.proj(out + lce.permute(0, 2, 3, 1))


def _build(topk: int, formulation: str) -> tuple[BiLevelRoutingAttention, torch.Tensor]:
    """The layer (fixed seed, so every formulation has the same weights) and its input."""
    torch.manual_seed(0)
    chunk = None if formulation == "sdpa-one-shot" else DEFAULT_KV_CHUNK_BYTES
    bra = BiLevelRoutingAttention(DIM, HEADS, N_WIN, topk, kv_chunk_bytes=chunk).eval()
    return bra, torch.randn(1, MAP, MAP, DIM)


def child(formulation: str, topk: int, threads: int) -> dict:
    """Run one formulation once in this (fresh) process; return its peak RSS growth and time."""
    torch.set_num_threads(threads)
    bra, x = _build(topk, formulation)
    fn = gather_bra if formulation == "gather" else (lambda b, t: b(t))
    with torch.inference_mode():
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS mark (/proc/self/clear_refs is not writable)")
        before = _status_bytes("VmRSS")
        t0 = time.perf_counter()
        y = fn(bra, x)
        first = time.perf_counter() - t0
        peak = _status_bytes("VmHWM")
        wall, cpu = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(bra, x)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {
        "peak_growth_mib": (peak - before) / 2**20,
        "first_ms": 1e3 * first,
        "median_ms": 1e3 * sorted(wall)[1],
        "cpu_ms": 1e3 * sorted(cpu)[1],
        "checksum": float(y.double().abs().sum()),
    }


def check_same_numbers(topk: int) -> float:
    """Max abs difference between ours and the gather formulation on a smaller map (same weights)."""
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(DIM, HEADS, N_WIN, topk).eval()
    x = torch.randn(1, 64, 64, DIM)
    with torch.inference_mode():
        return (bra(x) - gather_bra(bra, x)).abs().max().item()


def latency(threads: int) -> None:
    """Whole-network latency with hybridseg.tools.bench (medians after warm-up)."""
    from hybridseg.networks.braunetpp import braunetpp
    from hybridseg.tools.bench import time_forward, time_train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = braunetpp()  # the published Synapse network
    rows = [
        ("forward b1 224 fp32", time_forward(model, (1, 1, 224, 224), reps=7)),
        ("forward b1 224 bf16", time_forward(model, (1, 1, 224, 224), dtype=torch.bfloat16, reps=7)),
        ("train step b2 224 fp32", time_train_step(model, (2, 1, 224, 224), 9, reps=3)),
        ("train step b2 224 bf16", time_train_step(model, (2, 1, 224, 224), 9, dtype=torch.bfloat16, reps=3)),
    ]
    print(f"\nBRAUNetPP latency, {threads} threads (median / min ms):")
    for name, r in rows:
        print(f"  {name:24s} {r['median_ms']:8.1f} {r['min_ms']:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency", action="store_true", help="also time the whole network")
    ap.add_argument("--child", nargs=2, metavar=("FORMULATION", "TOPK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.threads)))
        return

    print(
        f"One BRA layer, map {MAP}x{MAP}x{DIM} (512x512 input, level 0), {HEADS} heads, n_win {N_WIN}, "
        f"batch 1, fp32, {args.threads} threads"
    )
    print(
        f"{'topk':>4} {'formulation':>14} {'peak RSS growth MiB':>20} {'median ms':>10} {'cpu ms':>8}  "
        f"{'gathered kv MiB':>15} {'attn matrix MiB':>15}"
    )
    # Big blocks straight from mmap and back on free: otherwise glibc raises its mmap threshold after
    # the first free and serves later blocks from the heap, so RSS would show heap fragmentation
    # rather than the tensors that are alive at the same time.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    for topk in args.topk:
        t = (MAP // N_WIN) ** 2
        gathered = N_WIN**2 * topk * t * 2 * DIM * 4 / 2**20
        attn = N_WIN**2 * HEADS * t * topk * t * 4 / 2**20
        sums = {}
        for form in FORMULATIONS:
            cmd = [sys.executable, __file__, "--child", form, str(topk), "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            sums[form] = res["checksum"]
            print(
                f"{topk:>4} {form:>14} {res['peak_growth_mib']:>20.1f} {res['median_ms']:>10.1f} "
                f"{res['cpu_ms']:>8.0f}  "
                f"{gathered:>15.1f} {attn if form == 'gather' else 0.0:>15.1f}"
            )
        print(
            f"     max |ours - gather| on a 64x64 map: {check_same_numbers(topk):.2e}; "
            f"output checksums {', '.join(f'{v:.6g}' for v in sums.values())}"
        )
    if args.latency:
        latency(args.threads)


if __name__ == "__main__":
    main()
