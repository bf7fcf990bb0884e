"""Segmentation metrics (Dice, IoU, HD95) under named evaluation protocols, plus MONAI metric classes.

Three protocols, each a fixed set of rules for empty masks and for the HD95 unit:

``paper``
    The official TransUNet / BRAU-Net++ ``calculate_metric_percase`` rules, so numbers are
    comparable with the published Synapse tables. Per class: prediction and truth both non-empty
    -> (medpy ``dc``, medpy ``hd95`` in voxels, spacing ignored); prediction non-empty and truth
    empty -> (1, 0); every other case (empty prediction, both empty) -> (0, 0). IoU is not part
    of that protocol and is not computed.
``physical``
    HD95 in mm from the volume spacing. Both empty -> Dice/IoU NaN (``both_empty``); exactly one
    empty -> Dice/IoU 0 (``empty_gt`` / ``empty_pred``); HD95 is NaN whenever either mask is
    empty, never 0. HD95 uses the pooled (medpy) definition, so ``paper`` and ``physical`` differ
    only in unit and empty-mask rules.
``busi``
    Per-image binary metrics as usually reported on BUSI: both empty -> Dice 1, IoU 1, HD95 0
    (a correct "no lesion"); exactly one empty -> Dice 0, IoU 0, HD95 NaN (undefined: there is
    no surface to measure to). NaN HD95 values are left out of means and counted separately by
    :func:`summarize`. HD95 is in pixels, or in mm when a spacing is given.

Two HD95 definitions (``hd95_method``): ``"pooled"`` is medpy's (one 95th percentile over the
surface distances of both directions); ``"max_directed"`` is MONAI's
``HausdorffDistanceMetric(percentile=95)`` (95th percentile per direction, larger of the two;
usually not smaller than ``"pooled"``, but linear interpolation between order statistics can make
it so: directions [0, 10] and [0, 10] give 9.5 vs 10). Every record names the method and unit.

Surfaces are medpy's: ``mask XOR binary_erosion(mask)`` with a connectivity-1 structure (voxels
outside the array count as background), distances by ``distance_transform_edt`` with the spacing.
Both masks are cropped to the bounding box of their union (plus one voxel, clipped at the array
border) first; the values are identical to the uncropped computation (tests check this).

Spacing is per array axis, in the same order as the axes (for NIfTI/MetaTensor data: mm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage

__all__ = [
    "HD95_METHODS",
    "PROTOCOLS",
    "STATUSES",
    "MetricRecord",
    "SegmentationProtocolMetric",
    "binary_case_metrics",
    "dice",
    "hd95",
    "iou",
    "label_volume_metrics",
    "mask_status",
    "summarize",
    "surface_distances",
]

Protocol = Literal["paper", "physical", "busi"]
HD95Method = Literal["pooled", "max_directed"]
SpacingLike = float | Sequence[float] | None

PROTOCOLS: tuple[str, ...] = ("paper", "physical", "busi")
HD95_METHODS: tuple[str, ...] = ("pooled", "max_directed")
#: Status of one (prediction, truth) pair; the index is the code used in integer outputs.
STATUSES: tuple[str, ...] = ("ok", "empty_gt", "empty_pred", "both_empty")


# --------------------------------------------------------------------------------------------
# Functional core (numpy boolean masks, any number of dimensions)
# --------------------------------------------------------------------------------------------


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """Non-zero is foreground, as in medpy; at least 1-D so 0-D input behaves like medpy's."""
    return np.atleast_1d(np.asarray(mask).astype(bool, copy=False))


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {p.shape} vs {g.shape}")
    return p, g


def _normalize_spacing(spacing: SpacingLike, ndim: int) -> tuple[float, ...] | None:
    """Spacing as a tuple of ``ndim`` positive finite floats (a scalar applies to every axis)."""
    if spacing is None:
        return None
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ValueError(f"spacing has {values.size} values for a {ndim}-D array")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be positive and finite, got {tuple(values.tolist())}")
    return tuple(float(v) for v in values)


def _distance_unit(ndim: int, spacing: tuple[float, ...] | None) -> str:
    if spacing is not None:
        return "mm"
    return "pixel" if ndim == 2 else "voxel"


