"""The braunetpp_synapse bundle run through MONAI's ConfigWorkflow on tiny generated CT volumes."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundles.conftest import bundle_files, error_text, infer, train_config, train_then_evaluate

FILES = {**bundle_files("braunetpp_synapse"), "bundle": "braunetpp_synapse"}
# CPU-sized: 64 px slices (n_win 4 divides the 16/8/4 maps), 2 iterations per epoch.
TINY = {
    "image_size": [64, 64],
    "n_win": 4,
    "batch_size": 4,
    "epoch_length": 2,
    "max_epochs": 1,
    "val_interval": 1,
    "num_workers": 0,
    "sw_batch_size": 16,
}


@pytest.fixture(scope="module")
def trained(synapse_dir, tmp_path_factory):
    return train_then_evaluate("braunetpp_synapse", synapse_dir, tmp_path_factory.mktemp("braunetpp_run"), **TINY)


def test_training_writes_checkpoints_and_logs(trained):
    assert (trained / "models" / "model.pt").is_file()
    last = torch.load(trained / "models" / "checkpoint_last.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(last)
    assert (trained / "eval" / "train.log").read_text().strip()


def test_evaluation_writes_rows_per_case_organ_and_protocol(trained, synapse_dir):
    datalist = json.loads((synapse_dir / "datalist.json").read_text())
    cases = {t["case"] for t in datalist["test"]}
    with open(trained / "test_eval" / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == cases
    assert len(rows) == len(cases) * 8 * 2  # 8 organs, paper + physical
    organs = {r["class_name"] for r in rows}
    assert "aorta" in organs and "pancreas" in organs
    for r in rows:
        if r["protocol"] == "paper":
            assert r["hd95_unit"] == "voxel" and r["dice"] != "nan" and r["hd95"] != "nan"
        else:
            assert r["hd95_unit"] == "mm"
            if r["status"] != "ok":
                assert r["hd95"] == "nan"
    table = (trained / "test_eval" / "summary.md").read_text()
    assert "| paper |" in table and "| physical |" in table and "aorta" in table
    assert list((trained / "test_eval" / "overlays").glob("*.png"))


def test_inference_writes_label_volume_on_the_input_grid(trained, synapse_dir, tmp_path):
    src = sorted((synapse_dir / "img").glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "out"
    infer(FILES["bundle"], inputs, out, trained / "models" / "model.pt", image_size=[64, 64], n_win=4)
    stem = src.name[: -len(".nii.gz")]
    seg = nib.load(out / f"{stem}_seg.nii.gz")
    ref = nib.load(src)
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= set(range(9))
    sidecar = json.loads((out / f"{stem}_seg.json").read_text())
    assert sidecar["labels"]["1"] == "aorta"


def test_training_on_a_tiny_set_lowers_the_loss(synapse_dir, tmp_path):
    parser = train_config(
        FILES["bundle"],
        **{
            **TINY,
            "dataset_dir": str(synapse_dir),
            "ckpt_dir": str(tmp_path / "m"),
            "output_dir": str(tmp_path / "e"),
            "epoch_length": 6,
            "learning_rate": 0.01,
        },
    )
    parser["train#handlers"] = parser["train#handlers"][:1]  # just the LR schedule
    torch.manual_seed(0)
    net = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    # fixed slices through the training volumes, preprocessed like validation
    tf = parser.get_parsed_content("validate#preprocessing")
    vols = [tf(d) for d in parser.get_parsed_content("train#data")]
    import torch.nn.functional as F

    def mean_loss() -> float:
        net.eval()
        losses = []
        with torch.no_grad():
            for v in vols:
                img = v["image"].as_tensor()[..., ::4].permute(3, 0, 1, 2)
                lab = v["label"].as_tensor()[..., ::4].permute(3, 0, 1, 2)
                img = F.interpolate(img, size=(64, 64), mode="bicubic")
                lab = F.interpolate(lab, size=(64, 64), mode="nearest")
                losses.append(loss_fn(net(img), lab).item())
        return float(np.mean(losses))

    before = mean_loss()
    parser.get_parsed_content("train#trainer").run()
    after = mean_loss()
    assert after < before, f"loss did not drop: {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("make, problem", [("2d", "expected a 3D volume"), ("nan", "NaN")])
def test_inference_bad_volume_fails_naming_the_file(trained, tmp_path, make, problem):
    inputs = tmp_path / "in"
    inputs.mkdir()
    arr = np.zeros((32, 32), np.int16) if make == "2d" else np.full((32, 32, 8), np.nan, np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(inputs / "bad.nii.gz"))
    with pytest.raises(Exception) as info:
        infer(FILES["bundle"], inputs, tmp_path / "out", trained / "models" / "model.pt", image_size=[64, 64], n_win=4)
    text = error_text(info.value)
    assert problem in text and "bad.nii.gz" in text


def _write_dicom_series(folder, volume_zyx: np.ndarray) -> None:
    """A CT series of 2D DICOM slices written with ITK (GDCM), one file per axial slice."""
    import itk

    folder.mkdir(parents=True)
    image = itk.image_from_array(volume_zyx.astype(np.int16))
    writer = itk.ImageSeriesWriter[itk.Image[itk.SS, 3], itk.Image[itk.SS, 2]].New()
    writer.SetInput(image)
    writer.SetImageIO(itk.GDCMImageIO.New())
    writer.SetFileNames([str(folder / f"slice{i:03d}.dcm") for i in range(volume_zyx.shape[0])])
    writer.Update()


def test_inference_reads_a_dicom_series_folder_and_writes_its_grid(trained, synapse_dir, tmp_path):
    ct = np.asarray(nib.load(sorted((synapse_dir / "img").glob("*.nii.gz"))[0]).dataobj)  # (x, y, z) HU
    _write_dicom_series(tmp_path / "in" / "series1", ct.transpose(2, 1, 0))
    out = tmp_path / "out"
    infer(FILES["bundle"], tmp_path / "in", out, trained / "models" / "model.pt", image_size=[64, 64], n_win=4)
    seg = nib.load(out / "series1_seg.nii.gz")
    assert seg.shape == ct.shape
    assert json.loads((out / "series1_seg.json").read_text())["source"].endswith("series1")


def test_lr_schedule_is_poly_decay_per_iteration_to_zero():
    """torch's PolynomialLR over epoch_length * max_epochs iterations: lr (1 - t/T)^0.9, then 0."""
    params = "$[torch.nn.Parameter(torch.zeros(1))]"  # the schedule does not depend on the network
    parser = train_config("braunetpp_synapse", epoch_length=93, max_epochs=4, **{"optimizer#params": params})
    optimizer, scheduler = parser.get_parsed_content("optimizer"), parser.get_parsed_content("lr_scheduler")
    total, lrs = 93 * 4, []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:total] == pytest.approx([0.05 * (1 - t / total) ** 0.9 for t in range(total)], rel=1e-12, abs=0)
    assert lrs[total] == 0.0


