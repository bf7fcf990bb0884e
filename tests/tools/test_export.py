"""The Model Zoo's verification commands, offline, and the TorchScript / ONNX exports of both networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hybridseg.io import InputDataError
from hybridseg.schemas import METADATA_SCHEMA
from hybridseg.tools.export import build_network, export_torchscript
from hybridseg.tools.package import verify_metadata
from tests.reference import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"
NAMES = ["cfformer_busi", "braunetpp_synapse"]
# CPU-sized overrides that keep each bundle's network class: CFFormer's smallest variant at 64 px;
# BRAU-Net++ with narrow levels at 64 px (n_win 4 divides its 16/8/4 maps). The second size is one every
# export must also take, traced ones included: CFFormer any multiple of 32; BRAU-Net++ one with the same
# routing padding pattern as the export size (every map still a multiple of n_win, see hybridseg.tools.export).
# PADDED_SIZE needs routing padding (96 px: the 6 x 6 level-2 map is padded to 8 for n_win 4): scripted
# exports take it, traced ones made at 64 px do not.
PADDED_SIZE = [1, 1, 96, 96]
TINY = {
    "cfformer_busi": ({"variant": "s", "image_size": [64, 64]}, [1, 3, 96, 128]),
    "braunetpp_synapse": (
        {"image_size": [64, 64], "n_win": 4, "network_defs#braunetpp#embed_dims": [32, 64, 128, 256]},
        [1, 1, 128, 128],
    ),
}


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _meta(name: str):
    return BUNDLES / name / "configs" / "metadata.json"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_verify_metadata_command_passes_with_the_local_schema(name):
    r = _run(
        "-m", "monai.bundle", "verify_metadata", "--meta_file", str(_meta(name)), "--filepath", str(METADATA_SCHEMA)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metadata is verified with no error" in r.stdout + r.stderr


@pytest.mark.slow
def test_verify_metadata_command_fails_when_a_required_field_is_removed(tmp_path):
    meta = json.loads(_meta("cfformer_busi").read_text())
    del meta["copyright"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta, indent=4))
    r = _run("-m", "monai.bundle", "verify_metadata", "--meta_file", str(bad), "--filepath", str(METADATA_SCHEMA))
    assert r.returncode != 0
    assert "'copyright' is a required property" in r.stdout + r.stderr


@pytest.mark.parametrize(
    "path",
    [
        ("version",),
        ("changelog",),
        ("required_packages_version",),
        ("eval_metrics",),
        ("network_data_format", "inputs", "image", "modality"),
        ("network_data_format", "outputs", "pred", "channel_def"),
        ("network_data_format", "inputs", "image", "spatial_shape"),
    ],
)
def test_local_schema_rejects_metadata_without_each_required_field(path, tmp_path):
    meta = json.loads(_meta("braunetpp_synapse").read_text())
    node = meta
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta, indent=4))
    with pytest.raises(InputDataError, match=path[-1]) as err:
        verify_metadata(bad)
    assert str(bad) in str(err.value)


def test_metadata_whose_version_has_no_changelog_entry_is_rejected(tmp_path):
    meta = json.loads(_meta("cfformer_busi").read_text())
    meta["version"] = "0.2.0"
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta, indent=4))
    with pytest.raises(InputDataError, match="0.2.0 has no changelog entry"):
        verify_metadata(bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_verify_net_in_out_passes_with_each_bundles_inference_config_and_real_network(name):
    # The published network at the metadata's 224 x 224 input, as the zoo's CI runs it.
    from monai.bundle import verify_net_in_out

    bundle = BUNDLES / name
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """Seeded initial weights of each bundle's CPU-sized network, saved as a bundle checkpoint."""
    out = {}
    for name, (overrides, _) in TINY.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name) / "model.pt"
        torch.save(build_network(BUNDLES / name, **overrides).state_dict(), path)
        out[name] = path
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_export_command_writes_torchscript_and_onnx_that_match_the_eager_network(name, tiny_ckpts, tmp_path):
    import onnxruntime as ort

    from hybridseg.tools.cli import main

    overrides, second = TINY[name]
    flags = [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    out = tmp_path / "export"
    main(
        [
            "export",
            str(BUNDLES / name),
            "--out",
            str(out),
            "--ckpt",
            str(tiny_ckpts[name]),
            "--onnx",
            f"--check_shapes=[{second}]",
            *flags,
        ]
    )

    net = build_network(BUNDLES / name, tiny_ckpts[name], **overrides)
    files = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(out / "model.ts"), _extra_files=files)
    assert isinstance(ts, torch.jit.RecursiveScriptModule) and "forward" in ts._c._method_names()
    # ckpt_export embeds the bundle's configs, which the MONAI Deploy operator reads back.
    assert json.loads(files["metadata.json"])["name"] == json.loads(_meta(name).read_text())["name"]
    assert "network_def" in json.loads(files["inference.json"])
    assert (out / "model.ts").stat().st_mode & 0o777 == 0o644
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    first = [1, second[1], *overrides["image_size"]]
    for shape in (first, second):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref = net(x)
            torch.testing.assert_close(ts(x), ref)  # the scripted graph runs the eager ops: float32 tolerances
        (got,) = session.run(["pred"], {"image": x.numpy()})
        assert got.shape == tuple(ref.shape)
        # onnxruntime fuses and reorders float ops; relative to the logits' range.
        assert np.abs(got - ref.numpy()).max() <= 1e-4 + 1e-3 * ref.abs().max().item()
    if name == "braunetpp_synapse":
        # The scripted export decides the routing padding per input; a trace made at 64 px froze "no padding".
        x = torch.randn(*PADDED_SIZE, generator=torch.Generator().manual_seed(7))
        traced_file = export_torchscript(
            BUNDLES / name, tmp_path / "traced.ts", tiny_ckpts[name], use_trace=True, network=net, **overrides
        )
        traced_ts = torch.jit.load(str(traced_file))
        with torch.no_grad():
            ref = net(x)
            torch.testing.assert_close(ts(x), ref)
            try:
                traced = traced_ts(x)
            except RuntimeError:
                traced = None
            assert traced is None or not torch.allclose(traced, ref, atol=1e-3)


