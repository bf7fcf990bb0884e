"""BRAU-Net++: published parameter counts, every reference fixture, converters, sizes, precision, export."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from hybridseg.io import InputDataError
from hybridseg.networks.braunetpp import (
    SCCSA,
    BRAUBlock,
    BRAUNetPP,
    FinalPatchExpandX4,
    PatchExpand,
    Stem,
    braunetpp,
    convert_official_state_dict,
    load_biformer_weights,
    load_official_checkpoint,
    official_to_ours_key,
)
from tests.reference import crc32_state_dict, load_fixture, max_abs_diff

SUB_TOL = {"rtol": 2e-5, "atol": 2e-5}
FULL_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_are_the_published_figures():
    with torch.device("meta"):
        assert _n_params(BRAUNetPP()) == 50_763_648
        assert _n_params(BRAUNetPP(use_sccsa=False)) == 31_403_328
        published = braunetpp()
    assert _n_params(published) == 50_763_648 and (published.n_win, published.num_classes) == (7, 9)


# --------------------------------------------------------------------------------------------
# Whole network against the official code (fixture weights loaded only through the converter).


def _assigned(sd: dict[str, torch.Tensor], **kwargs) -> BRAUNetPP:
    """A BRAUNetPP built on the meta device that takes over the tensors of ``sd`` (no initialisation)."""
    with torch.device("meta"):
        model = BRAUNetPP(**kwargs)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    """The full-model fixture, its filled official state dict and our 3- and 1-channel models."""
    fx = load_fixture("braunetpp", "braunetpp_synapse_224.pt")
    official = crc32_state_dict(fx["keys"])
    ours = convert_official_state_dict(official)  # the only way the fixture weights get in
    models = {ch: _assigned(ours, in_channels=ch, num_classes=9, n_win=7) for ch in (3, 1)}
    return fx, official, models


def _our_layer(official_layer: str) -> str:
    """Our module path for an official layer path (``stages.1.0``, ``layers_up.2.blocks.1``)."""
    return official_to_ours_key(official_layer + ".norm1.weight")[: -len(".norm1.weight")]


def _run_recording(model: BRAUNetPP, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Logits, intermediates in the fixture's names and layouts, and routing indices per official layer."""
    inter, routes, hooks = {}, {}, []
    nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731 - our NHWC -> fixture NCHW
    nlc = lambda t: t.flatten(1, 2)  # noqa: E731 - our NHWC -> fixture NLC

    def keep(module, name, layout, use_input=False):
        def hook(_m, args, out):
            inter[name] = layout(args[0] if use_input else out)

        hooks.append(module.register_forward_hook(hook))

    for i in range(3):
        keep(model.encoder[i].downsample, f"enc.down{i}", nchw)
        keep(model.encoder[i], f"enc.stage{i}", nlc)
        dec, k = model.decoder[i], 3 - i  # our decoder level i is the official layers_up.{3 - i}
        keep(dec.skip_attention, f"dec.sccsa{i + 1}_in", nchw, use_input=True)
        keep(dec.skip_attention, f"dec.sccsa{i + 1}", nchw)
        keep(dec.skip_fuse, f"dec.concat_back_dim{k}", nlc)
        keep(dec, f"dec.layers_up{k}", nlc)
    keep(model.bottleneck, "bottleneck", nchw)
    keep(model.bottleneck_expand, "dec.layers_up0", nlc)
    keep(model.norm_up, "dec.norm_up", nlc)
    for name, module in model.named_modules():
        if name.endswith("attn.router"):
            hooks.append(module.register_forward_hook(lambda _m, _i, out, n=name: routes.__setitem__(n, out)))
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, inter, routes


def test_crc32_fill_reproduces_the_fixture_fill_checks(reference):
    fx, official, _ = reference
    for key, check in fx["fill_check"].items():
        t = official[key].double().flatten()
        got = torch.stack([t.sum(), t.abs().sum(), t[0], t[-1]])
        torch.testing.assert_close(got, check.double(), rtol=1e-12, atol=1e-9)


def test_converter_drops_exactly_the_never_run_bottleneck_stage(reference):
    fx, official, models = reference
    unused = {k for k, _shape, _kind, used in fx["keys"] if not used}
    assert unused and all(k.startswith("bra_unet.stages.3.") for k in unused)
    converted = convert_official_state_dict(official)
    assert len(converted) == len(official) - len(unused)
    assert set(converted) == set(models[3].state_dict())


