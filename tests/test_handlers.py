"""The evaluation report (SegmentationReport): named grids for the BUSI metrics, agreement with the protocol's
MONAI metric handlers and MetricsSaver."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import MetricsSaver

from hybridseg.handlers import SegmentationReport, protocol_metric_handlers
from hybridseg.metrics import hd95


def test_busi_report_names_hd95_on_the_original_grid_and_on_the_network_grid(tmp_path):
    """A 448 x 448 image evaluated at 224: the prediction is 2 grid pixels off, i.e. 4 original pixels off, so
    the original-size HD95 is twice the network-grid HD95, and both are reported, each with its grid named."""
    gt = np.zeros((448, 448), np.uint8)
    gt[100:300, 120:320] = 1
    pred = np.roll(gt, 4, axis=0)
    grid_gt = gt[::2, ::2]  # nearest-neighbour resize by 1/2
    grid_pred = np.roll(grid_gt, 2, axis=0)
    report = SegmentationReport(tmp_path, {1: "lesion"}, protocols=["busi"], mode="binary", grid_key="pred_grid")
    report.reset()
    report.add_case("case1", pred[None].astype(np.float32), gt[None], grid_pred=grid_pred[None].astype(np.float32))
    report.epoch_completed()
    rows = {r["grid"]: r for r in csv.DictReader(open(tmp_path / "metrics_per_case.csv"))}
    assert set(rows) == {"original", "224x224"}
    assert float(rows["original"]["hd95"]) == pytest.approx(hd95(pred, gt))
    assert float(rows["224x224"]["hd95"]) == pytest.approx(hd95(grid_pred, grid_gt))
    assert float(rows["original"]["hd95"]) == pytest.approx(2 * float(rows["224x224"]["hd95"]))
    grid_summary = json.loads((tmp_path / "summary_busi_grid.json").read_text())
    assert grid_summary["grid"] == "224x224" and grid_summary["protocol"] == "busi"
    assert json.loads((tmp_path / "summary_busi.json").read_text())["grid"] == "original"
    table = (tmp_path / "summary.md").read_text()
    assert "| busi | original |" in table and "| busi | 224x224 |" in table


def test_report_agrees_with_the_protocol_metric_handlers_and_metrics_saver_writes_monais_files(tmp_path):
    """Three BUSI-like cases (overlap, both masks empty, prediction empty): the report's rows and summary hold
    the same values as the protocol's MONAI metric handlers; MetricsSaver writes MONAI's files beside them."""

    def mask(*box):
        m = torch.zeros(1, 8, 8)
        if box:
            m[0, box[0] : box[1], box[2] : box[3]] = 1
        return m

    cases = [("a", mask(1, 5, 1, 5), mask(2, 6, 2, 6)), ("b", mask(), mask()), ("c", mask(), mask(2, 4, 2, 4))]
    batches = [[{"case": name, "pred": p, "label": g}] for name, p, g in cases]
    engine = Engine(lambda engine, batch: batch)
    metrics = protocol_metric_handlers(2, ["busi"])
    for name, handler in metrics.items():
        handler.attach(engine, name)
    names = lambda batch: [{"filename_or_obj": item["case"]} for item in batch]  # noqa: E731
    MetricsSaver(str(tmp_path), metric_details="*", batch_transform=names, summary_ops=["mean"]).attach(engine)
    report = SegmentationReport(tmp_path, {1: "lesion"}, ["busi"], mode="binary", case_key="case", n_overlays=1)
    report.attach(engine)
    engine.run(batches)

    rows = {r["case"]: r for r in report.rows}
    assert rows["a"]["dice"] == pytest.approx(2 * 9 / 32) and rows["a"]["iou"] == pytest.approx(9 / 23)
    assert rows["a"]["status"] == "ok" and rows["a"]["hd95_unit"] == "pixel"
    assert (rows["b"]["dice"], rows["b"]["hd95"], rows["b"]["status"]) == (1.0, 0.0, "both_empty")
    assert rows["c"]["dice"] == 0.0 and math.isnan(rows["c"]["hd95"]) and rows["c"]["status"] == "empty_pred"
    summary = report.summaries["busi"]["per_class"][1]
    assert summary["dice"]["mean"] == pytest.approx((2 * 9 / 32 + 1.0 + 0.0) / 3) and summary["hd95"]["n_nan"] == 1
    assert "| busi | original | 3 |" in (tmp_path / "summary.md").read_text()
    assert engine.state.metrics["busi_dice"] == pytest.approx(summary["dice"]["mean"])
    assert len((tmp_path / "metrics_per_case.csv").read_text().splitlines()) == 1 + 3
    assert len((tmp_path / "busi_dice_raw.csv").read_text().splitlines()) == 1 + 3  # MONAI's per-case file
    assert "busi_hd95" in (tmp_path / "metrics.csv").read_text()
    assert [p.name for p in (tmp_path / "overlays").glob("*.png")] == ["a_overlay.png"]


def _engine_with_handlers(report: SegmentationReport, num_classes: int, protocols: list[str]) -> Engine:
    engine = Engine(lambda engine, batch: batch)
    for name, handler in protocol_metric_handlers(num_classes, protocols).items():
        handler.attach(engine, name)
    report.attach(engine)
    return engine


def test_report_takes_hd95_from_the_metric_handlers_without_computing_it_again(tmp_path, monkeypatch):
    """Synapse-like label volumes under both protocols: with hd95_from_metric_details the report writes the same
    rows as when it scores HD95 itself, while HD95 runs once per case, class and protocol (in the handlers)."""
    import hybridseg.metrics as metrics

    rng = np.random.default_rng(0)
    affine = torch.diag(torch.tensor([0.8, 0.8, 3.0, 1.0], dtype=torch.float64))
    cases = []
    for i in range(3):
        g = torch.zeros(1, 24, 24, 8)
        g[0, 4:12, 5:14, 2:6], g[0, 14:20, 10:18, 3:7] = 1, 2
        p = g.clone()
        p[0, int(rng.integers(3, 6)) : 12, 5:15, 2:6] = 1 if i != 2 else 0  # case 2: class 1 missed
        label = MetaTensor(g, affine=affine)
        cases.append([{"case": f"c{i}", "pred": MetaTensor(p, affine=affine), "label": label}])
    rows = {}
    calls = []
    real = metrics.hd95
    monkeypatch.setattr(metrics, "hd95", lambda *a, **k: calls.append(1) or real(*a, **k))
    for reuse in (False, True):
        calls.clear()
        report = SegmentationReport(
            tmp_path / str(reuse),
            {1: "a", 2: "b"},
            ["paper", "physical"],
            mode="labels",
            case_key="case",
            n_overlays=0,
            hd95_from_metric_details=reuse,
        )
        _engine_with_handlers(report, 3, ["paper", "physical"]).run(cases)
        rows[reuse] = (tmp_path / str(reuse) / "metrics_per_case.csv").read_text()
        n_ok = sum(r["status"] == "ok" for r in report.rows)
        assert len(calls) == (n_ok if reuse else 2 * n_ok)  # handlers: once per scored mask pair; report: again
    assert rows[True] == rows[False]
    assert "mm" in rows[True] and "voxel" in rows[True]


def test_report_reusing_hd95_says_which_metric_handler_is_missing(tmp_path):
    """Without the protocol's HD95 handler the report refuses to write rows without HD95, naming the handler."""
    report = SegmentationReport(tmp_path, {1: "lesion"}, ["busi"], case_key="case", hd95_from_metric_details=True)
    engine = Engine(lambda engine, batch: batch)
    report.attach(engine)
    batch = [{"case": "a", "pred": torch.ones(1, 4, 4), "label": torch.ones(1, 4, 4)}]
    with pytest.raises(ValueError, match="'busi_hd95'"):
        engine.run([batch])
    assert not (tmp_path / "metrics_per_case.csv").exists()
