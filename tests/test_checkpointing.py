"""Training persistence (hybridseg.checkpointing): atomic saves that survive a crash mid-save, the stop on a
non-finite loss, and loading that accepts only state dicts (MONAI SupervisedTrainer on a one-layer network,
so each test is well under a second apart from the one that kills a child process)."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from hybridseg.checkpointing import (
    AtomicCheckpointSaver,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
    attach_resume,
    training_state,
)
from hybridseg.io import InputDataError
from hybridseg.weights import load_state_checkpoint
from tests.reference import REPO_ROOT


def _trainer(images: list[torch.Tensor], handlers=(), max_epochs: int = 1):
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    data = [{"image": x, "label": torch.zeros_like(x)} for x in images]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=1),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.L1Loss(),
        train_handlers=list(handlers),
    )
    return trainer, training_state(net, opt, sched, trainer)


def _images(n: int, bad: int | None = None) -> list[torch.Tensor]:
    xs = [torch.full((1, 4, 4), float(i + 1)) for i in range(n)]
    if bad is not None:
        xs[bad][0, 0, 0] = math.inf
    return xs


def test_checkpoint_every_n_iterations_holds_the_full_training_state(tmp_path):
    trainer, state = _trainer(_images(5))
    saver = AtomicCheckpointSaver(tmp_path, state, every_n_iterations=2)
    saver.attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(_iteration(saver.path)))
    trainer.run()
    # saved at 2 and 4 (every 2), then when training completes (5)
    assert seen == [None, 2, 2, 4, 4]
    ck = load_state_checkpoint(saver.path, ["model", "optimizer", "lr_scheduler", "trainer"])
    assert ck["trainer"]["iteration"] == 5 and set(ck["model"]) == {"weight", "bias"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"], "temporary files left behind"


def _iteration(path: Path) -> int | None:
    return torch.load(path, weights_only=True)["trainer"]["iteration"] if path.is_file() else None


def test_a_failing_write_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer, state = _trainer(_images(2))
    saver = AtomicCheckpointSaver(tmp_path, state, every_n_iterations=1)
    saver.attach(trainer)
    trainer.run()
    before = saver.path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)  # half a file in the temporary...
        raise OSError(28, "No space left on device")  # ...then the write fails

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        saver.save()
    monkeypatch.undo()
    assert saver.path.read_bytes() == before
    assert load_state_checkpoint(saver.path, ["model", "trainer"])["trainer"]["iteration"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"], "the failed temporary file stayed"


KILL_DURING_SAVE = """
import os, signal, sys, torch
from hybridseg.checkpointing import AtomicCheckpointSaver
net = torch.nn.Linear(4, 4)
saver = AtomicCheckpointSaver(sys.argv[1], {"model": net}, filename="model.pt")
real_save = torch.save
def killed(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.truncate(64)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed
with torch.no_grad():
    net.weight.fill_(7.0)
saver.save()
"""


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL in the middle of torch.save (a job killed by the scheduler): the old file still loads."""
    torch.save({"weight": torch.ones(4, 4), "bias": torch.zeros(4)}, tmp_path / "model.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=env, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    state = load_state_checkpoint(tmp_path / "model.pt", ["model"])["model"]
    assert torch.equal(state["weight"], torch.ones(4, 4)), "the previous checkpoint was damaged"
    # what a kill leaves: one partial temporary file beside it, never under the checkpoint's name
    assert len([p for p in tmp_path.iterdir() if p.name != "model.pt"]) == 1


def test_non_finite_loss_stops_training_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint_last.pt"
    guard = StopOnNonFiniteLoss(checkpoint=ckpt)
    trainer, state = _trainer(_images(5, bad=2), handlers=[guard])  # iteration 3 sees an inf pixel
    AtomicCheckpointSaver(tmp_path, state, every_n_iterations=1).attach(trainer)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    msg = str(info.value)
    assert "at iteration 3 (epoch 1)" in msg and str(ckpt) in msg and "kept" in msg
    good = load_state_checkpoint(ckpt, ["model", "trainer"])
    assert good["trainer"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_non_finite_loss_before_any_checkpoint_says_none_was_saved(tmp_path):
    trainer, _ = _trainer(_images(2, bad=0), handlers=[StopOnNonFiniteLoss(tmp_path / "none.pt")])
    with pytest.raises(NonFiniteLossError, match=r"iteration 1 .*no checkpoint had been saved yet"):
        trainer.run()


def test_best_model_saver_keeps_the_best_score_and_resumes_comparing_with_it(tmp_path):
    from ignite.engine import Engine

    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(tmp_path, {"model": net}, filename="model.pt", key_metric="dice")
    scores = iter([0.5, 0.4, 0.7])
    ev = Engine(lambda e, b: None)

    @ev.on(Events.EPOCH_COMPLETED)
    def _metric(e):
        e.state.metrics["dice"] = next(scores)

    saver.attach(ev)
    ev.run([0], max_epochs=3)
    assert saver.best == 0.7
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == {"weight", "bias"}  # bare state dict
    again = AtomicCheckpointSaver(tmp_path, {"model": net}, filename="model.pt", key_metric="dice")
    again.load_state_dict(saver.state_dict())
    assert again.best == 0.7


@pytest.mark.parametrize(
    "write, keys, problem",
    [
        (lambda p: torch.save(torch.nn.Linear(2, 2), p), ["model"], "pickled Python objects"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), ["model"], "unreadable or truncated"),
        (lambda p: torch.save([torch.ones(1)], p), ["model"], "holds a list"),
        (lambda p: torch.save({"model": torch.ones(1)}, p), ["model", "optimizer"], "no 'optimizer'"),
        (lambda p: torch.save({"model": torch.ones(1)}, p), ["model"], "entry 'model' is a Tensor"),
        (lambda p: None, ["model"], "no such checkpoint file"),
    ],
    ids=["pickled_model", "truncated", "not_a_dict", "model_pt_for_resume", "not_state_dict", "missing"],
)
def test_checkpoints_that_are_not_state_dicts_are_refused_with_an_explanation(tmp_path, write, keys, problem):
    path = tmp_path / "ck é.pt"
    write(path)
    with pytest.raises(InputDataError, match=re.escape(problem)) as info:
        load_state_checkpoint(path, keys)
    assert str(path) in str(info.value)


def test_resume_refuses_a_best_model_file_before_training_starts(tmp_path):
    torch.save({"weight": torch.ones(1, 1, 1, 1), "bias": torch.ones(1)}, tmp_path / "model.pt")
    trainer, state = _trainer(_images(2))
    attach_resume(trainer, tmp_path / "model.pt", state)
    with pytest.raises(InputDataError, match="not model.pt"):
        trainer.run()
    assert trainer.state.iteration == 0


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    trainer, state = _trainer(_images(2))
    assert attach_resume(trainer, "auto", state, ckpt_dir=tmp_path) is None
    assert attach_resume(trainer, None, state) is None
    trainer.run()
    assert trainer.state.iteration == 2


def test_fp16_amp_training_state_includes_the_gradient_scaler(tmp_path):
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    net = torch.nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [{"image": x, "label": torch.zeros_like(x)} for x in _images(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(data, batch_size=1),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.L1Loss(),
        amp=True,
    )
    state = training_state(net, opt, torch.optim.lr_scheduler.StepLR(opt, 1), trainer)
    saver = AtomicCheckpointSaver(tmp_path, state)
    saver.attach(trainer)
    trainer.run()  # MONAI makes the scaler inside run(); the checkpoint must still hold its state
    assert trainer.scaler is not None
    saved = load_state_checkpoint(saver.path, list(state))["scaler"]
    assert saved == trainer.scaler.state_dict()
    _, plain = _trainer(_images(1))
    assert "scaler" not in plain  # fp32 / bf16 runs have no scaler to save


def _count_saves(saver: AtomicCheckpointSaver, trainer, log: list) -> None:
    real = saver.save

    def save():
        log.append(int(trainer.state.iteration))
        real()

    saver.save = save


def test_the_state_is_saved_at_the_end_not_after_every_short_epoch(tmp_path):
    trainer, state = _trainer(_images(2), max_epochs=3)
    saver = AtomicCheckpointSaver(tmp_path, state)
    saves: list[int] = []
    _count_saves(saver, trainer, saves)
    saver.attach(trainer)
    trainer.run()
    assert saves == [6]


def test_an_interval_save_on_an_epoch_s_last_iteration_waits_for_the_validation(tmp_path):
    trainer, state = _trainer(_images(2), max_epochs=2)
    events: list[str] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: events.append(f"validate {e.state.epoch}"))
    saver = AtomicCheckpointSaver(tmp_path, state, every_n_iterations=2)
    real = saver.save
    saver.save = lambda: (events.append(f"save {trainer.state.iteration}"), real())
    saver.attach(trainer)
    trainer.run()
    assert events == ["validate 1", "save 2", "validate 2", "save 4"]


def test_the_state_is_saved_every_n_seconds(tmp_path, monkeypatch):
    import hybridseg.checkpointing as ckpt

    now = [0.0]
    monkeypatch.setattr(ckpt, "monotonic", lambda: now[0])
    trainer, state = _trainer(_images(7))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: now.__setitem__(0, now[0] + 7.0))
    saver = AtomicCheckpointSaver(tmp_path, state, every_secs=20)
    saves: list[int] = []
    _count_saves(saver, trainer, saves)
    saver.attach(trainer)
    trainer.run()
    assert saves == [3, 6, 7]  # 21 s after the start, 21 s after that save, then the end


@pytest.mark.parametrize("sig, raised", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_an_interrupted_run_saves_its_iteration_then_stops_and_resumes_there(tmp_path, sig, raised):
    before = signal.getsignal(sig)
    trainer, state = _trainer(_images(5))
    saver = AtomicCheckpointSaver(tmp_path, state, every_n_iterations=100)
    saver.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: os.kill(os.getpid(), sig))
    with pytest.raises(raised) as info:
        trainer.run()
    if raised is SystemExit:
        assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(sig) is before, "the run's signal handler outlived it"
    assert _iteration(saver.path) == 3
    again, state2 = _trainer(_images(5))
    attach_resume(again, saver.path, state2)
    AtomicCheckpointSaver(tmp_path, state2).attach(again)
    again.run()
    assert again.state.iteration == 5 and _iteration(saver.path) == 5


def test_a_failed_run_gives_back_the_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    guard = StopOnNonFiniteLoss()
    trainer, state = _trainer(_images(3, bad=1), handlers=[guard])
    AtomicCheckpointSaver(tmp_path, state).attach(trainer)
    with pytest.raises(NonFiniteLossError):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before


class _Clock:
    """A fake ``time.perf_counter`` that each training iteration advances by one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed_engine(clock: _Clock, budget: float, epoch_length: int, later_step: float = 1.0, validator=None):
    from ignite.engine import Engine

    from hybridseg.checkpointing import TrainingTimeBudget

    def step(engine, batch):  # 1 s per iteration in the first epoch, ``later_step`` s afterwards
        clock.now += 1.0 if engine.state.epoch == 1 else later_step

    engine = Engine(step)
    TrainingTimeBudget(budget, validator=validator).attach(engine)
    return engine, range(epoch_length)


@pytest.mark.parametrize(
    "budget, epoch_length, epochs, iterations",
    [
        (10, 3, 3, 9),  # 3 s epochs: after 9 s another epoch (12 s) would not fit, stop at the epoch end
        (12, 3, 4, 12),  # exactly fits
        (4, 3, 1, 3),  # another 3 s epoch would not fit after the first
        (0, 3, 5, 15),  # no budget: every epoch runs
    ],
)
def test_time_budget_stops_training_before_or_at_the_budget(monkeypatch, budget, epoch_length, epochs, iterations):
    import time

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    engine, data = _timed_engine(clock, budget, epoch_length)
    engine.run(data, max_epochs=5)
    assert (engine.state.epoch, engine.state.iteration) == (epochs, iterations)


def test_time_budget_stops_mid_epoch_past_the_budget_and_validates_once(monkeypatch):
    import time

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    engine, data = _timed_engine(clock, 10, 3, later_step=4.0)  # epoch 1: 3 s, then 4 s per iteration
    engine.run(data, max_epochs=5)
    assert (engine.state.epoch, engine.state.iteration) == (2, 5)  # 3 + 4 + 4 = 11 s > 10 s at iteration 5

    class Validator:
        epochs: list[int] = []

        def run(self, epoch: int) -> None:
            self.epochs.append(epoch)

    clock.now = 0.0
    validator = Validator()
    engine, data = _timed_engine(clock, 1.5, 4, validator=validator)
    engine.run(data, max_epochs=5)
    assert (engine.state.epoch, engine.state.iteration) == (1, 2) and validator.epochs == [1]
