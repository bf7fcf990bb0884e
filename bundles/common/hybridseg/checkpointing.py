"""Training persistence: atomic checkpoints of the full training state, resume, a stop on non-finite loss, a
wall-clock training budget."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from time import monotonic
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver

from hybridseg.io import InputDataError
from hybridseg.weights import load_state_checkpoint

logger = logging.getLogger(__name__)


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _signals_usable() -> bool:
    """Signal handlers can be set (main thread) and stopping is a local decision (not under DDP)."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return threading.current_thread() is threading.main_thread() and not distributed


def _unwrap(obj: Any) -> Any:
    # DDP / DataParallel prefix every key with "module."; store the plain network so that single- and
    # multi-process runs read each other's checkpoints
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


def training_state(network: Any, optimizer: Any, lr_scheduler: Any, trainer: Any) -> dict[str, Any]:
    """What a resumable checkpoint holds: network, optimizer, LR scheduler, trainer (epoch / iteration) and,
    when the trainer uses fp16 AMP, its gradient scaler."""
    state = {"model": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "trainer": trainer}
    if getattr(trainer, "amp", False):
        state["scaler"] = _TrainerScaler(trainer)
    return state


class _TrainerScaler:
    """The trainer's AMP GradScaler, looked up when saving/loading: MONAI's SupervisedTrainer makes a new
    one at the start of every run(), after the configs built their save dicts (loading at STARTED comes
    after that, so a resumed run gets the saved scale)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)


def _loss_of(engine: Any) -> float | None:
    out = engine.state.output
    item = out[0] if isinstance(out, list) and out else out
    if isinstance(item, Mapping) and "loss" in item:
        return float(torch.as_tensor(item["loss"]).detach().float().mean())
    return None


class AtomicCheckpointSaver:
    """Write ``save_dict``'s state dicts to ``save_dir/filename`` atomically, through ignite's
    ``DiskSaver(atomic=True)``: the state goes to a temporary file in ``save_dir`` that is renamed onto
    ``filename`` only once complete, so a crash or kill while saving leaves the previous checkpoint intact.

    Training mode (``key_metric=None``): saves every ``every_n_iterations`` iterations and every
    ``every_secs`` seconds of training (0: off for either), when training completes, and when it is
    interrupted by SIGINT (Ctrl-C) or SIGTERM (a job scheduler): the current iteration finishes, the state is
    saved, then the run ends with KeyboardInterrupt / exit status 143 (single process; under DDP a rank
    cannot stop alone without stalling the others, so there only the interval saves apply). Not after every
    epoch: short epochs would spend their time writing a large state. A save that falls on an epoch's last
    iteration waits for the epoch end, so the state includes that epoch's validation (best-model score).
    Never on an exception, nor when the last loss is not finite: the file on disk is the last good state.
    Best-model mode (``key_metric="val_mean_dice"``, attach to the evaluator): saves when that metric beats
    the best so far; the best value is part of :meth:`state_dict` so a resumed run keeps comparing with it.
    Only rank 0 writes under DDP.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_last.pt",
        every_n_iterations: int = 0,
        key_metric: str | None = None,
        every_secs: float = 0,
        save_on_signal: bool = True,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict is empty: nothing to checkpoint")
        if every_n_iterations < 0 or every_secs < 0:
            raise ValueError(f"save intervals must be >= 0, got {every_n_iterations} iterations, {every_secs} s")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.filename = filename
        self.every_n_iterations = int(every_n_iterations)
        self.every_secs = float(every_secs)
        self.save_on_signal = save_on_signal
        self.key_metric = key_metric
        self.best: float = -math.inf
        self._saved_at: int | None = None
        self._last_save = monotonic()
        self._due = False
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        # built here, not at save time: its first idist.get_rank() is a collective under DDP, which
        # every rank reaches while the config is parsed but only rank 0 would reach while saving
        self._disk = DiskSaver(self.save_dir, atomic=True, create_dir=True, require_empty=False)

    @property
    def path(self) -> Path:
        return self.save_dir / self.filename

    def attach(self, engine: Any) -> None:
        if self.key_metric is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_metric)
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)
        engine.add_event_handler(Events.COMPLETED, self)
        if self.save_on_signal:
            # the signal handlers live exactly as long as the run: ignite has no event that reliably follows an
            # exception (only the first EXCEPTION_RAISED handler runs), so the engine's own run() is wrapped
            engine.run = functools.partial(self._run_saving_on_signal, engine, engine.run)

    def _run_saving_on_signal(self, engine: Any, run: Any, *args: Any, **kwargs: Any) -> Any:
        self._signal = None
        if _signals_usable():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[sig] = signal.signal(sig, functools.partial(self._on_signal, engine))
        try:
            state = run(*args, **kwargs)
        finally:
            self._restore_signals()
        if self._signal is not None:  # terminated by our handler: the state is saved (COMPLETED)
            msg = (
                f"training stopped by {signal.Signals(self._signal).name} at iteration {engine.state.iteration}; "
                f"the state is in {self.path}: run again with --resume_from auto to continue"
            )
            logger.warning(msg)
            if self._signal == signal.SIGINT:
                raise KeyboardInterrupt(msg)
            raise SystemExit(128 + self._signal)
        return state

    def _on_started(self, engine: Any) -> None:
        self._last_save, self._due = monotonic(), False

    def _on_signal(self, engine: Any, signum: int, frame: Any) -> None:
        if self._signal is not None:  # a second signal: the user means it, stop at once
            self._restore_signals()
            signal.raise_signal(signum)
            return
        self._signal = signum
        logger.warning(
            "%s received: finishing iteration %d, saving %s, then stopping (send it again to stop at once)",
            signal.Signals(signum).name,
            engine.state.iteration,
            self.path,
        )
        engine.terminate()

    def _restore_signals(self) -> None:
        while self._previous_handlers:
            sig, handler = self._previous_handlers.popitem()
            signal.signal(sig, handler)

    def _on_iteration(self, engine: Any) -> None:
        it = int(engine.state.iteration)
        n, secs = self.every_n_iterations, self.every_secs
        if (n and it % n == 0) or (secs and monotonic() - self._last_save >= secs):
            self._due = True
        epoch_length = engine.state.epoch_length
        if self._due and not (epoch_length and it % epoch_length == 0):  # at an epoch end: after validation
            self(engine)

    def _on_epoch(self, engine: Any) -> None:
        if self._due:
            self(engine)

    def __call__(self, engine: Any) -> None:
        it = int(engine.state.iteration)
        if it == self._saved_at:  # an interval save and the end can fall on one iteration
            return
        loss = _loss_of(engine)
        if loss is not None and not math.isfinite(loss):
            logger.warning("iteration %d: loss is %s, checkpoint %s not updated", it, loss, self.path)
            return
        self.save()
        self._saved_at, self._due, self._last_save = it, False, monotonic()
        if _is_rank0():
            logger.info("saved checkpoint %s (epoch %d, iteration %d)", self.path, engine.state.epoch, it)

    def _on_metric(self, engine: Any) -> None:
        value = float(engine.state.metrics[self.key_metric])
        if math.isfinite(value) and value > self.best:
            self.best = value
            self.save()
            logger.info("new best %s %.6g: saved %s", self.key_metric, value, self.path)

    def save(self) -> None:
        """Write the checkpoint now (rank 0 only)."""
        if not _is_rank0():
            return
        state = {k: _unwrap(v).state_dict() for k, v in self.save_dict.items()}
        if len(state) == 1:  # a lone network is stored as a bare state dict, as MONAI's saver does
            state = next(iter(state.values()))
        self._disk(state, self.filename)

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])


