"""CFFormer against the reference fixtures (whole model with every intermediate, submodules), converters,
parameter counts, gradients, bf16 autocast, channels_last, TorchScript trace and torch.export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybridseg.io import InputDataError
from hybridseg.networks.cfformer import (
    CFCA,
    XFF,
    CFFormer,
    DecoderBlock,
    builder,
    cfformer_b,
    cfformer_l,
    cfformer_s,
    convert_reference_state_dict,
    default_channels_last,
    load_imagenet_weights,
)
from hybridseg.networks.swin_v2 import SwinV2Features, relative_coords_table, relative_position_index
from tests.reference import crc32_state_dict, load_fixture, max_abs_diff

NET = "cfformer"
LOGIT_TOL = 5e-6
# Reference keys the converter must drop: aliases (661 in b), unused (6), Swin constants (2 per block).
B_ENTRIES, B_ALIASES, B_UNUSED, B_CONSTANTS = 1480, 661, 6, 2 * 24


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float | None = None) -> None:
    """README rule for intermediates and submodules: max|d| <= 2e-5 * max(1, max|ref|) unless ``tol``."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    tol = 2e-5 * max(1.0, ref.abs().max().item()) if tol is None else tol
    diff = max_abs_diff(ours, ref)
    assert diff <= tol, f"{what}: max|d| = {diff:.3g} > {tol:.3g}"


def filled_model(fx: dict, ref_sd: dict[str, torch.Tensor], **kwargs) -> CFFormer:
    """A CFFormer of the fixture's variant holding the crc32-v1 fill, loaded only through the converter."""
    model = CFFormer(fx["config"]["version"], **kwargs)
    model.load_state_dict(convert_reference_state_dict(ref_sd), strict=True)
    return model.eval()


def record_intermediates(model: CFFormer) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks storing every tensor the fixture holds, under the fixture's name prefixes (NCHW)."""
    acts: dict[str, torch.Tensor] = {}
    handles = []
    enc = model.encoder

    def keep(name, pick=lambda o: o):
        def hook(_m, _i, out):
            acts[name] = pick(out).detach().clone()

        return hook

    handles.append(enc.cnn.relu.register_forward_hook(keep("skip0_cnn_stem")))
    for k in range(1, 5):
        cfca, xff = getattr(enc, f"cfca{k}"), getattr(enc, f"xff{k}")
        handles.append(enc.cnn.stages()[k - 1].register_forward_hook(keep(f"stage{k}_cnn_out")))
        nchw = keep(f"stage{k}_trans_out_nchw", lambda o: o.permute(0, 3, 1, 2))
        handles.append(enc.transformer.features[2 * k - 1].register_forward_hook(nchw))
        handles.append(cfca.register_forward_hook(keep(f"stage{k}_cfca_out1_trans_to_cnn", lambda o: o[0])))
        handles.append(cfca.register_forward_hook(keep(f"stage{k}_cfca_out2_cnn_to_trans", lambda o: o[1])))

        def fused(_m, inputs, k=k):
            acts[f"stage{k}_trans_fused_nchw"] = inputs[0].detach().clone()
            acts[f"stage{k}_cnn_fused"] = inputs[1].detach().clone()

        handles.append(xff.register_forward_pre_hook(fused))
        handles.append(xff.register_forward_hook(keep(f"skip{k}_xff{k}")))
    for k in range(1, 6):
        handles.append(getattr(model.decoder, f"upconv{k}").register_forward_hook(keep(f"dec_upconv{k}_out")))
    return acts, handles


def fixture_name_to_ours(name: str, acts: dict) -> str:
    """The recorded entry whose name is the fixture name minus its ``_CxHxW`` suffix."""
    base = name.rsplit("_", 1)[0]
    assert base in acts, f"no recorded tensor for fixture intermediate {name}"
    return base


# --- the whole model, variant b (Swin-V2-S) ---------------------------------------------------------


@pytest.fixture(scope="module")
def fx_b() -> dict:
    return load_fixture(NET, "cfformer_b_224.pt")


@pytest.fixture(scope="module")
def ref_sd_b(fx_b) -> dict[str, torch.Tensor]:
    """The reference-keyed crc32-v1 state dict of variant b (aliases included)."""
    return crc32_state_dict(fx_b["keys"], fx_b["aliases"])


