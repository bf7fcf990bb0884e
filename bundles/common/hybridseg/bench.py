"""Latency measurements for the networks: medians over repetitions after warm-up, never one run.

``python -m hybridseg bench`` prints a table and writes JSON (see ``bench``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch


def _timed(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median / min / max in milliseconds."""
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "reps": len(times),
    }


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    """Autocast for ``dtype`` on ``device`` (no-op for fp32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def time_forward(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    warmup: int = 2,
    reps: int = 5,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Forward latency of ``model`` in eval mode under ``torch.inference_mode``."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(shape, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), autocast_ctx(device, dtype):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return summarize(_timed(step, warmup, reps))


def time_train_step(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    num_classes: int,
    dtype: torch.dtype | None = None,
    warmup: int = 1,
    reps: int = 3,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """One training step (forward, cross-entropy/BCE loss in fp32, backward, SGD step)."""
    device = torch.device(device)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(shape, device=device)
    if num_classes == 1:
        y = (torch.rand((shape[0], 1, *shape[2:]), device=device) > 0.5).float()
        loss_fn = torch.nn.BCEWithLogitsLoss()
    else:
        y = torch.randint(0, num_classes, (shape[0], *shape[2:]), device=device)
        loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(device, dtype):
            out = model(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return summarize(_timed(step, warmup, reps))


NETWORKS = {
    "cfformer_s": ("hybridseg.networks.cfformer", "CFFormer", {"variant": "s"}, 1),
    "cfformer_b": ("hybridseg.networks.cfformer", "CFFormer", {"variant": "b"}, 1),
    "cfformer_l": ("hybridseg.networks.cfformer", "CFFormer", {"variant": "l"}, 1),
    "braunetpp": ("hybridseg.networks.braunetpp", "BRAUNetPP", {"in_channels": 3, "num_classes": 9}, 9),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_network(name: str) -> tuple[torch.nn.Module, int]:
    """A freshly initialised network from :data:`NETWORKS` and its number of output classes."""
    import importlib

    module, cls, kwargs, classes = NETWORKS[name]
    return getattr(importlib.import_module(module), cls)(**kwargs), classes


def bench(
    networks: tuple[str, ...] | list[str] = ("cfformer_b", "braunetpp"),
    dtypes: tuple[str, ...] | list[str] = ("fp32", "bf16"),
    size: int = 224,
    batch: int = 1,
    train_batch: int = 2,
    reps: int = 5,
    train_reps: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    out: str | None = None,
) -> list[dict]:
    """Forward latency (eval, ``batch``) and training-step time (``train_batch``) of each network and dtype.

    Prints one line per setting (median / min / max ms over ``reps`` runs after warm-up) and writes the
    list as JSON to ``out`` when given. ``threads`` sets ``torch.set_num_threads`` (default: torch's).
    """
    import json
    import platform

    from hybridseg.io import atomic_write_text

    if threads:
        torch.set_num_threads(int(threads))
    results = []
    for name in [networks] if isinstance(networks, str) else networks:
        model, classes = build_network(name)
        for dt in [dtypes] if isinstance(dtypes, str) else dtypes:
            dtype = DTYPES[dt]
            shape = (batch, 3, size, size)
            fwd = time_forward(model, shape, dtype=dtype, reps=reps, device=device)
            train = time_train_step(
                model, (train_batch, 3, size, size), classes, dtype=dtype, reps=train_reps, device=device
            )
            row = {
                "network": name,
                "dtype": dt,
                "size": size,
                "device": device,
                "threads": torch.get_num_threads(),
                "forward_batch": batch,
                "forward": fwd,
                "train_batch": train_batch,
                "train_step": train,
            }
            results.append(row)
            print(
                f"{name:12s} {dt:5s} {size}px  forward b{batch}: {fwd['median_ms']:8.1f} ms "
                f"(min {fwd['min_ms']:.1f}, max {fwd['max_ms']:.1f})   train step b{train_batch}: "
                f"{train['median_ms']:8.1f} ms (min {train['min_ms']:.1f}, max {train['max_ms']:.1f})",
                flush=True,
            )
        del model
    if out:
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        atomic_write_text(out, json.dumps({"meta": meta, "results": results}, indent=4) + "\n")
    return results
