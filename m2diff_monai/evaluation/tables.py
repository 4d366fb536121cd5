"""The report's tables as data frames and CSV files: per-subject rows in column order, the per-method
summary (mean, std, n) and the paired t-tests (:mod:`.stats`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAPER_METRICS = ("ssim_paper", "psnr_paper", "nmse_paper", "lpips_paper")  # the papers' protocol (paper_protocol.py)
_LEADING = ("subject", "method", "ssim", "psnr", "nmse", "lpips", "bias")


def write_csv(path: Path, df) -> Path:
    """CSV written atomically; floats in full precision (the file round-trips the numbers)."""
    from m2diff_monai.io.atomic import write_with

    return write_with(path, lambda tmp: df.to_csv(tmp, index=False))


def region_names(df) -> list[str]:
    return [c[len("bias_") :] for c in df.columns if c.startswith("bias_")]


def order_columns(df):
    """subject, method, SSIM, PSNR, NMSE, LPIPS, bias (brain), bias per region, 2D metrics, the rest."""
    regions = [f"bias_{r}" for r in region_names(df)]
    two_d = [c for c in df.columns if c.startswith(("psnr_2d", "ssim_2d", "nmse_2d"))]
    first = [c for c in (*_LEADING, *regions, *two_d) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _headline_metrics(df) -> list[str]:
    """SSIM, PSNR, NMSE, LPIPS, bias (brain), bias per region, axial 2D metrics: what both the summary and the
    t-tests report first, in this order."""
    return [*_LEADING[2:], *(f"bias_{r}" for r in region_names(df)), "ssim_2d_axial", "psnr_2d_axial", "nmse_2d_axial"]


def summary_metrics(df) -> list[str]:
    candidates = [
        *_headline_metrics(df),
        "ssim_2d",
        "psnr_2d",
        "nmse_2d",
        *[f"{m}_2d_{o}" for o in ("coronal", "sagittal") for m in ("ssim", "psnr", "nmse")],
        *PAPER_METRICS,
    ]
    from m2diff_monai.evaluation.quantitation import recovery_metrics

    return [c for c in candidates if c in df.columns] + recovery_metrics(df)


def ttest_metrics(df) -> list[str]:
    import pandas as pd

    candidates = [*_headline_metrics(df), *PAPER_METRICS]
    return [c for c in candidates if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any()]


def method_stats(df, metric: str) -> dict[str, tuple[float, float, int]]:
    """method → (mean, sample std, n) with :func:`.stats.summary_table` (NaN and ±inf rows left out)."""
    import pandas as pd

    from m2diff_monai.evaluation.stats import summary_table

    clean = df[["method", metric]].copy()
    clean[metric] = pd.to_numeric(clean[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
    table = summary_table(clean, [metric])
    return {r["method"]: (r[f"{metric}_mean"], r[f"{metric}_std"], int(r["n"])) for _, r in table.iterrows()}


def summary_frame(df, metrics: Sequence[str]):
    """One row per method (LD first): ``<metric>_mean``, ``<metric>_std`` (ddof 1), ``<metric>_n``."""
    import pandas as pd

    methods = list(dict.fromkeys(df["method"]))
    rows = [{"method": m, "subjects": int((df["method"] == m).sum())} for m in methods]
    for metric in metrics:
        values = method_stats(df, metric)
        for row in rows:
            mean, std, n = values.get(row["method"], (float("nan"), float("nan"), 0))
            row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_n": n})
    return pd.DataFrame(rows)


def ttest_frame(df, metrics: Sequence[str]):
    """Paired two-tailed t-tests (:func:`.stats.paired_ttests`): LD against each method, then every method pair."""
    import pandas as pd

    from m2diff_monai.evaluation.stats import paired_ttests

    parts = []
    for metric in metrics:
        clean = df[["subject", "method", metric]].copy()
        clean[metric] = pd.to_numeric(clean[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
        part = paired_ttests(clean, metric)
        part.insert(0, "metric", metric)
        parts.append(part)
    columns = ["metric", "method_a", "method_b", "n", "mean_a", "mean_b", "mean_diff", "t", "p"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


__all__ = [
    "PAPER_METRICS",
    "method_stats",
    "order_columns",
    "region_names",
    "summary_frame",
    "summary_metrics",
    "ttest_frame",
    "ttest_metrics",
    "write_csv",
]