@pytest.fixture(scope="module")
def model_b(fx_b, ref_sd_b) -> CFFormer:
    return filled_model(fx_b, ref_sd_b)


def test_fill_checksums_hold_for_every_seed_name_including_constant_buffers(fx_b, ref_sd_b):
    sd = ref_sd_b
    constants = {"relative_coords_table": relative_coords_table(), "relative_position_index": relative_position_index()}
    assert len(fx_b["fill_checksums"]) > 800
    for name, (s, a, first, last) in fx_b["fill_checksums"].items():
        kind = name.rsplit(".", 1)[-1]
        t = (constants[kind] if kind in constants else sd[name]).double().flatten()
        assert math.isclose(t.sum().item(), s, rel_tol=1e-9, abs_tol=1e-9), name
        assert math.isclose(t.abs().sum().item(), a, rel_tol=1e-9, abs_tol=1e-12), name
        assert (t[0].item(), t[-1].item()) == (first, last), name


def test_converter_drops_only_aliases_unused_entries_and_constants(fx_b, ref_sd_b):
    keys = [k for k, *_ in fx_b["keys"]]
    assert len(keys) == B_ENTRIES and len(fx_b["aliases"]) == B_ALIASES
    unused = sorted(k for k, _s, _kind, used in fx_b["keys"] if not used)
    assert unused == sorted(
        f"encoder.{p}.{w}" for p in ("cnn.fc", "transformer.norm", "transformer.head") for w in ("weight", "bias")
    )
    converted = convert_reference_state_dict(ref_sd_b)
    assert len(converted) == B_ENTRIES - B_ALIASES - B_UNUSED - B_CONSTANTS
    with torch.device("meta"):
        ours = CFFormer("b").state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == v.shape for k, v in ours.items())


def test_converter_verifies_aliases_and_constant_buffers_when_present(ref_sd_b):
    sd = dict(ref_sd_b)
    sd["encoder.transformer.features.3.1.attn.relative_position_index"] = relative_position_index()
    sd["encoder.transformer.features.3.1.attn.relative_coords_table"] = relative_coords_table()
    convert_reference_state_dict(sd)  # correct constants pass and are dropped
    bad = dict(sd)
    bad["encoder.cnn_layer3.2.conv1.weight"] = bad["encoder.cnn_layer3.2.conv1.weight"] + 1
    with pytest.raises(ValueError, match=r"encoder\.cnn_layer3\.2\.conv1\.weight \(differs from encoder\.cnn"):
        convert_reference_state_dict(bad)
    bad = dict(sd)
    bad["encoder.transformer.features.3.1.attn.relative_position_index"] = relative_position_index().flip(0)
    with pytest.raises(ValueError, match="relative_position_index"):
        convert_reference_state_dict(bad)
    with pytest.raises(ValueError, match="encoder.mystery.weight"):
        convert_reference_state_dict({**sd, "encoder.mystery.weight": torch.zeros(1)})


def test_cfformer_b_reproduces_every_stored_intermediate_the_logits_and_the_float64_output(fx_b, model_b):
    # One test, so that the big model is built once per test worker.
    acts, handles = record_intermediates(model_b)
    try:
        with torch.no_grad():
            out = model_b(fx_b["input"])
    finally:
        for h in handles:
            h.remove()
    assert len(fx_b["intermediates"]) == 33
    for name, ref in fx_b["intermediates"].items():
        assert_close(acts[fixture_name_to_ours(name, acts)], ref, name)
    assert_close(out, fx_b["output"], "logits", tol=LOGIT_TOL)

    model64 = model_b.double()  # the fill is float32, so casting back restores it exactly
    try:
        with torch.no_grad():
            out64 = model64(fx_b["input"].double())
    finally:
        model_b.float()
    assert out64.dtype == torch.float64
    assert_close(out64, fx_b["output_float64"], "float64 logits", tol=1e-10)


# --- variant s (Swin-V2-T; the reference's version 's') ----------------------------------------------


@pytest.fixture(scope="module")
def fx_t() -> dict:
    return load_fixture(NET, "cfformer_t_224.pt")


@pytest.fixture(scope="module")
def ref_sd_t(fx_t) -> dict[str, torch.Tensor]:
    """The reference-keyed crc32-v1 state dict of the Swin-V2-T model (reference version 's')."""
    return crc32_state_dict(fx_t["keys"], fx_t["aliases"])


