"""``python -m hybridseg demo``: the main job, end to end, with the commands a user would type.

For each bundle: generate a synthetic data set in the real layout, build its datalist, train with the
bundle's quick (CPU-sized) settings, evaluate on the test split, infer on a few inputs, then print the
metrics tables and where the outputs are. Every step is the documented ``python -m hybridseg ...`` or
``python -m monai.bundle run ...`` command, run as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
BUNDLES = REPO / "bundles"


def _run(cmd: list[str], log: Path) -> float:
    """Run one command, streaming its output to ``log``; returns seconds, raises with the log tail."""
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-40:])
        raise SystemExit(f"command failed ({proc.returncode}) after {seconds:.0f} s; log {log}:\n{tail}")
    print(f"  done in {seconds:.1f} s", flush=True)
    return seconds


def _bundle_cmd(bundle: str, configs: list[str], **overrides: object) -> list[str]:
    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files).replace('"', "'")]
    cmd += ["--meta_file", str(BUNDLES / bundle / "configs" / "metadata.json")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def _train_evaluate_infer(bundle: str, data: Path, work: Path, n_infer: int, times: dict, log: Path) -> None:
    """Train (quick settings), evaluate on the test split, infer on copies of ``n_infer`` test inputs."""
    common = dict(dataset_dir=data, ckpt_dir=work / "models")
    times["train"] = _run(_bundle_cmd(bundle, ["train.json", "quick.json"], output_dir=work / "train", **common), log)
    times["evaluate"] = _run(
        _bundle_cmd(bundle, ["train.json", "quick.json", "evaluate.json"], output_dir=work / "test", **common), log
    )
    test = json.loads((data / "datalist.json").read_text())["test"][:n_infer]
    samples = work / "inference_inputs"
    samples.mkdir(parents=True, exist_ok=True)
    for t in test:  # copies, so the demo's inference never writes near the data set
        shutil.copy(data / t["image"], samples / Path(t["image"]).name)
    times["infer"] = _run(
        _bundle_cmd(
            bundle,
            ["inference.json", "quick.json"],
            input_dir=samples,
            output_dir=work / "inference",
            ckpt_path=work / "models" / "model.pt",
        ),
        log,
    )


def demo_busi(out: Path, n: int, size: int, log: Path) -> dict:
    data, work = out / "busi" / "Dataset_BUSI_with_GT", out / "busi" / "run"
    py = [sys.executable, "-m", "hybridseg"]
    times = {}
    times["generate"] = _run(
        py + ["synth_busi", "--out", str(data), "--n", str(n), "--size", str(size), "--seed", "0"], log
    )
    times["datalist"] = _run(py + ["datalist_busi", "--root", str(data), "--out", str(data / "datalist.json")], log)
    _train_evaluate_infer("cfformer_busi", data, work, 4, times, log)
    return {
        "work": work,
        "times": times,
        "table": (work / "test" / "summary.md").read_text(),
        "summary": json.loads((work / "test" / "summary_busi.json").read_text()),
    }


def demo_synapse(out: Path, n: int, shape: tuple[int, int, int], log: Path) -> dict:
    data, work = out / "synapse" / "RawData" / "Training", out / "synapse" / "run"
    py = [sys.executable, "-m", "hybridseg"]
    times = {}
    times["generate"] = _run(
        py + ["synth_synapse", "--out", str(data), "--n", str(n), "--shape", *map(str, shape), "--seed", "0"], log
    )
    times["datalist"] = _run(
        py + ["datalist_synapse", "--root", str(data), "--out", str(data / "datalist.json"), "--num_val", "1"], log
    )
    _train_evaluate_infer("braunetpp_synapse", data, work, 1, times, log)
    return {
        "work": work,
        "times": times,
        "table": (work / "test" / "summary.md").read_text(),
        "summary": {p: json.loads((work / "test" / f"summary_{p}.json").read_text()) for p in ("paper", "physical")},
    }


def demo(
    out: str = "demo_output",
    busi_n: int = 200,
    busi_size: int = 128,
    synapse_n: int = 10,
    synapse_shape: tuple[int, int, int] = (96, 96, 48),
    only: str | None = None,
) -> None:
    """Generate data, train, evaluate and infer both bundles with their quick settings; print the results.

    Args:
        out: folder for everything the demo writes (replaced if it holds an earlier demo).
        busi_n: number of synthetic BUSI-like images (all classes); busi_size: their side in pixels.
        synapse_n: number of synthetic CT volumes; synapse_shape: their X Y Z size.
        only: "busi" or "synapse" to run one bundle.
    """
    root = Path(out).resolve()
    if root.exists():
        if not (root / ".hybridseg-demo").exists():
            raise SystemExit(f"{root} exists and is not an earlier demo output; choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / ".hybridseg-demo").write_text("written by python -m hybridseg demo\n")
    log = root / "demo.log"
    t0 = time.perf_counter()
    results = {}
    if only in (None, "busi"):
        print("== cfformer_busi: CFFormer on BUSI-like ultrasound (synthetic) ==", flush=True)
        results["busi"] = demo_busi(root, busi_n, busi_size, log)
    if only in (None, "synapse"):
        print("== braunetpp_synapse: BRAU-Net++ on BTCV-like CT (synthetic) ==", flush=True)
        results["synapse"] = demo_synapse(root, synapse_n, tuple(synapse_shape), log)
    total = time.perf_counter() - t0
    print("\n" + "=" * 100)
    print("RESULTS ON SYNTHETIC DATA (quick CPU settings; not comparable with the papers' numbers)")
    for name, r in results.items():
        times = ", ".join(f"{k} {v:.0f} s" for k, v in r["times"].items())
        print(f"\n[{name}] test-set metrics ({times})\n{r['table']}")
        print(f"  per-case CSV: {r['work'] / 'test' / 'metrics_per_case.csv'}")
        print(f"  overlays:     {r['work'] / 'test' / 'overlays'}")
        print(f"  inference:    {r['work'] / 'inference'}")
    print(f"\nwall time {total:.0f} s; full log {log}")
    summary = {name: {"times_s": r["times"], "summary": r["summary"]} for name, r in results.items()}
    (root / "demo_results.json").write_text(json.dumps(summary, indent=4, default=str) + "\n")