def mask_status(pred: np.ndarray, gt: np.ndarray) -> str:
    """Which of ``ok`` / ``empty_gt`` / ``empty_pred`` / ``both_empty`` the pair is."""
    p, g = _check_pair(pred, gt)
    return _status(bool(p.any()), bool(g.any()))


def _status(pred_any: bool, gt_any: bool) -> str:
    if pred_any and gt_any:
        return "ok"
    if pred_any:
        return "empty_gt"
    if gt_any:
        return "empty_pred"
    return "both_empty"


def dice(pred: np.ndarray, gt: np.ndarray, *, both_empty: float = math.nan) -> float:
    """Dice ``2|P∩G| / (|P|+|G|)`` of two masks (non-zero = foreground); ``both_empty`` when 0/0.

    The arithmetic is medpy ``dc``'s, so values are bit-identical to it where it is defined (for two
    empty masks medpy 0.5.2 under numpy 2 returns NaN with a warning, its docs' 1.0 is not reached).
    """
    p, g = _check_pair(pred, gt)
    inter = int(np.count_nonzero(p & g))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    return 2.0 * inter / float(total) if total else float(both_empty)


def iou(pred: np.ndarray, gt: np.ndarray, *, both_empty: float = math.nan) -> float:
    """Jaccard index ``|P∩G| / |P∪G|`` (non-zero = foreground); ``both_empty`` when 0/0."""
    p, g = _check_pair(pred, gt)
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return inter / float(union) if union else float(both_empty)


