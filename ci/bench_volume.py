"""Whole-volume CT inference: the resize stages against the reference protocol, and the bundle end to end.

1. ``resize`` (always): on a windowed 512 x 512 x D volume, the papers' test protocol (every slice resized
   to 224 x 224 with cubic ``scipy.ndimage.zoom`` in a Python loop, predicted labels zoomed back with
   order 0) against ours (``ResizedSliceInferer``: batched bicubic ``F.interpolate`` of slice batches,
   logits resized back with nearest), with an identity "network" so that only the resizing is timed.
2. ``--bundle``: ``python -m monai.bundle run`` of ``braunetpp_synapse/configs/inference.json`` on that
   volume (read, window, slice batches, BRAU-Net++ at 224, resample back, write NIfTI) with randomly
   initialised weights, wall seconds of the whole subprocess.

Usage: ``.venv/bin/python ci/bench_volume.py [--depth 100] [--threads 2] [--bundle] [--reps 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from hybridseg.inferers import ResizedSliceInferer

ROOT = Path(__file__).resolve().parents[1]
ROI = (224, 224)


def write_ct(path: Path, depth: int, side: int = 512) -> None:
    """A smooth random int16 HU volume with BTCV-like spacing."""
    rng = np.random.default_rng(0)
    vol = ndimage.zoom(rng.normal(0, 300, size=(side // 16, side // 16, max(2, depth // 4))), 16, order=1)
    vol = vol[:side, :side, :depth]
    img = nib.Nifti1Image(vol.astype(np.int16), np.diag([0.75, 0.75, 3.0, 1.0]))
    nib.save(img, str(path))


def reference_protocol(vol: np.ndarray) -> np.ndarray:
    """The official test loop's resizing: per slice, cubic zoom to the ROI, then order-0 zoom back."""
    h, w, d = vol.shape
    out = np.empty((h, w, d), dtype=np.uint8)
    for z in range(d):
        sl = ndimage.zoom(vol[:, :, z], (ROI[0] / h, ROI[1] / w), order=3)
        lab = (sl > 0.5).astype(np.uint8)  # stands in for argmax of the network's output
        out[:, :, z] = ndimage.zoom(lab, (h / ROI[0], w / ROI[1]), order=0)
    return out


def ours(vol: torch.Tensor, sw_batch_size: int = 24) -> torch.Tensor:
    """ResizedSliceInferer with a network whose two logits make the same decision as the reference."""

    def net(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.5), x], 1)

    inferer = ResizedSliceInferer(roi_size=ROI, sw_batch_size=sw_batch_size, output="labels")
    with torch.inference_mode():
        return inferer(vol[None, None], net)


def bench_resize(vol: np.ndarray, reps: int) -> None:
    t = torch.from_numpy(vol)
    reference_protocol(vol[..., :2])  # warm-up
    ours(t[..., :2])
    times: dict[str, list[float]] = {"reference (scipy loop)": [], "ours (batched torch)": []}
    for _ in range(reps):  # interleaved
        t0 = time.perf_counter()
        ref = reference_protocol(vol)
        times["reference (scipy loop)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mine = ours(t)
        times["ours (batched torch)"].append(time.perf_counter() - t0)
    agree = float((mine[0, 0].numpy() == ref).mean())
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:24s} median {med[k]:7.2f} s  (min {min(v):.2f}, max {max(v):.2f}, {len(v)} reps)")
    print(
        f"  speed-up {med['reference (scipy loop)'] / med['ours (batched torch)']:.1f}x; "
        f"label agreement {100 * agree:.2f} % (cubic spline vs bicubic convolution differ slightly)"
    )


def bench_bundle(ct_dir: Path, work: Path, threads: int) -> float:
    """Wall seconds of ``monai.bundle run`` inference on every volume in ``ct_dir``, random weights."""
    from hybridseg.networks.braunetpp import braunetpp

    torch.manual_seed(0)
    ckpt = work / "model.pt"
    torch.save(braunetpp(in_channels=1, num_classes=9).state_dict(), ckpt)
    config = ROOT / "bundles/braunetpp_synapse/configs/inference.json"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    cmd += ["--input_dir", str(ct_dir), "--output_dir", str(work / "out"), "--ckpt_path", str(ckpt)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bundle", action="store_true", help="also run the bundle end to end")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ct").mkdir()
        write_ct(work / "ct" / "ct.nii.gz", args.depth)
        hu = nib.load(str(work / "ct" / "ct.nii.gz")).get_fdata()
        vol = np.clip((hu + 125) / 400, 0, 1).astype(np.float32)  # the bundle's window, -125..275 HU
        print(f"resize stages, 512x512x{args.depth} -> {ROI} and back, {args.threads} threads:")
        bench_resize(vol, args.reps)
        if args.bundle:
            secs = bench_bundle(work / "ct", work, args.threads)
            print(f"bundle inference (monai.bundle run, 512x512x{args.depth}, BRAU-Net++ 224): {secs:.1f} s")


if __name__ == "__main__":
    main()
