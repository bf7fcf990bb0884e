"""Benchmark of the networks: latency, throughput, peak memory, FLOPs and achieved TFLOP/s per setting.

``python -m hybridseg bench`` prints one line per (network, setting, batch) and writes JSON with ``--out``.

How it stays truthful on a shared, noisy machine:

* every setting of a network is warmed up, then the settings are timed **interleaved** (rep 1 of every
  setting, then rep 2, ...), so load from other processes hits all of them alike; the JSON keeps the
  median / min / max of the wall time, the process CPU time, and the **paired ratio** to fp32
  (median over reps of ``t_setting[r] / t_fp32[r]``), which is far less noisy than absolute times;
* the load average before and after the run is recorded, so a reader can tell a quiet run from a busy one;
* FLOPs come from ``torch.utils.flop_counter`` on the network itself, and the achieved TFLOP/s is given
  as a fraction of a matmul peak measured in the same process, in the setting's compute dtype;
* peak memory is the CUDA max allocated, or on CPU the growth of the peak resident set over one call
  (the kernel's VmHWM mark, reset just before the call).

Settings (see :data:`SETTINGS`): ``fp32``, ``bf16`` (autocast), ``bf16_weights`` (inference with a bf16
copy of the weights under autocast, so no weight is re-cast per forward), ``channels_last``,
``compile`` / ``bf16_compile`` (``torch.compile``, opt-in: compile time is recorded as ``first_ms``),
and on CUDA only ``fp16`` / ``bf16`` AMP and ``*_cuda_graphs`` (forward replayed from a CUDA graph).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hybridseg.inferers import autocast_dtype, cpu_has_native_bf16


@dataclass(frozen=True)
class Setting:
    """How one benchmark setting runs the network.

    ``amp``: autocast dtype (None: float32). ``weights``: dtype of a copy of the weights used for
    inference. ``cuda_only``: needs a GPU. ``train``: also timed as a training step.
    """

    amp: torch.dtype | None = None
    weights: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    cuda_only: bool = False
    train: bool = True
    about: str = ""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in (the matmul peak this setting is compared with)."""
        return self.amp or self.weights or torch.float32


SETTINGS: dict[str, Setting] = {
    "fp32": Setting(about="float32 eager"),
    "bf16": Setting(amp=torch.bfloat16, about="bf16 autocast, fp32 weights (re-cast every forward)"),
    "bf16_weights": Setting(
        amp=torch.bfloat16, weights=torch.bfloat16, train=False, about="bf16 weight copy under autocast"
    ),
    "channels_last": Setting(channels_last=True, about="float32, model and input channels_last"),
    "compile": Setting(compile=True, about="float32, torch.compile (inductor)"),
    "bf16_compile": Setting(amp=torch.bfloat16, compile=True, about="bf16 autocast, torch.compile"),
    "fp16": Setting(amp=torch.float16, cuda_only=True, about="fp16 AMP (grad scaler in training)"),
    "fp16_cuda_graphs": Setting(
        amp=torch.float16, cuda_graphs=True, cuda_only=True, train=False, about="fp16 AMP, CUDA graph replay"
    ),
    "bf16_cuda_graphs": Setting(
        amp=torch.bfloat16, cuda_graphs=True, cuda_only=True, train=False, about="bf16 AMP, CUDA graph replay"
    ),
}
# What a plain ``bench`` measures; compile is opt-in because its first call takes minutes on a small CPU.
DEFAULT_SETTINGS = ("fp32", "bf16", "bf16_weights", "channels_last")
CUDA_DEFAULT_SETTINGS = ("fp32", "bf16", "fp16", "bf16_weights", "channels_last", "fp16_cuda_graphs")

NETWORKS = {
    "cfformer_s": ("hybridseg.networks.cfformer", "cfformer_s", {}, 1),
    "cfformer_b": ("hybridseg.networks.cfformer", "cfformer_b", {}, 1),
    "cfformer_l": ("hybridseg.networks.cfformer", "cfformer_l", {}, 1),
    "braunetpp": ("hybridseg.networks.braunetpp", "braunetpp", {"in_channels": 3}, 9),
    # A few-layer BRAU-Net++ with the same code paths, for the CI run of the benchmark itself.
    "braunetpp_tiny": (
        "hybridseg.networks.braunetpp",
        "braunetpp",
        {
            "in_channels": 3,
            "embed_dims": (32, 64, 128, 256),
            "encoder_depths": (1, 1, 1),
            "decoder_depths": (1, 1, 1),
            "topks": (1, 2, 4),
        },
        9,
    ),
}


