"""The report folder's Markdown: ``summary.md`` (the papers' Table I layout), ``ttests.md`` and ``report.md``
(the page a person opens first)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2diff_monai.evaluation.inputs import LD_METHOD, TOOL
from m2diff_monai.evaluation.tables import PAPER_METRICS, method_stats

_DIGITS = {"ssim": 4, "psnr": 2, "nmse": 4, "lpips": 4, "bias": 2}


def _label(metric: str, *, percent: bool = True, plane: bool = False) -> str:
    """Display name; ``plane`` adds "2D axial"/"2D mean" to slice metrics, ``percent`` the bias unit."""
    unit = " (%)" if percent else ""
    if metric == "bias":
        return f"bias brain{unit}"
    if metric.startswith("bias_"):
        return f"bias {metric[len('bias_') :]}{unit}"
    base, _, rest = metric.partition("_2d")
    name = {"ssim": "SSIM", "psnr": "PSNR (dB)", "nmse": "NMSE", "lpips": "LPIPS"}.get(base, metric)
    if plane and _ == "_2d":
        name += f" 2D {rest.lstrip('_') or 'mean'}"
    if metric.endswith("_paper"):
        name = {"ssim": "SSIM", "psnr": "PSNR (dB)", "nmse": "NMSE", "lpips": "LPIPS"}[base[: -len("_paper")]]
        name += " (paper protocol)" if plane else ""
    return name


def _format(metric: str, mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    scale = 100.0 if metric.startswith("bias") else 1.0
    digits = _DIGITS.get(metric.split("_")[0], 4)
    text = f"{mean * scale:.{digits}f}"
    return text if not np.isfinite(std) else f"{text} ± {std * scale:.{digits}f}"


def _better(metric: str) -> str:
    base = metric.split("_")[0]
    return "high" if base in ("ssim", "psnr") else "abs" if base == "bias" else "low"


def _best_method(means: dict[str, float], better: str) -> str:
    """The method whose mean is best: highest ("high"), lowest ("low") or closest to 0 ("abs")."""
    score = {"high": lambda v: -v, "low": lambda v: v, "abs": abs}[better]
    return min(means, key=lambda m: score(means[m]))


def _table(df, metrics: Sequence[str], bold_best: bool = True) -> str:
    """Markdown "mean ± std" table, one row per method (LD first), best method (LD excluded) in bold."""
    import pandas as pd

    from m2diff_monai.evaluation.stats import to_markdown_table

    methods = list(dict.fromkeys(df["method"]))
    stats = {metric: method_stats(df, metric) for metric in metrics}
    cells = {m: {"method": m, "n": str(int((df["method"] == m).sum()))} for m in methods}
    for metric in metrics:
        contenders = {m: v[0] for m, v in stats[metric].items() if m != LD_METHOD and np.isfinite(v[0])}
        best = None
        if bold_best and len(contenders) >= 2:
            best = _best_method(contenders, _better(metric))
        for m in methods:
            mean, std, _ = stats[metric].get(m, (float("nan"), float("nan"), 0))
            text = _format(metric, mean, std)
            cells[m][_label(metric)] = f"**{text}**" if m == best else text
    frame = pd.DataFrame([cells[m] for m in methods])
    return to_markdown_table(frame)


PAPER_PROTOCOL_NOTE = (
    "The official M2Diff test loop (m2diff_monai/evaluation/paper_protocol.py, docs/evaluation.md): axial slices "
    "min–max scaled per slice, zero-padded (256² by default; the settings are in run.json's `paper_protocol`), the "
    "official SD brain mask per slice, torchmetrics PSNR and SSIM over the **whole padded slice**, mean over "
    "slices then subjects. The zeroed background counts in "
    "the mean, so PSNR is ≈ 10·log10(N/N_mask) dB higher than the tables above (N = pixels of the padded slice, "
    "N_mask = brain pixels), and the data range is each slice's, not the subject's. Only these numbers compare "
    "with the papers' tables.\n"
)


def _lpips_line(lpips_status: Mapping[str, Any]) -> str:
    """The LPIPS sentence of summary.md (report.md lists LPIPS once in its header and drops this one)."""
    lpips_line = (
        "LPIPS: AlexNet (lpips 0.1.4), mean over "
        + str(lpips_status.get("orientation", "axial"))
        + " slices with brain"
        if lpips_status.get("available")
        else str(lpips_status.get("reason") or "LPIPS unavailable")
    )
    if lpips_status.get("available") and lpips_status.get("reason"):
        lpips_line += f" — {lpips_status['reason']}"
    return f"{lpips_line}.\n"


def summary_markdown(df, regions: Sequence[str], lpips_status: Mapping[str, Any]) -> str:
    """The papers' Table I layout (mean ± std over subjects), LD first, then bias per region."""
    parts = [
        "# Summary: mean ± std over subjects\n",
        "Higher is better for SSIM and PSNR, lower for NMSE and LPIPS, bias closest to 0; the best method (LD "
        "excluded) is in bold when there are two or more. Two protocols: the first tables score inside the "
        "preprocessing brain mask with one data range per subject (the reference's peak in the brain); the papers' "
        "protocol (its own section) scores whole padded slices as the official code did. n = subjects.\n",
        _lpips_line(lpips_status),
        "## Volume metrics (3D, inside the brain mask)\n",
        _table(df, [m for m in ("ssim", "psnr", "nmse", "lpips") if m in df.columns]),
        "\n## Slice metrics, 2D axial, inside the brain mask (slices with ≥ min_slice_voxels brain voxels, the "
        "subject's data range; not the papers' protocol)\n",
        _table(df, [m for m in ("ssim_2d_axial", "psnr_2d_axial", "nmse_2d_axial", "lpips") if m in df.columns]),
        "\n## The papers' protocol (comparable with the papers' Table I)\n",
        PAPER_PROTOCOL_NOTE,
        _table(df, [m for m in PAPER_METRICS if m in df.columns]),
        "\n## Slice metrics, mean of the three orientations (2D)\n",
        _table(df, [m for m in ("ssim_2d", "psnr_2d", "nmse_2d") if m in df.columns]),
        "\n## Mean relative bias (%) = (mean prediction − mean reference) / mean reference\n",
        _table(df, ["bias", *[f"bias_{r}" for r in regions]]),
    ]
    if regions:
        parts.append("\nRegions with no voxel in a subject are left out of that region's mean (n/a when none).\n")
    return "\n".join(parts)


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def ttests_markdown(tt) -> str:
    import pandas as pd

    from m2diff_monai.evaluation.stats import to_markdown_table

    lines = [
        "# Paired two-tailed t-tests (scipy.stats.ttest_rel), paired by subject\n",
        "mean_diff = A − B; * p < 0.05, ** p < 0.01, *** p < 0.001, n.s. otherwise; n/a with fewer than 2 "
        "subjects. Bias values are fractions (0.01 = 1 %).\n",
    ]
    if tt.empty:
        return "\n".join(lines + ["No metric could be tested.\n"])
    frame = tt.copy()
    frame["metric"] = [_label(m, percent=False, plane=True) for m in frame["metric"]]
    frame["sig."] = [_stars(float(p)) for p in frame["p"]]
    frame = frame.rename(columns={"method_a": "A", "method_b": "B"})
    frame["n"] = frame["n"].astype(str)
    lines.append(
        to_markdown_table(
            pd.DataFrame(frame), ["metric", "A", "B", "n", "mean_a", "mean_b", "mean_diff", "t", "p", "sig."]
        )
    )
    return "\n".join(lines)


