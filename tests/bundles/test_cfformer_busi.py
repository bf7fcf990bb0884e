"""The cfformer_busi bundle through MONAI's ConfigWorkflow on tiny generated data: train, evaluate, infer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bundles.conftest import bundle_files, error_text, infer, train_config, train_then_evaluate

FILES = {**bundle_files("cfformer_busi"), "bundle": "cfformer_busi"}
# CPU-sized settings: smallest variant, 64 px, one epoch of batch 2.
TINY = {
    "variant": "s",
    "image_size": [64, 64],
    "batch_size": 2,
    "max_epochs": 1,
    "warmup_epochs": 0,
    "num_workers": 0,
    "amp": True,
}


@pytest.fixture(scope="module")
def trained(busi_dir, tmp_path_factory):
    """Train one epoch, then evaluate on the test split; returns the output folders."""
    return train_then_evaluate("cfformer_busi", busi_dir, tmp_path_factory.mktemp("cfformer_run"), **TINY)


def test_training_writes_best_and_last_checkpoints_and_logs(trained):
    assert (trained / "models" / "model.pt").is_file()
    last = torch.load(trained / "models" / "checkpoint_last.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(last)
    assert (trained / "eval" / "train.log").read_text().strip()
    assert list((trained / "eval").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_evaluation_writes_one_csv_row_per_test_image_with_metrics_in_range(trained, busi_dir):
    test_items = json.loads((busi_dir / "datalist.json").read_text())["test"]
    with open(trained / "test_eval" / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    # each image twice: at its original size and on the network grid (image_size), each named
    assert sorted(r["grid"] for r in rows) == sorted(["original", "64x64"] * len(test_items))
    assert {r["case"] for r in rows} == {Path(t["image"]).name.rsplit(".", 1)[0] for t in test_items}
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["iou"]) <= 1.0
        assert r["hd95"] == "nan" and r["status"] != "ok" or float(r["hd95"]) >= 0
    summary = json.loads((trained / "test_eval" / "summary_busi.json").read_text())
    assert 0.0 <= summary["over_classes"]["dice"]["mean"] <= 1.0 and summary["grid"] == "original"
    assert json.loads((trained / "test_eval" / "summary_busi_grid.json").read_text())["grid"] == "64x64"
    assert list((trained / "test_eval" / "overlays").glob("*_overlay.png"))


def test_inference_writes_masks_at_each_input_size(trained, busi_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    # different sizes and both gray and RGB inputs
    Image.fromarray(np.full((80, 112), 90, np.uint8)).save(inputs / "gray.png")
    Image.fromarray(np.full((70, 50, 3), 120, np.uint8)).save(inputs / "rgb.png")
    out = tmp_path / "out"
    infer(FILES["bundle"], inputs, out, trained / "models" / "model.pt", variant="s", image_size=[64, 64])
    assert np.asarray(Image.open(out / "gray_mask.png")).shape == (80, 112)
    assert np.asarray(Image.open(out / "rgb_mask.png")).shape == (70, 50)
    assert set(np.unique(np.asarray(Image.open(out / "gray_mask.png")))) <= {0, 255}
    assert (out / "gray_overlay.png").is_file()
    assert sorted(p.name for p in inputs.iterdir()) == ["gray.png", "rgb.png"], "inputs were touched"


@pytest.mark.parametrize(
    "make_bad, problem",
    [
        (lambda d: (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "broken.png"),
        (lambda d: None, "no input images"),
    ],
    ids=["unreadable_png", "empty_folder"],
)
def test_inference_bad_input_fails_naming_the_file_and_writes_nothing(trained, tmp_path, make_bad, problem):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(inputs / "good.png")
    if problem == "no input images":
        (inputs / "good.png").unlink()
    make_bad(inputs)
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        infer(FILES["bundle"], inputs, out, trained / "models" / "model.pt", variant="s", image_size=[64, 64])
    assert problem in error_text(info.value)
    assert not out.exists() or not any(out.rglob("*")), "partial outputs were written"


def test_inference_refuses_3d_nifti_where_2d_is_expected(trained, tmp_path):
    import nibabel as nib

    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.float32), np.eye(4)), str(inputs / "vol.nii.gz"))
    with pytest.raises(Exception) as info:
        infer(
            FILES["bundle"], inputs, tmp_path / "out", trained / "models" / "model.pt", variant="s", image_size=[64, 64]
        )
    assert "expected a 2D image" in error_text(info.value) and "vol.nii.gz" in error_text(info.value)


def test_one_training_epoch_lowers_the_loss(busi_dir, tmp_path):
    """Learning, not just running: the loss over the training images drops after one epoch."""
    parser = train_config(
        FILES["bundle"],
        **{
            **TINY,
            "dataset_dir": str(busi_dir),
            "ckpt_dir": str(tmp_path / "m"),
            "output_dir": str(tmp_path / "e"),
            "learning_rate": 1e-3,
        },
    )
    parser["train#handlers"] = parser["train#handlers"][:1]  # just the LR schedule: no validation, no files
    torch.manual_seed(0)
    net = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    from monai.data import DataLoader, Dataset

    eval_tf = parser.get_parsed_content("validate#preprocessing")
    data = parser.get_parsed_content("train#data")
    loader = DataLoader(Dataset(data, eval_tf), batch_size=4)

    def mean_loss() -> float:
        # BatchNorm on batch statistics, the rest in eval mode (no stochastic depth). After one epoch of
        # 7 iterations the running averages still hold mostly their initial (0, 1), so a plain eval-mode
        # loss measures those rather than what was learnt: it rises or falls with the random draws, in
        # fp32 as in bf16 (measured 16 -> 46 and 16 -> 111 in fp32, 16 -> 68 and 16 -> 130 in bf16, while
        # this loss fell 2.61 -> 0.77 in fp32 and 2.61 -> 0.83 in bf16 in the same runs).
        net.eval()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()  # updates the running averages too, which nothing here reads
        with torch.no_grad():
            return float(np.mean([loss_fn(net(b["image"]), b["label"]).item() for b in loader]))

    before = mean_loss()
    parser.get_parsed_content("train#trainer").run()
    after = mean_loss()
    assert after < before, f"loss did not drop: {before:.4f} -> {after:.4f}"


def _lr_sequence(parser, steps: int) -> list[float]:
    """Learning rates the config's optimizer sees at steps 0..steps-1 under its lr_scheduler."""
    optimizer, scheduler = parser.get_parsed_content("optimizer"), parser.get_parsed_content("lr_scheduler")
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup", [10, 1, 0])
def test_lr_schedule_is_linear_warmup_then_poly_decay_to_zero(warmup):
    """torch's LinearLR then PolynomialLR (SequentialLR): (t+1)/w during the warm-up, then (1 - t'/T')^0.9."""
    total, base = 130, 3e-4
    params = "$[torch.nn.Parameter(torch.zeros(1))]"  # the schedule does not depend on the network
    parser = train_config("cfformer_busi", max_epochs=total, warmup_epochs=warmup, **{"optimizer#params": params})
    expected = [(t + 1) / warmup if t < warmup else (1 - (t - warmup) / (total - warmup)) ** 0.9 for t in range(total)]
    lrs = _lr_sequence(parser, total + 2)
    assert lrs[:total] == pytest.approx([base * f for f in expected], rel=1e-12, abs=0)
    assert lrs[total:] == [0.0, 0.0]


