"""Training persistence: atomic checkpoints of the full training state, resume, a stop on non-finite loss."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hybridseg.io import InputDataError

logger = logging.getLogger(__name__)


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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

    Training mode (``key_metric=None``): saves every ``every_n_iterations`` iterations (0: off), at every
    epoch end and when training completes. Never on an exception, nor when the last loss is not finite, so
    the file on disk is always the last good state.
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
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict is empty: nothing to checkpoint")
        if every_n_iterations < 0:
            raise ValueError(f"every_n_iterations must be >= 0, got {every_n_iterations}")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.filename = filename
        self.every_n_iterations = int(every_n_iterations)
        self.key_metric = key_metric
        self.best: float = -math.inf
        self._saved_at: int | None = None
        from ignite.handlers import DiskSaver

        # built here, not at save time: its first idist.get_rank() is a collective under DDP, which
        # every rank reaches while the config is parsed but only rank 0 would reach while saving
        self._disk = DiskSaver(self.save_dir, atomic=True, create_dir=True, require_empty=False)

    @property
    def path(self) -> Path:
        return self.save_dir / self.filename

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.key_metric is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_metric)
            return
        if self.every_n_iterations > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        it = int(engine.state.iteration)
        if it == self._saved_at:  # epoch end and every-N can fall on one iteration
            return
        loss = _loss_of(engine)
        if loss is not None and not math.isfinite(loss):
            logger.warning("iteration %d: loss is %s, checkpoint %s not updated", it, loss, self.path)
            return
        self.save()
        self._saved_at = it
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
        from ignite.engine import Events

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
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        from ignite.handlers import Checkpoint

        from hybridseg.weights import load_state_checkpoint

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
