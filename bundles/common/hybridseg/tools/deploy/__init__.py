"""MONAI Deploy App SDK applications for the two bundles.

- :mod:`hybridseg.tools.deploy.synapse_app`: a CT DICOM series -> DICOM SEG with the 8 organ names, plus a NIfTI
  label volume on the series' grid (the pattern of the SDK's spleen example).
- :mod:`hybridseg.tools.deploy.busi_app`: a breast ultrasound DICOM image or PNG files -> mask PNGs at the input's
  size, plus a DICOM SEG when the input is DICOM.

Both run the TorchScript that ``python -m monai.bundle ckpt_export`` writes (it embeds the bundle's
``metadata.json`` and ``inference.json``). The SDK lives in its own environment (``ci/deploy_env.sh``,
``.venv-deploy``): importing this package's submodules needs it, importing ``hybridseg`` does not.
"""
