"""Acceptance targets: a verdict per method, on all subjects and on each ``--subset``.

A table of metrics leaves the verdict to the reader. The first questions a PET physicist asks can be checked
directly:
- Is the method at least ``margin`` dB PSNR above the best classical baseline, with at least its SSIM?
- Are the lesion means within ±``lesion`` % of the SD, and the other regions' means within ±``region`` %?
- Does the MRI help? A method ``X`` with an ``X-noMRI`` partner (the same checkpoint without the MRI) must be
  ``mri`` dB above it.

The defaults are issue 11's targets; ``m2diff-evaluate --targets margin=1,lesion=5,region=2,mri=0.5`` sets them,
and ``--targets off`` drops the section. Each value is a mean over the group's subjects, the same means as the
"By subset" section.

The LD's own bias is shown beside every bias check, as context, and is not judged. Where the unprocessed
measurement already misses a bias target on a group, no enhancement that stays faithful to it can be expected
to meet it. The report then says so, rather than the target being quietly dropped. Baselines are not judged:
they are the bar. With ``--floor-fwhm`` the floor row (SD + G*(LD − SD), what a perfect network would read after
the LD consistency) is shown the same way: a bias the floor already has is the measurement's, the rest the
method's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from m2diff_monai.errors import InputError
from m2diff_monai.evaluation.baselines import best_baseline
from m2diff_monai.evaluation.subsets import ALL_SUBJECTS
from m2diff_monai.inference.consistency_floor import is_floor_row

DEFAULT_TARGETS: dict[str, float] = {"margin": 1.0, "lesion": 5.0, "region": 2.0, "mri": 0.5}
NO_MRI_SUFFIX = "-noMRI"
COLUMNS = ["group", "method", "check", "value", "target", "met", "ld", "floor"]


def parse_targets(value: str | Mapping[str, Any] | None) -> dict[str, float] | None:
    """``None``/``"default"`` → the defaults; ``"off"`` → None; ``"margin=1,lesion=5"`` (or a dict) overrides them.

    Keys: margin (dB), lesion (%), region (%), mri (dB); each a finite number ≥ 0."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default")):
        return dict(DEFAULT_TARGETS)
    if isinstance(value, str) and value.strip().lower() == "off":
        return None
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        pairs = []
        for part in str(value).split(","):
            key, sep, number = part.partition("=")
            if not sep:
                raise InputError(f"--targets takes KEY=VALUE pairs (margin, lesion, region, mri) or off, got {part!r}")
            pairs.append((key.strip(), number.strip()))
    targets = dict(DEFAULT_TARGETS)
    for key, number in pairs:
        if key not in DEFAULT_TARGETS:
            raise InputError(f"--targets: unknown key {key!r}; choose from {', '.join(DEFAULT_TARGETS)}")
        try:
            parsed = float(number)
        except (TypeError, ValueError):
            raise InputError(f"--targets {key} must be a number, got {number!r}") from None
        if not parsed >= 0 or parsed == float("inf"):
            raise InputError(f"--targets {key} must be a finite number >= 0, got {number!r}")
        targets[key] = parsed
    return targets


def _bias_tolerance(region: str, targets: Mapping[str, float]) -> float:
    return targets["lesion"] if "lesion" in region else targets["region"]


def _add_row(
    rows: list[dict[str, Any]],
    group: str,
    method: str,
    check: str,
    value: float,
    target: str,
    met: bool,
    ld_value: float = float("nan"),
    floor_value: float = float("nan"),
) -> None:
    rows.append(
        {
            "group": group,
            "method": method,
            "check": check,
            "value": float(value),
            "target": target,
            "met": bool(met),
            "ld": float(ld_value),
            "floor": float(floor_value),
        }
    )


