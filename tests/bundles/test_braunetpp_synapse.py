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
    "slices_per_volume": 2,
    "volumes_per_batch": 2,
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
