"""Helpers the bundle configs call: bundle location, inference inputs, learning-rate schedule."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hybridseg.bundle import bundle_root, collect_inputs
from hybridseg.io import InputDataError
from tests.reference import REPO_ROOT


def test_bundle_root_is_found_from_the_repository_root_and_from_the_bundle_folder(monkeypatch):
    for cwd in (REPO_ROOT, REPO_ROOT / "bundles" / "cfformer_busi", REPO_ROOT / "bundles" / "braunetpp_synapse"):
        monkeypatch.chdir(cwd)
        assert bundle_root("cfformer_busi") == str(REPO_ROOT / "bundles" / "cfformer_busi")
        assert bundle_root("braunetpp_synapse") == str(REPO_ROOT / "bundles" / "braunetpp_synapse")


def test_inference_outputs_go_into_an_input_folder_only_when_asked(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(InputDataError, match="the output folder is an input folder"):
        collect_inputs(tmp_path, [".png"], output_dir=tmp_path)
    items = collect_inputs(tmp_path, [".png"], output_dir=tmp_path, allow_output_in_input_dir=True)
    assert items == [{"image": str(tmp_path / "a.png")}]


def test_inputs_whose_outputs_would_collide_are_refused(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / sub / "a.png")
    with pytest.raises(InputDataError, match="same output name"):
        collect_inputs([tmp_path / "x" / "a.png", tmp_path / "y" / "a.png"], [".png"])


@pytest.mark.parametrize("bundle", ["cfformer_busi", "braunetpp_synapse"])
def test_quick_recipe_states_a_budget_of_at_most_ten_minutes_that_the_trainer_enforces(bundle):
    from monai.bundle import ConfigParser

    configs = REPO_ROOT / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "quick.json")])
    assert 0 < parser["max_train_seconds"] <= 600
    budget = [h for h in parser["train#handlers"] if h.get("_target_") == "hybridseg.checkpointing.TrainingTimeBudget"]
    assert budget == [
        {
            "_target_": "hybridseg.checkpointing.TrainingTimeBudget",
            "seconds": "@max_train_seconds",
            "validator": "@validate#evaluator",
        }
    ]
    full = ConfigParser()
    full.read_config(str(configs / "train.json"))
    assert full["max_train_seconds"] is None  # the papers' recipes have no time limit


@pytest.mark.parametrize("bundle", ["cfformer_busi", "braunetpp_synapse"])
@pytest.mark.parametrize("extra", [[], ["quick.json"]])
def test_recipes_use_torchs_fused_optimizer_whose_update_equals_the_per_tensor_loop(bundle, extra):
    # the per-tensor loop (torch's CPU default) took a fifth of a demo step; the fused kernel does the same update
    import torch
    from monai.bundle import ConfigParser

    configs = REPO_ROOT / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in ["train.json", *extra]])
    torch.manual_seed(0)
    start, grads = torch.randn(3, 5), [torch.randn(3, 5) for _ in range(3)]
    results = []
    parser["optimizer#params"] = "$[torch.nn.Parameter(torch.zeros(1))]"
    configured = parser.get_parsed_content("optimizer")
    assert configured.defaults["fused"] is True
    for loop in ({}, {"fused": False, "foreach": False}):  # as configured, then torch's plain for-loop
        param = torch.nn.Parameter(start.clone())
        settings = {k: v for k, v in configured.defaults.items() if k != "decoupled_weight_decay"}  # AdamW's own
        optimizer = type(configured)([param], **{**settings, **loop})
        for g in grads:
            param.grad = g.clone()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
