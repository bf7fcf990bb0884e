"""Ignite handlers for the bundles' evaluation: the report (per-case table, summaries, overlays) built on MONAI's
metric handlers. Training persistence (checkpoints, resume, non-finite stop) is in :mod:`hybridseg.checkpointing`."""

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
