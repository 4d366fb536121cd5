"""Evaluation: metrics (:mod:`.metrics`), LPIPS (:mod:`.lpips_metric`), tables and paired t-tests (:mod:`.stats`),
CKA (:mod:`.cka`), figure panels (:mod:`.figures`), classical baselines (:mod:`.baselines`) and lesion
quantitation (:mod:`.quantitation`). See docs/fusion-and-metrics.md.

Names are imported lazily so that ``import m2diff_monai.evaluation`` stays cheap (no torch, pandas or matplotlib
until a function that needs them is used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "psnr": "metrics",
    "ssim": "metrics",
    "ssim_map": "metrics",
    "nmse": "metrics",
    "mse": "metrics",
    "relative_bias": "metrics",
    "resolve_data_range": "metrics",
    "per_slice_metrics": "metrics",
    "brain_mask_like_official": "metrics",
    "evaluate_volume": "metrics",
    "LPIPSMetric": "lpips_metric",
    "summary_table": "stats",
    "to_markdown_table": "stats",
    "paired_ttests": "stats",
    "linear_cka": "cka",
    "cka_matrix": "cka",
    "collect_activations": "cka",
    "ActivationRecorder": "cka",
    "save_cka_heatmap": "cka",
    "figure_panel": "figures",
    "gaussian_baseline": "baselines",
    "nlm_baseline": "baselines",
    "bm4d_baseline": "baselines",
    "lesion_recovery": "quantitation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
