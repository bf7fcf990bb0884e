"""Every ```bash block of the top README and of both bundle READMEs runs as written, on generated data.

The blocks are read from the files at test time (whatever they hold; ``<!-- bundle-only ... -->`` parts are
for the packaged bundle and left out), split into commands (``\\`` continuations joined, comments dropped) and
run in order, from the repository root. Only three things change, by rule:

1. data paths: every placeholder in :data:`SUBSTITUTIONS` becomes a generated data set (or output folder) in
   the real layout; a ``/data/...``, ``/path/...`` or ``/tmp/...`` path without an entry fails the test;
2. ``python`` is this interpreter;
3. bundle commands (``monai.bundle run``, ``ckpt_export``, ``verify_net_in_out``... with a bundle's config) get
   the bundle's :data:`TINY` overrides and a ``--ckpt_dir`` / ``--output_dir`` in the test's folder, each only
   when the command does not set it; the bundle's default ``models/`` folder is that ``--ckpt_dir``.

Commands matched by :data:`SKIP` are not run; each rule says why. So a README command that is wrong (a path
that a previous command did not write, an option that does not exist, a config that fails) fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.reference import REPO_ROOT

READMES = {
    "top": REPO_ROOT / "README.md",
    "cfformer_busi": REPO_ROOT / "bundles" / "cfformer_busi" / "docs" / "README.md",
    "braunetpp_synapse": REPO_ROOT / "bundles" / "braunetpp_synapse" / "docs" / "README.md",
}
# CPU-sized overrides per bundle (appended to its bundle runs unless the command sets the key itself).
TINY = {
    "cfformer_busi": {
        "variant": "s",
        "image_size": "[64,64]",
        "batch_size": 2,
        "max_epochs": 1,
        "warmup_epochs": 0,
        "num_workers": 0,
    },
    "braunetpp_synapse": {
        "image_size": "[64,64]",
        "n_win": 4,
        "batch_size": 4,
        "epoch_length": 2,
        "max_epochs": 1,
        "val_interval": 1,
        "sw_batch_size": 16,
        "num_workers": 0,
    },
}
# Placeholder in a README command -> folder (relative to the test's data folder) generated in its layout.
SUBSTITUTIONS = {
    "/data/Dataset_BUSI_with_GT": "Dataset_BUSI_with_GT",  # BUSI layout (synth_busi)
    "/data/DatasetB": "DatasetB",  # Dataset B layout: original/*.png, GT/*.png
    "/data/Synapse": "Synapse",  # raw BTCV layout under RawData/Training (synth_synapse)
    "/data/project_TransUNet/data/Synapse": "project_TransUNet/data/Synapse",  # train_npz + test_vol_h5
    "/data/synapse_nifti": "synapse_nifti",  # output of convert_transunet
    "/data/runs": "runs",  # training/evaluation outputs
    "/path/to/images": "inputs_2d",  # a few PNGs
    "/path/to/masks": "outputs_2d",
    "/path/to/cts": "inputs_ct",  # one NIfTI CT volume
    "/path/to/labels": "outputs_ct",
    "/tmp/busi": "tmp_busi",  # the top README generates its own data there
    "DIR": "Dataset_BUSI_with_GT",  # "--dataset_dir DIR" in prose-like commands
}
_SUB_ORDER = sorted(SUBSTITUTIONS, key=len, reverse=True)
_UNKNOWN_PATH = re.compile(r"^(/data/|/path/|/tmp/)")


def _first(tokens: list[str], *words: str) -> bool:
    return tokens[: len(words)] == list(words)


# (rule, reason): commands the test does not run.
SKIP: list[tuple[Callable[[list[str]], bool], str]] = [
    (lambda t: t[0] == "make", "builds the pinned environments and runs the whole suite or the demo (what CI runs)"),
    (lambda t: t[0] in (".", "source"), "activates .venv: the test already runs in that interpreter"),
    (
        lambda t: t[0] == "torchrun" or "torch.distributed.run" in t,
        "multi-process DDP for GPUs or several nodes: tests/bundles/test_training_robustness.py runs it under gloo",
    ),
    (lambda t: _first(t, "python", "-m", "hybridseg", "demo"), "the whole demo (10+ minutes): `make demo`"),
    (lambda t: _first(t, "python", "-m", "hybridseg", "bench"), "a benchmark (minutes): tests/tools/test_bench.py"),
    (
        lambda t: len(t) > 1 and t[0] == "python" and t[1].startswith("ci/"),
        "a measurement script run by hand (up to an hour of training); its parts are tested on their own",
    ),
    (
        lambda t: t[0] in ("pip", "curl", "wget") or _first(t, "python", "-m", "pip") or "fetch" in t,
        "downloads: these machines have no network",
    ),
]


def bash_blocks(text: str) -> list[str]:
    """The contents of every fenced ```bash block, in order (indented fences included), outside the parts
    written for the packaged bundle only (``<!-- bundle-only ... -->``)."""
    text = re.sub(r"<!-- bundle-only\n.*?-->", "", text, flags=re.S)
    return [m.group(1) for m in re.finditer(r"^[ \t]*```bash[ \t]*\n(.*?)^[ \t]*```", text, re.S | re.M)]


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comment-only and blank lines dropped."""
    out, current = [], ""
    for line in block.splitlines():
        line = line.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def skip_reason(tokens: list[str]) -> str | None:
    return next((reason for rule, reason in SKIP if rule(tokens)), None)


def _substitute(token: str, data: Path) -> str:
    """A placeholder path (the whole token, or its start up to a ``/``; also after ``--flag=``) -> generated."""
    flag, sep, value = token.partition("=") if token.startswith("--") else ("", "", token)
    for key in _SUB_ORDER:
        if value == key or (key.startswith("/") and value.startswith(key + "/")):
            return flag + sep + str(data / SUBSTITUTIONS[key]) + value[len(key) :]
    return token


def prepare(tokens: list[str], data: Path, work: Path) -> list[str]:
    """The command as the test runs it (see the module docstring)."""
    out = [_substitute(t, data) for t in tokens]
    for bundle in TINY:  # the bundle's default checkpoint folder is the test's
        out = [t.replace(f"bundles/{bundle}/models/", f"{work / (bundle + '_models')}/") for t in out]
    unknown = [t for t, new in zip(tokens, out, strict=True) if t == new and _UNKNOWN_PATH.match(t)]
    if unknown:
        raise AssertionError(f"no generated data for {unknown} in {shlex.join(tokens)}: add it to SUBSTITUTIONS")
    if out[0] == "python":
        out[0] = sys.executable
    if "monai.bundle" in out:
        bundle = next((b for b in TINY if any(f"bundles/{b}/" in t for t in out)), None)
        if bundle is not None:
            given = {t[2:].split("=", 1)[0] for t in out if t.startswith("--")}
            n_out = sum(1 for _ in work.glob(f"{bundle}_out*"))
            extra = {"ckpt_dir": work / f"{bundle}_models", "output_dir": work / f"{bundle}_out{n_out}", **TINY[bundle]}
            for key, value in extra.items():
                if key not in given:
                    out += [f"--{key}", str(value)]
    return out


def _transunet_release(root: Path) -> None:
    """A tiny TransUNet release: 3 training cases as train_npz slices, 2 test volumes, values in [0, 1]."""
    import h5py

    rng = np.random.default_rng(0)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for case, n in {"0005": 3, "0006": 4, "0007": 2}.items():
        for k in range(n):
            image = rng.random((32, 32), dtype=np.float32)
            np.savez(root / "train_npz" / f"case{case}_slice{k:03d}.npz", image=image, label=np.zeros_like(image))
    for case in ("0001", "0002"):
        with h5py.File(root / "test_vol_h5" / f"case{case}.npy.h5", "w") as f:
            f["image"] = rng.random((3, 32, 32), dtype=np.float32)
            f["label"] = rng.integers(0, 9, (3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Every data set the READMEs name, generated small in its real layout (no datalists: the READMEs build them)."""
    from hybridseg.tools.synth_busi import synth_busi
    from hybridseg.tools.synth_synapse import synth_synapse

    root = tmp_path_factory.mktemp("readme data")
    busi = root / "Dataset_BUSI_with_GT"
    synth_busi(out=str(busi), n=14, size=96, seed=0)
    # Dataset B: the benign/malignant synthetic images under its own layout
    for sub in ("original", "GT"):
        (root / "DatasetB" / sub).mkdir(parents=True)
    for mask in sorted(busi.glob("*/[bm]*_mask.png")):
        image = mask.parent / (mask.name[: -len("_mask.png")] + ".png")
        stem = image.stem.replace(" ", "").replace("(", "_").replace(")", "")
        shutil.copy(image, root / "DatasetB" / "original" / f"{stem}.png")
        shutil.copy(mask, root / "DatasetB" / "GT" / f"{stem}.png")
    synth_synapse(out=str(root / "Synapse" / "RawData" / "Training"), n=6, shape=(64, 64, 32), seed=0)
    _transunet_release(root / "project_TransUNet" / "data" / "Synapse")
    (root / "inputs_2d").mkdir()
    for png in sorted(busi.glob("benign/*[0-9]).png"))[:2]:
        shutil.copy(png, root / "inputs_2d" / png.name.replace(" ", "_"))
    (root / "inputs_ct").mkdir()
    shutil.copy(sorted((root / "Synapse" / "RawData" / "Training" / "img").iterdir())[0], root / "inputs_ct")
    return root


def test_commands_are_split_substituted_and_skipped_by_rule(tmp_path):
    block = (
        "# comment\npython -m hybridseg datalist_busi --root /data/DatasetB \\\n"
        "    --out /data/DatasetB/d.json\n\nmake demo  # x\n"
    )
    cmds = [shlex.split(c, comments=True) for c in commands(block)]
    assert cmds[0][-1] == "/data/DatasetB/d.json" and skip_reason(cmds[1]) and not skip_reason(cmds[0])
    ran = prepare(cmds[0], tmp_path, tmp_path)
    assert ran[0] == sys.executable and ran[-1] == str(tmp_path / "DatasetB" / "d.json")
    with pytest.raises(AssertionError, match="add it to SUBSTITUTIONS"):
        prepare(["python", "x.py", "--root", "/data/elsewhere"], tmp_path, tmp_path)
    bundle = prepare(
        shlex.split("python -m monai.bundle run --config_file bundles/cfformer_busi/configs/train.json --variant b"),
        tmp_path,
        tmp_path,
    )
    assert bundle.count("--variant") == 1 and "--max_epochs" in bundle and "--ckpt_dir" in bundle


def _untracked_files() -> set[str]:
    """Files in the checkout that git neither tracks nor ignores (empty outside a git checkout)."""
    proc = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else set()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(READMES))
def test_readme_bash_blocks_run_as_written(name, data, tmp_path):
    work = tmp_path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran, skipped = [], []
    for block in bash_blocks(READMES[name].read_text(encoding="utf-8")):
        for command in commands(block):
            tokens = shlex.split(command, comments=True)
            if not tokens:
                continue
            reason = skip_reason(tokens)
            if reason:
                skipped.append(f"{command[:60]}... ({reason})")
                continue
            cmd = prepare(tokens, data, work)
            start = time.perf_counter()
            before = _untracked_files()
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
            seconds = time.perf_counter() - start
            assert proc.returncode == 0, (
                f"{READMES[name].relative_to(REPO_ROOT)}: `{command}` failed (run as {shlex.join(cmd)}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
            # a README path relative to the checkout would make users write outputs into the repository
            stray = sorted(_untracked_files() - before)
            assert not stray, f"{READMES[name].relative_to(REPO_ROOT)}: `{command}` wrote into the checkout: {stray}"
            ran.append(f"{command[:60]}... ({seconds:.0f} s)")
    assert ran, f"{name}: no command of the README ran (skipped: {skipped})"
    print(f"{name}: ran {len(ran)} commands: " + "; ".join(ran))
    print(f"{name}: skipped {len(skipped)}: " + "; ".join(skipped))