def target_groups(subsets: Sequence[tuple[str, Sequence[str]]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """All subjects first, then each ``--subset``: the groups the targets are judged on (subset patterns)."""
    return ((ALL_SUBJECTS, ("*",)), *((name, tuple(patterns)) for name, patterns in subsets))


def target_table(group_means, baseline_rows: Sequence[str], targets: Mapping[str, float]):
    """One row per (group, judged method, check): the group mean, the target, whether it is met, and for bias
    checks the LD's own value. ``group_means``: :func:`.subsets.subset_table` over :func:`target_groups`, so the
    verdicts judge the very means the "By subset" section shows."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    bias_columns = [c for c in group_means.columns if c.startswith("bias_")]
    for group, part in group_means.groupby("subset", sort=False):
        means = part.set_index("method")
        best = best_baseline(means["psnr"].to_dict(), baseline_rows)
        floors = [m for m in means.index if is_floor_row(m)]
        judged = [m for m in means.index if m != "LD" and m not in set(baseline_rows) and m not in floors]
        for method in judged:
            row = means.loc[method]
            add = partial(_add_row, rows, group, method)
            if best is not None:
                margin = row["psnr"] - means.loc[best, "psnr"]
                add(f"PSNR over {best} (dB)", margin, f">= {targets['margin']:g}", margin >= targets["margin"])
                best_ssim = float(means.loc[means.index.isin(list(baseline_rows)), "ssim"].max())
                add("SSIM minus the best baseline's", row["ssim"] - best_ssim, ">= 0", row["ssim"] >= best_ssim)
            for column in bias_columns:
                value = 100.0 * row[column]
                if not math.isfinite(value):
                    continue
                region = column.removeprefix("bias_")
                tolerance = _bias_tolerance(region, targets)
                ld_value = 100.0 * means.loc["LD", column] if "LD" in means.index else float("nan")
                floor_value = 100.0 * means.loc[floors[0], column] if floors else float("nan")
                add(
                    f"{region} bias (%)",
                    value,
                    f"within ±{tolerance:g}",
                    abs(value) <= tolerance,
                    ld_value,
                    floor_value,
                )
            partner = method + NO_MRI_SUFFIX
            if partner in means.index:
                gain = row["psnr"] - means.loc[partner, "psnr"]
                add(f"PSNR over {partner} (dB)", gain, f">= {targets['mri']:g}", gain >= targets["mri"])
    return pd.DataFrame(rows, columns=COLUMNS)


def _passes(value: float, target: str) -> bool:
    """The verdict of ``target`` (">= X" or "within ±X", as :func:`target_table` writes them) on ``value``."""
    if target.startswith(">= "):
        return value >= float(target[3:])
    return abs(value) <= float(target.removeprefix("within ±"))


def _shown(value: float, target: str, met: bool, digits: int) -> str:
    """``value`` with ``digits`` decimals, or more when the rounded number would read as the other verdict
    (0.9976 dB against ">= 1" shows as +0.998, not +1.00)."""
    while digits < 6 and _passes(round(value, digits), target) != met:
        digits += 1
    return f"{value:+.{digits}f}"


def targets_markdown(table, targets: Mapping[str, float], baselines_scored: bool) -> str:
    """The report section: per group, a checks × methods table with ✓/✗ and the LD's own bias; then the misses."""
    if table is None or len(table) == 0:
        return ""
    lines = [
        "## Targets (means over each group's subjects; ✓ met, ✗ missed; baselines are the bar, not judged)\n",
        f"PSNR ≥ best baseline + {targets['margin']:g} dB with at least its SSIM; lesion bias within "
        f"±{targets['lesion']:g} %, other regions within ±{targets['region']:g} %; a method with an "
        f"`-noMRI` partner ≥ {targets['mri']:g} dB above it. The LD column is the unprocessed measurement's own bias:"
        " context, not judged.",
    ]
    if not baselines_scored:
        lines.append("No baselines were scored (`--baselines`), so the PSNR and SSIM checks are absent.")
    with_floor = "floor" in table.columns and bool(table["floor"].notna().any())
    if with_floor:
        lines.append(
            "The floor column is SD + G*(LD − SD) (`--floor-fwhm`): what a perfect network would read after the LD "
            "consistency, i.e. the part of a bias the LD's noise imposes: context, not judged."
        )
    misses: list[str] = []
    for group, part in table.groupby("group", sort=False):
        methods = list(dict.fromkeys(part["method"]))
        checks = list(dict.fromkeys(part["check"]))
        context_columns = ["LD", *(["floor"] if with_floor else [])]
        lines.append(f"\n### {group}\n")
        lines.append("| check | target | " + " | ".join(methods + context_columns) + " |")
        lines.append("| --- | --- | " + " | ".join(["---:"] * (len(methods) + len(context_columns))) + " |")
        for check in checks:
            rows = part[part["check"] == check].set_index("method")
            cells = []
            for method in methods:
                if method not in rows.index:
                    cells.append("")
                    continue
                row = rows.loc[method]
                value = _shown(row["value"], row["target"], bool(row["met"]), 4 if check.startswith("SSIM") else 2)
                cells.append(f"{value} {'✓' if row['met'] else '✗'}")
                if not row["met"]:
                    context = [f"LD itself {row['ld']:+.1f}"] if math.isfinite(row["ld"]) else []
                    if with_floor and math.isfinite(row["floor"]):
                        context.append(f"floor {row['floor']:+.1f}")
                    said = f" ({'; '.join(context)})" if context else ""
                    misses.append(f"{group}: {method} {check} {value}, target {row['target']}{said}")
            context_cells = []
            for column in ("ld", *(["floor"] if with_floor else [])):
                values = rows[column].dropna()
                context_cells.append(f"{values.iloc[0]:+.2f}" if len(values) else "")
            target = rows["target"].iloc[0]
            lines.append(f"| {check} | {target} | " + " | ".join(cells + context_cells) + " |")
    lines.append("")
    if misses:
        lines.append("Missed: " + "; ".join(misses) + ".")
    else:
        lines.append("Every check is met.")
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_TARGETS", "NO_MRI_SUFFIX", "parse_targets", "target_groups", "target_table", "targets_markdown"]
