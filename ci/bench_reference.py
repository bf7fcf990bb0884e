"""Our networks against the authors' reference implementations, timed side by side (run by hand, not in CI).

For each network whose reference checkout is given, runs ``--rounds`` pairs of fresh processes, ours and
the reference taking turns (the order flips every round, so a burst of load hits both alike). Each
process builds the network from random weights, warms up, then times ``--reps`` forward passes at batch 1
(``eval``, ``no_grad``, on a copy of the network that the training steps leave unchanged) and ``--reps``
training steps at batch 2 (forward, Dice + cross-entropy loss with the bundle's weights, backward, SGD),
fp32, 224 x 224, ``--threads`` threads, and reports medians. The ratio ours / reference is taken per round
(the two processes of one round) and its median printed.

``--ours-amp`` runs our side as the bundles do by default (``amp`` true: bf16 autocast where the CPU has
native bf16, AVX512-BF16 or AMX; the loss in fp32; inference on bf16 weight copies made once, as the bundles'
inferers do); the reference stays fp32 eager, as its authors run it on a CPU. Without native bf16 the flag
changes nothing (the bundles then run fp32 too).

``--ours-backend onnxruntime|onnxruntime_int8`` times our forward passes on the bundles' ONNX Runtime backend
(``hybridseg.backends.OnnxRuntimeNetwork``, what ``--backend`` selects in the bundles): the network exported
once in the warm-up (that first call's time reported as ``first_forward_s``; int8 calibrated on two random
batches), then run by an ONNX Runtime session with ``--threads`` threads.
Training steps stay torch (with ``--ours-amp`` if given).

The reference code cannot ship with this project: pass the path of your own checkout.

- BRAU-Net++: the authors' repository (Caipengzhou/BRAU-Netplusplus), the folder holding
  ``networks/bra_unet.py``; needs torch, timm, einops and fairscale.
- CFFormer: a folder holding the authors' ``CFFormer.py`` and ``Attention.py`` (the authors' repository,
  or the copy in FengheTan9/U-Bench under ``models/Hybrid/CFFormer``; the folder or any parent of it);
  needs torch, torchvision, timm and einops. Its torchvision backbones are built with ``weights=None``
  (nothing is downloaded; both sides start from random weights).

The reference runs under ``--reference-python`` (a virtual environment that can import its code; default:
this interpreter). A torchvision wheel whose compiled ops cannot load (a CUDA build on a CPU-only
machine) still serves here: its detection-op registrations are skipped, and the models used (ResNet34,
Swin-V2) are pure Python.

Usage::

    .venv/bin/python ci/bench_reference.py --braunetpp ~/src/BRAU-Netplusplus --cfformer ~/src/U-Bench \\
        --reference-python ~/refvenv/bin/python [--rounds 3] [--reps 3] [--threads 2] [--out ref.json]

Exit status: 0 when at least one network was compared, 2 when no reference checkout was usable.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NETWORKS = ("braunetpp", "cfformer_b")
SIZE = 224
# Input channels and classes as the bundles train them; the loss weights are the bundles' (spec/*.md).
SETUP = {
    "braunetpp": {"in_channels": 1, "classes": 9, "w_ce": 0.4},
    "cfformer_b": {"in_channels": 3, "classes": 1, "w_ce": 0.5},
}


# --- finding a user's checkout -----------------------------------------------------------------------


def find_reference(network: str, path: str | None) -> tuple[Path | None, str]:
    """(folder to import from, '') for a usable checkout, else (None, a sentence saying what is missing)."""
    if not path:
        return None, f"{network}: no reference checkout given (--{network.split('_')[0]} PATH): skipped"
    root = Path(path).expanduser()
    if not root.is_dir():
        return None, f"{network}: reference checkout {root} is absent (not a directory): skipped"
    if network == "braunetpp":
        if (root / "networks" / "bra_unet.py").is_file():
            return root, ""
        return None, f"{network}: {root} has no networks/bra_unet.py (a BRAU-Netplusplus checkout?): skipped"
    for candidate in [
        root,
        root / "models" / "Hybrid" / "CFFormer",
        *sorted(p.parent for p in root.rglob("CFFormer.py")),
    ]:
        if (candidate / "CFFormer.py").is_file() and (candidate / "Attention.py").is_file():
            return candidate, ""
    return (
        None,
        f"{network}: no folder under {root} holds CFFormer.py and Attention.py (the authors' model files): skipped",
    )


# --- the child process: build, warm up, time ----------------------------------------------------------


def import_torchvision_leniently() -> None:
    """Import torchvision even when its compiled ops cannot load (CUDA wheel, CPU-only torch).

    torchvision registers fake kernels for its detection ops at import; without its ``_C`` library those
    ops do not exist and the import fails, though the classification models never call them.
    """
    import torch

    original = torch.library.register_fake

    def lenient(op, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - mirrors torch's signature
        decorate = original(op, *args, **kwargs)

        def apply(fn):  # noqa: ANN001, ANN202
            try:
                return decorate(fn)
            except RuntimeError:  # the op was never defined: nothing to fake
                return fn

        return apply

    torch.library.register_fake = lenient
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass  # BRAU-Net++ runs without it; CFFormer's import below then names what is missing
    finally:
        torch.library.register_fake = original


def without_weights(build, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """Call a torchvision model builder with ``weights=None`` whatever weights the caller asked for."""
    return build(weights=None)


def build_reference(network: str, folder: Path):  # noqa: ANN201 - an nn.Module of foreign code
    """The authors' network as their code builds it, random weights, 224 input."""
    import_torchvision_leniently()  # CFFormer's backbones; timm (both) imports it when installed
    if network == "braunetpp":
        import pathlib

        # bra_unet.py rebinds PosixPath to WindowsPath at import (then no Path can be made on Linux):
        # import its dependencies first, so they initialise normally, and undo the rebinding after.
        for dependency in ("timm", "einops", "fairscale"):
            importlib.import_module(dependency)
        posix = pathlib.PosixPath
        sys.path.insert(0, str(folder))
        try:
            bra_unet = importlib.import_module("networks.bra_unet")
        finally:
            pathlib.PosixPath = posix
        return bra_unet.BRAUnet(img_size=SIZE, in_chans=3, num_classes=SETUP[network]["classes"], n_win=7)
    import torchvision.models as tvm

    package = types.ModuleType("cfformer_reference")
    package.__path__ = [str(folder)]  # the model file imports ``.Attention`` relatively
    sys.modules["cfformer_reference"] = package
    module = importlib.import_module("cfformer_reference.CFFormer")
    for name in ("resnet34", "swin_v2_t", "swin_v2_s", "swin_v2_b"):
        # The reference asks for ImageNet weights (a download); build the same backbones without them.
        setattr(module, name, functools.partial(without_weights, getattr(tvm, name)))
    return module.CDFormer(version="b", input_channel=3, num_classes=SETUP[network]["classes"])


