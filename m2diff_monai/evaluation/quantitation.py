"""Lesion-first quantitation: what a PET physicist reads before any image-quality number.

- **Regional mean bias** (%): ``bias_<region>`` of every region of the manifest, (mean method − mean SD) / mean SD,
  as :func:`.metrics.relative_bias` defines it (the per-subject columns exist already).
- **Lesion recovery** (regions whose name contains ``lesion``, e.g. the demo's ``lesion_hot``/``lesion_cold``):
  ``recovery_mean_<r>`` = mean(method in r) / mean(SD in r) (SUVmean-style) and ``recovery_max_<r>`` =
  max(method in r) / max(SD in r) (SUVmax-style); 1 is perfect, < 1 a hot lesion flattened, > 1 a cold lesion
  filled in. ``max_pred_<r>``/``max_target_<r>`` are the maxima themselves (original units).
- **Paired t-tests** (method vs SD inside the region, paired by subject, ``scipy.stats.ttest_rel``) only with
  at least ``MIN_TTEST_SUBJECTS`` = 5 subjects holding the region; with fewer the table says so ("n = 2 < 5: no
  t-test") instead of printing a p-value from two points.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_TTEST_SUBJECTS = 5
UNKNOWN_UNITS = "a.u. (original units)"
_UNIT_PATTERN = re.compile(r"(k?Bq\s*/\s*(?:ml|cc|cm3|cm\^3)|SUV\w*|MBq\s*/\s*ml|counts?)", re.IGNORECASE)


def is_lesion(region: str) -> bool:
    return "lesion" in region.lower()


def lesion_recovery(volume: np.ndarray, reference: np.ndarray, regions: Mapping[str, tuple]) -> dict[str, float]:
    """``recovery_mean_<r>``, ``recovery_max_<r>``, ``max_pred_<r>``, ``max_target_<r>`` for each lesion region
    (NaN when empty). ``regions``: ``{name: (mask, bounding box or None)}`` as :func:`.run.region_metrics`."""
    row: dict[str, float] = {}
    for name, (region, box) in regions.items():
        if not is_lesion(name):
            continue
        keys = [f"{k}_{name}" for k in ("recovery_mean", "recovery_max", "max_pred", "max_target")]
        if box is None:
            row.update({k: float("nan") for k in keys})
            continue
        inside = np.asarray(region[box], dtype=bool)
        pred = np.asarray(volume[box])[inside].astype(np.float64)
        target = np.asarray(reference[box])[inside].astype(np.float64)
        mean_t, max_t = float(target.mean()), float(target.max())
        row[keys[0]] = float(pred.mean()) / mean_t if mean_t != 0 else float("nan")
        row[keys[1]] = float(pred.max()) / max_t if max_t != 0 else float("nan")
        row[keys[2]], row[keys[3]] = float(pred.max()), max_t
    return row


def units_of(item: Mapping[str, Any], path: Path | None) -> str:
    """The image units: the manifest item's ``units`` if given, else a unit named in the NIfTI ``descrip``
    (e.g. "simulated FDG PET, Bq/mL" → "Bq/mL"), else "a.u. (original units)"."""
    if item.get("units"):
        return str(item["units"])
    if path is None:
        return UNKNOWN_UNITS
    try:
        import nibabel as nib

        descrip = nib.load(str(path)).header.get("descrip")
        text = bytes(np.asarray(descrip).tobytes()).decode("latin-1", "ignore") if descrip is not None else ""
    except Exception:  # units are a label: an unreadable header was reported by the loader already
        return UNKNOWN_UNITS
    found = _UNIT_PATTERN.search(text)
    return found.group(1).replace(" ", "") if found else UNKNOWN_UNITS


def _paired_test(df, metric_pred: str, metric_target: str, method: str) -> tuple[int, float]:
    """(n, p) of ttest_rel(method's values, SD's values) over subjects holding the region; p NaN when n < 5."""
    from scipy import stats as sps

    part = df[df["method"] == method][[metric_pred, metric_target]].apply(lambda c: c.astype(float)).dropna()
    n = len(part)
    if n < MIN_TTEST_SUBJECTS:
        return n, float("nan")
    return n, float(sps.ttest_rel(part[metric_pred], part[metric_target]).pvalue)


def _mean_std(values, digits: int = 3) -> str:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return "n/a"
    mean = f"{values.mean():.{digits}f}"
    return mean if values.size < 2 else f"{mean} ± {values.std(ddof=1):.{digits}f}"


def _p_text(n: int, p: float) -> str:
    if n < MIN_TTEST_SUBJECTS:
        return f"n = {n} < {MIN_TTEST_SUBJECTS}: no t-test"
    return f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"


def quantitation_markdown(df, regions: Sequence[str], units: str = UNKNOWN_UNITS) -> str:
    """The report's opening section: regional mean bias per method, then mean and max recovery per lesion."""
    methods = list(dict.fromkeys(df["method"]))
    lines = [
        "## Quantitation (read first): regional bias and lesion recovery against SD\n",
        f"Per method, mean ± std over subjects. Paired t-tests (method vs SD inside the region, paired by "
        f"subject) only with ≥ {MIN_TTEST_SUBJECTS} subjects holding the region; otherwise the table says "
        f"so. Uptake in {units}.\n",
    ]
    if not regions:
        return "\n".join(lines + ["No region masks in the manifest: no regional quantitation.\n"])
    lines.append("### Mean relative bias per region (%) = (mean method − mean SD) / mean SD\n")
    lines.append("| method | " + " | ".join(regions) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in regions) + " |")
    for m in methods:
        part = df[df["method"] == m]
        cells = []
        for r in regions:
            n, p = _paired_test(df, f"mean_pred_{r}", f"mean_target_{r}", m)
            test = "" if n < MIN_TTEST_SUBJECTS else f" (p {_p_text(n, p)})"
            cells.append(_mean_std(part[f"bias_{r}"].astype(float).to_numpy() * 100.0, 2) + test)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    counts = {r: int(df[df["method"] == methods[0]][f"bias_{r}"].astype(float).notna().sum()) for r in regions}
    untested = [f"{r} (n = {n} < {MIN_TTEST_SUBJECTS}: no t-test)" for r, n in counts.items() if n < MIN_TTEST_SUBJECTS]
    if untested:
        lines.append("\nSubjects per region: " + ", ".join(untested) + ".\n")
    lesions = [r for r in regions if is_lesion(r) and f"recovery_mean_{r}" in df.columns]
    if not lesions:
        lines.append("\nNo lesion masks (regions named `lesion*`) in the manifest: no recovery table.\n")
        return "\n".join(lines)
    for r in lesions:
        n_subjects = counts[r]
        sd_max = df[df["method"] == methods[0]][f"max_target_{r}"].astype(float)
        lines.append(
            f"\n### Lesion `{r}`: recovery = method / SD (1 = kept; {n_subjects} subject(s) with this "
            f"lesion; SD max {_mean_std(sd_max, 1)} {units})\n"
        )
        lines.append(
            "| method | n | mean recovery (SUVmean-style) | t-test mean | max recovery (SUVmax-style) | t-test max |"
        )
        lines.append("| --- | ---: | ---: | --- | ---: | --- |")
        for m in methods:
            part = df[df["method"] == m]
            n_mean, p_mean = _paired_test(df, f"mean_pred_{r}", f"mean_target_{r}", m)
            n_max, p_max = _paired_test(df, f"max_pred_{r}", f"max_target_{r}", m)
            lines.append(
                f"| {m} | {n_mean} | {_mean_std(part[f'recovery_mean_{r}'])} | {_p_text(n_mean, p_mean)} | "
                f"{_mean_std(part[f'recovery_max_{r}'])} | {_p_text(n_max, p_max)} |"
            )
    return "\n".join(lines) + "\n"


def recovery_metrics(df) -> list[str]:
    """The recovery columns of a per-subject table (for summary.csv)."""
    return [c for c in df.columns if c.startswith(("recovery_mean_", "recovery_max_"))]


__all__ = [
    "MIN_TTEST_SUBJECTS",
    "is_lesion",
    "lesion_recovery",
    "quantitation_markdown",
    "recovery_metrics",
    "units_of",
]
