"""Tests of hybridseg.metrics: medpy equivalence, protocol edge rules, hand-computed values, MONAI use."""

from __future__ import annotations

import csv
import math

import medpy.metric.binary as medpy_binary
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from medpy.metric.binary import dc
from medpy.metric.binary import hd95 as medpy_hd95
from medpy.metric.binary import jc
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler, MetricsSaver
from monai.metrics import HausdorffDistanceMetric
from scipy import ndimage

from hybridseg.metrics import (
    MetricRecord,
    SegmentationProtocolMetric,
    binary_case_metrics,
    dice,
    hd95,
    iou,
    label_volume_metrics,
    mask_status,
    summarize,
    surface_distances,
)

medpy_surface_distances = medpy_binary.__dict__["__surface_distances"]  # module-private, name not mangled


def blobs(rng: np.random.Generator, shape: tuple[int, ...], level: float = 0.2) -> np.ndarray:
    """Smooth random blobs (several components, some touching the border)."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > level


def random_pairs(seed: int, shape: tuple[int, ...], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        a, b = blobs(rng, shape), blobs(rng, shape)
        if a.any() and b.any():
            pairs.append((a, b))
    return pairs


def crafted_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Named mask pairs covering the geometric edge cases, 2-D and 3-D."""
    cases = {}
    z2 = np.zeros((12, 14), bool)
    a, b = z2.copy(), z2.copy()
    a[0:5, 0:6], b[2:8, 0:4] = True, True  # both touch the array border
    cases["border_2d"] = (a, b)
    a, b = z2.copy(), z2.copy()
    a[5, 6], b[5, 6] = True, True
    cases["single_voxel_same_2d"] = (a, b)
    a, b = z2.copy(), z2.copy()
    a[1, 1], b[9, 12] = True, True
    cases["single_voxels_apart_2d"] = (a, b)
    a, b = z2.copy(), z2.copy()
    a[1:4, 1:4], b[7:11, 8:13] = True, True
    cases["disjoint_2d"] = (a, b)
    a, b = z2.copy(), z2.copy()
    a[1:11, 1:13], b[4:7, 5:8] = True, True
    cases["nested_2d"] = (a, b)
    cases["full_vs_block_2d"] = (np.ones((12, 14), bool), b)
    a = z2.copy()
    a[3, :] = True  # a one-voxel line is all surface
    cases["line_vs_nested_2d"] = (a, b)
    z3 = np.zeros((9, 10, 11), bool)
    a, b = z3.copy(), z3.copy()
    a[0:4, 2:9, 0:11], b[2:9, 0:5, 3:7] = True, True
    cases["border_3d"] = (a, b)
    a, b = z3.copy(), z3.copy()
    a[1:8, 1:9, 1:10], b[3:6, 4:6, 4:7] = True, True
    cases["nested_3d"] = (a, b)
    a, b = z3.copy(), z3.copy()
    a[0, 0, 0], b[8, 9, 10] = True, True
    cases["corners_3d"] = (a, b)
    return cases


