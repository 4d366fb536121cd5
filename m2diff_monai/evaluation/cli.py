"""``m2diff-evaluate``: metrics, tables, statistics and figures for a cohort's predictions against the references.

    m2diff-evaluate --manifest data_manifests/NAME.json --split test --pred M2Diff=preds/m2diff \\
        [--pred IDDPM=preds/iddpm ...] --out reports/NAME [--baselines gaussian,nlm,bm3d] \\
        [--space native|preprocessed] [--per-slice] \\
        [--lpips-weights alexnet-owt-7be5be79.pth] [--checkpoint M2Diff=CKPT] [--timings M2Diff=FILE] [--cka CKPT]

Predictions are ``DIR/<subject>.nii.gz`` as ``m2diff-infer --manifest ... --out-dir DIR`` writes them.
Exit codes: 0 success; 1 some subjects failed under ``--keep-going`` (the report covers the others) or an
internal error (one line naming the log with the traceback; ``--debug`` prints it); 2 bad input or options (one
line on stderr naming the subject or file; no report written); 130 interrupted (no report written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from m2diff_monai.cli_runner import run_cli
from m2diff_monai.runtime import configure_threads

PROG = "m2diff-evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Score enhanced PET predictions of a manifest's cohort against the standard-dose reference "
        "(PSNR, SSIM, NMSE, LPIPS, regional bias; LD input as the first row; also in the papers' protocol: "
        "*_paper columns), with mean ± std tables, paired "
        "t-tests, figure panels, a complexity table, optional CKA heatmaps and a report.md linking them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--manifest", required=True, type=Path, help="data_manifests/NAME.json from m2diff-preprocess")
    io.add_argument("--split", default="test", help="test | val | train | all")
    io.add_argument("--subjects", default=None, help="comma list of subject ids (default: the whole split)")
    io.add_argument(
        "--pred",
        action="append",
        default=[],
        metavar="METHOD=DIR",
        required=True,
        help="a method's prediction folder holding <subject>.nii.gz (repeat for more methods; "
        "the order is the table order, after LD)",
    )
    io.add_argument(
        "--out",
        required=True,
        type=Path,
        help="report folder (replaced atomically only if it is an earlier report; never when it is or holds an "
        "input: docs/safety.md)",
    )
    m = p.add_argument_group("metrics")
    m.add_argument(
        "--space",
        choices=("native", "preprocessed"),
        default="native",
        help="native: the LD PET's own grid, original units; preprocessed: the preprocessed cube",
    )
    m.add_argument("--per-slice", action="store_true", help="also write per_slice.csv (2D metrics of every slice)")
    m.add_argument("--orientations", default="axial,coronal,sagittal", help="orientations of the 2D metrics")
    m.add_argument(
        "--min-slice-voxels",
        type=int,
        default=16,
        help="a slice is scored in 2D when it holds at least this many brain-mask voxels",
    )
    m.add_argument(
        "--lpips-weights",
        default=None,
        metavar="PATH",
        help="torchvision AlexNet ImageNet weights (alexnet-owt-7be5be79.pth); default: "
        "$M2DIFF_LPIPS_ALEXNET_WEIGHTS, then torch's hub cache. Missing: LPIPS reported unavailable",
    )
    m.add_argument("--no-lpips", action="store_true", help="skip LPIPS (the slowest metric on CPU)")
    m.add_argument(
        "--paper-scaling",
        choices=("reference", "own"),
        default="reference",
        help="papers' protocol (*_paper columns): map each image's axial slice with the SD slice's "
        "min-max (reference) or min-max scale each image on its own (own, as the official loader "
        "treated its inputs)",
    )
    m.add_argument(
        "--paper-pad",
        type=int,
        default=256,
        help="papers' protocol: zero-pad axial slices to N×N (official loader: 256; 0: no padding)",
    )
    m.add_argument(
        "--paper-min-size",
        type=int,
        default=None,
        metavar="PIXELS",
        help="papers' protocol: brain-mask objects/holes below this many pixels are removed "
        "(default: the official 1000 px at 1 mm², scaled to the slice's pixel area)",
    )
    m.add_argument(
        "--baselines",
        default="",
        metavar="NAMES",
        help="classical baselines scored as rows after LD, from the LD PET: comma list of gaussian "
        "(Gaussian post-filter, FWHM tuned on the validation split), nlm (skimage non-local "
        "means, h tuned on validation), bm3d (runs volumetric BM4D, σ estimated; slow: about a "
        "minute per 2 mm brain on one core). Default: none. The demo scripts pass all three",
    )
    m.add_argument(
        "--floor-fwhm",
        type=float,
        default=None,
        metavar="MM",
        help="also score the LD consistency's floor at this FWHM, SD + G*(LD - SD): what a perfect network would "
        "read after m2diff-infer's --ld-consistency-fwhm MM. A reference row (floor-MM), not judged; the Targets "
        "section shows its bias beside the LD's, so a lesion miss can be split into what the LD's noise imposes "
        "and what the method adds. Default: none",
    )
    m.add_argument(
        "--subset",
        action="append",
        default=[],
        metavar="NAME=PATTERN[,PATTERN]",
        help="also summarise the subjects whose id matches a shell-style pattern on their own (repeatable), e.g. "
        "--subset 'held-out=heldout-*' --subset 'in-distribution=demo-*': the report then adds per subset the mean "
        "PSNR, SSIM and regional bias of every method and its PSNR margin over the best baseline (subsets.csv)",
    )
    m.add_argument(
        "--targets",
        default="default",
        metavar="KEY=VALUE[,KEY=VALUE]|off",
        help="acceptance targets judged per method on all subjects and on each --subset, with the LD's own bias "
        "beside each bias check (targets.csv): margin (dB PSNR over the best baseline, with at least its SSIM), "
        "lesion (%% bias in lesion regions), region (%% bias elsewhere), mri (dB of X over X-noMRI). "
        "Default: margin=1,lesion=5,region=2,mri=0.5; off: no Targets section",
    )
    x = p.add_argument_group("extras")
    x.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="METHOD=CKPT",
        help="a method's training checkpoint for the complexity table (parameters; training s/epoch "
        "from the logs of its run folder). Default: the checkpoint in DIR/predictions.json",
    )
    x.add_argument(
        "--timings",
        action="append",
        default=[],
        metavar="METHOD=FILE",
        help="JSON with parameters / train_seconds_per_epoch / inference_seconds_per_subject, or an "
        "m2diff-infer summary (default: DIR/predictions.json)",
    )
    x.add_argument(
        "--cka",
        type=Path,
        default=None,
        metavar="CKPT",
        help="an M2Diff checkpoint (V3/V5/V6): linear CKA heatmaps of its PET vs MRI branches",
    )
    x.add_argument("--cka-slices", type=int, default=48, help="slices fed to the network for CKA")
    x.add_argument("--cka-pool", type=int, default=16, help="activations average-pooled to at most N×N (0: none)")
    x.add_argument("--device", default="cpu", help="device for CKA (cpu | cuda)")
    r = p.add_argument_group("run")
    r.add_argument("--no-figures", action="store_true", help="no figure panels")
    r.add_argument(
        "--keep-going",
        action="store_true",
        help="skip subjects with a missing or bad prediction (listed in the report, exit code 1) "
        "instead of stopping at the first",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--workers", type=int, default=2, help="threads scoring the rows (LD, methods) of a subject")
    return p


def _run(args: argparse.Namespace) -> dict:
    from m2diff_monai.evaluation.run import evaluate_cohort

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    cka_options = {"n_slices": args.cka_slices, "pool": args.cka_pool or None, "device": args.device}
    return evaluate_cohort(
        args.manifest,
        args.pred,
        args.out,
        split=args.split,
        space=args.space,
        subjects=subjects,
        per_slice=args.per_slice,
        lpips=not args.no_lpips,
        lpips_weights=args.lpips_weights,
        figures=not args.no_figures,
        orientations=args.orientations,
        min_slice_voxels=args.min_slice_voxels,
        keep_going=args.keep_going,
        progress=not args.no_progress,
        workers=args.workers,
        checkpoints=args.checkpoint,
        timings=args.timings,
        cka_checkpoint=args.cka,
        cka_options=cka_options,
        baselines=args.baselines,
        floor_fwhm=args.floor_fwhm,
        subsets=args.subset,
        targets=args.targets,
        paper_scaling=args.paper_scaling,
        paper_pad=args.paper_pad,
        paper_min_size=args.paper_min_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _evaluate, argv, interrupted="no report written")


def _evaluate(args: argparse.Namespace) -> int:
    configure_threads()
    summary = _run(args)
    lpips = summary["lpips"]
    if not lpips["available"] and not args.no_lpips:
        print(f"{PROG}: warning: {lpips['reason']}", file=sys.stderr)
    for sid, why in summary["skipped"].items():
        print(f"{PROG}: skipped {sid}: {why}", file=sys.stderr)
    for why in summary["failed"].values():
        print(f"{PROG}: failed: {why}", file=sys.stderr)
    out = Path(summary["out_dir"])
    print(f"{len(summary['subjects'])} subject(s), methods {', '.join(summary['methods'])}: report {out / 'report.md'}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
