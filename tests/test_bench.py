"""The benchmark command on a tiny setting: it measures, prints and writes JSON."""

from __future__ import annotations

import json

from hybridseg.bench import bench


def test_bench_writes_forward_and_train_step_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench(networks=["braunetpp"], dtypes=["fp32", "bf16"], size=64, reps=1, train_reps=1, out=str(out))
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"]
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(rows))
    for r in rows:
        for key in ("forward", "train_step"):
            assert 0 < r[key]["min_ms"] <= r[key]["median_ms"] <= r[key]["max_ms"]
    assert "braunetpp" in capsys.readouterr().out
