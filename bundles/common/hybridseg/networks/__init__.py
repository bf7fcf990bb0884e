"""The two published networks and the backbones they are built from."""

from hybridseg.networks.braunetpp import BRAUNetPP
from hybridseg.networks.cfformer import CFFormer

__all__ = ["BRAUNetPP", "CFFormer"]