@pytest.mark.parametrize("side, n_win, shift", [(224, 7, 44.8), (96, 3, 19.2), (256, 8, 51.2)])
def test_n_win_and_translation_follow_image_size(side, n_win, shift):
    """n_win = side / 32 (the published 224 / 7) and the augmentation's translation is 20 % of the side."""
    parser = train_config("braunetpp_synapse", image_size=[side, side])
    assert parser.get_parsed_content("n_win") == n_win
    translate = [t for t in parser.get("train#random_transforms")[-2]["transforms"] if "translate_range" in t]
    parser.update({"translate_probe": translate[0]["translate_range"]})
    assert parser.get_parsed_content("translate_probe") == [shift, shift]
    assert tuple(parser.get_parsed_content("hu_window")) == (-125, 275)


@pytest.mark.parametrize("windowed", [False, True])
def test_hu_window_scales_to_unit_range_and_is_skipped_for_windowed_data(windowed):
    """MONAI's ScaleIntensityRanged clips to [-125, 275] HU and scales to [0, 1]; it is left out (``_disabled_``)
    when the datalist says the data is already windowed, so the window is never applied twice."""
    block = {"name": "transunet_8organ", "source": "btcv13", "map": {"8": 1}}
    parser = train_config(
        "braunetpp_synapse", datalist_config={"label_mapping": block, "intensity": {"windowed": windowed}}
    )
    scale = [t for t in parser.get_parsed_content("volume_transforms") if type(t).__name__ == "ScaleIntensityRanged"]
    if windowed:
        assert not scale
        return
    x = {"image": torch.tensor([[-1000.0, -125.0, 75.0, 275.0, 3000.0]])}
    assert scale[0](x)["image"].tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0]]


