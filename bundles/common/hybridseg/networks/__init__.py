"""The two published networks, their builders (one per published variant) and the backbones they are built from.

BRAU-Net++'s builder is ``hybridseg.networks.braunetpp.braunetpp``; it is not re-exported here, where its name
would shadow the ``braunetpp`` module.
"""

from hybridseg.networks.braunetpp import BRAUNetPP
from hybridseg.networks.cfformer import CFFormer, cfformer_b, cfformer_l, cfformer_s

__all__ = ["BRAUNetPP", "CFFormer", "cfformer_b", "cfformer_l", "cfformer_s"]
