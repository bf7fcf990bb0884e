"""Bi-level routing attention: reference fixtures, chunking, padding for any map size, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridseg.networks.bra import BiLevelRoutingAttention, TopkRouting
from hybridseg.networks.braunetpp import official_to_ours_key
from tests.reference import load_fixture, max_abs_diff


def _bra_from_fixture(name: str) -> tuple[BiLevelRoutingAttention, dict]:
    """Our BRA with the fixture's filled weights, loaded through the official->ours key mapping."""
    fx = load_fixture("braunetpp", name)
    cfg = fx["config"]
    assert cfg["kv_downsample_mode"] == "identity" and cfg["param_attention"] == "qkvo"
    bra = BiLevelRoutingAttention(
        cfg["dim"], cfg["num_heads"], cfg["n_win"], cfg["topk"], cfg["qk_dim"], cfg["side_dwconv"]
    ).eval()
    bra.load_state_dict({official_to_ours_key(k, "bra"): v for k, v in fx["state_dict"].items()}, strict=True)
    return bra, fx


def _run_with_routing(bra: BiLevelRoutingAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the routing indices the router produced."""
    seen = []
    handle = bra.router.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            y = bra(x)
    finally:
        handle.remove()
    return y, seen[-1]


def test_bra_matches_reference_fixture_and_routing():
    bra, fx = _bra_from_fixture("bra.pt")
    y, r_idx = _run_with_routing(bra, fx["input"])
    torch.testing.assert_close(y, fx["output"], rtol=2e-5, atol=2e-5)
    assert torch.equal(r_idx, fx["r_idx"])


def test_bra_with_every_region_routed_matches_reference_fixture():
    bra, fx = _bra_from_fixture("bra_topk_all.pt")
    y, r_idx = _run_with_routing(bra, fx["input"])
    torch.testing.assert_close(y, fx["output"], rtol=2e-5, atol=2e-5)
    assert torch.equal(r_idx.sort(-1).values, fx["r_idx"].sort(-1).values)


def test_chunked_gather_gives_the_one_shot_result():
    bra, fx = _bra_from_fixture("bra.pt")
    bra.kv_chunk_bytes = None
    one_shot, _ = _run_with_routing(bra, fx["input"])
    bra.kv_chunk_bytes = 1  # one query region per chunk: 98 chunks
    chunked, _ = _run_with_routing(bra, fx["input"])
    torch.testing.assert_close(chunked, one_shot, rtol=1e-6, atol=1e-6)


def _naive_bra(bra: BiLevelRoutingAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loop-by-loop BRA with the documented padding semantics: (N, height, width, C) -> output, routing, real regions.

    Regions are ceil(height/S) x ceil(width/S) pixels of the zero-padded map; only real pixels count in the
    region means and act as keys; a region without real pixels is never routed to.
    """
    n, height, width, c = x.shape
    s, dk, m, scale = bra.n_win, bra.qk_dim, bra.num_heads, bra.scale
    hr, wr = -(-height // s), -(-width // s)
    qkv = F.linear(x.double(), bra.qkv.weight.double(), bra.qkv.bias.double())
    q, k, v = qkv[..., :dk], qkv[..., dk : 2 * dk], qkv[..., 2 * dk :]
    regions = [
        [
            (y, xx)
            for y in range(j * hr, (j + 1) * hr)
            for xx in range(i * wr, (i + 1) * wr)
            if y < height and xx < width
        ]
        for j in range(s)
        for i in range(s)
    ]
    out = torch.zeros(n, height, width, c, dtype=torch.float64)
    routes = torch.zeros(n, s * s, bra.topk, dtype=torch.long)
    for b in range(n):
        q_r = torch.stack(
            [
                q[b, [p[0] for p in px], [p[1] for p in px]].mean(0) if px else torch.zeros(dk, dtype=torch.float64)
                for px in regions
            ]
        )
        k_r = torch.stack(
            [
                k[b, [p[0] for p in px], [p[1] for p in px]].mean(0) if px else torch.zeros(dk, dtype=torch.float64)
                for px in regions
            ]
        )
        logits = (q_r * scale) @ k_r.T
        logits[:, [len(px) == 0 for px in regions]] = float("-inf")
        routes[b] = logits.topk(bra.topk, dim=-1).indices
        for r, px in enumerate(regions):
            keys = [p for sel in routes[b, r].tolist() for p in regions[sel]]
            ky, kx = [p[0] for p in keys], [p[1] for p in keys]
            for y, xx in px:
                for h in range(m):
                    qs, vs = slice(h * dk // m, (h + 1) * dk // m), slice(h * c // m, (h + 1) * c // m)
                    att = torch.softmax((q[b, y, xx, qs] * scale) @ k[b, ky, kx, qs].T, -1)
                    out[b, y, xx, vs] = att @ v[b, ky, kx, vs]
    lce = F.conv2d(
        v.permute(0, 3, 1, 2), bra.lce.weight.double(), bra.lce.bias.double(), padding=bra.lce.padding, groups=c
    ).permute(0, 2, 3, 1)
    y = F.linear(out + lce, bra.proj.weight.double(), bra.proj.bias.double())
    return y, routes, torch.tensor([len(px) > 0 for px in regions])


@pytest.mark.parametrize("size", [(9, 9), (10, 8), (4, 11)], ids=["unpadded", "padded", "padded-empty-regions"])
def test_bra_on_any_map_size_matches_loop_reference(size):
    # n_win 3: 9x9 needs no padding; 10x8 pads to 12x9 (regions 4x3); 4x11 pads to 6x12 (regions
    # 2x4), so the bottom region row holds only padding and must never be routed to.
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=3, topk=3).eval()
    x = torch.randn(2, *size, 16)
    y, routes = _run_with_routing(bra, x)
    y_ref, routes_ref, real = _naive_bra(bra, x)
    # Routing of regions without real pixels is irrelevant (their outputs are cropped away).
    assert torch.equal(routes[:, real], routes_ref[:, real])
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)


def test_padded_bra_with_every_region_routed_is_global_attention():
    # With all regions routed, BRA is plain global attention over the real pixels (plus LCE), whatever
    # the padding: a direct check that padded pixels never act as keys.
    torch.manual_seed(1)
    bra = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=4, topk=16).eval()
    x = torch.randn(1, 10, 7, 16)
    with torch.no_grad():
        y = bra(x)
        q, k, v = bra.qkv(x).flatten(1, 2).split([16, 16, 16], -1)
        heads = [t.view(1, -1, 2, 8).transpose(1, 2) for t in (q, k, v)]
        att = F.scaled_dot_product_attention(*heads, scale=bra.scale).transpose(1, 2).reshape(1, 10, 7, 16)
        lce = bra.lce(v.view(1, 10, 7, 16).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = bra.proj(att + lce)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_routing_has_no_gradient_and_checkpointed_chunks_keep_gradients():
    torch.manual_seed(2)
    bra = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2)
    x = torch.randn(1, 8, 8, 16, requires_grad=True)
    routes = []
    bra.router.register_forward_hook(lambda _m, _i, out: routes.append(out))
    bra(x).square().sum().backward()
    assert not routes[-1].requires_grad
    grads = [p.grad.clone() for p in bra.parameters()] + [x.grad.clone()]
    for p in list(bra.parameters()) + [x]:
        p.grad = None
    bra.kv_chunk_bytes, bra.checkpoint_chunks = 1, True
    bra(x).square().sum().backward()
    for g, p in zip(grads, list(bra.parameters()) + [x], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_routing_ranks_regions_tied_in_float32_by_their_float64_logits():
    # Logits 1 (region 0) and 1 + 2**-25 (region 1) round to the same float32 number; eager and scripted
    # modules (which cannot switch autocast off) both rank in float64, so they agree on such near ties.
    q = torch.tensor([[[1.0, 1.0]]])
    k = torch.tensor([[[1.0, 0.0], [1.0, 2.0**-25]]])
    assert ((q @ k.transpose(-2, -1))[0, 0, 0] == (q @ k.transpose(-2, -1))[0, 0, 1]).item()  # tied in float32
    router = TopkRouting(topk=1, scale=1.0)
    assert router(q, k).item() == 1
    assert torch.jit.script(router)(q, k).item() == 1


def test_bra_rejects_impossible_configurations():
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=5)
    with pytest.raises(ValueError, match="divisible"):
        BiLevelRoutingAttention(dim=16, num_heads=3, n_win=2, topk=2)


def test_bf16_autocast_bra_stays_close_to_float32():
    bra, fx = _bra_from_fixture("bra.pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = bra(fx["input"])
    assert y.dtype == torch.bfloat16
    assert max_abs_diff(y, fx["output"]) < 0.05 * fx["output"].abs().max().item()


def test_bf16_autocast_on_a_padded_map_stays_close_to_float32():
    torch.manual_seed(3)
    bra = BiLevelRoutingAttention(dim=32, num_heads=2, n_win=3, topk=3).eval()
    x = torch.randn(2, 10, 8, 32)  # pads to 12x9
    with torch.no_grad():
        ref = bra(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bra(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.02
