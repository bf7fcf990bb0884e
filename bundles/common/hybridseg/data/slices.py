"""Slice-level training data drawn from volumes, as the official BRAU-Net++ trainer draws it.

The official trainer reads TransUNet's ``train_npz`` list: one item per axial slice of the training
volumes (2211 slices of 18 cases), shuffled by a ``DataLoader`` with ``batch_size`` 24, so every slice
is equally likely in every batch. :class:`VolumeSliceDataset` is that list built from whole volumes (each
loaded and windowed once, e.g. by MONAI's ``CacheDataset``); a shuffling sampler with ``drop_last`` over
it gives batches of exactly the configured size. :func:`per_rank_batch_size` splits that batch between
DDP ranks so that the ranks' batches together are one global batch of the paper's size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

import torch
from monai.transforms import SqueezeDim
from torch.utils.data import Dataset

__all__ = ["VolumeSliceDataset", "iterations_per_epoch", "per_rank_batch_size", "world_size"]


class VolumeSliceDataset(Dataset):
    """Every slice along the last axis of every volume, one item each: ``(volume i, slice z)``.

    ``volumes`` is a map-style dataset of dicts whose ``keys`` hold channel-first volumes (C, H, W, D);
    item ``k`` is volume ``i``'s dict with those keys replaced by slice ``z`` (C, H, W) (other fields, e.g.
    ``case``, are kept) and ``transform`` applied. Items are ordered volume by volume, slice by slice.
    MONAI has no map-style dataset over the slices of several volumes (``PatchDataset`` draws a fixed
    number per volume, ``GridPatchDataset`` is iterable and takes no sampler), hence this class.

    The depths are read from ``volumes`` once, here: with a fully cached ``CacheDataset`` that costs
    nothing, otherwise every volume is loaded once (and again for each slice drawn: keep it cached).
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]] | Dataset,
        keys: str | Sequence[str] = ("image", "label"),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.volumes = volumes
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        if not self.keys:
            raise ValueError("keys must name at least one volume field")
        self.transform = transform
        self._squeeze = SqueezeDim(dim=-1)
        depths = []
        for i in range(len(volumes)):  # type: ignore[arg-type]
            item = volumes[i]
            shapes = {k: tuple(item[k].shape) for k in self.keys}
            if len({s[1:] for s in shapes.values()}) != 1 or any(len(s) != 4 for s in shapes.values()):
                raise ValueError(f"volume {i}: {self.keys} must be channel-first 3D of one shape, got {shapes}")
            depths.append(shapes[self.keys[0]][-1])
        self.depths: tuple[int, ...] = tuple(depths)
        self.index: list[tuple[int, int]] = [(i, z) for i, d in enumerate(depths) for z in range(d)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        vol, z = self.index[idx]
        item = dict(self.volumes[vol])
        for k in self.keys:
            # a copy: the cached volume must never see the augmentations' writes
            item[k] = self._squeeze(item[k][..., z : z + 1].clone())
        return self.transform(item) if self.transform is not None else item


def world_size() -> int:
    """Processes in the default process group (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def per_rank_batch_size(global_batch: int, num_replicas: int | None = None) -> int:
    """Items per rank and iteration so that the ``num_replicas`` ranks (default: the process group's size)
    together hold exactly ``global_batch``; raises ValueError when it does not divide evenly."""
    n = world_size() if num_replicas is None else int(num_replicas)
    if global_batch < 1 or n < 1 or global_batch % n:
        raise ValueError(
            f"a batch of {global_batch} cannot be split evenly over {n} ranks: "
            f"choose a number of ranks that divides it (or change batch_size)"
        )
    return global_batch // n


def iterations_per_epoch(loader: Sized) -> int:
    """Full batches per epoch of a ``drop_last`` training loader; ValueError when there is not one (a
    training set smaller than a batch would otherwise "train" for zero iterations and exit successfully)."""
    n = len(loader)
    if n == 0:
        dataset, batch = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
        size = len(dataset) if isinstance(dataset, Sized) else "?"
        raise ValueError(
            f"the training set holds {size} items, fewer than one batch of {batch} per rank: "
            "add training data or lower batch_size"
        )
    return n
