"""Ignite handlers for the bundles' evaluation: per-case metric reports under named protocols."""

from __future__ import annotations

import csv
import dataclasses
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
from monai.transforms import Resize

from hybridseg.image_io import output_stem, overlay_rgb, write_png
from hybridseg.io import atomic_write_text
from hybridseg.metrics import (
    MetricRecord,
    SegmentationProtocolMetric,
    binary_case_metrics,
    label_volume_metrics,
    summarize,
)

logger = logging.getLogger(__name__)

CSV_FIELDS = (
    "case",
    "class_id",
    "class_name",
    "protocol",
    "grid",
    "dice",
    "iou",
    "hd95",
    "hd95_unit",
    "hd95_method",
    "status",
)
#: ``grid`` of metrics measured on the image's own (original) grid
ORIGINAL_GRID = "original"

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


def _spacing(x: Any, ndim: int) -> tuple[float, ...] | None:
    """Voxel spacing per array axis from a MetaTensor's affine (column norms), None without one."""
    affine = getattr(x, "affine", None)
    if affine is None:
        return None
    a = _np(affine).astype(np.float64)
    if a.ndim == 3:
        a = a[0]
    return tuple(float(v) for v in np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0)))


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}"


class SegmentationReport:
    """Per-case Dice / IoU / HD95 of an evaluator's outputs under named protocols, written at epoch end.

    Files in ``output_dir``: ``metrics_per_case.csv`` (one row per case, class and protocol; ``status``
    says when a mask was empty), ``summary_<protocol>.json`` (mean/std per class and over classes, NaN
    counts) and ``summary.md`` (the papers' table layout: one row per protocol, mean Dice and HD95, then
    per-class Dice). Overlay PNGs of the first ``n_overlays`` cases go to ``output_dir/overlays``.

    ``mode="binary"``: ``pred``/``label`` are ``(1, H, W)`` masks (BUSI, protocol ``busi``).
    ``mode="labels"``: ``pred``/``label`` are ``(1, *spatial)`` label maps (Synapse; protocols ``paper``
    and ``physical``, spacing read from the label's affine).
    ``grid_key`` (binary mode): the output item holding the prediction on the network's grid (e.g. 224 x 224,
    before it is resized back). Each case is then scored twice, each named in the ``grid`` column: on its
    original grid (``original``) and on the network grid (``224x224``: the label resized there with nearest
    neighbour, as training resizes labels), reported as ``<protocol>`` and ``<protocol>_grid``
    (``summary_<protocol>_grid.json``). HD95 in pixels scales with the grid, so the two differ by about the
    resize factor.
    ``hd95_from_metric_details``: take the original grid's HD95 from the evaluator's protocol metric handlers
    (:func:`protocol_metric_handlers`, ``<protocol>_hd95`` in ``engine.state.metric_details``) instead of
    computing it again: HD95 is the costly part of scoring, and the handlers already compute it per case and
    class on the same prediction and label. Dice, IoU and the mask status are still computed here (cheap).
    Under DDP every rank computes its own cases; rank 0 gathers and writes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Mapping[Any, str],
        protocols: Sequence[str] = ("busi",),
        mode: str = "binary",
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        case_key: str | None = None,
        n_overlays: int = 4,
        overlay_from_file: bool = False,
        grid_key: str | None = None,
        hd95_from_metric_details: bool = False,
    ) -> None:
        if mode not in ("binary", "labels"):
            raise ValueError(f"mode must be 'binary' or 'labels', got {mode!r}")
        self.output_dir = Path(output_dir)
        self.class_names = {int(k): str(v) for k, v in class_names.items() if int(k) != 0}
        self.protocols = tuple(protocols)
        self.mode = mode
        self.pred_key, self.label_key, self.image_key, self.case_key = (pred_key, label_key, image_key, case_key)
        self.n_overlays = n_overlays
        self.overlay_from_file = overlay_from_file
        if grid_key is not None and mode != "binary":
            raise ValueError("grid_key (metrics on the network grid) is for mode='binary'")
        self.grid_key = grid_key
        self.hd95_from_metric_details = hd95_from_metric_details
        self.grids: dict[str, str] = {}
        # (rank, case ordinal, case name, protocol name, grid, record) in scoring order
        self._entries: list[tuple[int, int, str, str, str, MetricRecord]] = []
        self.summaries: dict[str, dict[str, Any]] = {}
        self._n_cases = 0

    def attach(self, engine: Any) -> None:

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Any = None) -> None:
        self._entries, self.summaries, self._n_cases, self.grids = [], {}, 0, {}

    def _case_name(self, item: Mapping[str, Any]) -> str:
        if self.case_key and self.case_key in item:
            return str(item[self.case_key])
        meta = getattr(item.get(self.image_key), "meta", {}) or {}
        name = meta.get("filename_or_obj")
        return output_stem(name) if name else f"case{self._n_cases:04d}"

    def add_case(self, case: str, pred: Any, label: Any, image: Any = None, grid_pred: Any = None) -> None:
        """Score one case (also usable without an engine); ``grid_pred``: the prediction on the network grid."""
        p, g = _np(pred), _np(label)
        if p.shape != g.shape:
            raise ValueError(f"case {case}: prediction shape {p.shape} differs from label shape {g.shape}")
        p, g = (p.reshape(p.shape[1:]) if p.shape[0] == 1 else p, g.reshape(g.shape[1:]) if g.shape[0] == 1 else g)
        hd = not self.hd95_from_metric_details
        for protocol in self.protocols:
            if self.mode == "binary":
                recs = [binary_case_metrics(p > 0.5, g > 0.5, protocol, compute_hd95=hd)]  # type: ignore[arg-type]
            else:
                spacing = _spacing(label, g.ndim) if protocol == "physical" else None
                recs = label_volume_metrics(
                    np.rint(p).astype(np.int64),
                    np.rint(g).astype(np.int64),
                    sorted(self.class_names),
                    protocol,
                    spacing,  # type: ignore[arg-type]
                    compute_hd95=hd,
                )
            self._add(case, protocol, ORIGINAL_GRID, recs)
            if grid_pred is not None:
                gp = _np(grid_pred)
                gp = gp.reshape(gp.shape[1:]) if gp.shape[0] == 1 else gp
                gg = _np(Resize(spatial_size=gp.shape, mode="nearest")(g[None].astype(np.float32)))[0]
                grid = "x".join(str(n) for n in gp.shape)
                self._add(case, f"{protocol}_grid", grid, [binary_case_metrics(gp > 0.5, gg > 0.5, protocol)])
        if self._n_cases < self.n_overlays:
            self._overlay(case, p, g, image)
        self._n_cases += 1

    def _add(self, case: str, name: str, grid: str, recs: list[MetricRecord]) -> None:
        self.grids[name] = grid
        self._entries.extend((0, self._n_cases, case, name, grid, r) for r in recs)

    @property
    def records(self) -> dict[str, list[MetricRecord]]:
        """Every scored record by protocol name (``<protocol>`` and, with ``grid_key``, ``<protocol>_grid``)."""
        out: dict[str, list[MetricRecord]] = {}
        for *_, name, _, r in self._entries:
            out.setdefault(name, []).append(r)
        return out

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows of ``metrics_per_case.csv``: one per case, class and protocol name, in scoring order."""
        return [
            {
                "case": case,
                "class_id": r.class_id,
                "class_name": self.class_names.get(r.class_id, ""),
                "protocol": r.protocol,
                "grid": grid,
                "dice": r.dice,
                "iou": r.iou,
                "hd95": r.hd95,
                "hd95_unit": r.hd95_unit,
                "hd95_method": r.hd95_method,
                "status": r.status,
            }
            for _, _, case, _, grid, r in self._entries
        ]

    def iteration_completed(self, engine: Any) -> None:
        output, batch = engine.state.output, engine.state.batch
        outputs = output if isinstance(output, list) else [output]
        batches = batch if isinstance(batch, list) else [batch] * len(outputs)
        for item, data in zip(outputs, batches, strict=True):
            # MONAI keeps datalist fields such as "case" in the batch, predictions in the output
            merged = {**data, **item} if isinstance(data, Mapping) else item
            self.add_case(
                self._case_name(merged),
                merged[self.pred_key],
                merged[self.label_key],
                merged.get(self.image_key),
                merged.get(self.grid_key) if self.grid_key else None,
            )

    def _overlay(self, case: str, p: np.ndarray, g: np.ndarray, image: Any) -> None:
        out = self.output_dir / "overlays"
        if self.mode == "binary":
            img = None
            if self.overlay_from_file and image is not None:
                from hybridseg.transforms import read_2d

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

    def _gather(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (self._entries, self.grids))
        # rank order, as MONAI all-gathers the metric handlers' buffers
        self._entries = [(rank, *e[1:]) for rank, (entries, _) in enumerate(gathered) for e in entries]
        for _, grids in gathered:
            self.grids.update(grids)

    def _fill_hd95(self, engine: Any) -> None:
        """Put the metric handlers' per-case HD95 into the original grid's records (``hd95_from_metric_details``)."""
        details = getattr(getattr(engine, "state", None), "metric_details", None) or {}
        for protocol in self.protocols:
            key = f"{protocol}_hd95"
            if key not in details:
                raise ValueError(
                    f"SegmentationReport(hd95_from_metric_details=True) needs the evaluator's metric handler {key!r} "
                    "with save_details (hybridseg.handlers.protocol_metric_handlers in additional_metrics)"
                )
            table = np.asarray(torch.as_tensor(details[key]).detach().cpu(), dtype=np.float64)
            cases: dict[tuple[int, int], int] = {}
            for i, (rank, ordinal, case, name, grid, r) in enumerate(self._entries):
                if name != protocol:
                    continue
                row = cases.setdefault((rank, ordinal), len(cases))
                if row >= table.shape[0] or not 1 <= r.class_id <= table.shape[1]:
                    raise RuntimeError(
                        f"{key}: the metric handler holds {tuple(table.shape)} (cases, classes) values but the report "
                        f"scored case {case!r} (number {row + 1}), class {r.class_id}: they did not see the same cases"
                    )
                value = float(table[row, r.class_id - 1])
                self._entries[i] = (rank, ordinal, case, name, grid, dataclasses.replace(r, hd95=value))
            if len(cases) != table.shape[0]:
                raise RuntimeError(f"{key}: the metric handler saw {table.shape[0]} cases, the report {len(cases)}")

    def epoch_completed(self, engine: Any = None) -> None:
        self._gather()
        if self.hd95_from_metric_details:
            self._fill_hd95(engine)
        rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0
        )
        self.summaries = {
            p: {**summarize(recs, class_names=self.class_names), "grid": self.grids.get(p, ORIGINAL_GRID)}
            for p, recs in self.records.items()
            if recs
        }
        if not rank0:
            return
        self.write()

    def write(self) -> None:
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
        logger.info("segmentation report (%d cases) in %s\n%s", self._n_cases, self.output_dir, table)

    def table(self) -> str:
        """One row per protocol and grid: mean Dice, mean HD95 (unit), then each class's mean Dice."""
        ids = sorted(self.class_names)
        head = ["protocol", "grid", "cases", "Dice", "HD95", "HD95 unit"] + [self.class_names[i] for i in ids]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.summaries.values():
            over = s["over_classes"]
            hd = over.get("hd95", {}).get("mean", math.nan)
            n_cases = max((e["n_cases"] for e in s["per_class"].values()), default=0)
            cells = [s["protocol"], s["grid"], str(n_cases), f"{over['dice']['mean']:.4f}", f"{hd:.2f}", s["hd95_unit"]]
            cells += [f"{s['per_class'][i]['dice']['mean']:.4f}" if i in s["per_class"] else "" for i in ids]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
