"""hybridseg: shared code of the CFFormer (BUSI) and BRAU-Net++ (Synapse) MONAI bundles.

Subpackages: ``networks`` (CFFormer, BRAU-Net++ and their backbones), ``data`` (readers,
datalist builders, synthetic data generators), ``metrics`` (Dice, IoU, HD95 protocols),
plus ``io`` (atomic writes, input errors) and ``cli`` (``python -m hybridseg``).
"""

__version__ = "0.1.0"
