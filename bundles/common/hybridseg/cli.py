"""``python -m hybridseg <command>``: one fire command per tool; ``--help`` on each."""

from __future__ import annotations

import fire

from hybridseg.data.busi import datalist_busi
from hybridseg.data.synapse import datalist_synapse
from hybridseg.data.synth_busi import synth_busi
from hybridseg.data.synth_synapse import synth_synapse
from hybridseg.data.transunet import convert_transunet

COMMANDS = {
    "synth_busi": synth_busi,
    "synth_synapse": synth_synapse,
    "datalist_busi": datalist_busi,
    "datalist_synapse": datalist_synapse,
    "convert_transunet": convert_transunet,
}


def main() -> None:
    fire.Fire(COMMANDS, name="hybridseg")


if __name__ == "__main__":
    main()
