"""Slice-level batches: every iteration holds exactly the configured number of slices, drawn uniformly."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, DistributedSampler

from hybridseg.data.slices import VolumeSliceDataset, per_rank_batch_size

DEPTHS = (7, 5, 11, 9, 16)  # 48 slices


def _volumes() -> list[dict]:
    """Volumes whose every voxel holds the slice's global id, so a batch tells which slices it holds."""
    vols, start = [], 0
    for i, d in enumerate(DEPTHS):
        ids = torch.arange(start, start + d, dtype=torch.float32).expand(1, 4, 4, d).clone()
        vols.append({"image": ids, "label": ids.long(), "case": f"{i:04d}"})
        start += d
    return vols


def _ids(batch: dict) -> list[int]:
    return [int(v) for v in batch["image"][:, 0, 0, 0]]


def test_slice_dataset_has_one_item_per_slice_in_volume_order():
    ds = VolumeSliceDataset(_volumes())
    assert len(ds) == sum(DEPTHS) and ds.depths == DEPTHS
    item = ds[8]  # volume 1, slice 1
    assert item["image"].shape == (1, 4, 4) and item["case"] == "0001"
    assert int(item["image"][0, 0, 0]) == 8 and int(item["label"][0, 0, 0]) == 8


def test_slice_dataset_never_writes_into_the_volumes():
    vols = _volumes()
    ds = VolumeSliceDataset(vols, transform=lambda d: {**d, "image": d["image"].mul_(0)})
    ds[3]
    assert int(vols[0]["image"][0, 0, 0, 3]) == 3


def test_slice_dataset_rejects_mismatched_image_and_label():
    vols = _volumes()
    vols[2]["label"] = vols[2]["label"][..., :-1]
    with pytest.raises(ValueError, match="volume 2"):
        VolumeSliceDataset(vols)


@pytest.mark.parametrize("batch", [24, 6])
def test_one_process_epoch_is_full_batches_of_distinct_uniformly_drawn_slices(batch):
    torch.manual_seed(0)
    loader = DataLoader(VolumeSliceDataset(_volumes()), batch_size=batch, shuffle=True, drop_last=True)
    sizes, seen = [], []
    for b in loader:
        sizes.append(len(_ids(b)))
        seen += _ids(b)
    assert sizes == [batch] * (sum(DEPTHS) // batch)
    assert len(set(seen)) == len(seen)  # a permutation of all slices, cut into batches
    # drawn over all slices, not per volume: some batch mixes slices of 3 or more volumes
    volume_of = [i for i, d in enumerate(DEPTHS) for _ in range(d)]
    assert max(len({volume_of[x] for x in _ids(b)}) for b in loader) >= 3


def test_ddp_ranks_each_take_their_share_of_every_global_batch():
    """Two ranks (DistributedSampler with num_replicas=2, no processes needed): each iteration, each rank holds
    12 slices and the two halves are 24 distinct slices; over the epoch the slices are drawn without repeats."""
    ds = VolumeSliceDataset(_volumes())
    per_rank = per_rank_batch_size(24, num_replicas=2)
    assert per_rank == 12
    batches = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, even_divisible=True)
        sampler.set_epoch(3)
        batches.append([_ids(b) for b in DataLoader(ds, batch_size=per_rank, sampler=sampler, drop_last=True)])
    assert len(batches[0]) == len(batches[1]) == sum(DEPTHS) // 24  # every rank runs the same iterations
    seen = []
    for r0, r1 in zip(*batches, strict=True):
        assert len(r0) == len(r1) == 12
        assert len(set(r0) | set(r1)) == 24
        seen += r0 + r1
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("batch, ranks", [(24, 5), (24, 0), (0, 1)])
def test_a_batch_that_does_not_split_over_the_ranks_is_refused(batch, ranks):
    with pytest.raises(ValueError, match="cannot be split evenly"):
        per_rank_batch_size(batch, num_replicas=ranks)


def test_a_training_set_smaller_than_one_batch_is_an_error_not_an_empty_epoch():
    from hybridseg.data.slices import iterations_per_epoch

    ds = VolumeSliceDataset(_volumes())
    assert iterations_per_epoch(DataLoader(ds, batch_size=24, drop_last=True)) == 2
    with pytest.raises(ValueError, match="holds 48 items, fewer than one batch of 64"):
        iterations_per_epoch(DataLoader(ds, batch_size=64, drop_last=True))
