"""Ignite handlers for the bundles: the evaluation report (per-case table, summaries, overlays) built on MONAI's
metric handlers, and training persistence (atomic checkpoints, resume, a stop on non-finite loss)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.handlers import IgniteMetricHandler, from_engine

from hybridseg.bundle import is_main_process
from hybridseg.image_io import output_stem, overlay_rgb, read_2d, write_png
from hybridseg.io import atomic_write_text
from hybridseg.metrics import MetricRecord, SegmentationProtocolMetric, mask_status, summarize

logger = logging.getLogger(__name__)

CSV_FIELDS = ("case", "class_id", "class_name", "protocol", "dice", "iou", "hd95", "hd95_unit", "hd95_method", "status")
#: The metrics each protocol defines (the paper protocol has no IoU).
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "paper": ("dice", "hd95"),
    "physical": ("dice", "iou", "hd95"),
    "busi": ("dice", "iou", "hd95"),
}


def protocol_metric_handlers(
    num_classes: int, protocols: Sequence[str], output_transform: Any = None
) -> dict[str, IgniteMetricHandler]:
    """MONAI metric handlers ``{"<protocol>_<metric>": IgniteMetricHandler}`` for every metric of each protocol.

    Each wraps :class:`~hybridseg.metrics.SegmentationProtocolMetric` (mean over classes, NaN skipped) and
    saves its per-case, per-class table in ``engine.state.metric_details`` (all-gathered under DDP), where
    MONAI's ``MetricsSaver`` and :class:`SegmentationReport` read it. Pass them as an evaluator's
    ``additional_metrics``.
    """
    transform = output_transform or from_engine(["pred", "label"])
    return {
        f"{protocol}_{metric}": IgniteMetricHandler(
            SegmentationProtocolMetric(num_classes, protocol, metric),  # type: ignore[arg-type]
            output_transform=transform,
            save_details=True,
        )
        for protocol in protocols
        for metric in PROTOCOL_METRICS[protocol]
    }


def _np(x: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().cpu())


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}"


class SegmentationReport:
    """The evaluation report of MONAI metric handlers' per-case details, written at epoch end.

    ``metrics``: the :func:`protocol_metric_handlers` the evaluator runs (``<protocol>_<metric>`` ->
    handler); their ``engine.state.metric_details`` tables hold every value, so the report computes no
    metric itself, only each class's mask status (which mask is empty) for the table and the overlays.
    Files in ``output_dir``: ``metrics_per_case.csv`` (one row per case, class and protocol; ``status``
    says when a mask was empty), ``summary_<protocol>.json`` (mean/std per class and over classes, NaN
    counts) and ``summary.md`` (the papers' table layout: one row per protocol, mean Dice and HD95, then
    per-class Dice). Overlay PNGs of the first ``n_overlays`` cases go to ``output_dir/overlays``. MONAI's
    ``MetricsSaver`` beside it writes the same details in its own layout (``*_raw.csv``, ``*_summary.csv``).

    ``mode="binary"``: ``pred``/``label`` are ``(1, H, W)`` masks (BUSI). ``mode="labels"``: ``(1, *spatial)``
    label maps (Synapse). Under DDP every rank records its own cases; rank 0 gathers them and writes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Mapping[Any, str],
        metrics: Mapping[str, IgniteMetricHandler],
        mode: str = "binary",
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        case_key: str | None = None,
        n_overlays: int = 4,
        overlay_from_file: bool = False,
    ) -> None:
        if mode not in ("binary", "labels"):
            raise ValueError(f"mode must be 'binary' or 'labels', got {mode!r}")
        if not metrics:
            raise ValueError("no metric handlers to report")
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): str(v) for k, v in class_names.items() if int(k) != 0}
        self.metrics = dict(metrics)
        self.protocols: tuple[str, ...] = tuple(dict.fromkeys(h.metric_fn.protocol for h in self.metrics.values()))
        self.mode = mode
        self.pred_key, self.label_key, self.image_key, self.case_key = (pred_key, label_key, image_key, case_key)
        self.n_overlays = n_overlays
        self.overlay_from_file = overlay_from_file
        self.cases: list[tuple[str, list[str]]] = []  # (case name, mask status per class id)
        self.rows: list[dict[str, Any]] = []
        self.summaries: dict[str, dict[str, Any]] = {}

    @property
    def class_ids(self) -> list[int]:
        return sorted(self.class_names)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Any = None) -> None:
        self.cases, self.rows, self.summaries = [], [], {}

    def _case_name(self, item: Mapping[str, Any]) -> str:
        if self.case_key and self.case_key in item:
            return str(item[self.case_key])
        meta = getattr(item.get(self.image_key), "meta", {}) or {}
        name = meta.get("filename_or_obj")
        return output_stem(name) if name else f"case{len(self.cases):04d}"

    def add_case(self, case: str, pred: Any, label: Any, image: Any = None) -> None:
        """Record one case's mask status per class (and its overlay); its values come from the metrics."""
        p, g = _np(pred), _np(label)
        if p.shape != g.shape:
            raise ValueError(f"case {case}: prediction shape {p.shape} differs from label shape {g.shape}")
        p, g = (p.reshape(p.shape[1:]) if p.shape[0] == 1 else p, g.reshape(g.shape[1:]) if g.shape[0] == 1 else g)
        if self.mode == "binary":
            status = [mask_status(p > 0.5, g > 0.5)]
        else:
            p_ids, g_ids = set(np.unique(np.rint(p)).astype(int)), set(np.unique(np.rint(g)).astype(int))
            status = [mask_status(np.array(c in p_ids), np.array(c in g_ids)) for c in self.class_ids]
        if len(self.cases) < self.n_overlays:
            self._overlay(case, p, g, image)
        self.cases.append((case, status))

    def iteration_completed(self, engine: Any) -> None:
        output, batch = engine.state.output, engine.state.batch
        outputs = output if isinstance(output, list) else [output]
        batches = batch if isinstance(batch, list) else [batch] * len(outputs)
        for item, data in zip(outputs, batches, strict=True):
            # MONAI keeps datalist fields such as "case" in the batch, predictions in the output
            merged = {**data, **item} if isinstance(data, Mapping) else item
            self.add_case(
                self._case_name(merged), merged[self.pred_key], merged[self.label_key], merged.get(self.image_key)
            )

    def _overlay(self, case: str, p: np.ndarray, g: np.ndarray, image: Any) -> None:
        out = self.output_dir / "overlays"
        if self.mode == "binary":
            img = None
            if self.overlay_from_file and image is not None:
                img, _ = read_2d(image.meta["filename_or_obj"])
            if img is None or img.shape != p.shape:
                img = _np(image)[0] if image is not None and _np(image).shape[-2:] == p.shape else p.astype(float)
            write_png(out / f"{case}_overlay.png", overlay_rgb(img, p > 0.5, g > 0.5))
            return
        # label volumes: the axial slice with the most ground-truth foreground
        z = int(np.argmax((g > 0).reshape(-1, g.shape[-1]).sum(0))) if g.ndim == 3 else None
        vol = _np(image)[0] if image is not None else g.astype(float)
        sl = (slice(None), slice(None), z) if z is not None else (slice(None),) * g.ndim
        write_png(out / f"{case}_z{z}.png", overlay_rgb(vol[sl], p[sl] > 0, g[sl] > 0))

    def _gather_cases(self) -> list[tuple[str, list[str]]]:
        """Every rank's cases in rank order: the order of MONAI's all-gathered metric details."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.cases
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.cases)
        return [c for cases in gathered for c in cases]

    def _records(self, engine: Any, cases: list[tuple[str, list[str]]]) -> dict[str, list[list[MetricRecord]]]:
        """Per protocol, per case: one MetricRecord per class, from the metric handlers' details."""
        details = getattr(engine.state, "metric_details", {})
        values: dict[str, dict[str, np.ndarray]] = {p: {} for p in self.protocols}
        method, unit = {}, {}
        for name, handler in self.metrics.items():
            fn = handler.metric_fn
            if name not in details:
                raise RuntimeError(f"metric {name!r} saved no details: attach it to the evaluator with save_details")
            table = _np(details[name]).reshape(len(cases), -1)
            if fn.class_ids != self.class_ids:
                raise ValueError(f"metric {name!r} scores classes {fn.class_ids}, the report names {self.class_ids}")
            values[fn.protocol][fn.metric] = table
            method[fn.protocol], unit[fn.protocol] = fn.hd95_method, fn.hd95_unit or ""
        out: dict[str, list[list[MetricRecord]]] = {}
        for protocol, tables in values.items():
            out[protocol] = [
                [
                    MetricRecord(
                        class_id=c,
                        dice=float(tables["dice"][i, j]) if "dice" in tables else math.nan,
                        iou=float(tables["iou"][i, j]) if "iou" in tables else None,
                        hd95=float(tables["hd95"][i, j]) if "hd95" in tables else None,
                        status=status[j],
                        protocol=protocol,
                        hd95_unit=unit[protocol],
                        hd95_method=method[protocol],
                    )
                    for j, c in enumerate(self.class_ids)
                ]
                for i, (_, status) in enumerate(cases)
            ]
        return out

    def epoch_completed(self, engine: Any) -> None:
        cases = self._gather_cases()
        records = self._records(engine, cases)
        self.rows = [
            {
                "case": case,
                "class_id": r.class_id,
                "class_name": self.class_names.get(r.class_id, ""),
                "protocol": r.protocol,
                "dice": r.dice,
                "iou": r.iou,
                "hd95": r.hd95,
                "hd95_unit": r.hd95_unit,
                "hd95_method": r.hd95_method,
                "status": r.status,
            }
            for i, (case, _) in enumerate(cases)
            for protocol in self.protocols
            for r in records[protocol][i]
        ]
        self.summaries = {
            p: summarize([r for case in recs for r in case], class_names=self.class_names)
            for p, recs in records.items()
            if recs
        }
        if is_main_process():
            self.write(len(cases))

    def write(self, n_cases: int) -> None:
        """Write the CSV, the JSON summaries and the markdown table (atomically)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(v) if isinstance(v, float) or v is None else v for k, v in r.items()})
        atomic_write_text(self.output_dir / "metrics_per_case.csv", buf.getvalue())
        for p, s in self.summaries.items():
            atomic_write_text(self.output_dir / f"summary_{p}.json", json.dumps(s, indent=4, default=str) + "\n")
        table = self.table()
        atomic_write_text(self.output_dir / "summary.md", table + "\n")
        logger.info("segmentation report (%d cases) in %s\n%s", n_cases, self.output_dir, table)

    def table(self) -> str:
        """One row per protocol: mean Dice, mean HD95 (unit), then each class's mean Dice."""
        ids = self.class_ids
        head = ["protocol", "cases", "Dice", "HD95", "HD95 unit"] + [self.class_names[i] for i in ids]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p, s in self.summaries.items():
            over = s["over_classes"]
            hd = over.get("hd95", {}).get("mean", math.nan)
            n_cases = max((e["n_cases"] for e in s["per_class"].values()), default=0)
            cells = [p, str(n_cases), f"{over['dice']['mean']:.4f}", f"{hd:.2f}", s["hd95_unit"]]
            cells += [f"{s['per_class'][i]['dice']['mean']:.4f}" if i in s["per_class"] else "" for i in ids]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Training that survives: atomic checkpoints every N iterations, resume, a stop on non-finite loss.


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
    """MONAI's CheckpointLoader (``torch.load(weights_only=True)``) preceded by
    :func:`hybridseg.io.load_state_checkpoint`'s checks, so a missing, truncated, pickled-object or
    wrong-kind checkpoint is refused with an error naming the file and the problem. Logs where it resumes."""

    def __init__(self, load_path: str | os.PathLike, load_dict: Mapping[str, Any], **kwargs: Any) -> None:
        from monai.handlers import CheckpointLoader

        self.load_path = str(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = kwargs.get("map_location")
        self._loader = CheckpointLoader(load_path=self.load_path, load_dict=self.load_dict, **kwargs)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        from hybridseg.io import load_state_checkpoint

        load_state_checkpoint(self.load_path, list(self.load_dict), map_location="cpu")
        self._loader(engine)
        if "trainer" in self.load_dict:
            logger.info(
                "resumed from %s at epoch %d, iteration %d", self.load_path, engine.state.epoch, engine.state.iteration
            )


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