@pytest.fixture(scope="module")
def model_s(fx_t, ref_sd_t) -> CFFormer:
    assert fx_t["config"]["version"] == "s" and fx_t["config"]["transformer"] == "swin_v2_t"
    return filled_model(fx_t, ref_sd_t)


def test_cfformer_s_matches_swin_v2_t_reference_logits(fx_t, model_s):
    with torch.no_grad():
        out = model_s(fx_t["input"])
    assert out.is_contiguous()
    assert_close(out, fx_t["output"], "logits", tol=LOGIT_TOL)


def test_channels_last_input_and_converted_weights_reproduce_the_reference_logits(fx_t, model_s):
    x = fx_t["input"].contiguous(memory_format=torch.channels_last)
    own = torch.channels_last if model_s.channels_last else torch.contiguous_format
    other = torch.contiguous_format if model_s.channels_last else torch.channels_last
    try:
        model_s.to(memory_format=other)  # a user may convert the weights
        with torch.no_grad():
            out = model_s(x)
    finally:
        model_s.to(memory_format=own)
    assert_close(out, fx_t["output"], "channels_last input", tol=LOGIT_TOL)


@pytest.mark.slow  # two CFFormer-s, each run in float32 and trained one step in float64: ~10 s
def test_either_convolution_layout_reproduces_the_reference_logits_and_trains_alike(fx_t, ref_sd_t):
    models = [filled_model(fx_t, ref_sd_t, channels_last=layout) for layout in (True, False)]
    grads = []
    for model in models:
        weight = model.encoder.cnn.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == model.channels_last
        assert weight.is_contiguous() != model.channels_last
        with torch.no_grad():
            out = model(fx_t["input"])
        assert out.is_contiguous()
        assert_close(out, fx_t["output"], f"logits, channels_last={model.channels_last}", tol=LOGIT_TOL)
        # Training gradients in float64, where float32 rounding (1e-5 of 6e-3 here, either layout against
        # float64) cannot hide a difference in what is computed.
        model.double().train()
        torch.manual_seed(0)  # the same stochastic depth draws in both
        model(fx_t["input"].double()).square().mean().backward()
        grads.append(model.encoder.cnn.conv1.weight.grad)
    assert max_abs_diff(grads[0], grads[1]) <= 1e-12


@pytest.mark.parametrize(
    "capability, cuda, channels_last",
    [("AVX2", False, False), ("AVX2", True, True), ("AVX512", False, True), ("DEFAULT", False, True)],
)
def test_default_layout_is_nchw_only_on_an_avx2_cpu_without_gpu(monkeypatch, capability, cuda, channels_last):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_channels_last() is channels_last


def test_bf16_autocast_output_is_close_to_fp32(fx_t, model_s):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model_s(fx_t["input"])
    assert out.dtype == torch.bfloat16  # autocast really ran the network in bf16
    ref = fx_t["output"]
    # Observed 3.8e-3 on logits of range 0.45 (std 0.037); bf16 keeps 8 mantissa bits.
    assert max_abs_diff(out.float(), ref) <= 1.5e-2
    assert torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1] > 0.99


@pytest.fixture(scope="module")
def gray_s() -> CFFormer:
    """A 1-channel variant-s network; each test loads the weights it needs."""
    return CFFormer("s", in_channels=1).eval()


def test_gray_model_with_summed_stems_equals_rgb_model_on_repeated_gray_image(ref_sd_t, model_s, gray_s):
    gray = gray_s
    sd = convert_reference_state_dict(ref_sd_t, in_channels=1)
    gray.load_state_dict(sd, strict=True)
    g = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = model_s(g.repeat(1, 3, 1, 1)), gray(g)
    assert b.shape == (2, 1, 64, 96)
    assert_close(b, a, "gray vs repeated gray", tol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:DeprecationWarning")
def test_torchscript_trace_round_trip_reproduces_the_reference_and_follows_other_input_sizes(fx_t, model_s, tmp_path):
    with torch.no_grad():
        traced = torch.jit.trace(model_s, fx_t["input"], check_trace=False)
        torch.jit.save(traced, tmp_path / "cfformer_s.pt")
        loaded = torch.jit.load(tmp_path / "cfformer_s.pt")
        assert_close(loaded(fx_t["input"]), fx_t["output"], "traced at 224", tol=LOGIT_TOL)
        # Window layouts are built inside the graph, so the 224 trace stays right at sizes with another
        # padding/shift pattern (160x288: stage 4 pads 5->8 without shift and 9->16 with shift).
        for size in ((256, 256), (160, 288)):
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(9))
            eager = model_s(x)
            assert eager.shape == (1, 1, *size)
            assert_close(loaded(x), eager, f"traced at {size}", tol=1e-6)