def build_ours(network: str):  # noqa: ANN201
    """Our network with the bundle's constructor arguments, random weights."""
    if network == "braunetpp":
        from hybridseg.networks.braunetpp import BRAUNetPP

        return BRAUNetPP(in_channels=1, num_classes=9, n_win=7)
    from hybridseg.networks.cfformer import CFFormer

    return CFFormer(variant="b", in_channels=3, num_classes=1)


def ours_amp_dtype(enabled: bool):  # noqa: ANN201 - a torch.dtype or None
    """The bundles' ``amp`` on this CPU (bf16 where native, else None: fp32); None when not ``enabled``.

    Imports ``hybridseg`` only when enabled: the reference's side runs where it may not be importable.
    """
    if not enabled:
        return None
    from hybridseg.inferers import autocast_dtype

    return autocast_dtype("cpu", True)


def ours_autocast(enabled: bool):  # noqa: ANN201 - a context manager
    """bf16 autocast where :func:`ours_amp_dtype` says so, else nothing."""
    import contextlib

    import torch

    dtype = ours_amp_dtype(enabled)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def ours_inference(  # noqa: ANN201 - a callable like the model
    model,  # noqa: ANN001 - an nn.Module
    enabled: bool,
    backend: str = "torch",
    cache_dir: str | None = None,
    threads: int = 2,
):
    """What the bundles' inferers call: the network, or under ``amp`` the network on its bf16 weight copies made
    once (``hybridseg.inferers.CastWeights``; the model itself without native bf16), or its ONNX Runtime twin
    for ``backend`` onnxruntime / onnxruntime_int8 (exported to ``cache_dir`` on the first call; int8
    calibrated on two random batches). Call in eval mode under ``torch.no_grad()``.
    """
    if backend != "torch":
        import torch

        from hybridseg.backends import OnnxRuntimeNetwork

        def calibration(shape: tuple[int, ...]) -> list:
            gen = torch.Generator().manual_seed(1)
            return [torch.randn(1, *shape, generator=gen).numpy() for _ in range(2)]

        return OnnxRuntimeNetwork(model, backend, cache_dir=cache_dir, calibration=calibration, num_threads=threads)
    from hybridseg.inferers import CastWeights

    dtype = ours_amp_dtype(enabled)
    if dtype is None:
        return model
    cast = CastWeights()
    return lambda x: cast(model, dtype)(x)