@pytest.mark.slow
def test_inference_on_onnxruntime_writes_the_labels_of_eager_torch(trained, synapse_dir, tmp_path):
    src = sorted((synapse_dir / "img").glob("*.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / src.name).write_bytes(src.read_bytes())
    ckpt = trained / "models" / "model.pt"
    labels = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        infer(FILES["bundle"], tmp_path / "in", out, ckpt, image_size=[64, 64], n_win=4, amp=False, backend=backend)
        labels[backend] = np.asarray(nib.load(out / src.name.replace(".nii.gz", "_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels["onnxruntime"], labels["torch"])
    # the exported graph is cached next to the checkpoint, for the size the network ran at
    assert [p.name.split("-")[-1] for p in ckpt.parent.glob("braunetpp-*.onnx")] == ["1x64x64.onnx"]


@pytest.mark.slow
def test_evaluation_on_int8_calibrates_on_training_volumes_and_reports_metrics(trained, synapse_dir, tmp_path):
    from tests.bundles.conftest import run_workflow

    common = {**TINY, "dataset_dir": str(synapse_dir), "ckpt_dir": str(trained / "models")}
    run_workflow(
        "train",
        [FILES["train"], FILES["evaluate"]],
        FILES["meta_file"],
        FILES["logging_file"],
        output_dir=str(tmp_path / "int8"),
        backend="onnxruntime_int8",
        num_calibration=2,
        **common,
    )
    assert list((trained / "models").glob("braunetpp-*-1x64x64-int8.onnx"))
    ours = json.loads((tmp_path / "int8" / "summary_paper.json").read_text())["over_classes"]["dice"]["mean"]
    eager = json.loads((trained / "test_eval" / "summary_paper.json").read_text())["over_classes"]["dice"]["mean"]
    assert abs(ours - eager) < 0.05, f"int8 mean Dice {ours:.3f} vs eager {eager:.3f}"


def test_unknown_backend_fails_naming_the_choices(trained, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 4), np.int16), np.eye(4)), str(src / "ct.nii.gz"))
    with pytest.raises(Exception) as info:
        infer(FILES["bundle"], src, tmp_path / "out", trained / "models" / "model.pt", backend="tensorrt")
    assert "unknown inference backend 'tensorrt'" in error_text(info.value)
    assert "torch, onnxruntime, onnxruntime_int8" in error_text(info.value)


def test_unet_baseline_trains_evaluates_and_infers_with_the_same_data_and_reports(synapse_dir, tmp_path):
    """``network_name unet``: MONAI's BasicUNet through the same train / evaluate / inference configs; the
    BiFormer weights path is not applied to it (a missing file would otherwise stop the run)."""
    unet = {**TINY, "network_name": "unet", "pretrained_biformer": str(tmp_path / "absent.pth")}
    run = train_then_evaluate(FILES["bundle"], synapse_dir, tmp_path / "run", **unet)
    state = torch.load(run / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("conv_0.") for k in state)
    with open(run / "test_eval" / "metrics_per_case.csv") as f:
        assert {r["protocol"] for r in csv.DictReader(f)} == {"paper", "physical"}
    src = sorted((synapse_dir / "img").glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / src.name).write_bytes(src.read_bytes())
    infer(
        FILES["bundle"], inputs, tmp_path / "out", run / "models" / "model.pt", network_name="unet", image_size=[64, 64]
    )
    assert nib.load(tmp_path / "out" / src.name.replace(".nii.gz", "_seg.nii.gz")).shape == nib.load(src).shape


def _epoch_batch_sizes(parser) -> tuple[int, list[int]]:
    loader = parser.get_parsed_content("train#dataloader")
    return parser.get_parsed_content("epoch_length"), [len(b["image"]) for b in loader]


def test_every_training_iteration_holds_exactly_batch_size_slices(synapse_dir, tmp_path):
    """The default recipe's 24 slices per iteration, counted over one epoch of train.json's own loader: 3
    training volumes x 32 slices = 96 slices -> 4 iterations of 24 (the official trainer's uniform draw)."""
    overrides = {"dataset_dir": str(synapse_dir), "image_size": [64, 64], "num_workers": 0}
    parser = train_config(FILES["bundle"], **overrides, ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"))
    n_slices = len(parser.get_parsed_content("train#dataset"))
    assert parser.get_parsed_content("batch_size") == 24 and n_slices == 96
    epoch_length, sizes = _epoch_batch_sizes(parser)
    assert sizes == [24] * 4 and epoch_length == 4
    first = next(iter(parser.get_parsed_content("train#dataloader")))
    assert first["image"].shape == (24, 1, 64, 64) and first["label"].dtype == torch.long


def test_under_ddp_the_ranks_together_hold_batch_size_slices_per_iteration(synapse_dir, tmp_path, monkeypatch):
    """multi_gpu_train.json on 2 ranks (sampler built per rank without processes): 12 slices per rank and
    iteration, i.e. the paper's 24 per optimiser step, and the same number of iterations on both ranks."""
    from monai.bundle import ConfigParser

    import hybridseg.data.slices as slices

    monkeypatch.setattr(slices, "world_size", lambda: 2)
    files = bundle_files("braunetpp_synapse")
    per_rank = []
    for rank in range(2):
        parser = ConfigParser()
        parser.read_config([files["train"], files["train"].replace("train.json", "multi_gpu_train.json")])
        parser.update(
            {
                "dataset_dir": str(synapse_dir),
                "image_size": [64, 64],
                "num_workers": 0,
                "train#sampler#num_replicas": 2,
                "train#sampler#rank": rank,
            }
        )
        per_rank.append(_epoch_batch_sizes(parser))
    assert per_rank[0] == per_rank[1] == (4, [12] * 4)


def test_num_val_0_trains_on_every_non_test_case_and_keeps_the_last_model(synapse_dir, tmp_path):
    """The paper's data exactly: ``datalist_synapse --num_val 0`` leaves no validation case, so training uses
    all non-test cases, never validates, and writes models/model.pt from the last state, which evaluation uses."""
    from hybridseg.data.synapse import datalist_synapse

    datalist = datalist_synapse(root=str(synapse_dir), out=str(tmp_path / "datalist_all.json"), seed=0, num_val=0)
    content = json.loads(open(datalist).read())
    assert len(content["training"]) == 4 and content["validation"] == []
    work = train_then_evaluate(
        "braunetpp_synapse", synapse_dir, tmp_path / "run", **{**TINY, "datalist": datalist, "max_epochs": 2}
    )
    model = torch.load(work / "models" / "model.pt", weights_only=True)
    last = torch.load(work / "models" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 4 and last["best_model"]["best"] == float("-inf")  # never validated
    assert model.keys() == last["model"].keys()
    assert all(torch.equal(model[k], last["model"][k]) for k in model)
    assert "val_mean_dice" not in (work / "eval" / "train.log").read_text()
    assert (work / "test_eval" / "summary_paper.json").is_file()


@pytest.mark.parametrize("use_sccsa, num_skips", [(True, 3), (False, 3), (True, 1), (False, 0)])
def test_ablation_config_keys_build_the_ablated_network(use_sccsa, num_skips):
    from hybridseg.networks.braunetpp import SCCSA

    with torch.device("meta"):
        net = train_config(FILES["bundle"], use_sccsa=use_sccsa, num_skips=num_skips).get_parsed_content("network_def")
    assert [level.use_skip for level in net.decoder] == [i < num_skips for i in range(3)]
    assert sum(isinstance(m, SCCSA) for m in net.modules()) == (num_skips if use_sccsa else 0)
