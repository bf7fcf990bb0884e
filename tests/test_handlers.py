"""The evaluation report (SegmentationReport): named grids for the BUSI metrics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hybridseg.handlers import SegmentationReport
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
