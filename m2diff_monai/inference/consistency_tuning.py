"""Choose the LD-consistency FWHM on the validation split: the smallest one that keeps the PSNR margin.

The consistency (:mod:`.consistency`) hands the prediction's band below a Gaussian back to the LD PET. A smaller
FWHM hands back more: lesion and regional means move towards the measurement, and more of its noise comes
with them. On the demo's validation subjects (M2Diff demo checkpoint, 4 mm grid) the cold-lesion bias rose
from +10 % at 4 mm to +19 % at 10 mm, and the PSNR from 30.1 to 35.0 dB. Lesion fidelity and PSNR pull in
opposite directions.

So the rule is the smallest FWHM whose mean validation PSNR stays at least ``margin`` dB (default 1.0, the
margin the demo recipes claim) above the best classical baseline's. That keeps as much of the measurement as
possible while keeping the margin. When no candidate reaches the margin, the choice is the candidate with the
highest PSNR, and the output says that the margin is not met. Off (``fwhm-off``) counts as an infinite FWHM: it
keeps none of the LD.

Input: an ``m2diff-evaluate`` output folder for the validation split. It holds one prediction per candidate,
named ``fwhm-<mm>`` or ``fwhm-off``, and the classical baselines (``--baselines``).
``scripts/tune_consistency.sh`` makes that folder and then runs this module:

    python -m m2diff_monai.inference.consistency_tuning REPORT_DIR [--margin 1.0]

This prints the table and the choice, and writes ``REPORT_DIR/consistency_choice.json``. When the evaluation also
holds ``floor-<mm>`` rows (:mod:`.consistency_floor`: the consistency applied to the SD itself), a second table
shows them: the biases a perfect network would still have at each FWHM, so a lesion miss can be split into what
the network adds and what the LD's noise imposes. The floors never enter the choice.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from m2diff_monai.cli_runner import run_cli
from m2diff_monai.errors import InputError

PROG = "python -m m2diff_monai.inference.consistency_tuning"
CANDIDATE_PREFIX = "fwhm-"
FLOOR_PREFIX = "floor-"
OFF = "off"
CHOICE_FILE = "consistency_choice.json"


def fwhm_label(fwhm_mm: float) -> str:
    """``7.0`` → ``"7"``, inf → ``"off"``: the candidate's name after ``fwhm-``."""
    return OFF if math.isinf(fwhm_mm) else f"{fwhm_mm:g}"


def candidate_fwhm(method: str, prefix: str = CANDIDATE_PREFIX) -> float | None:
    """``fwhm-7`` → 7.0, ``fwhm-off`` → inf; any other method name → None (``prefix``: ``floor-`` rows)."""
    if not method.startswith(prefix):
        return None
    value = method.removeprefix(prefix)
    if value == OFF:
        return math.inf
    try:
        fwhm = float(value)
    except ValueError:
        return None
    return fwhm if math.isfinite(fwhm) and fwhm > 0 else None


@dataclass(frozen=True)
class ConsistencyChoice:
    fwhm_mm: float | None  # None: off
    psnr: float
    best_baseline: str
    best_baseline_psnr: float
    margin_db: float
    margin_met: bool

    def setting(self) -> str:
        """The value for ``ld_consistency_fwhm`` / ``--ld-consistency-fwhm``."""
        return "none" if self.fwhm_mm is None else f"{self.fwhm_mm:g}"


def choose_fwhm(
    psnr_by_fwhm: dict[float, float], best_baseline: str, best_baseline_psnr: float, margin_db: float = 1.0
) -> ConsistencyChoice:
    """The smallest FWHM (inf = off) whose PSNR ≥ the best baseline's + ``margin_db``; otherwise the best PSNR."""
    if not psnr_by_fwhm:
        raise ValueError("no candidate FWHM to choose from")
    floor = best_baseline_psnr + margin_db
    passing = sorted(f for f, p in psnr_by_fwhm.items() if p >= floor)
    fwhm = passing[0] if passing else max(psnr_by_fwhm, key=lambda f: (psnr_by_fwhm[f], -f))
    return ConsistencyChoice(
        fwhm_mm=None if math.isinf(fwhm) else float(fwhm),
        psnr=float(psnr_by_fwhm[fwhm]),
        best_baseline=best_baseline,
        best_baseline_psnr=float(best_baseline_psnr),
        margin_db=float(margin_db),
        margin_met=bool(passing),
    )


