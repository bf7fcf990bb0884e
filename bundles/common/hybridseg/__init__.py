"""hybridseg: shared code of the CFFormer (BUSI) and BRAU-Net++ (Synapse) MONAI bundles.

Runtime (what the bundle configs import; vendored into packaged bundles): ``networks`` (CFFormer,
BRAU-Net++, their builders and backbones), ``data`` (readers, label schemes, datalist builders),
``transforms``, ``inferers``, ``backends`` (ONNX Runtime inference), ``metrics`` (Dice, IoU, HD95 protocols),
``handlers`` (evaluation report), ``checkpointing`` (training state, resume, time budget), ``weights`` (every
checkpoint and pretrained-file load, manifests), ``bundle`` (config helpers), ``image_io`` (image/volume
readers and writers) and ``io`` (atomic writes, input errors).
Tooling, never imported by the runtime: ``tools`` (``python -m hybridseg``).
"""

__version__ = "0.1.0"
