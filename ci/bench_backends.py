"""Time each inference backend on both bundles' networks and compare their labels with fp32 eager torch.

Run by hand (minutes; not part of the test suite):

    OMP_NUM_THREADS=2 .venv/bin/python ci/bench_backends.py --threads 2 --reps 3

For each bundle it generates data (``synth_busi`` images, ``synth_synapse`` CT volumes), preprocesses them with
the bundle's own ``inference.json`` preprocessing, and runs the bundle's own inferer (``BackendInferer`` around
``AutocastInferer`` / ``ResizedSliceInferer``) with each backend: ``torch`` fp32 (``amp`` off, the reference),
``torch`` with the bundle's default ``amp`` (bf16 autocast where the CPU has native bf16), ``onnxruntime`` and
``onnxruntime_int8`` (calibrated on other generated inputs than those timed). Repetitions alternate between
backends, so load on a shared machine hits all alike; the first call (export, quantisation) is timed apart.
Agreement: the share of pixels (CFFormer: ``sigmoid > 0.5`` at the network's 224 x 224) or voxels (BRAU-Net++:
labels on the volume grid) equal to fp32 eager torch's. Without ``--ckpt_*`` the networks have seeded random
weights: their logits sit close to the decision boundary, so agreement is then a pessimistic figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BACKENDS = (("torch", False), ("torch", True), ("onnxruntime", False), ("onnxruntime_int8", False))


def _label(backend: str, amp: bool) -> str:
    return f"{backend} ({'bundle amp' if amp else 'fp32'})" if backend == "torch" else backend


def _inputs(bundle: str, root: Path, n: int, seed: int, shape: list[int]) -> Path:
    from hybridseg.tools.synth_busi import synth_busi
    from hybridseg.tools.synth_synapse import synth_synapse

    if bundle == "cfformer_busi":
        synth_busi(out=str(root), n=n, size=shape[0], seed=seed)
        files = sorted(p for p in root.rglob("*.png") if "_mask" not in p.name)
    else:
        synth_synapse(out=str(root), n=n, shape=shape, seed=seed)
        files = sorted((root / "img").glob("*.nii.gz"))
    flat = root / "inputs"
    flat.mkdir()
    for f in files[:n]:
        os.symlink(f, flat / f.name)
    return flat


def bench_bundle(bundle: str, args: argparse.Namespace, work: Path) -> list[dict]:
    from hybridseg.tools.export import build_network, bundle_parser

    overrides = json.loads(getattr(args, f"overrides_{bundle.split('_')[0]}"))
    ckpt = getattr(args, f"ckpt_{bundle.split('_')[0]}")
    torch.manual_seed(0)
    network = build_network(REPO / "bundles" / bundle, ckpt, **overrides)
    busi = bundle == "cfformer_busi"
    shape = [args.busi_size, args.busi_size] if busi else args.ct_shape
    calib_dir = _inputs(bundle, work / "calibration", args.n_calibration, 1, shape)
    test_dir = _inputs(bundle, work / "test", args.n_test, 2, shape)
    cache = work / "models"
    inferers, images = {}, None
    for backend, amp in (b for b in BACKENDS if b[0] in args.backends):
        parser = bundle_parser(
            REPO / "bundles" / bundle,
            **overrides,
            backend=backend,
            amp=amp,
            input_dir=str(calib_dir),
            ckpt_path=str(cache / "model.pt"),
            num_calibration=args.n_calibration,
            **({} if busi else {"inferer#inferer#progress": False}),
        )
        inferers[(backend, amp)] = parser.get_parsed_content("inferer")
        if images is None:
            pre = parser.get_parsed_content("preprocessing")
            images = [pre({"image": str(f)})["image"][None] for f in sorted(test_dir.iterdir())]

    def run(key: tuple[str, bool], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = inferers[key](x, network)
        return (out > 0).to(torch.uint8) if busi else out

    first, times = {}, {k: [] for k in inferers}
    outputs = {}
    for key in inferers:
        t0 = time.perf_counter()
        outputs[key] = [run(key, images[0])]
        first[key] = time.perf_counter() - t0
    for key in inferers:  # outputs of every test input (also a second warm-up of each backend)
        outputs[key] += [run(key, x) for x in images[1:]]
    for _ in range(args.reps):
        for key in inferers:
            for x in images:
                t0 = time.perf_counter()
                run(key, x)
                times[key].append(time.perf_counter() - t0)
    ref_key = ("torch", False)
    rows = []
    for key in inferers:
        same = sum(int((a == b).sum()) for a, b in zip(outputs[key], outputs[ref_key], strict=True))
        total = sum(a.numel() for a in outputs[ref_key])
        med = statistics.median(times[key])
        ratios = [t / r for t, r in zip(times[key], times[ref_key], strict=True)]
        rows.append(
            {
                "bundle": bundle,
                "backend": _label(*key),
                "unit": "image" if busi else f"volume ({images[0].shape[-1]} slices)",
                "median_s": med,
                "min_s": min(times[key]),
                "max_s": max(times[key]),
                "x_fp32_eager_paired": statistics.median(ratios),
                "first_call_s": first[key],
                "agreement": same / total,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", nargs="+", default=["braunetpp_synapse", "cfformer_busi"])
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "onnxruntime_int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n_test", type=int, default=4, help="generated inputs timed (images; volumes: use 1)")
    p.add_argument("--n_calibration", type=int, default=4, help="other generated inputs int8 is calibrated on")
    p.add_argument("--busi_size", type=int, default=256)
    p.add_argument("--ct_shape", type=int, nargs=3, default=[160, 160, 48])
    p.add_argument("--ckpt_cfformer", default=None, help="cfformer_busi checkpoint (default: seeded random weights)")
    p.add_argument("--ckpt_braunetpp", default=None, help="braunetpp_synapse checkpoint")
    p.add_argument("--overrides_cfformer", default="{}", help='config overrides as JSON, e.g. {"variant": "s"}')
    p.add_argument("--overrides_braunetpp", default="{}")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bundle in args.bundles:  # each bundle's rows printed (and written) as soon as they are measured
            n_test = args.n_test if bundle == "cfformer_busi" else 1
            rows += bench_bundle(bundle, argparse.Namespace(**{**vars(args), "n_test": n_test}), Path(tmp) / bundle)
            print(f"\n{args.threads} threads, {args.reps} reps, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
            _table(rows)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=4) + "\n")


def _table(rows: list[dict]) -> None:
    print("| bundle | backend | per | median s (min-max) | x fp32 eager (paired) | first call s | agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bundle']} | {r['backend']} | {r['unit']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) "
            f"| {r['x_fp32_eager_paired']:.2f} | {r['first_call_s']:.1f} | {100 * r['agreement']:.2f} % |",
            flush=True,
        )


if __name__ == "__main__":
    main()