def _crop_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` and clipped to the array (mask not empty).

    The margin keeps the erosion of the crop equal to the erosion of the whole array even without
    relying on voxels outside the array being background; at the array border the crop edge is
    the array edge, so the same rule applies to both.
    """
    (box,) = ndimage.find_objects(mask.view(np.uint8), max_label=1)
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape, strict=True))


def _surface(mask: np.ndarray) -> np.ndarray:
    # connectivity 1 and one iteration: medpy's border voxels (and MONAI's, without subvoxels)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _directed_pair(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None, crop: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances a->b and b->a of two non-empty boolean masks of equal shape."""
    if crop:
        box = _crop_box(a | b)
        a, b = a[box], b[box]
    sa, sb = _surface(a), _surface(b)
    # the EDT measures distance to the nearest zero, so the surface is passed inverted
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return d_ab, d_ba


def _require_objects(p: np.ndarray, g: np.ndarray) -> None:
    if not p.any():
        raise ValueError("the first mask is empty: surface distances are undefined")
    if not g.any():
        raise ValueError("the second mask is empty: surface distances are undefined")


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: SpacingLike = None, *, crop: bool = True) -> np.ndarray:
    """Distance from every surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Same values as medpy's ``__surface_distances(a, b, spacing, connectivity=1)`` (in the order of
    the surface voxels in C order). Unit: voxels without ``spacing``, else the spacing's unit.
    Raises ``ValueError`` when either mask is empty.
    """
    p, g = _check_pair(a, b)
    _require_objects(p, g)
    sp = _normalize_spacing(spacing, p.ndim)
    if crop:
        box = _crop_box(p | g)
        p, g = p[box], g[box]
    return ndimage.distance_transform_edt(~_surface(g), sampling=sp)[_surface(p)]


def hd95(
    pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike = None, *, method: HD95Method = "pooled", crop: bool = True
) -> float:
    """95th-percentile Hausdorff distance between two non-empty masks.

    ``method="pooled"`` equals medpy ``hd95(pred, gt, voxelspacing=spacing)``:
    ``np.percentile(np.hstack((d_pg, d_gp)), 95)``. ``method="max_directed"`` is
    ``max(percentile(d_pg, 95), percentile(d_gp, 95))`` as in MONAI. Raises ``ValueError`` when
    either mask is empty (the protocols decide what an empty mask scores).
    """
    if method not in HD95_METHODS:
        raise ValueError(f"unknown HD95 method {method!r}; expected one of {HD95_METHODS}")
    p, g = _check_pair(pred, gt)
    _require_objects(p, g)
    d_pg, d_gp = _directed_pair(p, g, _normalize_spacing(spacing, p.ndim), crop)
    if method == "pooled":
        return float(np.percentile(np.hstack((d_pg, d_gp)), 95))
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


# --------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRecord:
    """Metrics of one class in one case under one protocol.

    ``None`` means "not computed / not defined by the protocol" (IoU under ``paper``, HD95 when
    not asked for); ``NaN`` means "undefined for this case" (an empty mask), see ``status``.
    """

    class_id: int
    dice: float
    iou: float | None
    hd95: float | None
    status: str
    protocol: str
    hd95_unit: str
    hd95_method: str


def _check_protocol(protocol: str, hd95_method: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if hd95_method not in HD95_METHODS:
        raise ValueError(f"unknown HD95 method {hd95_method!r}; expected one of {HD95_METHODS}")
    if protocol == "paper" and hd95_method != "pooled":
        raise ValueError("the paper protocol is defined with medpy's pooled HD95 only")


def _protocol_spacing(protocol: str, spacing: SpacingLike, ndim: int) -> tuple[float, ...] | None:
    if protocol == "paper":
        if spacing is not None:
            raise ValueError("the paper protocol measures HD95 in voxels: do not pass a spacing")
        return None
    if protocol == "physical" and spacing is None:
        raise ValueError("the physical protocol needs the voxel spacing (mm) to report HD95 in mm")
    return _normalize_spacing(spacing, ndim)


def _case(
    p: np.ndarray,
    g: np.ndarray,
    protocol: str,
    spacing: tuple[float, ...] | None,
    hd95_method: str,
    class_id: int,
    compute_hd95: bool,
) -> MetricRecord:
    """One class of one case; masks already validated, spacing already normalised."""
    status = _status(bool(p.any()), bool(g.any()))
    j: float | None = None
    if status == "ok":
        d = dice(p, g)
        j = None if protocol == "paper" else iou(p, g)
        h = hd95(p, g, spacing, method=hd95_method) if compute_hd95 else None  # type: ignore[arg-type]
    elif protocol == "paper":
        # calculate_metric_percase: only "truth empty, prediction not" scores (1, 0); the rest (0, 0)
        d, h = (1.0, 0.0) if status == "empty_gt" else (0.0, 0.0)
    elif status == "both_empty":
        # physical: nothing to score; busi: a correctly empty image is a perfect answer
        d, h = (math.nan, math.nan) if protocol == "physical" else (1.0, 0.0)
        j = d
    else:
        d, j, h = 0.0, 0.0, math.nan
    return MetricRecord(
        class_id=class_id,
        dice=d,
        iou=j,
        hd95=h if compute_hd95 else None,
        status=status,
        protocol=protocol,
        hd95_unit=_distance_unit(p.ndim, spacing),
        hd95_method=hd95_method,
    )


def binary_case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    protocol: Protocol,
    spacing: SpacingLike = None,
    *,
    hd95_method: HD95Method = "pooled",
    class_id: int = 1,
    compute_hd95: bool = True,
) -> MetricRecord:
    """Dice, IoU and HD95 of one binary mask pair (non-zero = foreground) under ``protocol``.

    ``spacing``: forbidden under ``paper`` (voxels), required under ``physical`` (mm), optional
    under ``busi`` (pixels without it). See the module docstring for the empty-mask rules.
    """
    _check_protocol(protocol, hd95_method)
    p, g = _check_pair(pred, gt)
    sp = _protocol_spacing(protocol, spacing, p.ndim)
    return _case(p, g, protocol, sp, hd95_method, class_id, compute_hd95)


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Integer label array; float arrays (e.g. from a tensor argmax) must hold whole numbers."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} must be a label map of whole numbers")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative labels")
    return arr


def label_volume_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    class_ids: Iterable[int],
    protocol: Protocol,
    spacing: SpacingLike = None,
    *,
    hd95_method: HD95Method = "pooled",
    compute_hd95: bool = True,
) -> list[MetricRecord]:
    """Per-class records for two integer label maps (class ``c`` is ``label == c``).

    With ``protocol="paper"`` this reproduces the official Synapse evaluation of one test volume
    (``calculate_metric_percase`` on ``pred == c`` and ``gt == c`` for ``c`` in ``class_ids``).
    """
    _check_protocol(protocol, hd95_method)
    pl, gl = _as_labels(pred, "prediction"), _as_labels(gt, "ground truth")
    if pl.shape != gl.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {pl.shape} vs {gl.shape}")
    pl, gl = np.atleast_1d(pl), np.atleast_1d(gl)
    sp = _protocol_spacing(protocol, spacing, pl.ndim)
    ids = [int(c) for c in class_ids]
    if any(c < 1 for c in ids):
        raise ValueError("class ids must be >= 1 (0 is background)")
    # one pass per volume for all class boxes, instead of two full-volume comparisons per class
    top = max(ids, default=0)
    boxes_p = ndimage.find_objects(pl, max_label=top) if top else []
    boxes_g = ndimage.find_objects(gl, max_label=top) if top else []
    records = []
    for c in ids:
        bp, bg = boxes_p[c - 1], boxes_g[c - 1]
        if bp is None and bg is None:
            box: tuple[slice, ...] = tuple(slice(0, 1) for _ in pl.shape)  # both empty: any tiny view
        else:
            parts = [b for b in (bp, bg) if b is not None]
            # the union box plus a 1-voxel margin, clipped, exactly as the binary core crops
            box = tuple(
                slice(max(min(s.start for s in ax) - 1, 0), min(max(s.stop for s in ax) + 1, n))
                for ax, n in zip(zip(*parts, strict=True), pl.shape, strict=True)
            )
        records.append(_case(pl[box] == c, gl[box] == c, protocol, sp, hd95_method, c, compute_hd95))
    return records


def _stats(values: Sequence[float | None], ddof: int) -> dict[str, float | int]:
    arr = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    n = int(ok.size)
    return {
        "mean": float(ok.mean()) if n else math.nan,
        "std": float(ok.std(ddof=ddof)) if n > ddof else math.nan,
        "n": n,
        "n_nan": int(arr.size - n),
    }


def summarize(
    records: Iterable[MetricRecord], *, class_names: Mapping[int, str] | None = None, ddof: int = 0
) -> dict[str, Any]:
    """Mean/std per class over cases, then over classes (the papers' order), NaN skipped but counted.

    ``records``: every case's records (one per class per case), all from one protocol. Returns::

        {"protocol", "hd95_unit", "hd95_method", "std_ddof",
         "per_class": {class_id: {"name", "n_cases", "status_counts",
                                  "dice"|"iou"|"hd95": {"mean", "std", "n", "n_nan"}}},
         "over_classes": {"dice"|"iou"|"hd95": {"mean", "std", "n", "n_nan"}}}

    ``over_classes`` takes mean/std of the per-class means (a class whose values are all NaN is
    counted in its ``n_nan``). Metrics that were not computed (``None`` in every record) are left
    out. ``ddof=0`` is the population std (numpy's default); pass 1 for the sample std.
    """
    recs = list(records)
    if not recs:
        raise ValueError("no records to summarise")
    kinds = {(r.protocol, r.hd95_unit, r.hd95_method) for r in recs}
    if len(kinds) != 1:
        raise ValueError(f"records mix protocols/units/HD95 methods: {sorted(kinds)}")
    ((protocol, unit, method),) = kinds
    metrics = [m for m in ("dice", "iou", "hd95") if any(getattr(r, m) is not None for r in recs)]
    per_class: dict[int, dict[str, Any]] = {}
    for cid in sorted({r.class_id for r in recs}):
        mine = [r for r in recs if r.class_id == cid]
        entry: dict[str, Any] = {
            "name": (class_names or {}).get(cid, str(cid)),
            "n_cases": len(mine),
            "status_counts": {s: sum(r.status == s for r in mine) for s in STATUSES},
        }
        for m in metrics:
            entry[m] = _stats([getattr(r, m) for r in mine], ddof)
        per_class[cid] = entry
    over = {m: _stats([e[m]["mean"] for e in per_class.values()], ddof) for m in metrics}
    return {
        "protocol": protocol,
        "hd95_unit": unit,
        "hd95_method": method,
        "std_ddof": ddof,
        "per_class": per_class,
        "over_classes": over,
    }


# --------------------------------------------------------------------------------------------
# MONAI integration
# --------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "mean_batch", "mean_channel", "none")


def _nanmean(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over ``dim`` skipping NaN (NaN where nothing is left) and the count of values used."""
    ok = ~torch.isnan(x)
    count = ok.sum(dim=dim)
    total = torch.where(ok, x, torch.zeros_like(x)).sum(dim=dim)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
    return mean, count.to(x.dtype)


def _spacing_from_affine(affine: torch.Tensor, ndim: int) -> tuple[float, ...]:
    a = np.asarray(affine.detach().cpu(), dtype=np.float64)
    # column norms of the rotation-zoom block: spacing along each array axis
    return tuple(float(v) for v in np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0)))


class SegmentationProtocolMetric(CumulativeIterationMetric):
    """One of Dice / IoU / HD95 under a protocol, as a MONAI cumulative metric.

    Inputs are batch-first, either one-hot ``(B, num_classes, *spatial)`` (values 0/1, already
    discretised as MONAI metrics expect) or labels ``(B, 1, *spatial)`` (whole numbers in
    ``[0, num_classes)``); ``y_pred`` and ``y`` may differ in form. Each call adds a float64
    ``(B, C)`` block to the buffer (``C = num_classes`` with background, else ``num_classes - 1``);
    ``get_buffer()`` is the per-item table (all-gathered under DDP) that ``IgniteMetricHandler``
    stores in ``engine.state.metric_details`` for ``MetricsSaver``.

    Spacing (``physical``; optional for ``busi``): ``spacing=`` given here or per call wins;
    otherwise ``physical`` reads it from the MetaTensor affine of ``y`` (else ``y_pred``), per
    item (so a PNG's identity affine would read as 1 mm: give 2-D data a real spacing or use
    ``busi``). ``busi`` never reads the affine, only an explicit spacing. ``paper`` refuses one.

    ``aggregate`` reductions (NaN skipped; NaN where no value is left, never 0):
    ``"mean"``: per-class mean over items, then mean over classes (the papers' order; MONAI's
    ``"mean"`` averages per item first, which differs only when NaNs occur); ``"mean_batch"``:
    per-class means ``(C,)``; ``"mean_channel"``: per-item means ``(N,)``; ``"none"``: the buffer.
    With ``get_not_nans=True`` it returns ``(value, count of values used)``.
    """

    def __init__(
        self,
        num_classes: int,
        protocol: Protocol = "paper",
        metric: Literal["dice", "iou", "hd95"] = "dice",
        include_background: bool = False,
        reduction: str = "mean",
        hd95_method: HD95Method = "pooled",
        spacing: SpacingLike = None,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        _check_protocol(protocol, hd95_method)
        if num_classes < 2:
            raise ValueError("num_classes counts the background too and must be >= 2")
        if metric not in ("dice", "iou", "hd95"):
            raise ValueError(f"unknown metric {metric!r}; expected dice, iou or hd95")
        if metric == "iou" and protocol == "paper":
            raise ValueError("the paper protocol defines Dice and HD95 only")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
        if protocol == "paper" and spacing is not None:
            raise ValueError("the paper protocol measures HD95 in voxels: do not pass a spacing")
        self.num_classes = num_classes
        self.protocol = protocol
        self.metric = metric
        self.include_background = include_background
        self.reduction = reduction
        self.hd95_method = hd95_method
        self.spacing = spacing
        self.get_not_nans = get_not_nans
        self._unit: str | None = None

    @property
    def class_ids(self) -> list[int]:
        """Class ids of the buffer's columns."""
        return list(range(0 if self.include_background else 1, self.num_classes))

    @property
    def hd95_unit(self) -> str | None:
        """Unit of the buffered HD95 values (``voxel``, ``pixel`` or ``mm``); None before any data."""
        return self._unit

    def reset(self) -> None:
        """Empty the buffer (and forget its unit)."""
        super().reset()
        self._unit = None

    def _masks(self, t: torch.Tensor, name: str) -> tuple[np.ndarray, bool]:
        """Numpy view of one batch: ``(array, is_label_map)``, validated."""
        arr = (t.as_tensor() if isinstance(t, MetaTensor) else t).detach().cpu().numpy()
        if arr.ndim < 3:
            raise ValueError(f"{name} must be batch-first (B, C, *spatial), got shape {arr.shape}")
        if arr.shape[1] == 1:
            labels = _as_labels(arr, name)
            if labels.size and labels.max() >= self.num_classes:
                raise ValueError(f"{name} has labels >= num_classes={self.num_classes}")
            return labels, True
        if arr.shape[1] != self.num_classes:
            raise ValueError(f"{name} has {arr.shape[1]} channels; expected 1 (labels) or {self.num_classes}")
        if arr.dtype != bool and not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} is one-hot but not binary: discretise it (argmax/threshold) first")
        return arr.astype(bool, copy=False), False

    def _item_spacings(
        self, y_pred: torch.Tensor, y: torch.Tensor, batch: int, ndim: int, spacing: Any
    ) -> list[tuple[float, ...] | None]:
        spacing = self.spacing if spacing is None else spacing
        if self.protocol == "paper":
            if spacing is not None:
                raise ValueError("the paper protocol measures HD95 in voxels: do not pass a spacing")
            return [None] * batch
        if spacing is not None:
            return [_normalize_spacing(spacing, ndim)] * batch
        if self.protocol == "busi":
            return [None] * batch
        for t in (y, y_pred):
            if isinstance(t, MetaTensor):
                aff = t.affine
                affs = [aff[i] for i in range(batch)] if aff.ndim == 3 else [aff] * batch
                return [_normalize_spacing(_spacing_from_affine(a, ndim), ndim) for a in affs]
        raise ValueError("the physical protocol needs a spacing: pass spacing= or MetaTensors with an affine")

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Per-item, per-class values ``(B, C)`` (float64) of the configured metric."""
        if y is None:
            raise ValueError("ground truth y is required")
        p, p_labels = self._masks(y_pred, "y_pred")
        g, g_labels = self._masks(y, "y")
        if p.shape[0] != g.shape[0] or p.shape[2:] != g.shape[2:]:
            raise ValueError(f"y_pred and y do not match: {tuple(y_pred.shape)} vs {tuple(y.shape)}")
        batch, ndim = p.shape[0], p.ndim - 2
        spacings = self._item_spacings(y_pred, y, batch, ndim, kwargs.get("spacing"))
        want_hd = self.metric == "hd95"
        out = np.empty((batch, len(self.class_ids)), dtype=np.float64)
        for b in range(batch):
            for j, c in enumerate(self.class_ids):
                pm = p[b, 0] == c if p_labels else p[b, c]
                gm = g[b, 0] == c if g_labels else g[b, c]
                rec = _case(pm, gm, self.protocol, spacings[b], self.hd95_method, c, want_hd)
                out[b, j] = getattr(rec, self.metric)
                if self._unit not in (None, rec.hd95_unit):
                    # a buffer mixing pixels and mm could not be averaged meaningfully
                    raise ValueError(f"HD95 unit changed from {self._unit} to {rec.hd95_unit}; call reset()")
                self._unit = rec.hd95_unit
        # on the input's device so the DDP all-gather in get_buffer() works with NCCL too
        return torch.from_numpy(out).to(y_pred.device)

    def aggregate(  # type: ignore[override]
        self, reduction: str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffer (see the class docstring); NaN-aware, float64."""
        reduction = reduction or self.reduction
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the metric buffer is empty: call the metric on some data first")
        if reduction == "none":
            value, count = data, (~torch.isnan(data)).to(data.dtype)
        elif reduction == "mean_batch":
            value, count = _nanmean(data, 0)
        elif reduction == "mean_channel":
            value, count = _nanmean(data, 1)
        else:
            per_class, _ = _nanmean(data, 0)
            value, _ = _nanmean(per_class, 0)
            count = (~torch.isnan(data)).sum().to(data.dtype)
        return (value, count) if self.get_not_nans else value
