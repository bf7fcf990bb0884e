"""``pretrained`` in both train.json files: ``auto`` uses the cached files (one warning and a scratch start
when they are missing), ``required`` makes a missing file an error naming the fetch command, ``none`` starts
from scratch; the loader's report goes to the log. Tiny BRAU-Net++ widths keep the network builds fast."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from tests.bundles.conftest import error_text, train_config
from tests.bundles.test_training_robustness import TINY_NET
from tests.networks.test_braunetpp import _fake_biformer


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def biformer_file(tmp_path):
    """A BiFormer-layout checkpoint sized for TINY_NET, placed in a weights folder under the manifest's name."""
    folder = tmp_path / "weights"
    folder.mkdir()
    sd = _fake_biformer(TINY_NET["network_defs#braunetpp#embed_dims"], [1, 1, 1, 1])
    torch.save({"model": sd, "epoch": 300}, folder / "biformer_base_best.pth")
    return folder, sd


def test_braunetpp_auto_loads_the_cached_biformer_file_and_logs_the_report(biformer_file, caplog):
    folder, sd = biformer_file
    parser = train_config("braunetpp_synapse", **TINY_NET, weights_dir=str(folder), device="$torch.device('cpu')")
    assert parser["pretrained"] == "auto"  # the papers' setting is the default
    with caplog.at_level(logging.INFO):
        net = parser.get_parsed_content("network")
    assert torch.equal(net.state_dict()["encoder.0.downsample.conv1.weight"], sd["downsample_layers.0.0.weight"])
    logged = [r.getMessage() for r in caplog.records if "load_biformer_weights" in r.getMessage()]
    assert len(logged) == 1 and "tensors loaded" in logged[0] and "left at initialisation" in logged[0]
    assert not _warnings(caplog)


def test_braunetpp_auto_without_the_file_warns_once_and_builds_from_scratch(tmp_path, caplog):
    parser = train_config("braunetpp_synapse", **TINY_NET, weights_dir=str(tmp_path), device="$torch.device('cpu')")
    with caplog.at_level(logging.INFO):
        parser.get_parsed_content("network")
    (msg,) = _warnings(caplog)
    assert "biformer_base_best.pth" in msg and "from scratch" in msg
    assert f"python -m hybridseg weights fetch braunetpp_synapse --dir {tmp_path}" in msg


def test_braunetpp_required_without_the_file_is_an_error_naming_the_fetch_command(tmp_path):
    parser = train_config("braunetpp_synapse", **TINY_NET, weights_dir=str(tmp_path), pretrained="required")
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("network")
    text = error_text(info.value)
    assert "pretrained=required" in text and "biformer_base_best.pth" in text
    assert "python -m hybridseg weights fetch braunetpp_synapse" in text


def test_braunetpp_none_ignores_a_cached_file(biformer_file, caplog):
    folder, sd = biformer_file
    parser = train_config("braunetpp_synapse", **TINY_NET, weights_dir=str(folder), pretrained="none")
    with caplog.at_level(logging.INFO):
        net = parser.get_parsed_content("network")
    assert not torch.equal(net.state_dict()["encoder.0.downsample.conv1.weight"], sd["downsample_layers.0.0.weight"])
    assert not _warnings(caplog) and not any("tensors loaded" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("variant, swin", [("s", "swin_v2_t"), ("b", "swin_v2_s"), ("l", "swin_v2_b")])
def test_cfformer_picks_the_swin_file_of_its_variant_from_the_cache(tmp_path, variant, swin, caplog):
    files = {"resnet34": b"r", "swin_v2_t": b"t", "swin_v2_s": b"s", "swin_v2_b": b"b"}
    entries = []
    for name, body in files.items():
        (tmp_path / f"{name}.pth").write_bytes(body)
        entries.append(
            {"name": name, "file": f"{name}.pth", "url": "http://127.0.0.1:9/x", "licence": "l", "network": "cfformer"}
            | {"sha256": hashlib.sha256(body).hexdigest()}
        )
    manifest = tmp_path / "weights.json"
    manifest.write_text(json.dumps({"bundle": "cfformer_busi", "files": entries}))
    parser = train_config("cfformer_busi", variant=variant, weights_dir=str(tmp_path), weights_manifest=str(manifest))
    got = parser.get_parsed_content("pretrained_files")
    assert got == {"resnet34": str(tmp_path / "resnet34.pth"), "swin": str(tmp_path / f"{swin}.pth")}
    parser = train_config("cfformer_busi", variant=variant, weights_dir=str(tmp_path / "none"))
    with caplog.at_level(logging.WARNING):
        assert parser.get_parsed_content("pretrained_files") == {}
    (msg,) = _warnings(caplog)
    assert "resnet34-b627a593.pth" in msg and "python -m hybridseg weights fetch cfformer_busi" in msg


def test_evaluation_configs_do_not_load_pretrained_weights():
    """evaluate.json replaces every weight with the trained checkpoint: no ImageNet load, no warning."""
    from monai.bundle import ConfigParser

    from tests.bundles.conftest import bundle_files

    for bundle in ("cfformer_busi", "braunetpp_synapse"):
        files = bundle_files(bundle)
        parser = ConfigParser()
        parser.read_config([files["train"], files["evaluate"]])
        assert parser["pretrained"] == "none"
