"""``python -m hybridseg demo``: the main job, end to end, with the commands a user would type.

For each bundle: generate a synthetic data set in the real layout, build its datalist, train with the demo's
own CPU-sized settings (``DEMO_SETTINGS``, written to ``<out>/<bundle>_demo.json`` and passed as an extra
config file, so the demo does not depend on ``quick.json``), evaluate on the test split, infer on a few
inputs, then print the metrics tables and draw two PNGs per bundle: the test overlays as a contact sheet and
the training loss / validation Dice curves. Every step is the documented ``python -m hybridseg ...`` or
``python -m monai.bundle run ...`` command, run as a subprocess whose output goes to ``demo.log``; while a
bundle trains, its step, epoch, loss, elapsed and estimated remaining time are printed from the log lines of
MONAI's ``StatsHandler``. The two bundles run one after the other (``--parallel``: side by side, half the
cores each, which on 2 cores is no faster: BRAU-Net++'s training is most of the time).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
BUNDLES = REPO / "bundles"

# The demo's settings (our choice, sized so the whole demo, set-up included, takes under 10 minutes on 2 cores):
# CFFormer-s at 64 px; BRAU-Net++ at 96 px with n_win 3 (maps 24/12/6/3 divide by 3), batch 8 and AdamW in place
# of the paper's SGD, which at a few hundred iterations does not get going on this data. Both optimizers use
# torch's fused kernel (the per-tensor loop took a fifth of a CFFormer-s demo step).
DEMO_SETTINGS: dict[str, dict[str, dict]] = {
    "cfformer_busi": {
        "network": {"variant": "s", "image_size": [64, 64], "amp": True},
        "train": {"batch_size": 8, "max_epochs": 9, "warmup_epochs": 1, "val_interval": 3, "num_workers": 0},
    },
    "braunetpp_synapse": {
        "network": {"image_size": [96, 96], "n_win": 3, "sw_batch_size": 32, "amp": True},
        "train": {
            "batch_size": 8,
            "epoch_length": 40,
            "max_epochs": 6,
            "val_interval": 2,
            "num_workers": 0,
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "params": "$@network.parameters()",
                "lr": 0.0005,
                "weight_decay": 0.0001,
                "fused": True,
            },
        },
    },
}

_PRINT = threading.Lock()
_ITER = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+) --(.*)")
_METRICS = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)")
_VALUE = re.compile(r"(\w+): ([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))")


def say(text: str) -> None:
    """Print a line at once (the bundles may be printing from two threads)."""
    with _PRINT:
        print(text, flush=True)


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class TrainingProgress:
    """Follows a training run's log lines (MONAI ``StatsHandler``) and keeps its loss and metric curves.

    ``feed`` returns a status line (epoch, step, loss, elapsed, remaining) when one is due: at each new epoch,
    each validation, and at least every ``every`` seconds.
    """

    def __init__(self, name: str, every: float = 15.0, clock=time.perf_counter) -> None:
        self.name, self.every, self.clock = name, every, clock
        self.t0 = clock()
        self.last_print = -math.inf
        self.first: tuple[float, int] | None = None  # (time, step) of the first logged step
        self.epoch = self.max_epochs = self.step = self.total = 0
        self.loss: list[tuple[int, float]] = []  # (global step, training loss)
        self.metrics: dict[str, list[tuple[int, float]]] = {}  # name -> [(epoch, value)]

    def feed(self, line: str) -> str | None:
        if m := _ITER.search(line):
            epoch, max_epochs, it, per_epoch = (int(g) for g in m.groups()[:4])
            new_epoch = epoch != self.epoch
            self.epoch, self.max_epochs = epoch, max_epochs
            self.step, self.total = (epoch - 1) * per_epoch + it, max_epochs * per_epoch
            if self.first is None:
                self.first = (self.clock(), self.step)
            values = dict(_VALUE.findall(m.group(5)))
            if "train_loss" in values:
                self.loss.append((self.step, float(values["train_loss"])))
            return self.status() if new_epoch or self.clock() - self.last_print >= self.every else None
        if m := _METRICS.search(line):
            for k, v in _VALUE.findall(m.group(2)):
                self.metrics.setdefault(k, []).append((int(m.group(1)), float(v)))
            return self.status()
        return None

    def status(self) -> str:
        self.last_print = now = self.clock()
        elapsed = now - self.t0
        # the rate since the first step: process start-up and data caching come before it
        known = self.first is not None and self.step > self.first[1]
        rate = (now - self.first[0]) / (self.step - self.first[1]) if known else math.nan
        parts = [f"[{self.name}] epoch {self.epoch}/{self.max_epochs}", f"step {self.step}/{self.total}"]
        if self.loss:
            parts.append(f"loss {self.loss[-1][1]:.4f}")
        for k, vals in self.metrics.items():
            parts.append(f"{k} {vals[-1][1]:.4f}")
        parts.append(f"elapsed {_mmss(elapsed)}")
        parts.append(f"remaining ~{_mmss(rate * (self.total - self.step))}" if known else "remaining ?")
        return ", ".join(parts)


def _run(cmd: list[str], log: Path, threads: int | None = None, progress: TrainingProgress | None = None) -> float:
    """Run one command, its output to ``log`` (and to ``progress``); returns seconds, raises with the log tail."""
    t0 = time.perf_counter()
    say("$ " + " ".join(cmd))
    env = {**os.environ}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    lines: list[str] = []
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env, text=True, errors="replace"
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode turns tqdm's carriage returns into line ends too
            f.write(line)
            lines = (lines + [line])[-40:]
            if progress is not None and (status := progress.feed(line)):
                say("  " + status)
        proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}) after {seconds:.0f} s; log {log}:\n{''.join(lines)}")
    say(f"  done in {seconds:.1f} s")
    return seconds


def _bundle_cmd(bundle: str, configs: Sequence[str | Path], **overrides: object) -> list[str]:
    files = [str(c if Path(c).is_absolute() else BUNDLES / bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files).replace('"', "'")]
    cmd += ["--meta_file", str(BUNDLES / bundle / "configs" / "metadata.json")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def write_settings(bundle: str, out: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """The demo's settings of ``bundle`` (updated with ``extra``) as config files: (network + training,
    network only)."""
    settings = DEMO_SETTINGS[bundle]
    extra = extra or {}
    # a key train.json does not define would be added silently and change nothing: refuse it
    defined = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    unknown = sorted({*settings["network"], *settings["train"], *extra} - set(defined))
    if unknown:
        raise ValueError(f"demo settings for {bundle}: {unknown} are not keys of {bundle}/configs/train.json")
    network_keys = {k: v for k, v in extra.items() if k in settings["network"]}
    train, network = out / f"{bundle}_demo.json", out / f"{bundle}_demo_network.json"
    train.write_text(json.dumps({**settings["network"], **settings["train"], **extra}, indent=4) + "\n")
    network.write_text(json.dumps({**settings["network"], **network_keys}, indent=4) + "\n")
    return train, network


def _train_evaluate_infer(
    bundle: str,
    data: Path,
    work: Path,
    out: Path,
    n_infer: int,
    times: dict,
    log: Path,
    threads: int | None,
    extra: dict | None = None,
) -> TrainingProgress:
    """Train (demo settings), evaluate on the test split, infer on copies of ``n_infer`` test inputs."""
    settings, network_settings = write_settings(bundle, out, extra)
    common = dict(dataset_dir=data, ckpt_dir=work / "models")
    progress = TrainingProgress(bundle)
    times["train"] = _run(
        _bundle_cmd(bundle, ["train.json", settings], output_dir=work / "train", **common), log, threads, progress
    )
    times["evaluate"] = _run(
        _bundle_cmd(bundle, ["train.json", settings, "evaluate.json"], output_dir=work / "test", **common), log, threads
    )
    test = json.loads((data / "datalist.json").read_text())["test"][:n_infer]
    samples = work / "inference_inputs"
    samples.mkdir(parents=True, exist_ok=True)
    for t in test:  # copies, so the demo's inference never writes near the data set
        shutil.copy(data / t["image"], samples / Path(t["image"]).name)
    times["infer"] = _run(
        _bundle_cmd(
            bundle,
            ["inference.json", network_settings],
            input_dir=samples,
            output_dir=work / "inference",
            ckpt_path=work / "models" / "model.pt",
        ),
        log,
        threads,
    )
    return progress


def demo_busi(out: Path, n: int, size: int, log: Path, threads: int | None = None, extra: dict | None = None) -> dict:
    data, work = out / "busi" / "Dataset_BUSI_with_GT", out / "busi" / "run"
    py = [sys.executable, "-m", "hybridseg"]
    times: dict[str, float] = {}
    times["generate"] = _run(
        py + ["synth_busi", "--out", str(data), "--n", str(n), "--size", str(size), "--seed", "0"], log, threads
    )
    times["datalist"] = _run(
        py + ["datalist_busi", "--root", str(data), "--out", str(data / "datalist.json")], log, threads
    )
    progress = _train_evaluate_infer("cfformer_busi", data, work, out, 4, times, log, threads, extra)
    return _result(work, times, progress, ["busi"])


def demo_synapse(
    out: Path, n: int, shape: Sequence[int], log: Path, threads: int | None = None, extra: dict | None = None
) -> dict:
    data, work = out / "synapse" / "RawData" / "Training", out / "synapse" / "run"
    py = [sys.executable, "-m", "hybridseg"]
    times: dict[str, float] = {}
    times["generate"] = _run(
        py + ["synth_synapse", "--out", str(data), "--n", str(n), "--shape", *map(str, shape), "--seed", "0"],
        log,
        threads,
    )
    times["datalist"] = _run(
        py + ["datalist_synapse", "--root", str(data), "--out", str(data / "datalist.json"), "--num_val", "1"],
        log,
        threads,
    )
    progress = _train_evaluate_infer("braunetpp_synapse", data, work, out, 1, times, log, threads, extra)
    return _result(work, times, progress, ["paper", "physical"])


def _result(work: Path, times: dict, progress: TrainingProgress, protocols: list[str]) -> dict:
    test = work / "test"
    return {
        "work": work,
        "times": times,
        "table": (test / "summary.md").read_text(),
        "summary": {p: json.loads((test / f"summary_{p}.json").read_text()) for p in protocols},
        "curves": {"train_loss": progress.loss, **progress.metrics},
        "figures": {
            "overlays": contact_sheet(test / "overlays", test / "metrics_per_case.csv", work.parent / "overlays.png"),
            "curves": draw_curves(progress, work.parent / "curves.png"),
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Figures, drawn with Pillow (already a dependency): no plotting library needed.


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _case_dice(csv_file: Path) -> dict[str, float]:
    """Mean Dice per case over its classes (the first protocol listed per case), from metrics_per_case.csv."""
    per: dict[str, list[float]] = {}
    first: dict[str, str] = {}
    if not csv_file.is_file():
        return {}
    with open(csv_file, newline="") as f:
        for r in csv.DictReader(f):
            proto = first.setdefault(r["case"], r["protocol"])
            if r["protocol"] == proto and r["dice"] not in ("", "nan"):
                per.setdefault(r["case"], []).append(float(r["dice"]))
    return {c: sum(v) / len(v) for c, v in per.items()}


def contact_sheet(folder: Path, csv_file: Path, dest: Path, tile: int = 200, columns: int = 4) -> Path | None:
    """The overlay PNGs of ``folder`` on one sheet, each captioned with its case and mean Dice."""
    from PIL import Image, ImageDraw

    files = sorted(folder.glob("*.png"))
    if not files:
        return None
    dice = _case_dice(csv_file)
    cols = min(columns, len(files))
    rows = math.ceil(len(files) / cols)
    cap = 22
    sheet = Image.new("RGB", (max(cols * tile, 420), rows * (tile + cap) + 28), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), "test overlays: ground truth outlined green, prediction red", fill="black", font=_font(14))
    for i, f in enumerate(files):
        img = Image.open(f).convert("RGB")
        scale = tile / max(img.size)  # small overlays are enlarged (nearest: pixels stay visible)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
        x, y = (i % cols) * tile, 28 + (i // cols) * (tile + cap)
        sheet.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        case = next((c for c in sorted(dice, key=len, reverse=True) if f.stem.startswith(c)), None)
        label = f.stem if case is None else f"{case}  Dice {dice[case]:.3f}"
        draw.text((x + 4, y + tile + 3), label[:32], fill="black", font=_font(13))
    _save(sheet, dest)
    return dest


_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _panel(
    draw,
    box: tuple[int, int, int, int],
    title: str,
    lines: dict[str, list[tuple[int, float]]],
    xlabel: str,
    y_range: tuple[float, float] | None = None,
    x_range: tuple[int, int] | None = None,
):
    """A line chart of ``lines`` (name -> [(x, y)]) in ``box``, with a value grid and a legend.

    The axes span the data unless ``y_range`` / ``x_range`` fix them (Dice on 0..1 over the whole run, so
    a single validation still reads as a point on a scale).
    """
    x0, y0, x1, y1 = box
    font = _font(13)
    draw.text((x0, y0 - 22), title, fill="black", font=_font(15))
    draw.rectangle(box, outline="black")
    points = [p for series in lines.values() for p in series]
    if not points:
        draw.text((x0 + 10, y0 + 10), "no values logged", fill="gray", font=font)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points if math.isfinite(p[1])]
    lo, hi = y_range or ((min(ys), max(ys)) if ys else (0.0, 1.0))
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    xmin, xmax = x_range or (min(xs), max(xs))
    xmax = xmax if xmax > xmin else xmin + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

    for k in range(5):  # horizontal grid with values
        v = lo + (hi - lo) * k / 4
        _, y = px(xmin, v)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((x0 - 48, y - 7), f"{v:.3f}", fill="black", font=font)
    draw.text((x0, y1 + 6), f"{xmin}", fill="black", font=font)
    draw.text((x1 - 30, y1 + 6), f"{xmax}", fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 20, y1 + 6), xlabel, fill="black", font=font)
    for i, (name, series) in enumerate(lines.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = [px(x, y) for x, y in series if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for p in pts if len(pts) < 30 else []:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        if len(lines) > 1:
            draw.text((x0 + 8, y0 + 6 + 16 * i), name, fill=colour, font=font)


def draw_curves(progress: TrainingProgress, dest: Path) -> Path:
    """Training loss per step and the logged metrics (Dice) per epoch, side by side, as one PNG."""
    from PIL import Image, ImageDraw

    panels: list[tuple[str, dict, str, dict]] = [("training loss", {"train_loss": progress.loss}, "step", {})]
    if progress.metrics:
        last = max(x for series in progress.metrics.values() for x, _ in series)
        ranges = {"y_range": (0.0, 1.0), "x_range": (0, max(progress.max_epochs, last))}
        panels.append(("Dice", progress.metrics, "epoch", ranges))
    w, h = 420, 300
    img = Image.new("RGB", (len(panels) * w + 40, h + 40), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, series, xlabel, ranges) in enumerate(panels):
        _panel(draw, (i * w + 70, 40, i * w + w, h - 10), f"{progress.name}: {title}", series, xlabel, **ranges)
    _save(img, dest)
    return dest


def _save(img, dest: Path) -> None:
    from hybridseg.io import atomic_path

    with atomic_path(dest) as tmp:
        img.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------------


def demo(
    out: str = "demo_output",
    busi_n: int = 200,
    busi_size: int = 128,
    synapse_n: int = 10,
    synapse_shape: tuple[int, int, int] = (96, 96, 48),
    only: str | None = None,
    parallel: bool = False,
    settings: dict | None = None,
) -> None:
    """Generate data, train, evaluate and infer both bundles with the demo's settings; print and draw results.

    Args:
        out: folder for everything the demo writes (replaced if it holds an earlier demo).
        busi_n: number of synthetic BUSI-like images (all classes); busi_size: their side in pixels.
        synapse_n: number of synthetic CT volumes; synapse_shape: their X Y Z size.
        only: "busi" or "synapse" to run one bundle.
        parallel: run the two bundles side by side, each on half the CPU cores (default: one after the other).
        settings: config values replacing the demo's own, per bundle, e.g.
            ``{"braunetpp_synapse": {"max_epochs": 2}}`` (written into ``<out>/<bundle>_demo.json``).
    """
    root = Path(out).resolve()
    if root.exists():
        if not (root / ".hybridseg-demo").exists():
            raise SystemExit(f"{root} exists and is not an earlier demo output; choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / ".hybridseg-demo").write_text("written by python -m hybridseg demo\n")
    t0 = time.perf_counter()
    jobs = {
        "busi": lambda log, threads: demo_busi(
            root, busi_n, busi_size, log, threads, (settings or {}).get("cfformer_busi")
        ),
        "synapse": lambda log, threads: demo_synapse(
            root, synapse_n, tuple(synapse_shape), log, threads, (settings or {}).get("braunetpp_synapse")
        ),
    }
    jobs = {k: v for k, v in jobs.items() if only in (None, k)}
    side_by_side = parallel and len(jobs) > 1
    threads = max(1, (os.cpu_count() or 2) // len(jobs)) if side_by_side else None
    say(
        "== cfformer_busi (CFFormer, BUSI-like ultrasound) and braunetpp_synapse (BRAU-Net++, BTCV-like CT), "
        f"synthetic data; {'side by side, ' + str(threads) + ' thread(s) each' if side_by_side else 'in turn'} =="
    )
    results: dict[str, dict] = {}
    errors: list[Exception | SystemExit] = []

    def work(name: str) -> None:
        try:
            results[name] = jobs[name](root / f"demo_{name}.log", threads)
        except (Exception, SystemExit) as e:  # reported after the other bundle finishes
            errors.append(e)

    if side_by_side:
        workers = [threading.Thread(target=work, args=(name,)) for name in jobs]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    else:
        for name in jobs:
            work(name)
    if errors:
        raise errors[0]
    total = time.perf_counter() - t0
    print("\n" + "=" * 100)
    print("RESULTS ON SYNTHETIC DATA (demo CPU settings; not comparable with the papers' numbers)")
    for name in (k for k in ("busi", "synapse") if k in results):
        r = results[name]
        times = ", ".join(f"{k} {v:.0f} s" for k, v in r["times"].items())
        print(f"\n[{name}] test-set metrics ({times})\n{r['table']}")
        print(f"  per-case CSV: {r['work'] / 'test' / 'metrics_per_case.csv'}")
        print(f"  inference:    {r['work'] / 'inference'}")
        for kind, path in r["figures"].items():
            print(f"  {kind + ':':13} {path}")
    print(f"\nwall time {total:.0f} s ({_mmss(total)}); logs {root}/demo_*.log")
    summary = {
        name: {"times_s": r["times"], "summary": r["summary"], "curves": r["curves"], "figures": r["figures"]}
        for name, r in results.items()
    }
    summary["wall_time_s"] = total  # type: ignore[assignment]
    (root / "demo_results.json").write_text(json.dumps(summary, indent=4, default=str) + "\n")
