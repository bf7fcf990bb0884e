"""ci/bench_reference.py (run by hand): what it says when the reference checkouts are missing or wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "ci" / "bench_reference.py"


@pytest.fixture(scope="module")
def bench_reference():
    spec = importlib.util.spec_from_file_location("bench_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_reference"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_reference", None)


def test_absent_checkouts_are_named_and_the_script_exits_2_without_timing(bench_reference, tmp_path, capsys):
    missing = tmp_path / "no_such_checkout"
    assert bench_reference.main(["--braunetpp", str(missing), "--cfformer", str(missing)]) == 2
    out = capsys.readouterr().out
    assert f"braunetpp: reference checkout {missing} is absent" in out
    assert f"cfformer_b: reference checkout {missing} is absent" in out
    assert "no reference checkout to compare against" in out


def test_no_arguments_says_which_option_each_network_needs(bench_reference, capsys):
    assert bench_reference.main([]) == 2
    out = capsys.readouterr().out
    assert "--braunetpp PATH" in out and "--cfformer PATH" in out


def test_a_folder_without_the_authors_files_is_refused_naming_what_is_missing(bench_reference, tmp_path):
    (tmp_path / "networks").mkdir()
    folder, why = bench_reference.find_reference("braunetpp", str(tmp_path))
    assert folder is None and "no networks/bra_unet.py" in why
    folder, why = bench_reference.find_reference("cfformer_b", str(tmp_path))
    assert folder is None and "CFFormer.py and Attention.py" in why


def test_the_cfformer_model_folder_is_found_below_a_repository_root(bench_reference, tmp_path):
    model_dir = tmp_path / "models" / "Hybrid" / "CFFormer"
    model_dir.mkdir(parents=True)
    (model_dir / "CFFormer.py").write_text("")
    (model_dir / "Attention.py").write_text("")
    assert bench_reference.find_reference("cfformer_b", str(tmp_path)) == (model_dir, "")
    (tmp_path / "networks").mkdir()
    (tmp_path / "networks" / "bra_unet.py").write_text("")
    assert bench_reference.find_reference("braunetpp", str(tmp_path)) == (tmp_path, "")


def test_ours_inference_under_amp_computes_what_autocast_alone_computes(bench_reference):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 1, 16, 16)
    for amp in (False, True):  # True: bf16 weight copies where the CPU has native bf16, else the model as it is
        with torch.no_grad(), bench_reference.ours_autocast(amp):
            assert torch.equal(bench_reference.ours_inference(net, amp)(x), net(x))


def test_ours_inference_on_onnxruntime_runs_the_export_made_in_the_given_folder(bench_reference, tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 1, 16, 16)
    infer = bench_reference.ours_inference(net, False, "onnxruntime", str(tmp_path), threads=1)
    with torch.no_grad():
        got, want = infer(x), net(x)
    assert [f.suffix for f in tmp_path.iterdir()] == [".onnx"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_an_onnxruntime_backend_is_refused_with_same_process_naming_why(bench_reference, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_reference.main(["--braunetpp", str(tmp_path), "--same-process", "--ours-backend", "onnxruntime"])
    assert exc.value.code == 2
    assert "without ONNX Runtime" in capsys.readouterr().err
