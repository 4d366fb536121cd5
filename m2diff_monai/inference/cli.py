"""``m2diff-infer``: raw LD PET (+ T1) NIfTI in, enhanced NIfTI out on the LD PET's own grid, original units.

Single subject::

    m2diff-infer --bundle bundles/m2diff --checkpoint CKPT --ld-pet LD.nii.gz [--mri T1.nii.gz] --out PRED.nii.gz

Cohort (a preprocessed manifest's ``volumes``)::

    m2diff-infer --bundle bundles/m2diff --checkpoint CKPT --manifest data_manifests/NAME.json \
        --split test --out-dir DIR

Job arrays and several GPUs (docs/inference.md)::

    m2diff-infer ... --manifest M --out-dir DIR --shard I/N      # one job of N; then:
    m2diff-infer merge --out-dir DIR                             # predictions.shard-*.json → predictions.json
    torchrun --nproc_per_node=G -m m2diff_monai.inference.cli ... --manifest M --out-dir DIR   # merges itself

Exit codes: 0 success, 2 bad input or options (one line on stderr naming the file or subject; nothing written
for that subject), 1 an unexpected internal error (one line naming the log with the traceback; ``--debug`` prints
it), 130 interrupted (m2diff_monai.cli_runner).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from m2diff_monai.cli_runner import run_cli
from m2diff_monai.runtime import configure_threads
from preprocessing.normalization import METHODS, cli_method

PROG = "m2diff-infer"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Enhance low-dose brain PET with a trained M2Diff/MFdiff checkpoint: three-orientation 2D "
        "sampling fused into one 3D volume, written on the input's own grid in its original units.",
        epilog="Outputs never replace an input: an --out/--out-dir/--summary path that is (or a folder that holds) "
        "the checkpoint, an input NIfTI, the manifest or a file it lists is refused before any work; manifest "
        "subject ids must be safe file names. A second cohort run on the same --out-dir refuses while the first "
        "runs. Existing predictions of the same name are replaced. See docs/safety.md. Job arrays: --shard I/N per "
        "job, then 'm2diff-infer merge --out-dir DIR'; several GPUs: torchrun --nproc_per_node=G -m "
        "m2diff_monai.inference.cli ... (rank 0 merges). See docs/inference.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="bundle folder (bundles/m2diff or bundles/mfdiff), or the name of a bundle an installed "
        "wheel ships (m2diff, mfdiff): default sampler settings from its inference.json; the "
        "network itself comes from the checkpoint",
    )
    io.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint (.pt)")
    io.add_argument("--ld-pet", type=Path, default=None, help="raw low-dose PET NIfTI (single-subject mode)")
    io.add_argument("--mri", type=Path, default=None, help="raw T1-weighted MRI NIfTI (optional)")
    io.add_argument("--out", type=Path, default=None, help="prediction NIfTI to write (.nii.gz or .nii)")
    io.add_argument("--subject", default=None, help="subject name in messages and the PNG (default: file name)")
    io.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="cohort mode: a preprocessed manifest; its 'volumes' of --split are enhanced",
    )
    io.add_argument("--split", default="test", help="cohort mode: test | val | train | all")
    io.add_argument("--subjects", default=None, help="cohort mode: comma list of subject ids (default: all)")
    io.add_argument("--out-dir", type=Path, default=None, help="cohort mode: folder for <subject>.nii.gz files")
    io.add_argument(
        "--shard",
        default=None,
        help="cohort mode, job arrays: I/N (1-based) enhances the id-sorted subjects at positions "
        "I-1 mod N and writes predictions.shard-I-of-N.json; join with 'm2diff-infer merge "
        "--out-dir DIR'. Under torchrun each rank takes its share by itself",
    )

    s = p.add_argument_group(
        "sampling (defaults: the sampler the checkpoint's training run was evaluated with "
        "(its stored inference_defaults), else the bundle's inference.json, else the values "
        "shown)"
    )
    s.add_argument(
        "--steps",
        default=None,
        help="sampling steps (respaced chain), or 'all' for the full T-step chain [default: 50]",
    )
    s.add_argument("--sampler", choices=("ancestral", "ddim"), default=None, help="reverse sampler [default: ddim]")
    s.add_argument("--eta", type=float, default=None, help="DDIM noise scale, 0 = deterministic [default: 0]")
    s.add_argument(
        "--start-step",
        default=None,
        help="start from the LD PET noised to this timestep (truncated start, not in the papers; "
        "MFdiff demo: 200) instead of pure noise; 'none' = pure noise [default: none]",
    )
    s.add_argument(
        "--clip-denoised",
        default=None,
        help="x̂0 clip range while sampling: auto (from the training data's normalization: (-1, 1) for "
        "min-max data, (-1, auto_clip_max) for shared) | none | LO,HI [default: the checkpoint's]",
    )
    s.add_argument("--orientations", default=None, help="comma list of axial,coronal,sagittal [default: all three]")
    s.add_argument(
        "--fusion",
        choices=("wavelet-stripe-residual", "wavelet-stripe", "mean", "wavelet3d"),
        default=None,
        help="how the orientation volumes are fused; wavelet-stripe is the papers' (LowGAN) stripe filter, "
        "which also damps small hot lesions; -residual filters only what each orientation alone "
        "holds [default: wavelet-stripe-residual]",
    )
    s.add_argument(
        "--samples",
        type=int,
        default=None,
        help="K draws; K > 1 writes their mean and a *_std per-voxel uncertainty map [default: 1]",
    )
    s.add_argument(
        "--ld-consistency-fwhm",
        default=None,
        metavar="MM",
        help="the fused volume takes the LD PET's band below a Gaussian of this FWHM (mm): keeps the "
        "coarse uptake and lesion means the network shifts, adds LD noise below the cut-off; "
        "'none' = off (the papers) [default: none; the demo recipes store theirs]",
    )
    s.add_argument(
        "--shared-noise",
        action="store_true",
        default=None,
        help="one noise path for every slice (less inter-slice flicker)",
    )
    s.add_argument("--seed", type=int, default=None, help="random seed [default: 0]")
    s.add_argument("--batch-size", type=int, default=None, help="slices per network batch [default: 16]")
    s.add_argument("--device", default=None, help="auto | cpu | cuda [default: auto]")
    s.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "none"),
        default=None,
        help=(
            "autocast precision; auto = bf16 where the hardware computes it natively (CUDA with bf16, CPUs "
            "with AVX512-BF16 or AMX), fp32 elsewhere [default: auto]"
        ),
    )
    s.add_argument(
        "--no-mri",
        action="store_true",
        default=None,
        help="MRI-free inference even when an MRI is given and the model was trained with MRI",
    )
    s.add_argument("--raw-weights", action="store_true", help="sample with the raw weights instead of the EMA")
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: OMP_NUM_THREADS, else the cgroup CPU quota, else "
        "SLURM_CPUS_PER_TASK, else the CPUs this process may use; docs/inference.md)",
    )

    o = p.add_argument_group("outputs")
    o.add_argument(
        "--save-orientations",
        action="store_true",
        default=None,
        help="also write the axial/coronal/sagittal volumes before fusion (*_<orientation>.nii.gz)",
    )
    o.add_argument("--no-png", action="store_true", help="do not write the PNG of the three views")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--summary", type=Path, default=None, help="also write the run summary as JSON here")

    pre = p.add_argument_group("preprocessing (default: what the checkpoint records for its training data)")
    pre.add_argument("--size", type=int, default=None, help="cube size of the training data (voxels at --spacing)")
    pre.add_argument(
        "--spacing",
        default=None,
        help="voxel size the model was trained at: X or X,Y,Z mm, or native (default: the checkpoint's "
        "record; none recorded = the scan's own). The scan is resampled to it and the "
        "prediction back to the scan's grid (single-subject mode)",
    )
    pre.add_argument(
        "--normalization",
        type=cli_method,
        metavar="|".join(METHODS),
        default=None,
        help="shared | volume (per-volume min-max) | slice (per-slice min-max, the official code)",
    )
    pre.add_argument("--transform", default=None, help="MRI-PET registration: SyN | affine | rigid")
    pre.add_argument("--space", choices=("pet", "mri"), default=None)
    pre.add_argument("--frame", type=int, default=None, help="0-based frame of a 4D PET to use")
    pre.add_argument("--sum-frames", action="store_true", help="sum the frames of a 4D PET")
    pre.add_argument("--qform-policy", choices=("warn", "reject"), default="warn")
    return p


def _settings(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "sampler": args.sampler,
        "eta": args.eta,
        "start_step": args.start_step,
        "orientations": args.orientations,
        "fusion": args.fusion,
        "samples": args.samples,
        "shared_noise": args.shared_noise,
        "ld_consistency_fwhm": args.ld_consistency_fwhm,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "amp": args.amp,
        "no_mri": args.no_mri,
        "save_orientations": args.save_orientations,
        "png": False if args.no_png else None,
        "use_ema": False if args.raw_weights else None,
        "progress": False if args.no_progress else None,
        "clip_denoised": args.clip_denoised,
    }


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    from m2diff_monai.inference import api

    settings = _settings(args)
    if args.manifest is not None:
        if args.ld_pet is not None or args.out is not None:
            parser.error("use either --manifest/--out-dir (cohort) or --ld-pet/--out (one subject), not both")
        if args.out_dir is None:
            parser.error("--manifest needs --out-dir")
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        return api.infer_manifest(
            args.checkpoint,
            args.manifest,
            args.out_dir,
            split=args.split,
            subjects=subjects,
            bundle=args.bundle,
            shard=args.shard,
            **settings,
        )
    if args.shard is not None:
        parser.error("--shard is for cohort mode (--manifest/--out-dir)")
    if args.ld_pet is None or args.out is None:
        parser.error("give --ld-pet and --out (or --manifest and --out-dir)")
    return api.infer_subject(
        args.checkpoint,
        args.ld_pet,
        args.out,
        args.mri,
        bundle=args.bundle,
        subject=args.subject,
        size=args.size,
        normalization=args.normalization,
        transform=args.transform,
        space=args.space,
        spacing=args.spacing,
        frame=args.frame,
        sum_frames=args.sum_frames,
        qform_policy=args.qform_policy,
        **settings,
    )


def merge_main(argv: Sequence[str]) -> int:
    """``m2diff-infer merge --out-dir DIR``: join the shard summaries of a job array into predictions.json."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} merge",
        description="Join OUT_DIR/predictions.shard-I-of-N.json (I = 1..N) into OUT_DIR/predictions.json. Refuses "
        "when a shard is missing, the shards disagree on manifest, split, checkpoint, weights, preprocessing or "
        "sampling settings, or a selected subject has no prediction.",
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="the --out-dir the shards wrote to")
    return run_cli(parser, _merge, argv, prog=PROG)


