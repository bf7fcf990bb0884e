"""Pieces both networks share: stochastic depth and the transformer weight initialisation.

Stochastic depth is MONAI's ``DropPath`` (per-sample drop of a residual branch, survivors scaled by
1/(1-p)): the same draws and values as torchvision's ``StochasticDepth(mode="row")`` and the official
BRAU-Net++ code. The truncated normal is torch's ``nn.init.trunc_normal_``, which the reference
implementations call; MONAI's ``trunc_normal_`` draws different values from the same seed.
"""

from __future__ import annotations

from monai.networks.layers import DropPath
from torch import nn

__all__ = ["DropPath", "init_linear_and_layer_norm_"]


def init_linear_and_layer_norm_(m: nn.Module, std: float = 0.02) -> None:
    """Transformer init of one module: Linear weight truncated normal (std 0.02, cut at ±2), bias 0; LayerNorm 1 / 0.

    Other modules are left as they are; call it on every module (``model.apply`` or a loop over ``modules()``).
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
