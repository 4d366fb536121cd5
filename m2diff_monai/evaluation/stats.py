"""Result tables and the paper's statistics: mean ± std per method, two-tailed paired t-tests between methods.

Input is a long table with one row per (subject, method) and one column per metric, e.g. the rows returned by
:func:`m2diff_monai.evaluation.metrics.evaluate_volume` plus ``subject`` and ``method`` columns.
The markdown formatter is written here (a few lines) so ``pandas.DataFrame.to_markdown`` and its ``tabulate``
dependency are not needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps


def summary_table(df: pd.DataFrame, metrics: Sequence[str], group: str = "method", *, digits: int = 4) -> pd.DataFrame:
    """One row per ``group`` value (first-appearance order): ``<metric>_mean``, ``<metric>_std`` (sample std,
    ddof=1, as papers report), ``<metric>`` ("mean ± std" text) and ``n`` (non-missing subjects per group)."""
    missing = [c for c in [group, *metrics] if c not in df.columns]
    if missing:
        raise KeyError(f"columns not in the table: {missing}")
    rows = []
    for name, part in df.groupby(group, sort=False):
        row: dict = {group: name, "n": int(part[list(metrics)].notna().all(axis=1).sum())}
        for metric in metrics:
            values = pd.to_numeric(part[metric], errors="coerce").dropna()
            mean = float(values.mean()) if len(values) else float("nan")
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{metric}_mean"] = mean
            row[f"{metric}_std"] = std
            row[metric] = _mean_std_text(mean, std, digits)
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_std_text(mean: float, std: float, digits: int) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None, *, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; floats with ``digits`` decimals (tiny p-values in e-notation)."""
    columns = list(df.columns if columns is None else columns)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in columns]
    lines = [
        "| " + " | ".join(str(c) for c in columns) + " |",
        "| " + " | ".join("---:" if num else "---" for num in numeric) + " |",
    ]
    for _, row in df[columns].iterrows():
        lines.append("| " + " | ".join(_cell(row[c], digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def paired_ttests(
    df: pd.DataFrame,
    metric: str,
    method_col: str = "method",
    subject_col: str = "subject",
    reference: str | None = None,
) -> pd.DataFrame:
    """Two-tailed paired t-tests (``scipy.stats.ttest_rel``) on ``metric`` between methods, paired by subject.

    ``reference`` given: that method against each other one; otherwise every pair (first-appearance order).
    Columns: ``method_a``, ``method_b``, ``n`` (subjects with both values), ``mean_a``, ``mean_b``,
    ``mean_diff`` (a − b), ``t``, ``p``. Fewer than 2 pairs → NaN t and p.
    """
    missing = [c for c in (metric, method_col, subject_col) if c not in df.columns]
    if missing:
        raise KeyError(f"columns not in the table: {missing}")
    if df.duplicated([method_col, subject_col]).any():
        raise ValueError(f"more than one row per ({method_col}, {subject_col}): cannot pair")
    wide = df.pivot(index=subject_col, columns=method_col, values=metric).apply(pd.to_numeric, errors="coerce")
    methods = list(dict.fromkeys(df[method_col]))
    if reference is not None:
        if reference not in methods:
            raise KeyError(f"reference method {reference!r} not in the table (methods: {methods})")
        pairs = [(reference, m) for m in methods if m != reference]
    else:
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
    rows = []
    for a, b in pairs:
        both = wide[[a, b]].dropna()
        n = len(both)
        if n >= 2:
            result = sps.ttest_rel(both[a].to_numpy(float), both[b].to_numpy(float))
            t, p = float(result.statistic), float(result.pvalue)
        else:
            t = p = float("nan")
        rows.append(
            {
                "method_a": a,
                "method_b": b,
                "n": n,
                "mean_a": float(both[a].mean()) if n else float("nan"),
                "mean_b": float(both[b].mean()) if n else float("nan"),
                "mean_diff": float((both[a] - both[b]).mean()) if n else float("nan"),
                "t": t,
                "p": p,
            }
        )
    return pd.DataFrame(rows, columns=["method_a", "method_b", "n", "mean_a", "mean_b", "mean_diff", "t", "p"])
