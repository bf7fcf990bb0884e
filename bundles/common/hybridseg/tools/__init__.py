"""Tooling around the bundles, not imported by any bundle config and not vendored into packaged bundles.

``cli`` (``python -m hybridseg``), ``bench``, ``demo``, ``export``, ``package``, the synthetic data generators
(``synth_busi``, ``synth_synapse``), the TransUNet release converter (``transunet``) and the MONAI Deploy apps
(``deploy``, which needs the SDK's own environment).
"""