def build_network(name: str) -> tuple[torch.nn.Module, int]:
    """A freshly initialised network from :data:`NETWORKS` (the published variants' builders) and its classes."""
    import importlib

    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose from {sorted(NETWORKS)}")
    module, cls, kwargs, classes = NETWORKS[name]
    return getattr(importlib.import_module(module), cls)(**kwargs), classes


def have_compiler() -> bool:
    """Whether inductor can build CPU kernels here (it needs a C++ compiler)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def select_settings(
    names: Sequence[str], device: str | torch.device, compiler: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The requested settings that can run on ``device``, and a reason for each one left out.

    Unknown names raise. CUDA-only settings are left out on CPU; ``torch.compile`` settings are left out
    on CPU when no C++ compiler is found (``compiler``: override the check, for tests).
    """
    device = torch.device(device)
    compiler = have_compiler() if compiler is None else compiler
    run, skipped = [], {}
    for name in names:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; choose from {sorted(SETTINGS)}")
        s = SETTINGS[name]
        if s.cuda_only and device.type != "cuda":
            skipped[name] = "needs a CUDA device"
        elif s.compile and device.type == "cpu" and not compiler:
            skipped[name] = "torch.compile on CPU needs a C++ compiler; none found"
        else:
            run.append(name)
    return run, skipped


def autocast_ctx(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast for ``dtype`` on ``device`` (no-op for None / fp32); ``cache=False`` for graph capture."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def summarize(times: list[float]) -> dict[str, float]:
    """Median / min / max of times in seconds, in milliseconds."""
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "reps": len(times),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 2048, reps: int = 5) -> float:
    """Best achieved TFLOP/s of a square matmul in ``dtype`` on ``device`` (after one warm-up).

    The side doubles from 256 up to ``n``, stopping early once one product takes over 0.25 s: emulated
    dtypes (bf16 on an AVX2-only CPU runs at ~0.3 GFLOP/s) would otherwise take minutes per product.
    """
    device = torch.device(device)
    side = min(256, n)
    while True:
        a = torch.randn(side, side, device=device, dtype=dtype)
        b = torch.randn(side, side, device=device, dtype=dtype)
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if side * 2 > n or time.perf_counter() - t0 > 0.25:
            break
        side *= 2
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * side**3 / best / 1e12


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``, by ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """Peak memory of one call of ``fn`` in MiB and what it is (CUDA max allocated / CPU peak RSS growth)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max allocated over the call"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None, "unavailable (cannot reset the peak RSS mark)"
    before = _status_bytes("VmRSS")
    fn()
    peak = _status_bytes("VmHWM")
    if before is None or peak is None:
        return None, "unavailable (/proc/self/status)"
    # RSS can drop below its starting point within the call (frees); growth is never negative.
    return max(0.0, (peak - before) / 2**20), "cpu peak RSS growth over the call"


def _forward_fn(
    model: torch.nn.Module, setting: Setting, x: torch.Tensor, device: torch.device
) -> Callable[[], object]:
    """A zero-argument callable running one inference forward as ``setting`` says (model prepared here)."""
    if setting.weights is not None or setting.channels_last:
        model = copy.deepcopy(model)
    if setting.weights is not None:
        model = model.to(setting.weights)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if setting.compile else model

    def fwd(inp: torch.Tensor = x) -> torch.Tensor:
        with torch.inference_mode(), autocast_ctx(device, setting.amp):
            return net(inp)

    if not setting.cuda_graphs:

        def step() -> None:
            fwd()
            _sync(device)

        return step
    # Capture after warm-up on a side stream (as the CUDA graphs docs require), replay on a static input.
    static_x = x.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fwd(static_x)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # The autocast weight cache must be off while capturing (the CUDA graphs / AMP docs).
    with torch.inference_mode(), torch.cuda.graph(graph), autocast_ctx(device, setting.amp, cache=False):
        net(static_x)

    def replay() -> None:
        graph.replay()
        _sync(device)

    return replay


def _train_fn(
    model: torch.nn.Module, setting: Setting, shape: tuple[int, ...], classes: int, device: torch.device
) -> Callable[[], object]:
    """One training step (forward, fp32 loss, backward, SGD) on a private copy of ``model``."""
    model = copy.deepcopy(model).train()
    x = torch.randn(shape, device=device)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if setting.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if setting.amp == torch.float16 else None
    if classes == 1:
        y = (torch.rand((shape[0], 1, *shape[2:]), device=device) > 0.5).float()
        loss_fn: torch.nn.Module = torch.nn.BCEWithLogitsLoss()
    else:
        y = torch.randint(0, classes, (shape[0], *shape[2:]), device=device)
        loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(device, setting.amp):
            out = net(x)
        loss = loss_fn(out.float(), y)  # the loss in fp32 whatever the network ran in
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        _sync(device)

    return step


def _interleaved(cases: list[tuple[str, Callable[[], object]]], reps: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of ``reps`` calls of each case, the cases taking turns within each rep."""
    res: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k, _ in cases}
    for _ in range(reps):
        for key, fn in cases:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            res[key]["wall"].append(time.perf_counter() - t0)
            res[key]["cpu"].append(time.process_time() - c0)
    return res


