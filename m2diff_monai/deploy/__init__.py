"""MONAI Deploy side of an exported bundle: in-memory volumes in, the enhanced volume out, through MONAI parts.

A bundle's ``inference.json`` (source and exported alike) declares the ids MONAI Deploy's
``MonaiBundleInferenceOperator`` reads: ``preprocessing`` (a ``Compose`` of :class:`PreparePETd`, made by
:func:`prepare_pet` from the embedded ``data_config``), ``inferer``
(:class:`PETEnhancementInferer`) and ``postprocessing`` (a ``Compose`` of :class:`RestorePETd`).
:func:`run_bundle_on_volume` calls them in the operator's order; docs/export.md says why an application wraps it
in its own operator instead of the generic one.
"""

from m2diff_monai.deploy.inferer import PETEnhancementInferer, ScriptedDenoiser
from m2diff_monai.deploy.runner import load_bundle_network, run_bundle_on_volume
from m2diff_monai.deploy.transforms import PreparePETd, RestorePETd, prepare_pet

__all__ = [
    "PETEnhancementInferer",
    "PreparePETd",
    "RestorePETd",
    "ScriptedDenoiser",
    "load_bundle_network",
    "prepare_pet",
    "run_bundle_on_volume",
]