def choose_from_summary(summary, margin_db: float = 1.0) -> tuple[ConsistencyChoice, object]:
    """``summary.csv`` of an evaluation (pandas) → the choice and the candidates' table (sorted by FWHM)."""
    from m2diff_monai.evaluation.baselines import best_baseline

    summary = summary.assign(fwhm_mm=summary["method"].map(candidate_fwhm))
    candidates = summary[summary["fwhm_mm"].notna()].sort_values("fwhm_mm")
    if candidates.empty:
        raise InputError(f"no prediction named {CANDIDATE_PREFIX}<mm> or {CANDIDATE_PREFIX}{OFF} in the evaluation")
    psnr_by_method = dict(zip(summary["method"], summary["psnr_mean"], strict=True))
    best = best_baseline(psnr_by_method)
    if best is None:
        raise InputError("the evaluation has no baseline rows: run m2diff-evaluate with --baselines")
    psnr = {float(r.fwhm_mm): float(r.psnr_mean) for r in candidates.itertuples()}
    return choose_fwhm(psnr, best, float(psnr_by_method[best]), margin_db), candidates


def floor_rows(summary):
    """The ``floor-<mm>`` rows of an evaluation's summary (pandas), sorted by FWHM; empty when there are none."""
    summary = summary.assign(fwhm_mm=summary["method"].map(lambda m: candidate_fwhm(m, FLOOR_PREFIX)))
    finite = summary["fwhm_mm"].map(lambda f: f is not None and math.isfinite(f)).astype(bool)
    return summary.loc[finite].sort_values("fwhm_mm")


def _bias_columns(table) -> list[str]:
    return [c for c in table.columns if c.startswith("bias_") and c.endswith("_mean") and c != "bias_mean"]


def _rows_markdown(table, bias: list[str]) -> list[str]:
    header = ["FWHM (mm)", "PSNR (dB)", "SSIM", *(f"{c[5:-5]} bias (%)" for c in bias)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---:"] * len(header)) + " |"]
    for row in table.itertuples():
        values = [f"{row.psnr_mean:.2f}", f"{row.ssim_mean:.4f}"]
        values += [
            f"{100.0 * getattr(row, c):+.1f}" if c in table.columns and math.isfinite(getattr(row, c)) else "n/a"
            for c in bias
        ]
        lines.append(f"| {fwhm_label(row.fwhm_mm)} | " + " | ".join(values) + " |")
    return lines


def choice_markdown(choice: ConsistencyChoice, candidates, floors=None) -> str:
    """The candidates' PSNR, SSIM and regional biases, then the rule and its outcome (then the floors, if any)."""
    bias = _bias_columns(candidates)
    lines = _rows_markdown(candidates, bias)
    needed = choice.best_baseline_psnr + choice.margin_db
    outcome = (
        f"the smallest FWHM with PSNR ≥ {needed:.2f} dB"
        if choice.margin_met
        else f"no candidate reaches {needed:.2f} dB: the highest PSNR, and the margin is NOT met"
    )
    lines.append(
        f"\nBest baseline {choice.best_baseline} {choice.best_baseline_psnr:.2f} dB, margin {choice.margin_db:g} dB: "
        f"ld_consistency_fwhm = {choice.setting()} ({outcome}; PSNR {choice.psnr:.2f} dB)."
    )
    if floors is not None and not floors.empty:
        lines.append(
            "\nFloor: SD + G*(LD − SD), the consistency applied to the standard dose, i.e. what a perfect network "
            "would read at each FWHM (not a candidate; the LD's noise below the filter sets these biases):\n"
        )
        lines += _rows_markdown(floors, bias)
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Choose the LD-consistency FWHM from an m2diff-evaluate run on the validation split with "
        "predictions named fwhm-<mm> / fwhm-off and --baselines: the smallest FWHM whose mean PSNR is at least "
        "--margin dB above the best baseline (see scripts/tune_consistency.sh).",
    )
    p.add_argument("report", type=Path, help="the m2diff-evaluate output folder (with summary.csv)")
    p.add_argument("--margin", type=float, default=1.0, help="PSNR margin over the best baseline, dB (default 1)")
    return p


def _run(args: argparse.Namespace) -> int:
    import pandas as pd

    from m2diff_monai.io.atomic import save_json

    summary_csv = args.report / "summary.csv"
    if not summary_csv.is_file():
        raise InputError("no summary.csv: give an m2diff-evaluate output folder", path=args.report)
    summary = pd.read_csv(summary_csv)
    choice, candidates = choose_from_summary(summary, args.margin)
    floors = floor_rows(summary)
    print(choice_markdown(choice, candidates, floors), end="")
    table = {fwhm_label(r.fwhm_mm): float(r.psnr_mean) for r in candidates.itertuples()}
    floor_bias = {
        fwhm_label(r.fwhm_mm): {c[5:-5]: float(getattr(r, c)) for c in _bias_columns(floors)}
        for r in floors.itertuples()
    }
    save_json(
        args.report / CHOICE_FILE,
        {**asdict(choice), "setting": choice.setting(), "psnr_by_fwhm": table, "floor_bias_by_fwhm": floor_bias},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
