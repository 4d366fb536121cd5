"""MONAI Deploy side of an exported bundle: in-memory volumes in, the enhanced volume out, through MONAI parts.

The exported ``configs/inference.json`` declares three extra ids, the ones MONAI Deploy's
``MonaiBundleInferenceOperator`` reads: ``preprocessing`` (a ``Compose`` of :class:`PreparePETd`), ``inferer``
(:class:`PETEnhancementInferer`) and ``postprocessing`` (a ``Compose`` of :class:`RestorePETd`).
:func:`run_bundle_on_volume` calls them in the operator's order; docs/export.md says why an application wraps it
in its own operator instead of the generic one.
"""

from m2diff_monai.deploy.inferer import PETEnhancementInferer, ScriptedDenoiser
from m2diff_monai.deploy.runner import deploy_config_items, load_bundle_network, run_bundle_on_volume
from m2diff_monai.deploy.transforms import PreparePETd, RestorePETd

__all__ = [
    "PETEnhancementInferer",
    "PreparePETd",
    "RestorePETd",
    "ScriptedDenoiser",
    "deploy_config_items",
    "load_bundle_network",
    "run_bundle_on_volume",
]
