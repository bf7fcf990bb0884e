"""Access to the reference fixtures in ``../shared/reference`` and the "crc32-v1" parameter fill.

The fixtures are never copied into the project; tests that need them skip, saying why, when the
folder is absent. ``HYBRIDSEG_REFERENCE_DIR`` overrides the location.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("HYBRIDSEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def fixture_path(network: str, name: str) -> Path:
    """Path of one fixture file; skips the calling test (with the reason) when it is not there."""
    path = REFERENCE_DIR / network / name
    if not path.is_file():
        pytest.skip(f"reference fixture {path} is absent (the shared/reference folder beside the checkout)")
    return path


def load_fixture(network: str, name: str) -> dict:
    """Load one fixture with ``torch.load(weights_only=True)`` (or skip when absent)."""
    return torch.load(fixture_path(network, name), weights_only=True, map_location="cpu")


def crc32_tensor(name: str, shape: list[int] | tuple[int, ...], kind: str = "param") -> torch.Tensor | None:
    """The "crc32-v1" value of one state-dict entry; None for entries the fill leaves as constructed."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    shape = tuple(shape)
    if kind == "param":
        if len(shape) <= 1:
            base = 1.0 if name.endswith("weight") else 0.0
            return base + 0.1 * torch.randn(shape, generator=g)
        fan_in = math.prod(shape) // shape[0]
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if name.endswith("running_var"):
        return 0.75 + 0.5 * torch.rand(shape, generator=g)
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)  # left as constructed
    return None


def crc32_state_dict(keys: list, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Build the filled reference state dict from a fixture key table ``[[key, shape, kind, used], ...]``.

    Alias keys (CFFormer registers its backbones twice) get the tensor of the name they alias, as the
    reference fill seeds a shared tensor once, by its first name. Constant buffers (Swin coordinate
    tables) are omitted: the fill leaves them as constructed and the fixtures do not hold them.
    """
    aliases = aliases or {}
    out: dict[str, torch.Tensor] = {}
    for key, shape, kind, _used in keys:
        if key in aliases:
            continue
        value = crc32_tensor(key, shape, kind)
        if value is not None:
            out[key] = value
    for key, target in aliases.items():
        if target in out:
            out[key] = out[target]
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The fixtures' rule for submodules, backbones and intermediates: max|d| <= 2e-5 * max(1, max|ref|)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    tol = 2e-5 * max(1.0, ref.abs().max().item())
    diff = max_abs_diff(ours, ref)
    assert diff <= tol, f"{what}: max|d| = {diff:.3g} > {tol:.3g}"