class NonFiniteLossError(RuntimeError):
    """Training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """Stop training with :class:`NonFiniteLossError` naming the epoch and iteration as soon as the loss is
    NaN/inf (ignite's TerminateOnNan ends the run "successfully", which would then save the broken state).
    Attach it before any checkpoint saver (the bundles list it first among the train handlers)."""

    def __init__(self, checkpoint: str | os.PathLike | None = None) -> None:
        self.checkpoint = checkpoint

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        loss = _loss_of(engine)
        if loss is None or math.isfinite(loss):
            return
        kept = ""
        if self.checkpoint is not None:
            ck = Path(self.checkpoint)
            kept = (
                f"; the last good checkpoint is kept: {ck}"
                if ck.is_file()
                else f"; no checkpoint had been saved yet ({ck})"
            )
        raise NonFiniteLossError(
            f"training loss is {loss} at iteration {engine.state.iteration} (epoch {engine.state.epoch}); "
            f"training stopped{kept}. Lower the learning rate, check the inputs, or use fp32/bf16"
        )


class StateDictCheckpointLoader:
    """Load a checkpoint of state dicts into ``load_dict``'s objects when the engine starts, as MONAI's
    CheckpointLoader does (strict, keeping the engine's ``max_epochs``), but reading the file once through
    :func:`hybridseg.weights.load_state_checkpoint` (``weights_only=True``): a missing, truncated,
    pickled-object or wrong-kind checkpoint is refused with an error naming the file. MONAI's loader would
    read a 1 GB training state a second time after that check. Logs where it resumes."""

    def __init__(
        self, load_path: str | os.PathLike, load_dict: Mapping[str, Any], map_location: Any = None, strict: bool = True
    ) -> None:
        self.load_path = str(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.strict = strict

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        checkpoint = load_state_checkpoint(self.load_path, list(self.load_dict), map_location=self.map_location)
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=dict(checkpoint), strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise InputDataError(
                self.load_path,
                f"was saved at epoch {engine.state.epoch}, past this run's max_epochs {prior_max_epochs}; "
                "raise max_epochs to train on",
            )
        engine.state.max_epochs = prior_max_epochs  # the run's own planned length, not the checkpoint's
        if "trainer" in self.load_dict:
            logger.info(
                "resumed from %s at epoch %d, iteration %d", self.load_path, engine.state.epoch, engine.state.iteration
            )
        else:
            logger.info("loaded %s from %s", ", ".join(self.load_dict), self.load_path)


def attach_resume(
    trainer: Any,
    resume_from: str | os.PathLike | None,
    load_dict: Mapping[str, Any],
    ckpt_dir: str | os.PathLike | None = None,
    map_location: Any = None,
) -> str | None:
    """Resume ``trainer`` from a training checkpoint when ``resume_from`` is set; returns the path used.

    ``resume_from``: a checkpoint path, or ``"auto"`` for ``ckpt_dir/checkpoint_last.pt`` when it exists
    (start fresh, logged, when it does not: a job script can always pass ``auto``). Empty / None: no resume.
    """
    if resume_from in (None, "", False):
        return None
    path = Path(str(resume_from))
    if str(resume_from) == "auto":
        if ckpt_dir is None:
            raise ValueError("resume_from='auto' needs ckpt_dir")
        path = Path(ckpt_dir) / "checkpoint_last.pt"
        if not path.is_file():
            logger.info("resume_from=auto: no %s yet, starting a new training run", path)
            return None
    StateDictCheckpointLoader(path, load_dict, map_location=map_location).attach(trainer)
    return str(path)


class TrainingTimeBudget:
    """Stop training within ``seconds`` of wall-clock time from the trainer's start (validation and
    checkpointing included): after an epoch (and its validation), stop when another epoch of the mean length
    so far would not fit; during an epoch, stop at the first iteration past the budget and run ``validator``
    once on the weights reached (so the best model is chosen among them too; this last validation is the only
    time spent past the budget). ``None`` or 0: no limit. Used to give networks the same time budget."""

    def __init__(self, seconds: float | None, validator: Any = None) -> None:
        self.seconds = float(seconds or 0)
        self.validator = validator
        self._start = 0.0
        self._first_epoch = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.seconds <= 0:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _started(self, engine: Any) -> None:
        import time

        self._start = time.perf_counter()
        self._first_epoch = int(engine.state.epoch)  # a resumed run's epochs before the start do not count

    def _elapsed(self) -> float:
        import time

        return time.perf_counter() - self._start

    def _stop(self, engine: Any, why: str) -> None:
        logger.info(
            "time budget %.0f s: %s after %.0f s (iteration %d)",
            self.seconds,
            why,
            self._elapsed(),
            engine.state.iteration,
        )
        engine.terminate()

    def _epoch_completed(self, engine: Any) -> None:
        done = int(engine.state.epoch) - self._first_epoch
        if done > 0 and self._elapsed() * (done + 1) / done > self.seconds:
            self._stop(engine, "another epoch would not fit, stopping")

    def _iteration_completed(self, engine: Any) -> None:
        if engine.should_terminate or self._elapsed() <= self.seconds:
            return
        self._stop(engine, "spent, stopping mid-epoch")
        if self.validator is not None:
            self.validator.run(engine.state.epoch)