def test_config_derives_nothing_by_hand_imagenet_statistics_come_from_the_runtime():
    parser = train_config("cfformer_busi", dataset_dir="/nowhere")
    norm = parser.get_parsed_content("network_input_transforms")[-1]
    assert tuple(norm.normalizer.subtrahend) == (0.485, 0.456, 0.406)
    assert tuple(norm.normalizer.divisor) == (0.229, 0.224, 0.225)


def test_unet_baseline_trains_evaluates_and_infers_with_the_same_data_and_reports(busi_dir, tmp_path):
    """``network_name unet``: MONAI's BasicUNet through the same train / evaluate / inference configs; the
    hybrid's ImageNet paths are not applied to it (a missing file would otherwise stop the run)."""
    unet = {**TINY, "network_name": "unet", "pretrained_resnet34": str(tmp_path / "absent.pth")}
    run = train_then_evaluate(FILES["bundle"], busi_dir, tmp_path / "run", **unet)
    state = torch.load(run / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("conv_0.") for k in state) and not any("swin" in k for k in state)
    summary = json.loads((run / "test_eval" / "summary_busi.json").read_text())
    assert 0.0 <= summary["over_classes"]["dice"]["mean"] <= 1.0
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((80, 112), 90, np.uint8)).save(inputs / "gray.png")
    infer(
        FILES["bundle"], inputs, tmp_path / "out", run / "models" / "model.pt", network_name="unet", image_size=[64, 64]
    )
    assert np.asarray(Image.open(tmp_path / "out" / "gray_mask.png")).shape == (80, 112)


def test_unknown_network_name_fails_naming_the_choices(busi_dir, tmp_path):
    parser = train_config(FILES["bundle"], **TINY, network_name="unet3", dataset_dir=str(busi_dir))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("network_def")
    assert "'unet3' is not one of: cfformer, unet" in error_text(info.value)


@pytest.mark.parametrize(
    "overrides, fusion",
    [({"cfca": False}, ("NoChannelExchange", "XFF")), ({"xff": False}, ("CFCA", "PlainFusion")), ({}, ("CFCA", "XFF"))],
)
def test_ablation_config_keys_build_the_ablated_network(overrides, fusion):
    with torch.device("meta"):
        net = train_config("cfformer_busi", **overrides).get_parsed_content("network_def")
    assert (type(net.encoder.cfca1).__name__, type(net.encoder.xff1).__name__) == fusion


@pytest.mark.parametrize("encoder, cls", [("cnn", "CNNEncoder"), ("transformer", "TransformerEncoder")])
def test_encoder_config_key_builds_the_single_branch_ablations(encoder, cls):
    with torch.device("meta"):
        net = train_config("cfformer_busi", encoder=encoder).get_parsed_content("network_def")
    assert type(net.encoder).__name__ == cls


def test_a_datalist_without_validation_part_trains_and_keeps_the_last_model(busi_dir, tmp_path):
    """``datalist_busi --split 0.8 0 0.2``: no validation, so models/model.pt is the model after the last epoch."""
    from hybridseg.data.busi import datalist_busi

    datalist = datalist_busi(root=str(busi_dir), out=str(tmp_path / "no_val.json"), seed=0, split=(0.8, 0.0, 0.2))
    assert json.loads(open(datalist).read())["validation"] == []
    work = train_then_evaluate("cfformer_busi", busi_dir, tmp_path / "run", **{**TINY, "datalist": datalist})
    model = torch.load(work / "models" / "model.pt", weights_only=True)
    last = torch.load(work / "models" / "checkpoint_last.pt", weights_only=True)
    assert all(torch.equal(model[k], last["model"][k]) for k in last["model"])
    assert (work / "test_eval" / "summary_busi.json").is_file()