def test_torch_export_reproduces_the_reference_logits(fx_t, model_s):
    exported = torch.export.export(model_s, (fx_t["input"],))
    with torch.no_grad():
        out = exported.module()(fx_t["input"])
    assert_close(out, fx_t["output"], "exported", tol=LOGIT_TOL)


def test_bad_input_shapes_raise_clear_errors(model_s):
    with pytest.raises(ValueError, match="multiples of 32"):
        model_s(torch.zeros(1, 3, 224, 200))
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        model_s(torch.zeros(1, 1, 224, 224))


# --- structure: parameter counts, unused modules, gradients, init ------------------------------------


# README "Parameter counts": per-stage CFCA and XFF counts for 96-768 and 128-1024 transformer channels.
CFCA_96, CFCA_128 = (24_896, 98_944, 394_496, 1_575_424), (33_152, 131_840, 525_824, 2_100_224)
XFF_96, XFF_128 = (347_392, 1_389_056, 5_555_200, 22_218_752), (500_032, 1_999_488, 7_996_672, 31_984_128)


@pytest.mark.parametrize(
    "variant, used, swin, cfca, xff, decoder",
    [
        ("s", 98_281_451, 27_581_034, CFCA_96, XFF_96, 17_811_585),
        ("b", 119_667_323, 48_966_906, CFCA_96, XFF_96, 17_811_585),
        ("l", 184_815_801, 86_903_800, CFCA_128, XFF_128, 31_355_969),
    ],
)
def test_parameter_counts_equal_reference_used_in_forward_counts(variant, used, swin, cfca, xff, decoder):
    with torch.device("meta"):
        model = CFFormer(variant)

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    enc = model.encoder
    assert count(model) == used
    assert count(enc.cnn) == 21_284_672 and count(enc.transformer) == swin
    assert tuple(count(getattr(enc, f"cfca{k}")) for k in range(1, 5)) == cfca
    assert tuple(count(getattr(enc, f"xff{k}")) for k in range(1, 5)) == xff
    assert count(model.decoder) + count(model.head) == decoder


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown CFFormer variant 't'"):
        CFFormer("t")
    with pytest.raises(ValueError, match="unknown CFFormer variant 't'"):
        builder("t")


@pytest.mark.parametrize(
    "build, variant, swin, used",
    [
        (cfformer_s, "s", "swin_v2_t", 98_281_451),
        (cfformer_b, "b", "swin_v2_s", 119_667_323),
        (cfformer_l, "l", "swin_v2_b", 184_815_801),
    ],
)
def test_builders_make_the_published_variants_and_name_their_imagenet_swin(build, variant, swin, used):
    with torch.device("meta"):
        model, gray = build(), build(in_channels=1, num_classes=2)
    assert builder(variant) is build
    assert (model.variant, model.swin_name, model.encoder.transformer.name) == (variant, swin, swin)
    assert sum(p.numel() for p in model.parameters()) == used
    assert (gray.variant, gray.in_channels, gray.num_classes) == (variant, 1, 2)


@pytest.fixture(scope="module")
def fresh_s() -> CFFormer:
    """An un-filled variant-s network with the fresh initialisation (backbones get overwritten by loaders)."""
    torch.manual_seed(0)
    return CFFormer("s")


