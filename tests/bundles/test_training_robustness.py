"""Training that survives: resume after SIGKILL, bit-identical CPU reruns, DDP under torchrun (gloo).

A tiny BRAU-Net++ (config overrides of the network's widths and depths) keeps these runs to seconds; the
bundle's own configs, MONAI's runner and ignite's engines do everything else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bundles.conftest import bundle_files, run_workflow, workflow_error
from tests.reference import REPO_ROOT

FILES = bundle_files("braunetpp_synapse")
TINY_NET = {
    "network_defs#braunetpp#embed_dims": [16, 32, 64, 128],
    "network_defs#braunetpp#encoder_depths": [1, 1, 1],
    "network_defs#braunetpp#decoder_depths": [1, 1, 1],
    "network_defs#braunetpp#head_dim": 16,
}
# 64 px slices, 2 slices per iteration (all ranks together), no worker processes, fp32 (bf16 autocast on
# CPU is slower at these sizes and the determinism test wants plain fp32 arithmetic)
TINY = {
    **TINY_NET,
    "image_size": [64, 64],
    "n_win": 4,
    "batch_size": 2,
    "sw_batch_size": 16,
    "num_workers": 0,
    "amp": False,
    "learning_rate": 0.01,
}


@pytest.fixture(scope="module")
def synapse_small(tmp_path_factory) -> Path:
    """Six 64x64x16 volumes: 2 training, 2 validation, 2 test (two of each so that two ranks share them)."""
    from hybridseg.data.synapse import datalist_synapse
    from hybridseg.tools.synth_synapse import synth_synapse

    root = tmp_path_factory.mktemp("synapse small") / "Träining"  # a space and a non-ASCII letter
    synth_synapse(out=str(root), n=6, shape=(64, 64, 16), seed=1)
    datalist_synapse(root=str(root), out=str(root / "datalist.json"), seed=0, num_val=2)
    return root


def _write_overrides(path: Path, overrides: dict) -> str:
    path.write_text(json.dumps(overrides, indent=4))
    return str(path)


def _bundle_cmd(configs: list[str], **args) -> list[str]:
    cmd = ["-m", "monai.bundle", "run", "--config_file", repr(configs)]
    cmd += ["--meta_file", FILES["meta_file"], "--logging_file", FILES["logging_file"]]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _interrupted_run(dataset_dir: Path, work: Path, overrides: dict, name: str, iteration: int):
    """Train with ``overrides`` (written to ``work/tiny.json``) into ``work/models`` and ``work/run1``, sending
    signal ``name`` to the bundle's own process after ``iteration``: from inside the trainer, so that it falls
    at a known iteration whatever the machine's speed. Returns (the process, the overrides file, the args)."""
    base = _write_overrides(work / "tiny.json", overrides)
    run = [
        "$import signal",
        "$@train#checkpoint_saver.attach(@train#trainer)",
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={iteration}), "
        f"lambda e: os.kill(os.getpid(), signal.{name}))",
        "$@train#trainer.run()",
    ]
    signal_at = _write_overrides(work / "signal.json", {"run": run})
    args = {"dataset_dir": dataset_dir, "ckpt_dir": work / "models"}
    proc = _run([sys.executable] + _bundle_cmd([FILES["train"], base, signal_at], output_dir=work / "run1", **args))
    return proc, base, args