def _paired_ratio(t: list[float], ref: list[float]) -> dict[str, float]:
    r = [a / b for a, b in zip(t, ref, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _machine() -> dict:
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": platform.processor() or "",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    meta["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return meta


def _measure(
    kind: str,
    cases: list[tuple[str, Callable[[], object]]],
    batch: int,
    flops: int,
    peaks: dict[torch.dtype, float],
    reps: int,
    device: torch.device,
    common: dict,
) -> list[dict]:
    """Warm up each case (first call timed: compile time), time them interleaved, one row per case."""
    first = {}
    for key, fn in cases:
        t0 = time.perf_counter()
        fn()
        first[key] = 1e3 * (time.perf_counter() - t0)
        fn()  # a second warm-up: oneDNN / autotuning caches settle on the second call
    times = _interleaved(cases, reps)
    rows = []
    for key, fn in cases:
        setting = SETTINGS[key]
        mem, mem_kind = peak_memory_mib(fn, device)
        med = statistics.median(times[key]["wall"])
        peak = peaks[setting.compute_dtype]
        achieved = flops / med / 1e12
        row = {
            **common,
            "kind": kind,
            "setting": key,
            "about": setting.about,
            "batch": batch,
            "wall": summarize(times[key]["wall"]),
            "cpu": summarize(times[key]["cpu"]),
            "first_call_ms": first[key],
            "throughput_img_s": batch / med,
            "peak_memory_mib": mem,
            "peak_memory_kind": mem_kind,
            "gflops": flops / 1e9,
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "peak_dtype": _dtype_name(setting.compute_dtype),
            "fraction_of_peak": achieved / peak,
        }
        if "fp32" in times:
            row["ratio_vs_fp32"] = _paired_ratio(times[key]["wall"], times["fp32"]["wall"])
        rows.append(row)
    return rows


def _print_row(r: dict) -> None:
    ratio = f"  x{r['ratio_vs_fp32']['median']:.2f} vs fp32" if "ratio_vs_fp32" in r else ""
    mem = f"{r['peak_memory_mib']:7.0f} MiB" if r["peak_memory_mib"] is not None else "    n/a MiB"
    print(
        f"{r['network']:14s} {r['kind']:10s} {r['setting']:16s} b{r['batch']:<3d} {r['size']}px  "
        f"median {r['wall']['median_ms']:9.1f} ms (min {r['wall']['min_ms']:.1f}, "
        f"max {r['wall']['max_ms']:.1f})  {r['throughput_img_s']:7.2f} img/s  {mem}  "
        f"{r['gflops']:7.1f} GFLOP  "
        f"{r['achieved_tflops']:.3f} TFLOP/s = {100 * r['fraction_of_peak']:.0f}% of {r['peak_dtype']} peak"
        f"{ratio}",
        flush=True,
    )


def bench(
    networks: Sequence[str] | str = ("cfformer_b", "braunetpp"),
    settings: Sequence[str] | str | None = None,
    batches: Sequence[int] | int = (1, 16),
    size: int = 224,
    train_batch: int = 2,
    reps: int = 5,
    train_reps: int = 3,
    train: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    peak_n: int = 2048,
    seed: int = 0,
    out: str | None = None,
) -> dict:
    """Measure each network under each setting: inference at each of ``batches``, and a training step.

    ``settings`` defaults to :data:`DEFAULT_SETTINGS` (on CUDA :data:`CUDA_DEFAULT_SETTINGS`); ``fp32``
    is always measured, as the reference of the ratios. Settings that cannot run here are listed under
    ``skipped`` with the reason. Returns (and writes to ``out`` as JSON) ``{"meta", "peaks", "skipped",
    "results"}``; prints one line per row.
    """
    import json

    from hybridseg.io import atomic_write_text

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if threads:
        torch.set_num_threads(int(threads))
    networks = [networks] if isinstance(networks, str) else list(networks)
    batches = [batches] if isinstance(batches, int) else [int(b) for b in batches]
    if settings is None:
        settings = CUDA_DEFAULT_SETTINGS if dev.type == "cuda" else DEFAULT_SETTINGS
    names = [settings] if isinstance(settings, str) else list(settings)
    names = ["fp32"] + [n for n in names if n != "fp32"]
    run, skipped = select_settings(names, dev)
    load_before = os.getloadavg()
    peaks = {torch.float32: matmul_peak_tflops(torch.float32, dev, peak_n)}
    for dt in {SETTINGS[n].compute_dtype for n in run} - {torch.float32}:
        peaks[dt] = matmul_peak_tflops(dt, dev, peak_n)
    peak_text = ", ".join(f"{_dtype_name(k)} {v:.3f} TFLOP/s" for k, v in peaks.items())
    print(f"matmul peak: {peak_text}", flush=True)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", flush=True)

    results: list[dict] = []
    for net_name in networks:
        torch.manual_seed(seed)
        model, classes = build_network(net_name)
        model = model.to(dev).eval()
        common = {"network": net_name, "size": size, "device": str(dev), "threads": torch.get_num_threads()}
        x1 = torch.randn(1, 3, size, size, device=dev)
        with torch.inference_mode():
            flops1 = count_flops(functools.partial(model, x1))  # all ops per-sample: FLOPs scale with batch
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=dev)
            cases = [(n, _forward_fn(model, SETTINGS[n], x, dev)) for n in run]
            rows = _measure("forward", cases, batch, flops1 * batch, peaks, reps, dev, common)
            for r in rows:
                _print_row(r)
            results += rows
            del cases
        if train:
            shape = (train_batch, 3, size, size)
            tr = [n for n in run if SETTINGS[n].train]
            step_flops = count_flops(_train_fn(model, SETTINGS["fp32"], shape, classes, dev))
            cases = [(n, _train_fn(model, SETTINGS[n], shape, classes, dev)) for n in tr]
            rows = _measure("train_step", cases, train_batch, step_flops, peaks, train_reps, dev, common)
            for r in rows:
                _print_row(r)
            results += rows
            del cases
        del model
    doc = {
        "meta": {
            **_machine(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "bundle_default_amp_dtype": _dtype_name(autocast_dtype(dev, True) or torch.float32),
            "flops_note": "forward FLOPs counted at batch 1 and scaled (all ops are per-sample)",
            # Without a low mmap threshold glibc keeps freed blocks resident and reuses them, so the CPU
            # peak-RSS growth of a warmed-up call understates its working set (docs/performance.md).
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        },
        "peaks": {_dtype_name(k): v for k, v in peaks.items()},
        "skipped": skipped,
        "results": results,
    }
    if out:
        atomic_write_text(out, json.dumps(doc, indent=4) + "\n")
    return doc


def time_forward(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
    reps: int = 5,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Median / min / max forward latency of ``model`` (eval, inference mode) after two warm-up calls."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    step = _forward_fn(model, Setting(amp=dtype), torch.randn(shape, device=dev), dev)
    step()
    step()
    return summarize(_interleaved([("x", step)], reps)["x"]["wall"])


def time_train_step(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    num_classes: int,
    dtype: torch.dtype | None = None,
    reps: int = 3,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Median / min / max time of one training step (on a copy of ``model``) after one warm-up step."""
    dev = torch.device(device)
    step = _train_fn(model.to(dev), Setting(amp=dtype), shape, num_classes, dev)
    step()
    return summarize(_interleaved([("x", step)], reps)["x"]["wall"])
