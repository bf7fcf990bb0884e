"""Shared network pieces: MONAI's stochastic depth as both networks use it, the transformer initialisation."""

from __future__ import annotations

import torch
from torch import nn

from hybridseg.networks.blocks import DropPath, init_linear_and_layer_norm_


def test_stochastic_depth_drops_whole_samples_in_training_and_is_identity_in_eval():
    sd = DropPath(0.5)
    x = torch.ones(64, 3, 4, 5)
    torch.manual_seed(0)
    y = sd(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1/(1-p)
    assert torch.equal(sd.eval()(x), x)


def test_stochastic_depth_draws_as_the_reference_implementations():
    """One Bernoulli(1-p) draw per sample on an (N, 1, ..., 1) tensor, survivors scaled by 1/(1-p): the draws of
    torchvision's StochasticDepth(p, "row") (Swin-V2) and the official BRAU-Net++ DropPath from the same seed."""
    x = torch.randn(16, 7, 7, 8)
    torch.manual_seed(3)
    ours = DropPath(0.3).train()(x)
    torch.manual_seed(3)
    keep = torch.empty(16, 1, 1, 1).bernoulli_(0.7).div_(0.7)
    assert torch.equal(ours, x * keep)


def test_transformer_init_is_trunc_normal_linear_and_unit_layer_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.LayerNorm(300), nn.Conv2d(2, 2, 3))
    conv = net[2].weight.detach().clone()
    net.apply(init_linear_and_layer_norm_)
    w = net[0].weight
    assert w.abs().max() <= 2.0 and abs(w.std().item() - 0.02) < 1e-3 and torch.all(net[0].bias == 0)
    assert torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)
    assert torch.equal(net[2].weight, conv)  # other modules untouched