def test_whole_network_matches_reference_with_intermediates_and_routing(reference):
    fx, _, models = reference
    y, inter, routes = _run_recording(models[3], fx["input"])
    torch.testing.assert_close(y, fx["output"], **FULL_TOL)
    assert set(inter) == set(fx["intermediates"])
    for name, ref in fx["intermediates"].items():
        torch.testing.assert_close(inter[name], ref, **FULL_TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert len(fx["routing_idx"]) == 24 and len(routes) == 24
    for layer, ref_idx in fx["routing_idx"].items():
        assert torch.equal(routes[_our_layer(layer) + ".attn.router"], ref_idx), layer


def test_one_channel_input_is_repeated_and_matches_reference(reference):
    fx, _, models = reference
    assert models[1].encoder[0].downsample.conv1.in_channels == 3
    y, _, _ = _run_recording(models[1], fx["input_1ch"])
    torch.testing.assert_close(y, fx["output_1ch"], **FULL_TOL)


@pytest.mark.slow  # ~30 s on CPUs without native bf16 (emulated kernels)
def test_bf16_autocast_stays_close_to_float32(reference):
    # With the fixture's random weights the routing logits of many regions nearly tie (margins down to
    # 2e-5), so bf16 rounding re-routes a part of the regions and the whole-network error (about 9 %
    # relative) is much larger than one block's (0.4 %, checked in the block test).
    fx, _, models = reference
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = models[3](fx["input"])
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref = fx["output"]
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.15
    agree = (y.float().argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree > 0.85, f"bf16 and fp32 argmax agree on only {agree:.1%} of the pixels"


# --------------------------------------------------------------------------------------------
# Submodule fixtures, weights through the same official->ours renaming rules.


def _load_sub(module: torch.nn.Module, fx: dict, kind: str) -> torch.nn.Module:
    module.load_state_dict({official_to_ours_key(k, kind): v for k, v in fx["state_dict"].items()}, strict=True)
    return module.eval()


def test_block_matches_reference_step_by_step():
    fx = load_fixture("braunetpp", "biformer_block.pt")
    cfg = fx["config"]
    block = _load_sub(BRAUBlock(cfg["dim"], cfg["num_heads"], cfg["n_win"], cfg["topk"], cfg["mlp_ratio"]), fx, "block")
    h, w = cfg["input_resolution"]
    steps: dict[str, list[torch.Tensor]] = {}
    for name in ("norm1", "pos_embed", "attn", "norm2", "mlp"):
        getattr(block, name).register_forward_hook(lambda _m, _i, out, n=name: steps.setdefault(n, []).append(out))
    with torch.no_grad():
        y = block(fx["input"].unflatten(1, (h, w)))
    torch.testing.assert_close(y.flatten(1, 2), fx["output"], **SUB_TOL)
    ours = {
        "norm1_call1": steps["norm1"][0].flatten(1, 2),
        "pos_embed_call1": steps["pos_embed"][0],  # NCHW already (the conv's own output)
        "norm1_call2": steps["norm1"][1],
        "attn_call1": steps["attn"][0],
        "norm2_call1": steps["norm2"][0],
        "mlp_call1": steps["mlp"][0],
    }
    for name, ref in fx["steps"].items():
        torch.testing.assert_close(ours[name], ref, **SUB_TOL, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = block(fx["input"].unflatten(1, (h, w)))
    assert ((y16.float() - y).norm() / y.norm()).item() < 0.01  # bf16 keeps one block within 1 %


def test_sccsa_matches_reference():
    fx = load_fixture("braunetpp", "sccsa.pt")
    sccsa = _load_sub(SCCSA(fx["config"]["in_channels"], fx["config"]["rate"]), fx, "sccsa")
    with torch.no_grad():
        y = sccsa(fx["input"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, fx["output"], **SUB_TOL)


@pytest.mark.parametrize(("name", "nchw_input"), [("patch_expand.pt", False), ("patch_expand_first.pt", True)])
def test_patch_expand_matches_both_reference_classes(name, nchw_input):
    fx = load_fixture("braunetpp", name)
    h, w = fx["config"]["input_resolution"]
    pe = _load_sub(PatchExpand(fx["config"]["dim"]), fx, "patch_expand")
    x = fx["input"].permute(0, 2, 3, 1) if nchw_input else fx["input"].unflatten(1, (h, w))
    with torch.no_grad():
        y = pe(x)
    torch.testing.assert_close(y.flatten(1, 2), fx["output"], **SUB_TOL)


def test_final_patch_expand_x4_matches_reference():
    fx = load_fixture("braunetpp", "final_patch_expand_x4.pt")
    h, w = fx["config"]["input_resolution"]
    up = _load_sub(FinalPatchExpandX4(fx["config"]["dim"]), fx, "final_patch_expand_x4")
    with torch.no_grad():
        y = up(fx["input"].unflatten(1, (h, w)))
    torch.testing.assert_close(y.flatten(1, 2), fx["output"], **SUB_TOL)


def test_stem_matches_reference():
    fx = load_fixture("braunetpp", "stem.pt")
    stem = _load_sub(Stem(3, 96), fx, "stem")
    with torch.no_grad():
        y = stem(fx["input"]).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, fx["output"], **SUB_TOL)


# --------------------------------------------------------------------------------------------
# Converters and checkpoint files.


def test_converter_names_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys bra_unet.extra.weight"):
        convert_official_state_dict({"bra_unet.norm_up.weight": torch.ones(96), "bra_unet.extra.weight": torch.ones(1)})


SMALL = {
    "embed_dims": [32, 64, 128, 256],
    "encoder_depths": (1, 1, 2),
    "decoder_depths": (1, 1, 1),
    "topks": (1, 2, 2),
    "n_win": 2,
}


def test_official_checkpoint_file_loads_and_mismatches_are_clear_errors(reference, tmp_path):
    fx = reference[0]
    # An official-layout checkpoint of a small configuration: every official key of the fixture's key
    # table that has a counterpart here, plus the never-run stages.3 entries, as saved from a
    # DataParallel-wrapped BRAUnet inside a {"state_dict": ...} container.
    source = BRAUNetPP(**SMALL).state_dict()
    official = {}
    for key, shape, _kind, used in fx["keys"]:
        ours = official_to_ours_key(key.removeprefix("bra_unet.")) if used else None
        if ours is None:
            official["module." + key] = torch.zeros(shape[:1])
        elif ours in source:
            official["module." + key] = source.pop(ours)
    assert not source, f"our keys without an official name: {sorted(source)[:5]}"
    path = tmp_path / "synapse_epoch_best.pth"
    torch.save({"state_dict": official, "epoch": 399}, path)

    model = BRAUNetPP(**SMALL)
    load_official_checkpoint(model, path)
    expected = convert_official_state_dict(official)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    with pytest.raises(InputDataError, match="(?s)" + re.escape(str(path)) + ".*size mismatch for head.weight"):
        load_official_checkpoint(BRAUNetPP(**SMALL, num_classes=4), path)
    with pytest.raises(InputDataError, match="(?s)Unexpected key.*skip_attention"):
        load_official_checkpoint(BRAUNetPP(**SMALL, use_sccsa=False), path)
    with pytest.raises(InputDataError, match="does not exist"):
        load_official_checkpoint(model, tmp_path / "missing.pth")


def _fake_biformer(dims: list[int], depths: list[int], head_mismatch: bool = True) -> dict[str, torch.Tensor]:
    """A BiFormer-style state dict (``biformer_base_best.pth`` key layout) with random values."""
    sd: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)

    def put(key, *shape):
        sd[key] = torch.randn(shape, generator=g)

    def bn(prefix, c):
        put(prefix + "weight", c), put(prefix + "bias", c), put(prefix + "running_mean", c)
        put(prefix + "running_var", c)
        sd[prefix + "num_batches_tracked"] = torch.tensor(7)

    (put("downsample_layers.0.0.weight", dims[0] // 2, 3, 3, 3), put("downsample_layers.0.0.bias", dims[0] // 2))
    bn("downsample_layers.0.1.", dims[0] // 2)
    (put("downsample_layers.0.3.weight", dims[0], dims[0] // 2, 3, 3), put("downsample_layers.0.3.bias", dims[0]))
    bn("downsample_layers.0.4.", dims[0])
    for i in range(1, 4):
        put(f"downsample_layers.{i}.0.weight", dims[i], dims[i - 1], 3, 3)
        put(f"downsample_layers.{i}.0.bias", dims[i])
        bn(f"downsample_layers.{i}.1.", dims[i])
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            put(p + "pos_embed.weight", c, 1, 3, 3), put(p + "pos_embed.bias", c)
            for norm in ("norm1", "norm2"):
                put(p + norm + ".weight", c), put(p + norm + ".bias", c)
            if i < 3:
                put(p + "attn.qkv.qkv.weight", 3 * c, c), put(p + "attn.qkv.qkv.bias", 3 * c)
                put(p + "attn.wo.weight", c, c), put(p + "attn.wo.bias", c)
            else:  # BiFormer's last stage is full attention (AttentionLePE)
                put(p + "attn.qkv.weight", 3 * c, c), put(p + "attn.proj.weight", c, c)
                put(p + "attn.proj.bias", c)
            put(p + "attn.lepe.weight", c, 1, 5, 5), put(p + "attn.lepe.bias", c)
            put(p + "mlp.0.weight", 3 * c, c), put(p + "mlp.0.bias", 3 * c)
            put(p + "mlp.3.weight", c, 3 * c), put(p + "mlp.3.bias", c)
    bn("norm.", dims[3])
    put("head.weight", 1000, dims[3]), put("head.bias", 1000)
    return sd


def test_biformer_weights_load_into_the_encoder_and_report_the_rest(tmp_path):
    model = BRAUNetPP(in_channels=1, num_classes=2, **SMALL)
    sd = _fake_biformer(SMALL["embed_dims"], [2, 2, 3, 2])
    sd["stages.2.1.mlp.0.weight"] = torch.zeros(5, 5)  # a shape that does not fit must be skipped, not loaded
    path = tmp_path / "biformer_base_best.pth"
    torch.save({"model": sd, "epoch": 300, "args": argparse.Namespace(model="biformer_base")}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_biformer_weights(model, path)

    own = model.state_dict()
    encoder = {k for k in own if k.startswith(("encoder.", "bottleneck."))}
    assert set(report.loaded) == encoder - {"encoder.2.blocks.1.mlp.fc1.weight"}
    assert set(report.left_at_init) == set(own) - set(report.loaded)
    assert torch.equal(own["encoder.0.downsample.conv1.weight"], sd["downsample_layers.0.0.weight"])
    assert torch.equal(own["encoder.2.blocks.1.attn.qkv.weight"], sd["stages.2.1.attn.qkv.qkv.weight"])
    assert torch.equal(own["bottleneck.bn.running_var"], sd["downsample_layers.3.1.running_var"])
    for key in report.left_at_init:
        assert torch.equal(own[key], before[key]), key
    assert "shape" in report.skipped["stages.2.1.mlp.0.weight"]
    for key in (
        "stages.0.1.norm1.weight",
        "stages.2.2.attn.wo.bias",
        "stages.3.0.attn.proj.weight",
        "norm.weight",
        "head.bias",
    ):
        assert key in report.skipped, key
    assert str(len(report.loaded)) in report.summary()

    torch.save({"model": {"head.weight": torch.ones(2, 2)}}, path)
    with pytest.raises(InputDataError, match="no BiFormer encoder weights"):
        load_biformer_weights(model, path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputDataError, match="cannot be read as a PyTorch checkpoint"):
        load_biformer_weights(model, path)


# --------------------------------------------------------------------------------------------
# Any size that is a multiple of 32, gradients, export.


@pytest.fixture(scope="module")
def random_models():
    """The Synapse network with its own random initialisation, for n_win 7 and 8 (same weights)."""
    torch.manual_seed(0)
    model = BRAUNetPP(n_win=7).eval()
    return {7: model, 8: _assigned(model.state_dict(), n_win=8)}


@pytest.mark.parametrize(
    ("n_win", "size"),
    [(8, (256, 256)), (7, (256, 256)), (7, (288, 224)), (8, (512, 512))],
    ids=["256-nwin8", "256-nwin7-padded", "288x224-padded", "512-nwin8"],
)
def test_inputs_of_any_multiple_of_32_give_finite_full_size_logits(random_models, n_win, size):
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        y = random_models[n_win](x)
    assert y.shape == (1, 9, *size)
    assert torch.isfinite(y).all()


def test_inputs_that_are_not_multiples_of_32_or_wrong_channels_are_refused(random_models):
    with pytest.raises(ValueError, match="multiples of 32"):
        random_models[7](torch.randn(1, 1, 224, 240))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        random_models[7](torch.randn(1, 3, 224, 224))


def test_every_parameter_gets_a_gradient_on_a_padded_input():
    torch.manual_seed(0)
    dims = [32, 64, 128, 256]
    model = BRAUNetPP(
        num_classes=3, embed_dims=dims, drop_path_rate=0.0, encoder_depths=(1, 1, 2), decoder_depths=(1, 1, 1)
    ).train()
    x = torch.randn(2, 1, 96, 64)  # level maps 24x16, 12x8, 6x4: all padded for n_win 7
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (2, 96, 64)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_torch_jit_trace_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BRAUNetPP(**{**SMALL, "n_win": 3}).eval()
    x = torch.randn(1, 1, 64, 64)  # maps 16, 8, 4: the padded attention path is traced too
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
    path = tmp_path / "braunetpp.ts"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        got = loaded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_stays_close_to_float32(random_models, dtype):
    model = random_models[7].cuda()
    x = torch.randn(1, 1, 224, 224, device="cuda")
    try:
        with torch.no_grad():
            ref = model(x)
            with torch.autocast("cuda", dtype=dtype):
                y = model(x)
    finally:
        model.cpu()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert max_abs_diff(y, ref) < 0.15 * ref.abs().max().item()


def test_conv_weights_stay_channels_last_after_loading_a_contiguous_state_dict():
    # Stored in the activations' layout, so oneDNN does not copy every weight on every call.
    torch.manual_seed(0)
    model = BRAUNetPP(embed_dims=(32, 64, 128, 256), encoder_depths=(1, 1, 1), decoder_depths=(1, 1, 1))
    conv_weights = [p for p in model.parameters() if p.ndim == 4]
    assert len(conv_weights) > 10
    model.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)


# --------------------------------------------------------------------------------------------
# Ablation switches: SCCSA on/off and the number of skip connections (the paper's skip-count study)

# Full-size Synapse network, (use_sccsa, num_skips) -> parameters; the README lists them.
ABLATION_PARAMS = {
    (True, 3): 50_763_648,
    (True, 2): 35_718_912,
    (True, 1): 31_956_672,
    (True, 0): 31_015_584,
    (False, 3): 31_403_328,
    (False, 2): 31_108_032,
    (False, 1): 31_034_112,
    (False, 0): 31_015_584,
}


@pytest.mark.parametrize(("use_sccsa", "num_skips"), list(ABLATION_PARAMS))
def test_ablation_builds_runs_forward_and_backward_and_counts_its_parameters(use_sccsa, num_skips, record_property):
    with torch.device("meta"):
        n = _n_params(BRAUNetPP(use_sccsa=use_sccsa, num_skips=num_skips))
    record_property("parameters", n)
    assert n == ABLATION_PARAMS[(use_sccsa, num_skips)]
    torch.manual_seed(0)
    tiny = dict(embed_dims=(32, 64, 128, 256), encoder_depths=(1, 1, 1), decoder_depths=(1, 1, 1), n_win=4)
    model = BRAUNetPP(use_sccsa=use_sccsa, num_skips=num_skips, **tiny).train()
    out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 9, 64, 64) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert [k for k, p in model.named_parameters() if p.grad is None] == []
    kept = [level.use_skip for level in model.decoder]  # decoder[0] is the 1/4 level
    assert kept == [i < num_skips for i in range(3)]


def test_skip_count_outside_0_to_3_is_refused():
    with pytest.raises(ValueError, match="num_skips"):
        BRAUNetPP(num_skips=4)


@pytest.mark.parametrize("num_skips", [0, 1])
def test_skip_count_ablation_scripts_and_matches_eager(num_skips):
    torch.manual_seed(0)
    tiny = dict(embed_dims=(32, 64, 128, 256), encoder_depths=(1, 1, 1), decoder_depths=(1, 1, 1), n_win=4)
    model = BRAUNetPP(num_skips=num_skips, **tiny).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-4, atol=1e-4)
