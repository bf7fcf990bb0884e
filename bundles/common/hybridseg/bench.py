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