def _trainer_iteration(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=True)["trainer"]["iteration"])


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_from_the_saved_iteration(synapse_small, tmp_path):
    """SIGKILL at iteration 5 of a 6-iteration epoch (checkpoints every 2): the resumed run starts at
    iteration 5, not 1, and finishes the planned 12 iterations with the LR schedule where it left off."""
    work = tmp_path
    common = {**TINY, "epoch_length": 6, "max_epochs": 2, "val_interval": 2, "save_state_every_iters": 2}
    # SIGKILL cannot be caught, so nothing is flushed or saved on the way out
    killed, base, args = _interrupted_run(synapse_small, work, common, "SIGKILL", 5)
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    ckpt = work / "models" / "checkpoint_last.pt"
    assert _trainer_iteration(ckpt) == 4

    # the resumed run saves every iteration, so its log lists each iteration it trains
    resumed = _run(
        [sys.executable]
        + _bundle_cmd(
            [FILES["train"], base], output_dir=work / "run2", resume_from="auto", save_state_every_iters=1, **args
        )
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (work / "run2" / "train.log").read_text()
    assert re.search(r"resumed from .*checkpoint_last\.pt at epoch 0, iteration 4", log), log[-2000:]
    saved = [int(i) for i in re.findall(r"saved checkpoint .* \(epoch \d+, iteration (\d+)\)", log)]
    assert saved == list(range(5, 13)), f"resumed run did not continue at iteration 5: {saved}"
    last = torch.load(ckpt, weights_only=True)
    assert last["trainer"]["iteration"] == 12
    assert last["lr_scheduler"]["last_epoch"] == 12  # the per-iteration schedule continued, not restarted
    assert (work / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_sigterm_saves_the_state_of_the_current_iteration_and_the_run_resumes_there(synapse_small, tmp_path):
    """A scheduler's SIGTERM at iteration 3 with no interval save due: the bundle finishes that iteration,
    saves the full state, exits with status 143, and --resume_from auto trains on from iteration 3."""
    work = tmp_path
    common = {**TINY, "epoch_length": 6, "max_epochs": 1, "val_interval": 1, "save_state_every_iters": 100}
    stopped, base, args = _interrupted_run(synapse_small, work, common, "SIGTERM", 3)
    assert stopped.returncode == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "training stopped by SIGTERM at iteration 3" in (work / "run1" / "train.log").read_text()
    ckpt = work / "models" / "checkpoint_last.pt"
    assert _trainer_iteration(ckpt) == 3
    resumed = _run(
        [sys.executable] + _bundle_cmd([FILES["train"], base], output_dir=work / "run2", resume_from="auto", **args)
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (work / "run2" / "train.log").read_text()
    assert re.search(r"resumed from .*checkpoint_last\.pt at epoch 0, iteration 3", log), log[-2000:]
    saved = [int(i) for i in re.findall(r"saved checkpoint .* \(epoch \d+, iteration (\d+)\)", log)]
    assert saved == [6] and _trainer_iteration(ckpt) == 6  # the end only: no save per epoch or iteration


def _losses_of(dataset_dir: Path, work: Path, overrides: dict) -> list[float]:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=FILES["train"],
        meta_file=FILES["meta_file"],
        logging_file=FILES["logging_file"],
        dataset_dir=str(dataset_dir),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "eval"),
        **overrides,
    )
    wf.initialize()  # runs the config's set_determinism(seed)
    losses: list[float] = []
    from ignite.engine import Events

    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    wf.run()
    wf.finalize()
    return losses


@pytest.mark.slow
def test_two_cpu_runs_with_the_same_seed_give_identical_losses(synapse_small, tmp_path):
    """Fixed seed on CPU: random crops/flips, shuffling, weight init and the updates all repeat exactly."""
    overrides = {**TINY, "epoch_length": 4, "max_epochs": 1, "val_interval": 5, "seed": 7}
    first = _losses_of(synapse_small, tmp_path / "a", overrides)
    second = _losses_of(synapse_small, tmp_path / "b", overrides)
    assert len(first) == 4
    assert first == second, f"{first} != {second}"
    other = _losses_of(synapse_small, tmp_path / "c", {**overrides, "seed": 8})
    assert other != first, "another seed gave the same losses: the seed is not what drives the run"


def _torchrun(configs: list[str], **args) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2`` of the bundle runner: two CPU processes over gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return _run(cmd + _bundle_cmd(configs, **args))


@pytest.mark.slow
def test_two_process_training_and_evaluation_match_single_process_outputs(synapse_small, tmp_path):
    """multi_gpu_train.json under torchrun (2 ranks, gloo): DDP training writes the single-process outputs
    once, from rank 0; multi_gpu_evaluate.json then gives exactly the 1-process test metrics."""
    work = tmp_path
    tiny = _write_overrides(
        work / "tiny.json", {**TINY, "epoch_length": 2, "max_epochs": 1, "val_interval": 1, "save_state_every_iters": 1}
    )
    cfg = Path(FILES["train"]).parent
    args = {"dataset_dir": synapse_small, "ckpt_dir": work / "models"}
    train = _torchrun([FILES["train"], str(cfg / "multi_gpu_train.json"), tiny], output_dir=work / "eval", **args)
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    assert sorted(p.name for p in (work / "models").iterdir()) == ["checkpoint_last.pt", "model.pt"]
    last = torch.load(work / "models" / "checkpoint_last.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "best_model"} <= set(last)
    assert last["trainer"]["iteration"] == 2
    assert not any(k.startswith("module.") for k in last["model"]), "DDP wrapper leaked into the checkpoint"
    log = (work / "eval" / "train.log").read_text()
    assert log.count("saved checkpoint") == 2, "checkpoints must be written (and logged) by rank 0 only"
    events = list((work / "eval").glob("events.out.tfevents.*"))  # ...<time>.<host>.<pid>.<n>
    assert events and len({e.name.split(".")[-2] for e in events}) == 1, "TensorBoard files from 2 ranks"

    two = _torchrun(
        [FILES["train"], FILES["evaluate"], str(cfg / "multi_gpu_evaluate.json"), tiny],
        output_dir=work / "test_2ranks",
        **args,
    )
    assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-4000:]
    run_workflow(
        "train",
        [FILES["train"], FILES["evaluate"]],
        FILES["meta_file"],
        FILES["logging_file"],
        output_dir=str(work / "test_1rank"),
        dataset_dir=str(synapse_small),
        ckpt_dir=str(work / "models"),
        **{**TINY, "epoch_length": 2, "max_epochs": 1},
    )
    for protocol in ("paper", "physical"):
        one = json.loads((work / "test_1rank" / f"summary_{protocol}.json").read_text())
        both = json.loads((work / "test_2ranks" / f"summary_{protocol}.json").read_text())
        assert both == one, f"{protocol}: 2-rank summary differs from the 1-rank summary"
    rows = [(work / d / "metrics_per_case.csv").read_text().splitlines() for d in ("test_1rank", "test_2ranks")]
    assert len(rows[0]) == 1 + 2 * 8 * 2  # header, 2 test cases x 8 organs x 2 protocols
    assert sorted(rows[0]) == sorted(rows[1])


@pytest.mark.slow
def test_cfformer_multi_gpu_train_runs_under_torchrun_with_rank0_outputs(tmp_path):
    """CFFormer-s (the smallest variant, ~98 M parameters) for one DDP iteration per rank, then validation
    sharded over both ranks: the same files as single-process training, written once."""
    from hybridseg.data.busi import datalist_busi
    from hybridseg.tools.synth_busi import synth_busi

    root = tmp_path / "BUSI small"
    synth_busi(out=str(root), n=12, size=64, seed=0)
    datalist_busi(root=str(root), out=str(root / "datalist.json"), seed=0)  # 6 train, 2 val, 2 test
    files = bundle_files("cfformer_busi")
    tiny = _write_overrides(
        tmp_path / "tiny.json",
        {
            "variant": "s",
            "image_size": [64, 64],
            "batch_size": 1,
            "max_epochs": 1,
            "warmup_epochs": 0,
            "num_workers": 0,
            "amp": False,
            "val_interval": 1,
            "save_state_every_iters": 1,
            "train#trainer#epoch_length": 1,
        },
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "monai.bundle", "run", "--config_file"]
    cmd += [repr([files["train"], str(Path(files["train"]).parent / "multi_gpu_train.json"), tiny])]
    cmd += ["--meta_file", files["meta_file"], "--logging_file", files["logging_file"]]
    cmd += ["--dataset_dir", str(root), "--ckpt_dir", str(tmp_path / "models")]
    cmd += ["--output_dir", str(tmp_path / "eval")]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_last.pt", "model.pt"]
    last = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 1 and not any(k.startswith("module.") for k in last["model"])
    events = list((tmp_path / "eval").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1, "TensorBoard files from 2 ranks"
    assert (tmp_path / "eval" / "train.log").read_text().count("saved checkpoint") == 1


@pytest.mark.slow
def test_bundle_training_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(synapse_small, tmp_path):
    """An absurd learning rate blows the weights up within a few iterations: the bundle's own handlers stop
    the run naming the iteration, and checkpoint_last.pt is the state from before it, with finite weights."""
    text = workflow_error(
        FILES["train"],
        FILES["meta_file"],
        FILES["logging_file"],
        dataset_dir=str(synapse_small),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
        **{**TINY, "learning_rate": 1e12, "epoch_length": 8, "max_epochs": 1, "save_state_every_iters": 1},
    )
    m = re.search(r"training loss is (nan|inf|-inf) at iteration (\d+) \(epoch 1\)", text)
    assert m, text[-2000:]
    assert "the last good checkpoint is kept" in text
    last = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == int(m.group(2)) - 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