def test_every_module_runs_and_every_parameter_receives_a_gradient(fresh_s):
    torch.manual_seed(1)
    called = set()
    leaves = {name: m for name, m in fresh_s.named_modules() if not list(m.children())}
    handles = [m.register_forward_hook(lambda m, i, o, n=name: called.add(n)) for name, m in leaves.items()]
    fresh_s.train()
    try:
        out = fresh_s(torch.randn(2, 3, 64, 64))
        out.float().pow(2).mean().backward()
    finally:
        fresh_s.eval()
        for h in handles:
            h.remove()
    assert sorted(set(leaves) - called) == []
    no_grad = [n for n, p in fresh_s.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    fresh_s.zero_grad(set_to_none=True)
    assert no_grad == []


def test_fresh_init_follows_the_reference_rules(fresh_s):
    enc = fresh_s.encoder
    cfca = enc.cfca2.se_trans.fc1
    assert torch.all(cfca.bias == 0) and cfca.weight.abs().max() <= 2.0 and cfca.weight.std() < 0.03
    conv = fresh_s.decoder.upconv3[0]
    assert torch.all(conv.bias == 0)
    fan_out = conv.weight.shape[0] * 9  # He-normal, fan_out mode
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    assert torch.all(fresh_s.head[1].weight == 1) and torch.all(fresh_s.head[1].bias == 0)
    assert not torch.all(enc.xff1.out_conv.bias == 0)  # XFF keeps PyTorch's default (uniform) init


# --- submodule fixtures ------------------------------------------------------------------------------


def submodule_state_dict(sd: dict, ref_prefix: str, our_prefix: str) -> dict:
    """Convert a standalone reference submodule state dict through the full-model converter."""
    full = convert_reference_state_dict({ref_prefix + k: v for k, v in sd.items()})
    assert all(k.startswith(our_prefix) for k in full), sorted(full)
    return {k[len(our_prefix) :]: v for k, v in full.items()}


@pytest.mark.parametrize("case", ["randn", "channel_offset"])
def test_cfca_matches_reference_outputs_and_internals(case):
    fx = load_fixture(NET, "cfca.pt")
    cfca = CFCA(96, 64).eval()
    cfca.load_state_dict(submodule_state_dict(fx["state_dict"], "encoder.cdca1.", "encoder.cfca1."))
    c = fx["cases"][case]
    trans, cnn = c["x1_trans"], c["x2_cnn"]
    with torch.no_grad():
        out1, out2 = cfca(trans, cnn)
        attn = cfca.attention(trans, cnn)
        assert_close(cfca.se_trans(trans).unsqueeze(-1), c["se1_trans_sigmoid_Bx96x1"], "SE on transformer")
        assert_close(cfca.se_cnn(cnn).unsqueeze(-1), c["se2_cnn_sigmoid_Bx64x1"], "SE on CNN")
    assert_close(attn, c["attn_logits_Bx64x96"], "attention logits")
    assert_close(attn.softmax(2), c["softmax_dim2_for_out1"], "softmax over transformer channels")
    assert_close(attn.softmax(1), c["softmax_dim1_for_out2"], "softmax over CNN channels")
    assert_close(out1, c["out1_trans_to_cnn"], "out1")
    assert_close(out2, c["out2_cnn_to_trans"], "out2")


def test_xff_matches_reference_output_and_intermediates():
    fx = load_fixture(NET, "xff.pt")
    xff = XFF(96, 64, 96).eval()
    xff.load_state_dict(submodule_state_dict(fx["state_dict"], "encoder.X_spatial_1.", "encoder.xff1."))
    seen = {}
    xff.out_conv.register_forward_pre_hook(lambda m, i: seen.__setitem__("cat", i[0].detach().clone()))
    trans, cnn = fx["inputs"]["trans"], fx["inputs"]["cnn"]
    with torch.no_grad():
        out = xff(trans, cnn)
        assert_close(xff.trans_conv(trans), fx["intermediates"]["trans_conv_out_Bx64"], "trans_conv")
        assert_close(xff.cnn_conv(cnn), fx["intermediates"]["cnn_conv_out_Bx96"], "cnn_conv")
    assert_close(seen["cat"], fx["intermediates"]["concat_input_to_out_conv_Bx160"], "concat (CNN first)")
    assert_close(out, fx["output"], "output")


def test_decoder_block_matches_reference_after_each_layer():
    fx = load_fixture(NET, "decoder_block.pt")
    block = DecoderBlock(192, 64).eval()
    block.load_state_dict(submodule_state_dict(fx["state_dict"], "decoder.upconv2.", "decoder.upconv2."))
    x = fx["input"]
    with torch.no_grad():
        for i, (layer, (name, ref)) in enumerate(zip(block, fx["intermediates"].items(), strict=True)):
            x = layer(x.clone())  # clone: the ReLUs work in place
            assert name.startswith(f"after_{i}_")
            assert_close(x, ref, name)
        assert_close(block(fx["input"]), fx["output"], "output")


# --- ImageNet backbone loading ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_files(fx_t, ref_sd_t, tmp_path_factory) -> dict:
    """Fake torchvision resnet34 and swin_v2_t checkpoints (the fixture's key tables, random values)."""
    sd = ref_sd_t
    consts = {"relative_coords_table": relative_coords_table(), "relative_position_index": relative_position_index()}
    files = {}
    for name, prefix in (("resnet34", "encoder.cnn."), ("swin_v2_t", "encoder.transformer.")):
        tv = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        for key, _shape, kind, _used in fx_t["keys"]:
            if kind == "other_buffer" and key.startswith(prefix):
                tv[key[len(prefix) :]] = consts[key.rsplit(".", 1)[-1]]
        path = tmp_path_factory.mktemp("imagenet") / f"{name}.pth"
        torch.save(tv, path)
        files[name] = (path, tv)
    return files


def test_load_imagenet_weights_fills_both_backbones_and_reports_ignored_keys(fresh_s, imagenet_files):
    (rpath, rsd), (spath, ssd) = imagenet_files["resnet34"], imagenet_files["swin_v2_t"]
    report = load_imagenet_weights(fresh_s, resnet34=rpath, swin=spath)
    assert [k for k in report.skipped if k.startswith("resnet34:")] == ["resnet34:fc.bias", "resnet34:fc.weight"]
    assert {"swin_v2_t:norm.weight", "swin_v2_t:head.bias"} <= set(report.skipped)
    loaded_swin = [k for k in report.loaded if k.startswith("encoder.transformer.")]
    assert len(loaded_swin) == len(fresh_s.encoder.transformer.state_dict())
    # CFCA, XFF and the decoder keep their initialisation, and the report says so
    assert set(report.left_at_init) == set(fresh_s.state_dict()) - set(report.loaded)
    assert any(k.startswith("decoder.") for k in report.left_at_init)
    assert not any(k.startswith("encoder.cnn.") for k in report.left_at_init)
    assert report.files == [str(rpath), str(spath)] and str(len(report.loaded)) in report.summary()
    assert torch.equal(fresh_s.encoder.cnn.layer4[2].conv2.weight, rsd["layer4.2.conv2.weight"])
    assert torch.equal(fresh_s.encoder.transformer.features[5][5].attn.qkv.weight, ssd["features.5.5.attn.qkv.weight"])


def test_load_imagenet_weights_is_all_or_nothing_and_lists_offending_keys(fresh_s, imagenet_files, tmp_path):
    rpath = imagenet_files["resnet34"][0]
    ssd = dict(imagenet_files["swin_v2_t"][1])
    del ssd["features.7.1.mlp.0.bias"]
    torch.save(ssd, tmp_path / "bad_swin.pth")
    with torch.no_grad():
        fresh_s.encoder.cnn.conv1.weight.add_(1.0)
    before = fresh_s.encoder.cnn.conv1.weight.clone()
    with pytest.raises(InputDataError, match=r"bad_swin\.pth.*features\.7\.1\.mlp\.0\.bias"):
        load_imagenet_weights(fresh_s, resnet34=rpath, swin=tmp_path / "bad_swin.pth")
    assert torch.equal(fresh_s.encoder.cnn.conv1.weight, before)  # the good ResNet file was not applied


def test_load_imagenet_weights_refuses_the_swin_file_of_another_variant(imagenet_files):
    with torch.device("meta"):
        model_b = CFFormer("b")  # expects swin_v2_s: stage 3 has 18 blocks, the file 6
    path = imagenet_files["swin_v2_t"][0]
    with pytest.raises(InputDataError) as err:
        load_imagenet_weights(model_b, swin=path)
    msg = str(err.value)
    assert str(path) in msg and "Swin-V2-T weights (CFFormer variant 's')" in msg
    assert "variant 'b', which needs Swin-V2-S" in msg


def test_a_swin_v2_s_file_for_variant_l_is_refused_by_its_shapes_whatever_its_name(tmp_path):
    """Shapes decide, not the file name: a Swin-V2-S state dict saved as swin_v2_b-781e5279.pth."""
    with torch.device("meta"):
        model_l = CFFormer("l")
        small = SwinV2Features("swin_v2_s").state_dict()  # meta tensors: shapes only, nothing allocated
    path = tmp_path / "swin_v2_b-781e5279.pth"
    torch.save(small, path)
    with pytest.raises(InputDataError) as err:
        load_imagenet_weights(model_l, swin=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "Swin-V2-S weights (CFFormer variant 'b')" in msg and "variant 'l', which needs Swin-V2-B" in msg
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(InputDataError, match="resnet.pth: holds no torchvision Swin-V2 weights"):
        load_imagenet_weights(model_l, swin=tmp_path / "resnet.pth")


def test_load_imagenet_weights_sums_rgb_stems_for_a_gray_model(imagenet_files, gray_s):
    gray = gray_s
    load_imagenet_weights(gray, resnet34=imagenet_files["resnet34"][0], swin=imagenet_files["swin_v2_t"][0])
    rgb_conv1 = imagenet_files["resnet34"][1]["conv1.weight"]
    rgb_embed = imagenet_files["swin_v2_t"][1]["features.0.0.weight"]
    assert torch.equal(gray.encoder.cnn.conv1.weight, rgb_conv1.sum(1, keepdim=True))
    assert torch.equal(gray.encoder.transformer.features[0][0].weight, rgb_embed.sum(1, keepdim=True))


# --- ablation switches (the article's Table 3) ----------------------------------------------------------

ABLATIONS = {
    "cfformer": {},
    "no_cfca": {"cfca": False},
    "no_xff": {"xff": False},
    "no_cfca_no_xff": {"cfca": False, "xff": False},
    "cnn_only": {"encoder": "cnn"},
    "transformer_only": {"encoder": "transformer"},
}
# Full-size (224-independent) parameter counts of variant b; the README lists them.
ABLATION_PARAMS_B = {
    "cfformer": 119_667_323,
    "no_cfca": 117_573_563,
    "no_xff": 101_908_763,
    "no_cfca_no_xff": 99_815_003,
    "cnn_only": 29_410_305,
    "transformer_only": 66_630_843,
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_parameter_counts_of_the_full_size_network(name, record_property):
    with torch.device("meta"):
        model = CFFormer("b", **ABLATIONS[name])
    n = sum(p.numel() for p in model.parameters())
    record_property("parameters", n)
    assert n == ABLATION_PARAMS_B[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ABLATIONS if n != "cfformer"])
def test_ablation_builds_runs_forward_and_backward_with_every_parameter_trained(name):
    torch.manual_seed(0)
    model = CFFormer("s", **ABLATIONS[name]).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_ablation_switches_replace_cfca_and_xff_by_the_articles_alternatives():
    from hybridseg.networks.cfformer import NoChannelExchange, PlainFusion

    with torch.device("meta"):
        model = CFFormer("s", cfca=False, xff=False)
    assert all(isinstance(getattr(model.encoder, f"cfca{k}"), NoChannelExchange) for k in range(1, 5))
    assert all(isinstance(getattr(model.encoder, f"xff{k}"), PlainFusion) for k in range(1, 5))
    trans, cnn = torch.randn(1, 96, 8, 8), torch.randn(1, 64, 8, 8)
    to_cnn, to_trans = NoChannelExchange()(trans, cnn)
    assert to_cnn.shape == cnn.shape and to_trans.shape == trans.shape and not to_cnn.any() and not to_trans.any()
    fuse = PlainFusion(96, 64, 96)
    expected = torch.nn.functional.conv2d(
        torch.cat([cnn, trans], 1), fuse.out_conv.weight, fuse.out_conv.bias, padding=1
    )
    torch.testing.assert_close(fuse(trans, cnn), expected)


def test_single_branch_encoders_refuse_fusion_switches_and_unknown_encoders():
    with pytest.raises(ValueError, match="one"):
        CFFormer("s", encoder="cnn", cfca=False)
    with pytest.raises(ValueError, match="unknown CFFormer encoder"):
        CFFormer("s", encoder="resnet")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["no_cfca_no_xff", "cnn_only", "transformer_only"])
def test_ablations_script_and_match_eager(name):
    torch.manual_seed(0)
    model = CFFormer("s", **ABLATIONS[name]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-4, atol=1e-4)
