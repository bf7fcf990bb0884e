"""Swin Transformer V2 parts against the torchvision reference fixtures, and the ImageNet loader."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridseg.io import InputDataError
from hybridseg.networks.cfformer import convert_reference_state_dict
from hybridseg.networks.swin_v2 import (
    PatchMergingV2,
    SwinTransformerBlockV2,
    SwinV2Features,
    load_swin_v2_imagenet,
    relative_coords_table,
    relative_position_index,
    shift_region_mask,
    swin_v2_state_dict_from_torchvision,
    window_layout,
)
from tests.reference import assert_close, crc32_state_dict, load_fixture

NET = "cfformer"


def submodule_state_dict(sd: dict, prefix: str) -> dict:
    """Convert a standalone reference submodule state dict via the full-model converter (prefix in, out)."""
    full = convert_reference_state_dict({prefix + k: v for k, v in sd.items()})
    assert all(k.startswith(prefix) for k in full), sorted(full)
    return {k[len(prefix) :]: v for k, v in full.items()}


def torchvision_swin_file_dict(model_name: str = "swin_v2_t") -> dict[str, torch.Tensor]:
    """A fake torchvision ``swin_v2_t`` checkpoint: the fixture's key table, random values, constants."""
    fx = load_fixture(NET, "swin_v2_t_features.pt")
    sd = crc32_state_dict(fx["keys"])
    for key, shape, kind, _used in fx["keys"]:
        if kind == "other_buffer":
            const = relative_coords_table() if key.endswith("relative_coords_table") else relative_position_index()
            assert list(const.shape) == shape
            sd[key] = const.clone()
    return sd


@pytest.fixture(scope="module")
def block_fixture() -> dict:
    return load_fixture(NET, "swinv2_block.pt")


def test_coordinate_tables_equal_torchvision_buffers_bit_for_bit(block_fixture):
    sd = block_fixture["state_dict"]
    assert torch.equal(relative_coords_table(), sd["attn.relative_coords_table"])
    assert torch.equal(relative_position_index(), sd["attn.relative_position_index"])


@pytest.mark.parametrize(
    "case", ["shift4_16x16", "shift0_16x16", "shift4_14x14", "shift0_14x14", "shift4_7x7", "shift0_7x7"]
)
def test_swinv2_block_matches_reference_case(block_fixture, case):
    c = block_fixture["cases"][case]
    block = SwinTransformerBlockV2(96, 3, shift=c["shift_size"]).eval()
    block.load_state_dict(submodule_state_dict(block_fixture["state_dict"], "encoder.transformer.features.1.0."))
    seen = {}
    block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o.detach().clone()))
    block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o.detach().clone()))
    with torch.no_grad():
        out = block(c["input"])
        bias = block.attn.relative_position_bias()
    assert_close(bias, block_fixture["relative_position_bias_1x3x64x64"], "relative position bias")
    assert_close(seen["attn"], c["attn_out_before_norm1"], f"{case} attention output")
    assert_close(seen["mlp"], c["mlp_out_before_norm2"], f"{case} MLP output")
    assert_close(out, c["output"], f"{case} block output")


def test_shift_mask_separates_regions_only_in_the_last_window_row_and_column():
    mask = shift_region_mask(16, 16, 8, 4, 4)  # 2x2 windows
    assert mask.shape == (4, 64, 64)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    # Window 3 (bottom-right) holds 4 regions of 16 tokens: each token sees 16 unmasked keys.
    assert torch.all((mask[3] == 0).sum(-1) == 16)