def official_percase(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """The official Synapse per-class rules, written from the official evaluation code, on top of medpy."""
    p, g = pred > 0, gt > 0
    if p.sum() > 0 and g.sum() > 0:
        return dc(p, g), medpy_hd95(p, g)
    if p.sum() > 0 and g.sum() == 0:
        return 1, 0
    return 0, 0


# ------------------------------------------------------------------------ functional core vs medpy


@pytest.mark.parametrize("name", sorted(crafted_pairs()))
def test_dice_iou_hd95_and_surface_distances_equal_medpy_on_crafted_masks(name: str) -> None:
    a, b = crafted_pairs()[name]
    assert dice(a, b) == dc(a, b)
    assert iou(a, b) == jc(a, b)
    assert hd95(a, b) == medpy_hd95(a, b)
    assert hd95(b, a) == medpy_hd95(b, a)
    np.testing.assert_array_equal(surface_distances(a, b), medpy_surface_distances(a, b))


@pytest.mark.parametrize("shape", [(30, 34), (14, 16, 12)])
def test_hd95_equals_medpy_on_random_blobs_with_and_without_anisotropic_spacing(shape: tuple[int, ...]) -> None:
    spacings = [None, (2.5, 0.7, 0.9)[: len(shape)], 0.6]
    for a, b in random_pairs(seed=len(shape), shape=shape, count=12):
        assert dice(a, b) == dc(a, b)
        assert iou(a, b) == jc(a, b)
        for spacing in spacings:
            assert hd95(a, b, spacing) == medpy_hd95(a, b, voxelspacing=spacing)
            np.testing.assert_array_equal(surface_distances(a, b, spacing), medpy_surface_distances(a, b, spacing))


@pytest.mark.parametrize("shape", [(30, 34), (14, 16, 12)])
def test_cropping_to_the_union_box_gives_values_identical_to_no_cropping(shape: tuple[int, ...]) -> None:
    pairs = random_pairs(seed=10 + len(shape), shape=shape, count=10)
    # small objects far from the border make the crop much smaller than the array
    small_a, small_b = np.zeros(shape, bool), np.zeros(shape, bool)
    small_a[(slice(4, 7),) * len(shape)] = True
    small_b[(slice(5, 9),) * len(shape)] = True
    pairs += [(small_a, small_b)] + [crafted_pairs()[k] for k in ("border_2d", "border_3d", "corners_3d")]
    for a, b in pairs:
        sp = (2.5, 0.7, 0.9)[: a.ndim]
        for method in ("pooled", "max_directed"):
            assert hd95(a, b, sp, method=method, crop=True) == hd95(a, b, sp, method=method, crop=False)
        np.testing.assert_array_equal(surface_distances(a, b, sp), surface_distances(a, b, sp, crop=False))


def test_pooled_and_max_directed_hd95_equal_hand_computed_values() -> None:
    gt, pred = np.zeros((3, 20), bool), np.zeros((3, 20), bool)
    gt[1, 0] = True
    pred[1, 2] = pred[1, 10] = True
    # pred->gt distances [2, 10], gt->pred [2]; pooled [2, 2, 10]: rank 1.9 -> 2 + 0.9 * 8
    assert hd95(pred, gt, method="pooled") == pytest.approx(9.2, abs=1e-12)
    # per direction: [2, 10] -> 2 + 0.95 * 8 = 9.6, [2] -> 2; the larger is kept
    assert hd95(pred, gt, method="max_directed") == pytest.approx(9.6, abs=1e-12)
    assert hd95(pred, gt, spacing=(1.0, 0.5), method="max_directed") == pytest.approx(4.8, abs=1e-12)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy")  # raised inside MONAI itself
def test_max_directed_hd95_matches_monai_hausdorff_metric_with_anisotropic_spacing() -> None:
    pairs = random_pairs(seed=3, shape=(14, 16, 12), count=6)
    monai_metric = HausdorffDistanceMetric(include_background=True, percentile=95)
    spacing = (2.5, 0.7, 0.9)
    for a, b in pairs:
        expected = monai_metric(
            torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float(), spacing=spacing
        )
        ours = hd95(a, b, spacing, method="max_directed")
        assert ours == pytest.approx(float(expected), rel=1e-5)


def test_max_directed_hd95_can_be_below_pooled_because_percentiles_interpolate() -> None:
    gt, pred = np.zeros((3, 21), bool), np.zeros((3, 21), bool)
    gt[1, [0, 20]] = True
    pred[1, [0, 10]] = True
    # both directions [0, 10] -> 9.5 each; pooled [0, 0, 10, 10] at rank 2.85 -> 10
    assert hd95(pred, gt, method="max_directed") == pytest.approx(9.5, abs=1e-12)
    assert hd95(pred, gt, method="pooled") == pytest.approx(10.0, abs=1e-12) == medpy_hd95(pred, gt)


def test_surface_functions_raise_on_an_empty_mask_instead_of_returning_a_number() -> None:
    a, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="empty"):
        hd95(a, empty)
    with pytest.raises(ValueError, match="empty"):
        surface_distances(empty, a)


