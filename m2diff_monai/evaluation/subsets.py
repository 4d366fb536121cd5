"""Subsets of the evaluated subjects scored on their own: a pooled mean can hide a group on which a method fails
(e.g. held-out anatomy beside in-distribution subjects), so ``m2diff-evaluate --subset NAME=PATTERN[,PATTERN]``
adds, per subset, the mean PSNR, SSIM and regional bias of every method over that subset's subjects, and the PSNR
margin of each method over the best classical baseline there. Patterns are shell-style (``fnmatch``), matched
case-sensitively against subject ids. Subsets are small by construction: means only, no t-tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from m2diff_monai.errors import InputError
from m2diff_monai.evaluation.baselines import best_baseline
from m2diff_monai.inference.consistency_floor import is_floor_row

SUBSET_METRICS: tuple[str, ...] = ("psnr", "ssim")
ALL_SUBJECTS = "all subjects"  # reserved: the group the report's targets judge before the subsets


def parse_subsets(values: Mapping[str, Any] | Sequence[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``["held-out=heldout-*", "in-distribution=demo-*,sub-0*"]`` or ``{name: patterns}`` → ``((name,
    (pattern, ...)), ...)`` in the given order; one-line :class:`InputError` on a malformed or repeated name."""
    if not values:
        return ()
    if isinstance(values, Mapping):
        pairs = [(str(k), [values[k]] if isinstance(values[k], str) else list(values[k])) for k in values]
    else:
        pairs = []
        for item in [values] if isinstance(values, str) else values:
            name, sep, patterns = str(item).partition("=")
            if not sep:
                raise InputError(f"--subset must be NAME=PATTERN[,PATTERN...], got {item!r}")
            pairs.append((name, patterns.split(",")))
    out: dict[str, tuple[str, ...]] = {}
    for name, patterns in pairs:
        name = name.strip()
        cleaned = tuple(p.strip() for p in patterns if str(p).strip())
        if not name or not cleaned:
            raise InputError(f"--subset needs a name and at least one pattern, got {name!r}={patterns!r}")
        if name in out:
            raise InputError(f"--subset {name!r} given twice")
        if name == ALL_SUBJECTS:
            raise InputError(f"--subset name {ALL_SUBJECTS!r} is reserved for the whole split; choose another")
        out[name] = cleaned
    return tuple(out.items())


def subset_members(subjects: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``subjects`` (in their order) whose id matches any of ``patterns``."""
    return [s for s in subjects if any(fnmatchcase(s, p) for p in patterns)]


def check_subsets(subsets: Sequence[tuple[str, Sequence[str]]], subjects: Sequence[str]) -> None:
    """A subset that matches none of the subjects to evaluate is a typo, not an empty table: one-line error."""
    for name, patterns in subsets:
        if not subset_members(subjects, patterns):
            raise InputError(
                f"--subset {name}={','.join(patterns)} matches none of the subjects evaluated "
                f"({', '.join(subjects[:6])}{', ...' if len(subjects) > 6 else ''})"
            )


def subset_table(df, subsets: Sequence[tuple[str, Sequence[str]]], regions: Sequence[str]):
    """One row per (subset, method): n, the subjects, and the mean of PSNR, SSIM and each region's bias."""
    import pandas as pd

    methods = list(dict.fromkeys(df["method"]))
    subjects = list(dict.fromkeys(df["subject"]))
    columns = [*SUBSET_METRICS, *(f"bias_{r}" for r in regions if f"bias_{r}" in df.columns)]
    rows = []
    for name, patterns in subsets:
        members = subset_members(subjects, patterns)
        part = df[df["subject"].isin(members)]
        for method in methods:
            values = part[part["method"] == method]
            rows.append(
                {
                    "subset": name,
                    "method": method,
                    "n": int(len(values)),
                    "subjects": " ".join(values["subject"]),
                    **{c: float(values[c].astype(float).mean()) for c in columns},
                }
            )
    return pd.DataFrame(rows, columns=["subset", "method", "n", "subjects", *columns])


def subsets_markdown(table, baseline_rows: Sequence[str]) -> str:
    """The report section: a table per subset, then each method's PSNR margin over the best baseline there."""
    if table is None or len(table) == 0:
        return ""
    bias = [c for c in table.columns if c.startswith("bias_")]
    lines = [
        "## By subset (mean over each subset's subjects; small n: means only, no t-tests)\n",
    ]
    for name, part in table.groupby("subset", sort=False):
        members = part["subjects"].iloc[0].split()
        lines.append(f"### {name} (n = {len(members)}: {', '.join(members)})\n")
        header = ["method", "PSNR (dB)", "SSIM", *(f"{c[5:]} bias (%)" for c in bias)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
        for _, row in part.iterrows():
            cells = [f"{row['psnr']:.2f}", f"{row['ssim']:.4f}", *(f"{100.0 * row[c]:+.1f}" for c in bias)]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        psnr = dict(zip(part["method"], part["psnr"], strict=True))
        best = best_baseline(psnr, baseline_rows)
        if best is not None:
            others = part[~part["method"].isin([*baseline_rows, "LD"]) & ~part["method"].map(is_floor_row)]
            margins = ", ".join(f"{r['method']} {r['psnr'] - psnr[best]:+.2f} dB" for _, r in others.iterrows())
            here = f"{best}, {psnr[best]:.2f} dB"
            lines.append(f"\nPSNR over the best baseline here ({here}): {margins or 'no method'}.\n")
        else:
            lines.append("")
    return "\n".join(lines) + "\n"


__all__ = [
    "ALL_SUBJECTS",
    "SUBSET_METRICS",
    "check_subsets",
    "parse_subsets",
    "subset_members",
    "subset_table",
    "subsets_markdown",
]