def _merge(args: argparse.Namespace) -> int:
    from m2diff_monai.inference.cohort import merge_shards

    merged = merge_shards(args.out_dir)
    print(
        f"{len(merged['subjects'])} subject(s) from {len(merged['shards'])} shard(s); list: "
        f"{Path(args.out_dir) / 'predictions.json'}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    parser = build_parser()
    return run_cli(
        parser, lambda args: _infer(args, parser), argv, interrupted="nothing written for the subject in progress"
    )


def _infer(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    threads = configure_threads(args.threads)
    if args.summary is not None:
        from m2diff_monai.io.safety import RunInputs

        RunInputs(
            [
                ("--checkpoint", args.checkpoint),
                ("--ld-pet", args.ld_pet),
                ("--mri", args.mri),
                ("--manifest", args.manifest),
            ]
        ).check(args.summary, "--summary")
    summary = {**_run(args, parser), "threads": threads}
    if args.summary is not None:
        from m2diff_monai.io.atomic import save_json

        save_json(args.summary, summary)
    if "subjects" in summary:
        from m2diff_monai.inference.cohort import torchrun_world

        world = torchrun_world()
        if world is not None and world[0] != 0:  # rank 0 reports the merged cohort
            return 0
        for entry in summary["subjects"]:
            print(f"{entry['subject']}: {entry['files']['prediction']} ({entry['seconds']['sampling']:.1f} s sampling)")
        listed = (
            f"predictions.shard-{summary['shard'].replace('/', '-of-')}.json"
            if "shard" in summary
            else "predictions.json"
        )
        print(
            f"{len(summary['subjects'])} subject(s) in {summary['seconds']:.1f} s; list: {Path(args.out_dir) / listed}"
        )
    else:
        for warning in summary.get("warnings", []):
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        print(json.dumps({"subject": summary["subject"], "files": summary["files"], "seconds": summary["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
