"""Both networks compile with torch.jit.script and compute what the eager modules compute, at any size."""

from __future__ import annotations

import pytest
import torch

from hybridseg.networks.bra import TopkRouting
from hybridseg.networks.braunetpp import BRAUNetPP
from hybridseg.networks.cfformer import CFFormer

# n_win 4 on levels of side H/4, H/8, H/16: 64 -> 16, 8, 4 (no padding), 96 -> 24, 12, 6 (6 padded to 8).
TINY_BRAUNETPP = {
    "embed_dims": (32, 64, 128, 256),
    "encoder_depths": (1, 1, 1),
    "decoder_depths": (1, 1, 1),
    "topks": (2, 4, 4),
    "n_win": 4,
    "num_classes": 4,
}


def scripted_round_trip(model: torch.nn.Module, tmp_path) -> torch.jit.ScriptModule:
    """torch.jit.script, saved and loaded back (what an exported model.ts goes through)."""
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    return torch.jit.load(str(path))


def assert_same_outputs(model: torch.nn.Module, scripted: torch.nn.Module, shapes: list[tuple[int, ...]]) -> None:
    """Scripted and eager outputs are bit-identical at each input shape."""
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            eager, got = model(x), scripted(x)
        assert got.shape == eager.shape, shape
        assert torch.equal(got, eager), f"{shape}: max |diff| {(got - eager).abs().max().item():.3g}"


@pytest.mark.slow  # the smallest CFFormer (Swin-V2-T) takes ~20 s to script, save, load and run here
def test_scripted_cfformer_equals_eager_at_sizes_with_different_swin_padding(tmp_path):
    torch.manual_seed(0)
    model = CFFormer("s", in_channels=3, num_classes=2).eval()
    scripted = scripted_round_trip(model, tmp_path)
    # 128: Swin maps 32, 16, 8 (shift dropped), 4 (padded); 96: 24, 12 (padded, shifted), 6, 3 (padded).
    assert_same_outputs(model, scripted, [(1, 3, 128, 128), (2, 3, 96, 64)])


@pytest.mark.slow  # ~9 s to script, save, load and run at four sizes on this loaded machine
def test_scripted_braunetpp_decides_routing_padding_per_input(tmp_path):
    torch.manual_seed(0)
    model = BRAUNetPP(**TINY_BRAUNETPP).eval()
    scripted = scripted_round_trip(model, tmp_path)
    # First a size that needs no padding, then sizes that pad some levels (and back): the padding
    # decision is taken per call in the scripted graph, not frozen as a trace would freeze it.
    assert_same_outputs(model, scripted, [(1, 1, 64, 64), (1, 1, 96, 96), (2, 1, 96, 64), (1, 1, 64, 64)])


def test_scripted_routing_ignores_autocast_like_eager_routing():
    """Routing runs in float64, which autocast never casts, in eager and in a scripted graph alike."""
    torch.manual_seed(0)
    router = TopkRouting(topk=8, scale=64**-0.5)
    scripted = torch.jit.script(router)
    q, k = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = router(q, k), scripted(q, k)
        low = torch.topk((q * router.scale) @ k.transpose(-2, -1), k=8, dim=-1).indices  # bf16 logits
    assert torch.equal(got, eager)
    assert not torch.equal(low, eager)  # the inputs are ones where bf16 logits would route differently


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cfformer_b", "braunetpp"])
def test_scripted_published_networks_equal_eager(name, tmp_path):
    torch.manual_seed(0)
    if name == "cfformer_b":
        model = CFFormer("b", in_channels=3, num_classes=1).eval()
        shapes = [(1, 3, 256, 256), (1, 3, 224, 224)]  # Swin maps 64..8 unpadded; 56..7 padded
    else:
        model = BRAUNetPP(in_channels=1, num_classes=9, n_win=7).eval()
        shapes = [(1, 1, 224, 224), (1, 1, 256, 256)]  # levels 56, 28, 14 split by 7; 64, 32, 16 padded
    assert_same_outputs(model, scripted_round_trip(model, tmp_path), shapes)