def _ttests_versus_ld(tt) -> list[str]:
    """Paired t-tests of every method against LD, with p only where n allows (the report says why not)."""
    from m2diff_monai.evaluation.quantitation import MIN_TTEST_SUBJECTS

    if tt.empty:
        return []
    versus_ld = tt[(tt["method_a"] == LD_METHOD)]
    lines: list[str] = []
    lines.append(
        f"## Paired t-tests against LD (p shown with ≥ {MIN_TTEST_SUBJECTS} subjects; every pair and "
        "value: [ttests.md](ttests.md))\n"
    )
    lines.append("| metric | method | mean (method − LD) | p | |")
    lines.append("| --- | --- | ---: | ---: | --- |")
    for _, r in versus_ld.iterrows():
        diff = -float(r["mean_diff"])
        scale = 100.0 if str(r["metric"]).startswith("bias") else 1.0
        p = float(r["p"])
        p_text = "n/a" if not np.isfinite(p) else f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"
        if int(r["n"]) < MIN_TTEST_SUBJECTS:  # the report states it; ttests.md keeps every value
            p, p_text = float("nan"), f"n = {int(r['n'])} < {MIN_TTEST_SUBJECTS}: no t-test"
        lines.append(
            f"| {_label(r['metric'], plane=True)} | {r['method_b']} | {diff * scale:+.4g} | {p_text} | {_stars(p)} |"
        )
    lines.append("")
    return lines


def _cka_section(cka: Mapping[str, Any] | None) -> list[str]:
    """The representation-similarity section (paper §III-G), when the run computed it."""
    if not cka:
        return []
    lines: list[str] = []
    lines.append("## Representation similarity: linear CKA between the PET and MRI branches (paper §III-G)\n")
    lines.append(
        f"Checkpoint `{cka['checkpoint']}`; {cka['examples']} slices, timesteps {cka['timesteps']}, "
        f"activations average-pooled to ≤ {cka['pool']}² per channel. "
        "Details: [cka/cka.json](cka/cka.json).\n"
    )
    for part, png in cka["heatmaps"].items():
        lines.append(f"![{part} CKA](cka/{png})\n")
    return lines


