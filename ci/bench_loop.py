"""Bundle training loop against the bare network step: are data loading and handlers the bottleneck?

Builds ``cfformer_busi``'s ``train.json`` + ``quick.json`` with MONAI's ConfigParser (what
``python -m monai.bundle run`` does) on a generated BUSI-like data set, and runs its SupervisedTrainer
for a few epochs, timing every iteration (ITERATION_COMPLETED to ITERATION_COMPLETED, so data loading,
the step and the iteration handlers are all inside; the first iteration of each epoch is left out,
since it also pays for the epoch's start and the previous epoch's validation). The bare step is the
same network, loss, optimizer and inferer on one fixed batch, timed before and after the loop (to
bracket load drift on a shared machine).

Usage: ``.venv/bin/python ci/bench_loop.py [--epochs 2] [--n 100] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from hybridseg.data.busi import datalist_busi
from hybridseg.tools.synth_busi import synth_busi

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cfformer_busi" / "configs"


def bare_steps(parser: ConfigParser, batch: dict, reps: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``reps`` training steps of the bundle's network, loss, optimizer, inferer."""
    net = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    opt = parser.get_parsed_content("optimizer")
    inferer = parser.get_parsed_content("train#inferer")
    device = parser.get_parsed_content("device")
    x, y = batch["image"].to(device), batch["label"].to(device)
    net.train()
    times = []
    for _ in range(reps + 1):  # one warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(inferer(x, net), y)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n", type=int, default=100, help="generated images")
    ap.add_argument("--reps", type=int, default=4, help="bare steps before and after the loop")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "busi"
        synth_busi(out=str(data), n=args.n, size=128, seed=0)
        datalist_busi(root=str(data), out=str(data / "datalist.json"))
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "train.json"), str(BUNDLE / "quick.json")])
        parser.update(
            {"dataset_dir": str(data), "bundle_root": tmp, "max_epochs": args.epochs, "val_interval": args.epochs}
        )
        parser.parse()
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        batch = next(iter(parser.get_parsed_content("train#dataloader")))
        before = bare_steps(parser, batch, args.reps)

        stamps: list[tuple[int, float, float]] = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: stamps.append((e.state.epoch, time.perf_counter(), time.process_time())),
        )
        parser.get_parsed_content("train#checkpoint_saver").attach(trainer)
        t0 = time.perf_counter()
        trainer.run()
        total = time.perf_counter() - t0
        after = bare_steps(parser, batch, args.reps)

    pairs = zip(stamps, stamps[1:], strict=False)
    loop = [b - a for (ea, a, _), (eb, b, _) in pairs if ea == eb]
    loop_cpu = [b - a for (ea, _, a), (eb, _, b) in zip(stamps, stamps[1:], strict=False) if ea == eb]
    bare = [w for w, _ in before + after]
    bare_cpu = [c for _, c in before + after]
    med_loop, med_bare = statistics.median(loop), statistics.median(bare)
    # CPU time (data loading runs in this process: num_workers 0) is robust to other processes' load.
    cpu_loop, cpu_bare = statistics.median(loop_cpu), statistics.median(bare_cpu)
    bs = batch["image"].shape
    print(f"cfformer_busi quick settings, batch {tuple(bs)}, {args.threads} threads, {args.epochs} epochs")
    print(
        f"  bundle loop iteration: median {1e3 * med_loop:.0f} ms (min {1e3 * min(loop):.0f}, "
        f"max {1e3 * max(loop):.0f}, {len(loop)} iterations; whole run {total:.1f} s)"
    )
    print(
        f"  bare step:             median {1e3 * med_bare:.0f} ms (min {1e3 * min(bare):.0f}, "
        f"max {1e3 * max(bare):.0f}; before {1e3 * statistics.median(w for w, _ in before):.0f}, "
        f"after {1e3 * statistics.median(w for w, _ in after):.0f})"
    )
    print(f"  CPU time: loop {1e3 * cpu_loop:.0f} ms, bare {1e3 * cpu_bare:.0f} ms per iteration")
    print(f"  loop / bare: wall {med_loop / med_bare:.3f}, CPU {cpu_loop / cpu_bare:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
