"""The benchmark on a tiny setting: it measures, prints and writes complete JSON; setting selection."""

from __future__ import annotations

import json

import pytest
import torch

from hybridseg.tools import bench as B


@pytest.mark.slow
def test_bench_writes_latency_throughput_memory_flops_and_peak_fraction(tmp_path, capsys):
    out = tmp_path / "bench.json"
    doc = B.bench(
        networks=["braunetpp_tiny"],
        settings=["bf16", "channels_last"],
        batches=[1, 2],
        size=32,
        reps=2,
        train_reps=1,
        peak_n=128,
        out=str(out),
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    rows = doc["results"]
    fwd = [(r["setting"], r["batch"]) for r in rows if r["kind"] == "forward"]
    # fp32 is always measured first: it is the reference of the paired ratios
    assert fwd == [(s, b) for b in (1, 2) for s in ("fp32", "bf16", "channels_last")]
    assert [r["setting"] for r in rows if r["kind"] == "train_step"] == ["fp32", "bf16", "channels_last"]
    for r in rows:
        w = r["wall"]
        assert 0 < w["min_ms"] <= w["median_ms"] <= w["max_ms"] and w["reps"] >= 1
        assert r["throughput_img_s"] == pytest.approx(r["batch"] / w["median_ms"] * 1e3)
        assert r["gflops"] > 0 and 0 < r["achieved_tflops"] and r["fraction_of_peak"] > 0
        assert r["peak_tflops"] == doc["peaks"][r["peak_dtype"]]
        assert r["peak_memory_mib"] is None or r["peak_memory_mib"] >= 0
        assert r["ratio_vs_fp32"]["min"] <= r["ratio_vs_fp32"]["median"] <= r["ratio_vs_fp32"]["max"]
    by = {(r["kind"], r["setting"], r["batch"]): r for r in rows}
    # FLOPs are the network's, the same for every setting, proportional to the batch
    assert by["forward", "bf16", 2]["gflops"] == pytest.approx(2 * by["forward", "fp32", 1]["gflops"])
    assert by["forward", "fp32", 1]["ratio_vs_fp32"]["median"] == 1.0
    assert by["train_step", "fp32", 2]["gflops"] > 2 * by["forward", "fp32", 2]["gflops"]  # fwd + bwd
    assert doc["peaks"]["bfloat16"] > 0 and doc["meta"]["load_average_before"]
    assert "braunetpp_tiny" in capsys.readouterr().out


def test_flop_counter_counts_a_known_matmul_and_convolution():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert B.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert B.count_flops(lambda: conv(torch.randn(1, 3, 6, 6))) == 2 * 5 * 3 * 9 * 36


def test_cuda_only_and_uncompilable_settings_are_skipped_with_a_reason():
    names = ["fp32", "bf16", "fp16", "bf16_cuda_graphs", "compile", "bf16_weights"]
    run, skipped = B.select_settings(names, "cpu", compiler=False)
    assert run == ["fp32", "bf16", "bf16_weights"]
    assert skipped == {
        "fp16": "needs a CUDA device",
        "bf16_cuda_graphs": "needs a CUDA device",
        "compile": "torch.compile on CPU needs a C++ compiler; none found",
    }
    run, skipped = B.select_settings(names, "cpu", compiler=True)
    assert "compile" in run and "compile" not in skipped
    # on CUDA everything is attempted, compile too (inductor builds Triton kernels there)
    assert B.select_settings(names, "cuda", compiler=False) == (names, {})
    with pytest.raises(ValueError, match="unknown setting 'int4'"):
        B.select_settings(["int4"], "cpu")
    assert "compile" not in B.DEFAULT_SETTINGS  # opt-in: minutes of compile time on a small CPU


def test_cuda_request_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="cuda"):
        B.bench(networks=["braunetpp_tiny"], device="cuda", out=None)
