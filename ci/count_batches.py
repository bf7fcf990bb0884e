"""Count the items of every training batch over one epoch of each bundle's own train loader, on generated data.

    .venv/bin/python ci/count_batches.py [--ranks 2]

Builds the demo-sized synthetic sets (BUSI-like: 200 images of 128 px; BTCV-like: 10 volumes of 96 x 96 x 48,
one validation case as the demo holds out, and once with ``--num_val 0``), parses ``train.json`` (plus
``multi_gpu_train.json`` with ``--ranks``, each rank's sampler built in this process) and prints, per bundle,
the iterations of one epoch and the batch sizes seen.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

from monai.bundle import ConfigParser

import hybridseg.data.slices as slices
from hybridseg.data.busi import datalist_busi
from hybridseg.data.synapse import datalist_synapse
from hybridseg.tools.synth_busi import synth_busi
from hybridseg.tools.synth_synapse import synth_synapse

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def epoch(bundle: str, overrides: dict, ranks: int) -> list[list[int]]:
    """Batch sizes of one epoch, per rank."""
    configs = [str(BUNDLES / bundle / "configs" / "train.json")]
    if ranks > 1:
        configs.append(str(BUNDLES / bundle / "configs" / "multi_gpu_train.json"))
    slices.world_size = lambda: ranks  # what the process group would say
    per_rank = []
    for rank in range(ranks):
        parser = ConfigParser()
        parser.read_config(configs)
        parser.update({**overrides, "num_workers": 0})
        if ranks > 1:
            parser.update({"train#sampler#num_replicas": ranks, "train#sampler#rank": rank})
        per_rank.append([len(b["image"]) for b in parser.get_parsed_content("train#dataloader")])
    return per_rank


def report(name: str, per_rank: list[list[int]], items: int) -> None:
    sizes = [sum(s) for s in zip(*per_rank, strict=True)]
    counts = ", ".join(f"{n} x {size}" for size, n in sorted(collections.Counter(sizes).items()))
    print(f"{name}: {items} training items, {len(sizes)} iterations; items per iteration (all ranks): {counts}")
    if len(per_rank) > 1:
        print(f"  per rank: {[collections.Counter(r) for r in per_rank]}")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__).parse_known_args()[1]
    ranks = int(args[args.index("--ranks") + 1]) if "--ranks" in args else 1
    with tempfile.TemporaryDirectory() as tmp:
        ct = Path(tmp) / "synapse" / "RawData" / "Training"
        synth_synapse(out=str(ct), n=10, shape=(96, 96, 48), seed=0)
        for num_val in (1, 0):
            datalist = datalist_synapse(root=str(ct), out=str(ct / f"datalist_{num_val}.json"), num_val=num_val)
            overrides = {"dataset_dir": str(ct), "datalist": datalist}
            per_rank = epoch("braunetpp_synapse", overrides, ranks)
            parser = ConfigParser()
            parser.read_config(str(BUNDLES / "braunetpp_synapse" / "configs" / "train.json"))
            parser.update({**overrides, "num_workers": 0})
            report(f"braunetpp_synapse (num_val {num_val})", per_rank, len(parser.get_parsed_content("train#dataset")))
        us = Path(tmp) / "busi" / "Dataset_BUSI_with_GT"
        synth_busi(out=str(us), n=200, size=128, seed=0)
        datalist_busi(root=str(us), out=str(us / "datalist.json"))
        per_rank = epoch("cfformer_busi", {"dataset_dir": str(us)}, ranks)
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / "cfformer_busi" / "configs" / "train.json"))
        parser.update({"dataset_dir": str(us)})
        report("cfformer_busi", per_rank, len(parser.get_parsed_content("train#data")))


if __name__ == "__main__":
    main()