def dice_ce(logits, target, classes: int, w_ce: float):  # noqa: ANN001, ANN201
    """The bundles' DiceCE written in torch alone (the reference environment has no MONAI).

    Sigmoid + BCE for one class, softmax + CE otherwise; soft Dice per sample and class, smooth 1e-5.
    """
    import torch
    import torch.nn.functional as F

    if classes == 1:
        ce = F.binary_cross_entropy_with_logits(logits, target)
        prob, onehot = torch.sigmoid(logits), target
    else:
        ce = F.cross_entropy(logits, target)
        prob = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, classes).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum(dim=(2, 3))
    denom = prob.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = 1.0 - (2.0 * inter + 1e-5) / (denom + 1e-5)
    return w_ce * ce + (1.0 - w_ce) * dice.mean()


def child(
    side: str,
    network: str,
    folder: str | None,
    reps: int,
    threads: int,
    seed: int,
    amp: bool = False,
    backend: str = "torch",
) -> dict:
    """Build one side's network and time forward (b1) and training steps (b2); medians in ms."""
    import tempfile

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build_reference(network, Path(folder)) if side == "reference" else build_ours(network)
    build_s = time.perf_counter() - t0
    setup = SETUP[network]
    c, k = setup["in_channels"], setup["classes"]
    x1 = torch.randn(1, c, SIZE, SIZE)
    x2 = torch.randn(2, c, SIZE, SIZE)
    y = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float() if k == 1 else torch.randint(0, k, (2, SIZE, SIZE))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    autocast = functools.partial(ours_autocast, amp and side == "ours")
    # Forward passes on a copy the training steps do not change: inference runs on fixed weights, and ours
    # makes its bf16 weight copies once for them (the steps are interleaved with the training steps below).
    frozen = copy.deepcopy(model).eval()
    backend = backend if side == "ours" else "torch"
    # the ONNX export lives as long as the timing
    cache = tempfile.TemporaryDirectory(prefix="bench_reference_onnx_") if backend != "torch" else None
    infer = ours_inference(frozen, amp, backend, cache and cache.name, threads) if side == "ours" else frozen

    def forward() -> None:
        with torch.no_grad(), autocast():
            infer(x1)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x2)
        loss = dice_ce(logits.float(), y, k, setup["w_ce"])
        loss.backward()
        opt.step()

    first_forward_s = 0.0
    for i in range(2):  # warm-up: oneDNN primitive caches, allocator, our window-layout cache, the ONNX export
        t0 = time.perf_counter()
        forward()
        if i == 0:
            first_forward_s = time.perf_counter() - t0
        train_step()
    times: dict[str, list[float]] = {"forward_b1": [], "train_b2": []}
    cpu: dict[str, list[float]] = {"forward_b1": [], "train_b2": []}
    for _ in range(reps):  # interleaved, so a burst of load hits both measurements alike
        for name, fn in (("forward_b1", forward), ("train_b2", train_step)):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - wall0)
            cpu[name].append(time.process_time() - cpu0)
    params = sum(p.numel() for p in model.parameters())
    if cache is not None:
        cache.cleanup()
    return {
        "side": side,
        "network": network,
        "amp": bool(amp and side == "ours" and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "backend": backend,
        "first_forward_s": first_forward_s,  # with an onnxruntime backend: export (+ int8 calibration) and first run
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": params,
        "build_s": build_s,
        "ms": {n: [1000 * t for t in ts] for n, ts in times.items()},
        "median_ms": {n: 1000 * statistics.median(ts) for n, ts in times.items()},
        # Process CPU time (all threads): less disturbed than wall time when others share the cores.
        "cpu_ms": {n: [1000 * t for t in ts] for n, ts in cpu.items()},
        "cpu_median_ms": {n: 1000 * statistics.median(ts) for n, ts in cpu.items()},
    }


def same_process(network: str, folder: str, reps: int, threads: int, amp: bool = False) -> dict:
    """Both networks in one process (the reference's environment), their calls taking turns.

    Under heavy load this pairs the two far more tightly than separate processes (each call of ours has
    a call of the reference right next to it). Returns per-call ratios ours / reference, wall and CPU.
    """
    import torch

    sys.path.insert(0, str(REPO / "bundles" / "common"))  # our networks need torch and MONAI
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {"ours": build_ours(network), "reference": build_reference(network, Path(folder))}
    frozen = {side: copy.deepcopy(m).eval() for side, m in models.items()}  # fixed weights, as in child()
    infer = {"ours": ours_inference(frozen["ours"], amp), "reference": frozen["reference"]}
    setup = SETUP[network]
    c, k = setup["in_channels"], setup["classes"]
    x1, x2 = torch.randn(1, c, SIZE, SIZE), torch.randn(2, c, SIZE, SIZE)
    y = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float() if k == 1 else torch.randint(0, k, (2, SIZE, SIZE))
    opts = {side: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for side, m in models.items()}

    def call(side: str, what: str) -> None:
        model = models[side]
        if what == "forward_b1":
            with torch.no_grad(), ours_autocast(amp and side == "ours"):
                infer[side](x1)
            return
        model.train()
        opts[side].zero_grad(set_to_none=True)
        with ours_autocast(amp and side == "ours"):
            logits = model(x2)
        dice_ce(logits.float(), y, k, setup["w_ce"]).backward()
        opts[side].step()

    result: dict[str, dict] = {}
    for what in ("forward_b1", "train_b2"):
        for side in models:  # warm-up
            call(side, what)
        clocks: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": []} for s in models}
        for r in range(reps):
            for side in ("ours", "reference") if r % 2 == 0 else ("reference", "ours"):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                call(side, what)
                clocks[side]["wall"].append(1000 * (time.perf_counter() - wall0))
                clocks[side]["cpu"].append(1000 * (time.process_time() - cpu0))
        for clock in ("wall", "cpu"):
            ours, ref = clocks["ours"][clock], clocks["reference"][clock]
            ratios = [o / f for o, f in zip(ours, ref, strict=True)]
            result[f"{what}_{clock}"] = {
                "ours_ms": statistics.median(ours),
                "reference_ms": statistics.median(ref),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ours_all_ms": ours,
                "reference_all_ms": ref,
            }
    return {"network": network, "threads": torch.get_num_threads(), "summary": result}


# --- the parent: alternate processes, collect, print ---------------------------------------------------


def run_child(python: str, side: str, network: str, folder: Path | None, args: argparse.Namespace, seed: int) -> dict:
    """One fresh process of ``side``; its JSON result (raises with its stderr on failure)."""
    cmd = [python, str(Path(__file__).resolve()), "--child", side, "--network", network]
    cmd += ["--reps", str(args.reps), "--threads", str(args.threads), "--seed", str(seed)]
    cmd += ["--ours-amp"] if args.ours_amp else []
    cmd += ["--ours-backend", args.ours_backend] if side == "ours" else []
    if folder is not None:
        cmd += ["--folder", str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {network} process failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_capability() -> dict:
    """What ATen and oneDNN dispatch to here (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can lower them)."""
    import torch

    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        **{
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ
        },
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def compare(network: str, folder: Path, args: argparse.Namespace) -> dict:
    """``--rounds`` alternating ours/reference process pairs for one network; per-round ratios."""
    if args.same_process:
        res = run_child(args.reference_python, "both", network, folder, args, seed=0)
        return {"network": network, "reference_folder": str(folder), "same_process": True, **res}
    rounds = []
    for r in range(args.rounds):
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        res = {}
        for side in order:
            python = args.reference_python if side == "reference" else sys.executable
            res[side] = run_child(python, side, network, folder if side == "reference" else None, args, seed=r)
            med, cpu = res[side]["median_ms"], res[side]["cpu_median_ms"]
            print(f"  round {r + 1} {network} {side:9s}: forward b1 {med['forward_b1']:8.0f} ms "
                  f"(CPU {cpu['forward_b1']:.0f}), train step b2 {med['train_b2']:8.0f} ms "
                  f"(CPU {cpu['train_b2']:.0f})"
                  + (f", first forward {res[side]['first_forward_s']:.1f} s (export)"
                     if res[side]["backend"] != "torch" else ""), flush=True)  # fmt: skip
        rounds.append(res)
    summary = {}
    for clock in ("median_ms", "cpu_median_ms"):
        for what in ("forward_b1", "train_b2"):
            ours = [rd["ours"][clock][what] for rd in rounds]
            ref = [rd["reference"][clock][what] for rd in rounds]
            ratios = [o / f for o, f in zip(ours, ref, strict=True)]
            summary[f"{what}_{'cpu' if clock.startswith('cpu') else 'wall'}"] = {
                "ours_ms": statistics.median(ours),
                "reference_ms": statistics.median(ref),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
    return {"network": network, "reference_folder": str(folder), "rounds": rounds, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--braunetpp", help="checkout of the BRAU-Net++ authors' repository (holds networks/bra_unet.py)")
    p.add_argument("--cfformer", help="folder holding the authors' CFFormer.py and Attention.py (or a parent)")
    p.add_argument("--reference-python", default=sys.executable, help="python of an environment that runs it")
    p.add_argument("--rounds", type=int, default=3, help="ours/reference process pairs per network")
    p.add_argument("--reps", type=int, default=3, help="timed forward passes and training steps per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run both networks in one process of --reference-python, calls taking turns (tighter pairs on a "
        "loaded machine; ours is imported from this checkout's bundles/common, so that environment needs MONAI)",
    )
    p.add_argument(
        "--ours-amp",
        action="store_true",
        help="our side with the bundles' default amp (bf16 autocast on a CPU with native bf16; fp32 elsewhere)",
    )
    p.add_argument(
        "--ours-backend",
        choices=("torch", "onnxruntime", "onnxruntime_int8"),  # hybridseg.backends.BACKENDS; not imported: the
        # reference's environment parses these options too and cannot import hybridseg
        default="torch",
        help="the bundles' inference backend for our forward passes (training steps stay torch)",
    )
    p.add_argument("--child", choices=("ours", "reference", "both"), help=argparse.SUPPRESS)
    p.add_argument("--network", choices=NETWORKS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.same_process and args.ours_backend != "torch":
        p.error("--same-process runs ours in the reference's environment, without ONNX Runtime: drop --ours-backend")
    if args.child == "both":
        print(json.dumps(same_process(args.network, args.folder, args.reps, args.threads, args.ours_amp)))
        return 0
    if args.child:
        print(
            json.dumps(
                child(
                    args.child,
                    args.network,
                    args.folder,
                    args.reps,
                    args.threads,
                    args.seed,
                    args.ours_amp,
                    args.ours_backend,
                )
            )
        )
        return 0

    targets = []
    for network, path in (("braunetpp", args.braunetpp), ("cfformer_b", args.cfformer)):
        folder, why = find_reference(network, path)
        if folder is None:
            print(why, flush=True)
        else:
            targets.append((network, folder))
    if not targets:
        print("no reference checkout to compare against: pass --braunetpp and/or --cfformer (see --help)")
        return 2
    mode = "one process, calls taking turns" if args.same_process else f"{args.rounds} process pairs"
    precision = "ours with the bundles' amp (bf16 where native), reference fp32" if args.ours_amp else "fp32"
    precision += f"; our forward on {args.ours_backend}" if args.ours_backend != "torch" else ""
    print(f"threads {args.threads}, {precision}, {SIZE}x{SIZE}, {mode}, {args.reps} reps; "
          f"reference python {args.reference_python}; load average {load_average()}", flush=True)  # fmt: skip
    results = {"load_average_before": load_average(), "threads": args.threads, "ours_amp": args.ours_amp}
    results["ours_backend"] = args.ours_backend
    results["cpu_capability"] = cpu_capability()
    results["networks"] = []
    for network, folder in targets:
        results["networks"].append(compare(network, folder, args))
    results["load_average_after"] = load_average()
    print(f"\nload average after: {results['load_average_after']}")
    print("| network | clock | forward b1 ours / reference (ms) | ours/ref median (min-max) "
          "| train step b2 ours / reference (ms) | ours/ref median (min-max) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for res in results["networks"]:
        for clock in ("wall", "cpu"):
            cells = []
            for what in ("forward_b1", "train_b2"):
                s = res["summary"][f"{what}_{clock}"]
                cells.append(f"{s['ours_ms']:.0f} / {s['reference_ms']:.0f}")
                cells.append(f"**{s['ratio_median']:.2f}** ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})")
            print(f"| {res['network']} | {clock} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
