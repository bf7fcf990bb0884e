"""The demo's progress lines, its settings files and its figures (the full demo is run by hand: make demo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hybridseg.tools.demo import _COLOURS, DEMO_SETTINGS, TrainingProgress, contact_sheet, draw_curves, write_settings

# what MONAI's StatsHandler logs for the trainer (per iteration) and the evaluator (per validation)
ITER = "2026-12-02 07:00:00,000 - INFO - Epoch: {e}/3, Iter: {i}/10 -- train_loss: {loss:.4f} "
METRICS = "2026-12-02 07:00:00,000 - INFO - Epoch[{e}] Metrics -- val_mean_dice: {d:.4f} "


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fed(every: float = 1000.0) -> tuple[TrainingProgress, list[str]]:
    clock = Clock()
    progress, printed = TrainingProgress("busi", every=every, clock=clock), []
    for e in (1, 2):
        for i in range(1, 11):
            clock.t = 30 + 2.0 * ((e - 1) * 10 + i)  # 30 s start-up, then 2 s per step
            if line := progress.feed(ITER.format(e=e, i=i, loss=1.0 / (e * i))):
                printed.append(line)
        if line := progress.feed(METRICS.format(e=e, d=0.4 * e)):
            printed.append(line)
    return progress, printed


def test_progress_prints_epoch_step_elapsed_and_remaining_time_from_the_training_log():
    progress, printed = _fed()
    # a line at each new epoch and at each validation
    assert len(printed) == 4
    last = printed[-1]
    assert "[busi] epoch 2/3" in last and "step 20/30" in last and "val_mean_dice 0.8000" in last
    # 2 s per step since the first step (start-up not counted): 10 steps left -> 0:20
    assert "elapsed 1:10" in last and "remaining ~0:20" in last
    assert "remaining ?" in printed[0]  # one step seen: no rate yet
    assert progress.loss[-1] == (20, 0.05) and progress.metrics["val_mean_dice"] == [(1, 0.4), (2, 0.8)]


def test_progress_prints_at_least_every_interval_within_an_epoch():
    _, printed = _fed(every=5.0)  # 2 s per step: about every third step
    assert len(printed) > 8


def test_curves_and_contact_sheet_are_drawn_as_pngs(tmp_path):
    progress, _ = _fed()
    curves = draw_curves(progress, tmp_path / "curves.png")
    assert Image.open(curves).size[0] > 800  # two panels: loss, Dice
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    for case in ("case_a", "case_b", "case_c"):
        Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(overlays / f"{case}_overlay.png")
    (tmp_path / "m.csv").write_text(
        "case,class_name,protocol,dice\ncase_a,lesion,busi,0.9\ncase_b,lesion,busi,0.5\ncase_c,lesion,busi,nan\n"
    )
    sheet = Image.open(contact_sheet(overlays, tmp_path / "m.csv", tmp_path / "sheet.png", tile=100, columns=2))
    assert sheet.size == (420, 2 * (100 + 22) + 28)
    # the overlays are enlarged to the tile: gray 90 fills most of the first tile's width
    row = np.asarray(sheet.convert("L"))[28 + 50, :100]
    assert (row == 90).sum() >= 95
    assert contact_sheet(tmp_path / "nothing", tmp_path / "m.csv", tmp_path / "x.png") is None


def test_dice_curve_is_drawn_on_a_zero_to_one_scale_over_the_whole_run(tmp_path):
    progress = TrainingProgress("synapse")
    progress.max_epochs, progress.loss = 6, [(1, 1.5), (240, 0.2)]
    progress.metrics = {"val_mean_dice": [(3, 0.5), (6, 0.874)]}
    img = np.asarray(Image.open(draw_curves(progress, tmp_path / "curves.png")).convert("RGB")).astype(int)
    # Dice panel box (490, 40)-(840, 290): epoch e, Dice d sit at x = 490 + 350 e / 6, y = 290 - 250 d.
    dot = img[165 - 1 : 165 + 2, 665 - 1 : 665 + 2].reshape(-1, 3)  # epoch 3, Dice 0.5
    assert (np.abs(dot - _COLOURS[0]).sum(1) < 30).all()
    assert (np.abs(img[288, 491:839] - _COLOURS[0]).sum(1) > 100).all()  # nothing drawn at Dice 0


def test_demo_settings_are_written_as_config_files_with_the_network_part_apart(tmp_path):
    train, network = write_settings("braunetpp_synapse", tmp_path, {"max_epochs": 2, "n_win": 7})
    t, n = json.loads(train.read_text()), json.loads(network.read_text())
    assert t["max_epochs"] == 2 and t["n_win"] == 7 and t["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert n == {**DEMO_SETTINGS["braunetpp_synapse"]["network"], "n_win": 7}


def test_demo_settings_refuse_keys_the_bundle_does_not_define(tmp_path):
    # a stale key (the demo once set slices_per_volume after the sampler dropped it) changes nothing silently
    with pytest.raises(ValueError, match=r"\['slices_per_volume'\] are not keys of braunetpp_synapse"):
        write_settings("braunetpp_synapse", tmp_path, {"slices_per_volume": 4})
    for bundle in DEMO_SETTINGS:  # the demo's own settings all take effect
        write_settings(bundle, tmp_path)
