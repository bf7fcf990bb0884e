"""The evaluation report: per-case tables and summaries from MONAI's protocol metric handlers, beside
MONAI's MetricsSaver, with the overlays."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import MetricsSaver

from hybridseg.handlers import SegmentationReport, protocol_metric_handlers


def test_report_tables_come_from_the_protocol_metric_handlers_beside_monai_metrics_saver(tmp_path):
    """Three BUSI-like cases (overlap, both masks empty, prediction empty) through MONAI metric handlers:
    the report's rows and summary hold the handlers' per-case values; MetricsSaver writes MONAI's files."""

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
    report = SegmentationReport(tmp_path, {1: "lesion"}, metrics, mode="binary", case_key="case", n_overlays=1)
    report.attach(engine)
    engine.run(batches)

    rows = {r["case"]: r for r in report.rows}
    assert rows["a"]["dice"] == pytest.approx(2 * 9 / 32) and rows["a"]["iou"] == pytest.approx(9 / 23)
    assert rows["a"]["status"] == "ok" and rows["a"]["hd95_unit"] == "pixel"
    assert (rows["b"]["dice"], rows["b"]["hd95"], rows["b"]["status"]) == (1.0, 0.0, "both_empty")
    assert rows["c"]["dice"] == 0.0 and math.isnan(rows["c"]["hd95"]) and rows["c"]["status"] == "empty_pred"
    summary = report.summaries["busi"]["per_class"][1]
    assert summary["dice"]["mean"] == pytest.approx((2 * 9 / 32 + 1.0 + 0.0) / 3) and summary["hd95"]["n_nan"] == 1
    assert "| busi | 3 |" in (tmp_path / "summary.md").read_text()
    assert len((tmp_path / "metrics_per_case.csv").read_text().splitlines()) == 1 + 3
    assert len((tmp_path / "busi_dice_raw.csv").read_text().splitlines()) == 1 + 3  # MONAI's per-case file
    assert "busi_hd95" in (tmp_path / "metrics.csv").read_text()
    assert [p.name for p in (tmp_path / "overlays").glob("*.png")] == ["a_overlay.png"]