def test_torchscript_export_rejects_a_checkpoint_of_another_network(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, ckpt)
    overrides, _ = TINY["braunetpp_synapse"]
    with pytest.raises(InputDataError, match="does not fit the bundle's network") as err:
        build_network(BUNDLES / "braunetpp_synapse", ckpt, **overrides)
    assert str(ckpt) in str(err.value)
    (tmp_path / "notackpt.pt").write_text("hello")
    with pytest.raises(InputDataError, match="cannot be read as a PyTorch checkpoint"):
        export_torchscript(BUNDLES / "braunetpp_synapse", tmp_path / "model.ts", tmp_path / "notackpt.pt")
    assert not (tmp_path / "model.ts").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HYBRIDSEG_FULL_EXPORTS") != "1",
    reason="the published networks' exports take 1.5-4 min each on 2 cores; set HYBRIDSEG_FULL_EXPORTS=1",
)
@pytest.mark.parametrize("name", NAMES)
def test_published_network_exports_match_eager_at_224_and_a_second_size(name, tmp_path):
    from hybridseg.tools.export import compare_torchscript, export_onnx

    bundle = BUNDLES / name
    channels = 3 if name == "cfformer_busi" else 1
    second = [1, channels, 256, 320] if name == "cfformer_busi" else [1, channels, 448, 448]
    torch.manual_seed(0)
    net = build_network(bundle)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    export_torchscript(bundle, tmp_path / "model.ts", tmp_path / "model.pt")  # scripted
    # BRAU-Net++ at 256: maps 64, 32, 16 need routing padding for n_win 7, which 224 does not
    shapes = [[1, channels, 224, 224], second] + ([[1, channels, 256, 256]] if name == "braunetpp_synapse" else [])
    compare_torchscript(tmp_path / "model.ts", net, shapes)
    export_onnx(bundle, tmp_path / "model.onnx", tmp_path / "model.pt", check_shapes=[second])