def test_invalid_spacing_and_shape_mismatch_are_rejected() -> None:
    a = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="3 values for a 2-D"):
        hd95(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        hd95(a, a, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.ones((4, 5), bool))


def test_dice_and_iou_of_two_empty_masks_are_nan_unless_a_value_is_given() -> None:
    empty = np.zeros((3, 3), bool)
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert dice(empty, empty, both_empty=1.0) == 1.0
    assert mask_status(empty, empty) == "both_empty"
    assert mask_status(np.ones((3, 3)), empty) == "empty_gt"
    assert mask_status(empty, np.ones((3, 3))) == "empty_pred"


# ------------------------------------------------------------------------------------- protocols


def crafted_label_volumes() -> tuple[np.ndarray, np.ndarray]:
    """Labels 1..5 with every edge rule: 1 ok (touching border), 2 gt only, 3 pred only, 4 absent, 5 ok."""
    pred, gt = np.zeros((10, 12, 14), np.uint8), np.zeros((10, 12, 14), np.uint8)
    gt[0:4, 0:5, 0:6], pred[1:5, 0:6, 0:5] = 1, 1
    gt[6:9, 2:4, 9:12] = 2
    pred[7:9, 8:11, 2:4] = 3
    gt[5, 9, 12], pred[8, 10, 13] = 5, 5
    return pred, gt


def test_paper_protocol_equals_official_percase_rules_on_crafted_and_random_label_volumes() -> None:
    rng = np.random.default_rng(7)
    volumes = [crafted_label_volumes()]
    for _ in range(4):
        # 4 classes from smoothed noise, so sizes, touching and missing classes vary
        labels = [
            np.digitize(ndimage.gaussian_filter(rng.standard_normal((12, 16, 14)), 1.5), [0.1, 0.25, 0.4, 0.55])
            for _ in range(2)
        ]
        volumes.append((labels[0].astype(np.int16), labels[1].astype(np.int16)))
    seen = set()
    for pred, gt in volumes:
        records = label_volume_metrics(pred, gt, range(1, 6), "paper")
        for rec in records:
            expected = official_percase(pred == rec.class_id, gt == rec.class_id)
            assert (rec.dice, rec.hd95) == expected
            assert rec.iou is None and rec.hd95_unit == "voxel" and rec.hd95_method == "pooled"
            seen.add(rec.status)
    assert seen == {"ok", "empty_gt", "empty_pred", "both_empty"}


def test_paper_protocol_edge_rules_score_pred_without_gt_as_one_and_other_empties_as_zero() -> None:
    pred, gt = crafted_label_volumes()
    by_class = {r.class_id: r for r in label_volume_metrics(pred, gt, [2, 3, 4], "paper")}
    assert (by_class[2].status, by_class[2].dice, by_class[2].hd95) == ("empty_pred", 0.0, 0.0)
    assert (by_class[3].status, by_class[3].dice, by_class[3].hd95) == ("empty_gt", 1.0, 0.0)
    assert (by_class[4].status, by_class[4].dice, by_class[4].hd95) == ("both_empty", 0.0, 0.0)


def test_paper_protocol_refuses_a_spacing_and_iou() -> None:
    pred, gt = crafted_label_volumes()
    with pytest.raises(ValueError, match="voxels"):
        label_volume_metrics(pred, gt, [1], "paper", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="Dice and HD95 only"):
        SegmentationProtocolMetric(num_classes=3, protocol="paper", metric="iou")


def test_physical_protocol_hd95_equals_hand_computed_mm_on_anisotropic_spacing() -> None:
    spacing = (2.5, 0.6, 0.8)
    pred, gt = np.zeros((6, 8, 9), np.uint8), np.zeros((6, 8, 9), np.uint8)
    pred[0, 0, 0], gt[1, 3, 4] = 1, 1  # one voxel each: offset (1, 3, 4) voxels
    # two 1-voxel-thick slabs 3 slices apart: every surface voxel faces the other slab at 3 * 2.5 mm
    pred[2, 2:7, 2:8], gt[5, 2:7, 2:8] = 2, 2
    records = {r.class_id: r for r in label_volume_metrics(pred, gt, [1, 2], "physical", spacing)}
    assert records[1].hd95 == pytest.approx(math.sqrt(2.5**2 + 1.8**2 + 3.2**2), abs=1e-12)
    assert records[2].hd95 == pytest.approx(7.5, abs=1e-12)
    assert records[1].hd95_unit == "mm" and records[1].dice == 0.0 and records[1].status == "ok"
    paper = {r.class_id: r for r in label_volume_metrics(pred, gt, [1, 2], "paper")}
    assert paper[1].hd95 == pytest.approx(math.sqrt(1 + 9 + 16), abs=1e-12)
    assert paper[2].hd95 == pytest.approx(3.0, abs=1e-12)


def test_physical_protocol_reports_empty_masks_as_nan_with_a_status_never_as_zero() -> None:
    pred, gt = crafted_label_volumes()
    records = {r.class_id: r for r in label_volume_metrics(pred, gt, [2, 3, 4], "physical", (3.0, 0.7, 0.7))}
    assert records[2].status == "empty_pred" and records[2].dice == 0.0 and math.isnan(records[2].hd95)
    assert records[3].status == "empty_gt" and records[3].dice == 0.0 and math.isnan(records[3].hd95)
    assert records[4].status == "both_empty" and math.isnan(records[4].dice) and math.isnan(records[4].hd95)
    with pytest.raises(ValueError, match="spacing"):
        label_volume_metrics(pred, gt, [1], "physical")


def test_label_volume_metrics_equal_binary_case_metrics_class_by_class() -> None:
    pred, gt = crafted_label_volumes()
    for protocol, spacing in (("paper", None), ("physical", (3.0, 0.7, 0.8)), ("busi", None)):
        for rec in label_volume_metrics(pred, gt, range(1, 6), protocol, spacing, hd95_method="pooled"):
            single = binary_case_metrics(
                pred == rec.class_id, gt == rec.class_id, protocol, spacing, class_id=rec.class_id
            )
            np.testing.assert_equal(rec, single)


def test_busi_convention_for_empty_masks_and_pixel_or_mm_units() -> None:
    empty, lesion, other = np.zeros((20, 20), bool), np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    lesion[4:12, 5:11], other[6:14, 6:13] = True, True
    both = binary_case_metrics(empty, empty, "busi")
    assert (both.dice, both.iou, both.hd95, both.status) == (1.0, 1.0, 0.0, "both_empty")
    for pred, gt, status in ((empty, lesion, "empty_pred"), (lesion, empty, "empty_gt")):
        rec = binary_case_metrics(pred, gt, "busi")
        assert (rec.dice, rec.iou, rec.status) == (0.0, 0.0, status) and math.isnan(rec.hd95)
    px = binary_case_metrics(lesion, other, "busi")
    assert (px.dice, px.iou, px.hd95, px.hd95_unit) == (
        dc(lesion, other),
        jc(lesion, other),
        medpy_hd95(lesion, other),
        "pixel",
    )
    mm = binary_case_metrics(lesion, other, "busi", spacing=0.5)
    assert mm.hd95_unit == "mm" and mm.hd95 == pytest.approx(px.hd95 * 0.5, abs=1e-12)


def test_label_maps_accept_whole_float_labels_and_reject_fractions() -> None:
    pred, gt = crafted_label_volumes()
    assert label_volume_metrics(pred.astype(np.float32), gt, [1], "paper") == label_volume_metrics(
        pred, gt, [1], "paper"
    )
    with pytest.raises(ValueError, match="whole numbers"):
        label_volume_metrics(pred + 0.5, gt, [1], "paper")


def record(class_id: int, d: float, h: float, status: str = "ok") -> MetricRecord:
    return MetricRecord(class_id, d, d, h, status, "physical", "mm", "pooled")


def test_summarize_averages_cases_per_class_then_classes_skipping_and_counting_nan() -> None:
    nan = math.nan
    records = [
        record(1, 0.8, 2.0),
        record(2, 0.5, 4.0),  # case 1
        record(1, 0.6, 6.0),
        record(2, 0.0, nan, "empty_pred"),  # case 2
        record(1, 1.0, nan, "empty_gt"),
        record(2, nan, nan, "both_empty"),  # case 3
    ]
    s = summarize(records, class_names={1: "aorta", 2: "gallbladder"})
    assert (s["protocol"], s["hd95_unit"], s["hd95_method"], s["std_ddof"]) == ("physical", "mm", "pooled", 0)
    c1, c2 = s["per_class"][1], s["per_class"][2]
    assert c1["name"] == "aorta" and c1["n_cases"] == 3
    assert c1["dice"] == {"mean": pytest.approx(0.8), "std": pytest.approx(math.sqrt(0.08 / 3)), "n": 3, "n_nan": 0}
    assert c1["hd95"] == {"mean": 4.0, "std": 2.0, "n": 2, "n_nan": 1}
    assert c2["dice"]["mean"] == 0.25 and c2["dice"]["n_nan"] == 1
    assert c2["hd95"] == {"mean": 4.0, "std": 0.0, "n": 1, "n_nan": 2}
    assert c2["status_counts"] == {"ok": 1, "empty_gt": 0, "empty_pred": 1, "both_empty": 1}
    assert s["over_classes"]["dice"]["mean"] == pytest.approx((0.8 + 0.25) / 2)
    assert s["over_classes"]["hd95"] == {"mean": 4.0, "std": 0.0, "n": 2, "n_nan": 0}
    assert summarize(records, ddof=1)["per_class"][1]["hd95"]["std"] == pytest.approx(math.sqrt(8))


def test_summarize_refuses_records_of_different_protocols() -> None:
    other = MetricRecord(1, 1.0, None, 0.0, "ok", "paper", "voxel", "pooled")
    with pytest.raises(ValueError, match="mix"):
        summarize([record(1, 0.5, 1.0), other])


# --------------------------------------------------------------------------------- MONAI classes


def label_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 3-D items with labels 0..3 (num_classes 4), covering ok and empty cases."""
    p0, g0 = (np.where(v > 3, 0, v) for v in crafted_label_volumes())
    p1, g1 = np.roll(g0, 1, axis=1), g0.copy()  # item 2: classes 1 and 2 shifted, 3 absent
    pred = torch.from_numpy(np.stack([p0, p1])[:, None].astype(np.int64))
    gt = torch.from_numpy(np.stack([g0, g1])[:, None].astype(np.int64))
    return pred, gt


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("protocol,metric", [("paper", "dice"), ("paper", "hd95"), ("busi", "iou")])
def test_metric_class_buffer_equals_functional_records_for_label_and_one_hot_inputs(protocol, metric) -> None:
    pred, gt = label_batch()
    from_labels = SegmentationProtocolMetric(4, protocol=protocol, metric=metric)
    from_labels(pred, gt)
    from_one_hot = SegmentationProtocolMetric(4, protocol=protocol, metric=metric)
    from_one_hot(one_hot(pred, 4), gt)
    buffer = from_labels.get_buffer()
    assert buffer.shape == (2, 3) and buffer.dtype == torch.float64 and from_labels.class_ids == [1, 2, 3]
    expected = [
        [getattr(r, metric) for r in label_volume_metrics(p[0].numpy(), g[0].numpy(), [1, 2, 3], protocol)]
        for p, g in zip(pred, gt, strict=True)
    ]
    np.testing.assert_array_equal(buffer.numpy(), np.array(expected))
    np.testing.assert_array_equal(from_one_hot.get_buffer().numpy(), buffer.numpy())


def test_metric_class_aggregates_per_class_then_over_classes_skipping_nan() -> None:
    pred, gt = label_batch()
    metric = SegmentationProtocolMetric(
        4, protocol="physical", metric="dice", spacing=(2.0, 1.0, 1.0), get_not_nans=True
    )
    metric(pred, gt)
    buf = metric.get_buffer().numpy()
    # item 2 has class 3 in neither mask: physical Dice NaN, left out of the class-3 mean
    assert math.isnan(buf[1, 2]) and not np.isnan(buf[0]).any()
    per_class = np.nanmean(buf, axis=0)
    value, count = metric.aggregate()
    assert value.item() == pytest.approx(per_class.mean()) and count.item() == 5
    value, count = metric.aggregate("mean_batch")
    np.testing.assert_allclose(value.numpy(), per_class)
    np.testing.assert_array_equal(count.numpy(), [2, 2, 1])
    value, count = metric.aggregate("mean_channel")
    np.testing.assert_allclose(value.numpy(), np.nanmean(buf, axis=1))
    metric.reset()
    empty_pred = torch.zeros_like(pred)
    metric(empty_pred[1:], torch.zeros_like(gt[1:]))
    value, count = metric.aggregate()
    assert math.isnan(value.item()) and count.item() == 0  # nothing to average is NaN, never 0


def test_metric_class_reads_spacing_per_item_from_metatensor_affine_and_explicit_spacing_wins() -> None:
    pred, gt = np.zeros((2, 1, 6, 8, 9), np.int64), np.zeros((2, 1, 6, 8, 9), np.int64)
    pred[:, 0, 0, 0, 0], gt[:, 0, 1, 3, 4] = 1, 1
    affines = torch.stack(
        [
            torch.diag(torch.tensor([2.5, 0.6, 0.8, 1.0], dtype=torch.float64)),
            torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)),
        ]
    )
    y = MetaTensor(torch.from_numpy(gt), affine=affines)
    y.is_batch = True
    metric = SegmentationProtocolMetric(2, protocol="physical", metric="hd95")
    metric(torch.from_numpy(pred), y)
    np.testing.assert_allclose(metric.get_buffer()[:, 0].numpy(), [math.sqrt(19.73), math.sqrt(26.0)])
    assert metric.hd95_unit == "mm"
    override = SegmentationProtocolMetric(2, protocol="physical", metric="hd95", spacing=2.0)
    override(torch.from_numpy(pred), y)
    np.testing.assert_allclose(override.get_buffer()[:, 0].numpy(), [2 * math.sqrt(26.0)] * 2)
    with pytest.raises(ValueError, match="spacing"):
        SegmentationProtocolMetric(2, protocol="physical", metric="hd95")(torch.from_numpy(pred), torch.from_numpy(gt))


def test_metric_class_busi_ignores_the_identity_affine_of_png_images() -> None:
    pred, gt = torch.zeros(1, 1, 20, 20), torch.zeros(1, 1, 20, 20)
    pred[0, 0, 2, 2], gt[0, 0, 2, 10] = 1, 1
    y = MetaTensor(gt, affine=torch.diag(torch.tensor([0.1, 0.1, 1.0, 1.0], dtype=torch.float64)))
    metric = SegmentationProtocolMetric(2, protocol="busi", metric="hd95")
    metric(pred, y)
    assert metric.get_buffer().item() == 8.0 and metric.hd95_unit == "pixel"


def test_metric_class_rejects_undiscretised_one_hot_and_out_of_range_labels() -> None:
    metric = SegmentationProtocolMetric(3, protocol="paper", metric="dice")
    gt = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="not binary"):
        metric(torch.full((1, 3, 4, 4), 1 / 3), gt)
    with pytest.raises(ValueError, match="num_classes"):
        metric(torch.full((1, 1, 4, 4), 3.0), gt)


def test_ignite_metric_handler_and_metrics_saver_record_mean_and_per_item_values(tmp_path) -> None:
    pred, gt = label_batch()
    batches = [
        {"pred": pred, "label": gt, "names": ["case_a", "case_b"]},
        # decollated (list of channel-first) input, as post-transforms produce
        {"pred": list(pred[:1]), "label": list(gt[:1]), "names": ["case_c"]},
    ]
    engine = Engine(lambda eng, batch: (batch["pred"], batch["label"]))
    IgniteMetricHandler(SegmentationProtocolMetric(4, protocol="paper", metric="hd95"), save_details=True).attach(
        engine, "hd95"
    )
    MetricsSaver(
        str(tmp_path),
        metric_details=["hd95"],
        batch_transform=lambda batch: [{"filename_or_obj": n} for n in batch["names"]],
    ).attach(engine)
    engine.run(batches, max_epochs=1)
    details = engine.state.metric_details["hd95"].numpy()
    expected = [
        [r.hd95 for r in label_volume_metrics(p[0].numpy(), g[0].numpy(), [1, 2, 3], "paper")]
        for p, g in zip([*pred, pred[0]], [*gt, gt[0]], strict=True)
    ]
    np.testing.assert_array_equal(details, np.array(expected))
    assert engine.state.metrics["hd95"] == pytest.approx(details.mean(axis=0).mean())
    with open(tmp_path / "hd95_raw.csv") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ["case_a", "case_b", "case_c"]
    assert float(rows[2][1]) == pytest.approx(details[1, 0], abs=1e-4)