def report_markdown(summary: Mapping[str, Any], df, tt, staging: Path) -> str:
    """The page a person opens first: what was evaluated, quantitation (regional bias, lesion recovery), the
    image-quality tables, the pictures, links to every file."""
    from m2diff_monai.evaluation import baselines as baselines_mod
    from m2diff_monai.evaluation.quantitation import UNKNOWN_UNITS, quantitation_markdown

    opts = summary["options"]
    where = (
        "the low-dose PET's own grid (RAS+ voxel order), original units; reference = the source SD PET"
        if opts["space"] == "native"
        else "the preprocessed cube, original units (cube × its scaling)"
    )
    lines = [
        f"# Evaluation report: {summary.get('manifest_name') or Path(summary['manifest']).stem} "
        f"({opts['split']} split)\n",
        f"{TOOL} {summary['version']}, {summary['created']}. Manifest `{summary['manifest']}`.\n",
        f"- Methods: {', '.join(summary['methods'])} (LD = the low-dose input, scored like a method).",
        *[f"  - {m}: `{p}`" for m, p in summary["predictions"].items()],
        f"- Subjects evaluated ({len(summary['subjects'])}): {', '.join(summary['subjects'])}.",
    ]
    for sid, why in summary["skipped"].items():
        lines.append(f"- Skipped {sid}: {why}.")
    for sid, why in summary["failed"].items():
        lines.append(f"- **Failed** {sid}: {why}")
    lpips = summary["lpips"]
    if lpips["available"]:
        lpips_text = "available" + (f" ({lpips['reason']})" if lpips.get("reason") else "")
    else:
        lpips_text = lpips["reason"]
    lines += [
        f"- Evaluated on {where}; brain and region masks from the preprocessed folder (nearest neighbour).",
        f"- Regions: {', '.join(summary['regions']) or 'none in the manifest'}.",
        f"- LPIPS: {lpips_text}.",
        *baselines_mod.settings_markdown(summary["_baselines"]),
        "- Definitions: docs/evaluation.md.\n",
        quantitation_markdown(df, summary["regions"], summary.get("units") or UNKNOWN_UNITS),
    ]
    if summary.get("_targets") is not None:
        from m2diff_monai.evaluation.targets import targets_markdown

        lines.append(
            targets_markdown(summary["_targets"], summary["options"]["targets"], bool(summary["_baselines"].names))
        )
    if summary.get("_subsets") is not None:
        from m2diff_monai.evaluation.subsets import subsets_markdown

        lines.append(subsets_markdown(summary["_subsets"], list(baselines_mod.BASELINE_ROWS.values())))
    summary_md = (staging / "summary.md").read_text().split("\n", 1)[1].replace("\n" + _lpips_line(lpips), "", 1)
    lines += ["## Image quality (mean ± std over subjects)\n", summary_md.replace("\n## ", "\n### ")]
    lines += _ttests_versus_ld(tt)
    if summary["figures"]:
        lines.append("## Figures: LD | methods | SD | |method − SD| (axial, coronal, sagittal)\n")
        for sid, png in summary["figures"].items():
            lines.append(f"### {sid}\n\n![{sid}]({png})\n")
    lines += _cka_section(summary.get("cka"))
    lines.append("## Complexity\n")
    lines.append((staging / "complexity.md").read_text().split("\n", 1)[1])
    lines.append("\n## Files\n")
    described = {
        "per_subject.csv": "one row per (subject, method): every metric",
        "per_slice.csv": "one row per (subject, method, orientation, slice): 2D PSNR, SSIM, NMSE (+ LPIPS, axial)",
        "summary.csv": "mean, std and n per method and metric",
        "subsets.csv": "per --subset and method: n, subjects, mean PSNR, SSIM and regional bias",
        "targets.csv": "per group (all subjects, each --subset), method and check: mean, target, met, LD's own bias",
        "summary.md": "the tables above",
        "ttests.csv": "paired t-tests, every metric and pair",
        "ttests.md": "the same as a table",
        "complexity.md": "parameters, training s/epoch, inference s/subject",
        "complexity.json": "the same with the sources of each number",
        "run.json": "settings, subjects, skipped/failed, timings",
    }
    for name, what in described.items():
        if (staging / name).exists() or name == "run.json":
            lines.append(f"- [{name}]({name}): {what}")
    return "\n".join(lines) + "\n"


__all__ = ["PAPER_PROTOCOL_NOTE", "report_markdown", "summary_markdown", "ttests_markdown"]
