"""The two published networks, their builders (one per published variant) and the backbones they are built from."""

from hybridseg.networks.braunetpp import BRAUNetPP, braunetpp
from hybridseg.networks.cfformer import CFFormer, cfformer_b, cfformer_l, cfformer_s

__all__ = ["BRAUNetPP", "CFFormer", "braunetpp", "cfformer_b", "cfformer_l", "cfformer_s"]