def torchvision_partition(x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """torchvision written out: zero pad, drop the shift on axes fitting one window, roll, partition."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (window - w % window) % window, 0, (window - h % window) % window))
    ph, pw = x.shape[1:3]
    sh, sw = (0 if window >= ph else shift), (0 if window >= pw else shift)
    x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = x.view(b, ph // window, window, pw // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, c)


@pytest.mark.parametrize("h, w", [(7, 7), (14, 14), (16, 16), (10, 24), (7, 24), (56, 56)])
@pytest.mark.parametrize("shift", [0, 4])
def test_window_layout_gathers_like_pad_roll_partition_and_scatters_back(h, w, shift):
    x = torch.randn(2, h, w, 3)
    layout = window_layout(h, w, 8, shift)
    tokens = torch.cat([x.reshape(2, h * w, 3), torch.zeros(2, 1, 3)], dim=1)
    windows = tokens[:, layout.gather]
    assert torch.equal(windows, torchvision_partition(x, 8, shift))
    assert torch.equal(windows[:, layout.scatter].view(2, h, w, 3), x)
    assert layout.padded == (h % 8 != 0 or w % 8 != 0)
    assert (layout.shift_mask is None) == (shift == 0 or (h <= 8 and w <= 8))


@pytest.mark.parametrize("h, w", [(7, 7), (7, 24), (16, 16)])
def test_traced_window_layout_always_pads_and_masks_shifted_blocks_with_the_same_result(h, w):
    eager, traced = window_layout(h, w, 8, 4), window_layout(h, w, 8, 4, traced=True)
    assert torch.equal(eager.gather, traced.gather) and torch.equal(eager.scatter, traced.scatter)
    assert traced.padded and traced.shift_mask is not None
    expected = torch.zeros_like(traced.shift_mask) if eager.shift_mask is None else eager.shift_mask
    assert torch.equal(traced.shift_mask, expected)


def test_shift_mask_equals_torchvision_slice_construction():
    for ph, pw, sh, sw in [(16, 16, 4, 4), (8, 24, 0, 4), (24, 8, 4, 0), (32, 16, 4, 4)]:
        region = torch.zeros(ph, pw)  # torchvision: label the 3x3 slice grid, then compare labels
        count = 0
        for hs in ((0, -8), (-8, -sh), (-sh, None)):
            for ws in ((0, -8), (-8, -sw), (-sw, None)):
                region[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        region = region.view(ph // 8, 8, pw // 8, 8).permute(0, 2, 1, 3).reshape(-1, 64)
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        expected = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        assert torch.equal(shift_region_mask(ph, pw, 8, sh, sw), expected), (ph, pw, sh, sw)


def test_shift_mask_cached_under_inference_mode_still_allows_training_backward():
    block = SwinTransformerBlockV2(32, 2, shift=4)
    x = torch.randn(1, 16, 16, 32)
    with torch.inference_mode():
        block(x)  # fills the mask cache inside inference mode
    block(x).sum().backward()
    assert block.attn.qkv.weight.grad is not None


@pytest.mark.parametrize("case", ["1x16x16x96", "2x7x7x96"])
def test_patch_merging_v2_matches_reference_case(case):
    fx = load_fixture(NET, "patch_merging_v2.pt")
    c = fx["cases"][case]
    pm = PatchMergingV2(96).eval()
    pm.load_state_dict(submodule_state_dict(fx["state_dict"], "encoder.transformer.features.2."))
    with torch.no_grad():
        gathered = pm.gather(c["input"])
        reduced = pm.reduction(gathered)
        out = pm(c["input"])
    assert_close(gathered, c["gathered_4C_input_to_reduction"], f"{case} gathered 4C")
    assert_close(reduced, c["reduction_out"], f"{case} reduction")
    assert_close(out, c["output"], f"{case} output")


def test_swin_v2_t_features_match_reference_after_every_feature_layer():
    fx = load_fixture(NET, "swin_v2_t_features.pt")
    model = SwinV2Features("swin_v2_t").eval()
    tv = crc32_state_dict(fx["keys"])
    for name in ("features.0.0.weight", "features.1.0.attn.logit_scale", "features.5.3.mlp.3.weight"):
        s, a, first, last = fx["fill_checksums"][name].tolist()
        t = tv[name].double().flatten()
        assert math.isclose(t.sum().item(), s, rel_tol=1e-9, abs_tol=1e-9), name
        assert math.isclose(t.abs().sum().item(), a, rel_tol=1e-9) and t[0].item() == first and t[-1].item() == last
    model.load_state_dict(swin_v2_state_dict_from_torchvision(tv, model))
    x = fx["input"]
    with torch.no_grad():
        for i, (layer, (name, ref)) in enumerate(zip(model.features, fx["all_feature_outputs"].items(), strict=True)):
            x = layer(x)
            assert name.startswith(f"features{i}_")
            assert_close(x, ref, name)
        outs = model(fx["input"])
    for out, ref in zip(outs, fx["outputs"].values(), strict=True):
        assert_close(out, ref, "stage output")


@pytest.mark.parametrize(
    "name, used_params", [("swin_v2_t", 27_581_034), ("swin_v2_s", 48_966_906), ("swin_v2_b", 86_903_800)]
)
def test_parameter_count_equals_reference_used_in_forward(name, used_params):
    with torch.device("meta"):
        model = SwinV2Features(name)
    assert sum(p.numel() for p in model.parameters()) == used_params


@pytest.mark.parametrize("name, last_p", [("swin_v2_t", 0.2), ("swin_v2_s", 0.3), ("swin_v2_b", 0.5)])
def test_stochastic_depth_rises_linearly_from_zero_to_the_model_maximum(name, last_p):
    with torch.device("meta"):
        model = SwinV2Features(name)
    ps = [m.stochastic_depth.drop_prob for m in model.modules() if isinstance(m, SwinTransformerBlockV2)]
    assert ps[0] == 0.0 and ps[-1] == pytest.approx(last_p)
    assert all(b > a for a, b in zip(ps, ps[1:], strict=False))
    with torch.device("meta"):
        custom = SwinV2Features(name, stochastic_depth_prob=0.1)
    assert max(m.stochastic_depth.drop_prob for m in custom.modules() if isinstance(m, SwinTransformerBlockV2)) == 0.1


def test_fresh_init_zeroes_linear_biases_and_sets_logit_scale_ln10():
    model = SwinV2Features("swin_v2_t")
    attn = model.features[1][0].attn
    assert torch.all(attn.qkv.bias == 0) and torch.all(attn.cpb_mlp[0].bias == 0)
    assert torch.allclose(attn.logit_scale, torch.full_like(attn.logit_scale, math.log(10.0)))
    assert attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_key_bias_has_no_effect_on_the_attention_output():
    block = SwinTransformerBlockV2(32, 2).eval()
    x = torch.randn(1, 8, 8, 32)
    with torch.no_grad():
        before = block(x)
        block.attn.qkv.bias[32:64] += 5.0
        after = block(x)
    assert torch.equal(before, after)


@pytest.fixture(scope="module")
def swin_t_file(tmp_path_factory) -> tuple:
    """A fake torchvision swin_v2_t checkpoint saved once for the loader tests: (path, state dict)."""
    sd = torchvision_swin_file_dict()
    path = tmp_path_factory.mktemp("swin") / "swin_v2_t.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def swin_t_model() -> SwinV2Features:
    return SwinV2Features("swin_v2_t")


def save_modified(sd: dict, tmp_path, **changes) -> object:
    """Save ``sd`` with entries replaced (a value) or removed (None) to a new file; returns its path."""
    sd = dict(sd)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    path = tmp_path / "modified.pth"
    torch.save(sd, path)
    return path


def test_loader_reads_torchvision_checkpoint_and_ignores_head_norm_and_constants(swin_t_file, swin_t_model):
    path, sd = swin_t_file
    ignored = load_swin_v2_imagenet(swin_t_model, path)
    constants = [k for k in sd if k.endswith(("relative_coords_table", "relative_position_index"))]
    assert len(constants) == 2 * 12  # two per block
    assert sorted(ignored) == sorted(["norm.weight", "norm.bias", "head.weight", "head.bias", *constants])
    assert torch.equal(swin_t_model.features[5][3].mlp[3].weight, sd["features.5.3.mlp.3.weight"])


def test_loader_sums_rgb_patch_embedding_for_a_gray_model(swin_t_file):
    path, sd = swin_t_file
    gray = SwinV2Features("swin_v2_t", in_channels=1)
    load_swin_v2_imagenet(gray, path)
    assert torch.equal(gray.features[0][0].weight, sd["features.0.0.weight"].sum(1, keepdim=True))


def test_loader_error_lists_missing_unexpected_and_misshapen_keys(swin_t_file, swin_t_model, tmp_path):
    _, sd = swin_t_file
    path = save_modified(
        sd,
        tmp_path,
        features__3__1__attn__proj__bias=None,
        features__9__extra__weight=torch.zeros(3),
        features__2__reduction__weight=torch.zeros(5, 5),
    )
    with pytest.raises(InputDataError) as err:
        load_swin_v2_imagenet(swin_t_model, path)
    msg = str(err.value)
    assert str(path) in msg
    for key in ("features.3.1.attn.proj.bias", "features.9.extra.weight", "features.2.reduction.weight [5, 5]"):
        assert key in msg


def test_loader_rejects_a_checkpoint_of_another_swin_size(swin_t_file):
    with torch.device("meta"):
        model_s = SwinV2Features("swin_v2_s")  # the check runs before loading, so shapes suffice
    with pytest.raises(InputDataError, match=r"missing keys: features\.5\.6\."):
        load_swin_v2_imagenet(model_s, swin_t_file[0])


def test_loader_rejects_constant_buffers_of_another_window(swin_t_file, swin_t_model, tmp_path):
    _, sd = swin_t_file
    key = "features.1.0.attn.relative_coords_table"
    path = save_modified(sd, tmp_path, **{key.replace(".", "__"): sd[key] * 2})
    with pytest.raises(InputDataError, match="relative_coords_table"):
        load_swin_v2_imagenet(swin_t_model, path)


def test_loader_rejects_a_file_that_is_not_a_state_dict(swin_t_model, tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputDataError, match="junk.pth"):
        load_swin_v2_imagenet(swin_t_model, path)
