"""Hybrid vs in-bundle UNet on hard generated data, with the same wall-clock training budget (run by hand).

For each bundle asked for, this script
1. generates the hard synthetic data set (``--realism hard``, fixed seeds) and its datalist;
2. trains the hybrid (``configs/quick.json`` as shipped) and the UNet (``--network_name unet`` plus
   ``--unet_overrides``) one after the other through MONAI's bundle runner, each in its own process, on the
   same split; quick.json's ``max_train_seconds`` (ignite ``TimeLimit``: wall-clock seconds from the
   trainer's start, validation and checkpointing included) is the budget for both;
3. evaluates each best checkpoint (``model.pt``, selected on the validation part) on the test part with
   ``evaluate.json``;
4. prints test Dice, HD95, iterations done and training wall time per network, and writes them to
   ``WORK/compare_<bundle>.json``.

The UNet gets its own learning rate and number of epochs (``--unet_overrides``; the defaults are this
project's pilot-tuned choices, see the bundle READMEs): same wall-clock budget, each network with a schedule
that completes within it. Run on an otherwise idle machine for figures to quote; the machine's load average
is printed with the results.

    python ci/compare_baseline.py --work /tmp/compare                       # both bundles
    python ci/compare_baseline.py --work /tmp/compare --bundles busi --networks unet
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = {"busi": "cfformer_busi", "synapse": "braunetpp_synapse"}
HYBRID = {"busi": "cfformer", "synapse": "braunetpp"}
# The UNet's own recipe under the same budget: a larger learning rate (pilot runs, see the bundle READMEs) and
# as many epochs as fill about the wall time the hybrid's schedule takes on a quiet 2-core machine with native
# bf16 (2026-12-02: CFFormer-s 35 epochs in ~590 s, UNet 2.35 s per epoch; BRAU-Net++ 12 epochs in ~490 s,
# UNet 7.4 s per epoch), so neither network's schedule is cut short there nor ends with budget left unused.
UNET_OVERRIDES = {
    "busi": {"max_epochs": 250, "learning_rate": 0.001},
    "synapse": {"max_epochs": 70, "learning_rate": 0.001},
}


def make_data(kind: str, root: Path) -> Path:
    """Generate the hard data set and its datalist once; returns the dataset folder."""
    from hybridseg.data.busi import datalist_busi
    from hybridseg.data.synapse import datalist_synapse
    from hybridseg.tools.synth_busi import synth_busi
    from hybridseg.tools.synth_synapse import synth_synapse

    data = root / f"{kind}_hard"
    if (data / "datalist.json").is_file():
        return data
    if kind == "busi":  # benign + malignant + normal: some images have no lesion, as in the real set
        synth_busi(str(data), n=200, size=160, seed=2026, size_jitter=0.3, realism="hard", overwrite=True)
        datalist_busi(str(data), str(data / "datalist.json"), classes=("benign", "malignant", "normal"), seed=0)
    else:
        synth_synapse(str(data), n=16, shape=(96, 96, 48), seed=2026, realism="hard", overwrite=True)
        datalist_synapse(str(data), str(data / "datalist.json"), seed=0, num_val=1)
    return data


def _run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` with output to ``log``; returns its wall and CPU time (s); raises with the log's tail."""
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime


def _flags(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]


def train_and_test(kind: str, network: str, data: Path, work: Path, overrides: dict) -> dict:
    """Train one network with quick.json (+ overrides), evaluate it on the test split; returns its figures."""
    import torch

    configs = REPO / "bundles" / BUNDLE[kind] / "configs"
    quick = [str(configs / "train.json"), str(configs / "quick.json")]
    out = work / network
    common = ["--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--network_name", network]
    common += _flags(overrides)
    runner = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    if (out / "result.json").is_file():  # finished earlier with these settings: reuse (delete it to rerun)
        return json.loads((out / "result.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    wall, cpu = _run(runner + [json.dumps(quick)] + common + ["--output_dir", str(out / "train")], out / "train.txt")
    budget_line = [ln for ln in (out / "train" / "train.log").read_text().splitlines() if "time budget" in ln]
    state = torch.load(out / "models" / "checkpoint_last.pt", map_location="cpu", weights_only=True, mmap=True)
    trainer = state["trainer"]
    evaluate = json.dumps(quick + [str(configs / "evaluate.json")])
    _run(runner + [evaluate] + common + ["--output_dir", str(out / "test")], out / "test.txt")
    summary = json.loads((out / "test" / ("summary_busi.json" if kind == "busi" else "summary_paper.json")).read_text())
    over = summary["over_classes"]
    result = {
        "network": network,
        "test_dice": over["dice"]["mean"],
        "test_hd95": over["hd95"]["mean"],
        "iterations": int(trainer["iteration"]),
        "epochs": round(int(trainer["iteration"]) / int(trainer["epoch_length"]), 2),
        "process_wall_s": round(wall, 1),
        "process_cpu_s": round(cpu, 1),
        "budget_stop": budget_line[-1].split("INFO: ")[-1] if budget_line else "not reached (all epochs ran)",
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "overrides": overrides,
    }
    (out / "result.json").write_text(json.dumps(result, indent=4) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for data, checkpoints and reports")
    ap.add_argument("--bundles", nargs="+", choices=sorted(BUNDLE), default=["busi", "synapse"])
    ap.add_argument("--networks", nargs="+", choices=["hybrid", "unet"], default=["hybrid", "unet"])
    ap.add_argument("--overrides", type=json.loads, default={}, help="JSON dict applied to both networks")
    ap.add_argument("--unet_overrides", type=json.loads, default=None, help="JSON dict for the UNet only")
    ap.add_argument("--tag", default="", help="suffix of the run folders (pilots with other settings)")
    args = ap.parse_args(argv)
    for kind in args.bundles:
        data = make_data(kind, args.work)
        rows = []
        for which in args.networks:
            net = HYBRID[kind] if which == "hybrid" else "unet"
            extra = dict(args.overrides)
            if which == "unet":
                extra.update(UNET_OVERRIDES[kind] if args.unet_overrides is None else args.unet_overrides)
            rows.append(train_and_test(kind, net, data, args.work / f"{kind}{args.tag}", extra))
            print(json.dumps(rows[-1]), flush=True)
        report = args.work / f"compare_{kind}{args.tag}.json"
        report.write_text(json.dumps(rows, indent=4) + "\n")
        print(f"\n{BUNDLE[kind]} on hard synthetic data (test split), same wall-clock budget:")
        print(f"{'network':<10} {'Dice':>7} {'HD95':>8} {'iters':>6} {'wall s':>8}")
        for r in rows:
            print(
                f"{r['network']:<10} {r['test_dice']:>7.4f} {r['test_hd95']:>8.2f} {r['iterations']:>6d} "
                f"{r['process_wall_s']:>8.1f}"
            )


if __name__ == "__main__":
    main()
