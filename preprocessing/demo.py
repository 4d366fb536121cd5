"""``m2diff-preprocess demo``: the embedded demo cohort — simulated PET on real MNI152 anatomy, preprocessed.

Steps: N subjects from the MNI152 2009 maps (:mod:`preprocessing.phantom`: random diffeomorphic warps, FDG-like
activity, pathology in some subjects) → standard- and low-dose PET through the simulator
(:mod:`preprocessing.simulation`, nested mode: the LD counts are a binomial thinning of the SD counts) and a T1 on
its own grid with a random rigid misalignment → raw NIfTI and ``DIR/raw/subjects.csv`` → the preprocessing pipeline
→ ``data_manifests/demo.json``. Every file is written atomically; a rerun skips subjects already generated with
the same settings (``DIR/raw/<id>/subject.json`` is each subject's done marker, written last).

Held-out anatomy: ``--heldout N`` (default 2) more subjects, ``heldout-NNN``, in the ``test`` split (so every
evaluation of the test split scores them) but drawn from :data:`preprocessing.phantom_anatomy.HELDOUT_VARIATION` —
stronger warps, other head sizes, enlarged ventricles, atrophy, asymmetry — which no training or validation subject
comes from. Their ids say which test subjects they are. Every T1 is scanner-like (skull, scalp, neck, bias field,
noise; ``--t1-style stripped`` for the old skull-stripped template T1).

Registration: rigid by default (``--transform``). Measured on this cohort (4 mm): the correlation of the
registered T1 with the true WM map inside GM|WM is 0.74–0.79 with rigid for with-skull T1s, but 0.34–0.55 with
SyN (0.72 for the skull-stripped T1): Mattes-MI SyN pulls the T1's skull and scalp onto the PET's brain edge, so
the MRI channel shows misplaced anatomy and misguides the network. Inference re-uses the transform the training
manifest records, so the demo checkpoint registers a new T1 rigidly too.

Default DRF 100 (the M2Diff paper's DaCRA setting). With the default standard-dose count level (3·10⁸ trues, a
long acquisition) the 2 mm low-dose images are very noisy but keep the anatomy visible (PSNR ≈ 20 dB against the
standard dose in the brain), so the enhancement task is hard yet learnable; ``--drf 20`` makes it easier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m2diff_monai.cli_runner import print_error
from m2diff_monai.errors import InputError
from m2diff_monai.io.atomic import save_json, save_nifti, save_text

from .normalization import METHODS, cli_method
from .simulate import add_scanner_arguments, scanner_params, subject_seed
from .simulation import ScannerParams

MASK_NAMES = ("gm", "wm", "hypometabolism", "lesion_hot", "lesion_cold")
DEMO_DRF = 100.0
DEMO_NOTES = (
    "Simulated PET on real MNI152 anatomy (demo cohort): MNI152 2009 T1/GM/WM maps (nilearn) warped into "
    "distinct subjects; FDG-like activity with hypometabolism and lesions in some subjects; SD and LD PET "
    "from a 2D per-plane PET model (Joseph projector, attenuation, PSF, scatter, randoms, Poisson counts, "
    "binomial thinning) reconstructed with OSEM. Not patient data."
)


@dataclass(frozen=True)
class DemoOptions:
    subjects: int = 12
    resolution: int = 2
    size: int | None = None  # None: 128 at 2 mm, 256 at 1 mm (divided by downsample)
    drf: float = DEMO_DRF
    seed: int = 0
    workers: int = 1
    downsample: int = 1  # block-average the template (e.g. 2 → 4 mm) for quick tests
    transform: str = "rigid"  # intra-subject T1→PET is rigid; SyN warps the skull/scalp into the brain (measured)
    spacing: str = "auto"  # target voxel size of preprocessing (auto = the cohort's median: the grid's own here)
    backend: str = "numpy"
    normalization: str = "shared"  # preprocessing only: not part of the raw cohort's fingerprint
    scanner: ScannerParams = field(default_factory=ScannerParams)
    heldout: int = 2  # extra test subjects with held-out anatomy (HELDOUT_VARIATION)
    t1_style: str = "head"

    def grid_size(self) -> int:
        if self.size is not None:
            return int(self.size)
        base = 128 if self.resolution == 2 else 256
        return max(32, base // self.downsample)

    def fingerprint(self) -> dict[str, Any]:
        """What makes a generated subject valid for reuse (not: counts of subjects, workers, size, transform)."""
        return {
            "resolution": self.resolution,
            "downsample": self.downsample,
            "drf": float(self.drf),
            "seed": self.seed,
            "scanner": asdict(self.scanner),
            "t1_style": self.t1_style,
            "version": 2,
        }


HELDOUT_PREFIX = "heldout-"


def subject_plan(n: int, heldout: int = 0) -> list[tuple[str, str, str]]:
    """``(subject_id, pathology kind, split)`` for ``n`` subjects: kinds cycle healthy, hypometabolism, lesions,
    both; the last ``n_test`` are test, the ``n_val`` before them validation (12 → 8 / 2 / 2). Then ``heldout``
    test subjects ``heldout-NNN`` (held-out anatomy; kinds alternate lesions and hypometabolism+lesions).

    Validation and test subjects all carry lesions (kinds alternate hypometabolism+lesions and lesions): whatever
    is selected on validation (baseline settings, the best checkpoint, the demo's LD-consistency FWHM) is then
    selected on lesions too, and the test split scores lesion recovery on every subject."""
    from .phantom import PATHOLOGY_KINDS

    if n < 3:
        raise ValueError("the demo cohort needs at least 3 subjects (train, val, test)")
    n_hold = max(1, round(n / 6))
    n_train = n - 2 * n_hold
    plan = []
    for i in range(n):
        split = "train" if i < n_train else ("val" if i < n_train + n_hold else "test")
        plan.append((f"demo-{i + 1:03d}", PATHOLOGY_KINDS[i % len(PATHOLOGY_KINDS)], split))
    if n >= 4:  # validation and test subjects carry lesions: the last two kinds are lesions and both
        for split in ("val", "test"):
            split_idx = [i for i, p in enumerate(plan) if p[2] == split]
            for j, i in enumerate(split_idx):
                plan[i] = (plan[i][0], PATHOLOGY_KINDS[-1 - (j % 2)], split)
    plan += [(f"{HELDOUT_PREFIX}{j + 1:03d}", PATHOLOGY_KINDS[-1 - (j % 2)], "test") for j in range(heldout)]
    return plan


def _subject_files(sid: str, masks: list[str]) -> dict[str, str]:
    files = {
        "sd_pet": f"{sid}/pet_sd.nii.gz",
        "ld_pet": f"{sid}/pet_ld.nii.gz",
        "mri": f"{sid}/t1.nii.gz",
        "activity": f"{sid}/activity.nii.gz",
    }
    files.update({f"mask_{m}": f"{sid}/mask_{m}.nii.gz" for m in masks})
    return files


def generate_subject(raw_dir: Path, sid: str, kind: str, split: str, options: DemoOptions) -> dict[str, Any]:
    """Make (or reuse) one raw subject; return its subjects-table row and timings."""
    import nibabel as nib

    from .phantom import make_subject
    from .phantom_anatomy import VARIATIONS, load_anatomy
    from .simulation import simulate_volume

    folder = raw_dir / sid
    marker = folder / "subject.json"
    if marker.exists():
        try:
            record = json.loads(marker.read_text())
            files_ok = all((raw_dir / p).exists() for p in record["files"].values())
            if (
                record.get("fingerprint") == options.fingerprint()
                and record.get("kind") == kind
                and record.get("split") == split
                and files_ok
            ):
                return {**record, "reused": True}
        except (OSError, ValueError, KeyError):
            pass
    t0 = time.perf_counter()
    seed = subject_seed(options.seed, sid)
    rng = np.random.default_rng(seed)
    anatomy = load_anatomy(options.resolution, options.downsample)
    variation = "heldout" if sid.startswith(HELDOUT_PREFIX) else "training"
    phantom = make_subject(anatomy, rng, kind, variation=VARIATIONS[variation], t1_style=options.t1_style)
    t1_done = time.perf_counter()
    brain = (phantom.masks["gm"] + phantom.masks["wm"]) > 0
    sim = simulate_volume(
        phantom.activity,
        anatomy.spacing,
        options.drf,
        seed=seed + 1,
        mode="nested",
        params=options.scanner,
        mu_map=phantom.mu_map,
        calibration_mask=brain,
        backend=options.backend,
    )
    t_sim = time.perf_counter() - t1_done

    present = [m for m in MASK_NAMES if m in phantom.masks and phantom.masks[m].any()]
    files = _subject_files(sid, present)

    def pet_image(data: np.ndarray) -> nib.Nifti1Image:
        img = nib.Nifti1Image(data.astype(np.float32), phantom.affine)
        img.set_qform(phantom.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        img.header["descrip"] = b"simulated FDG PET, Bq/mL"
        return img

    save_nifti(raw_dir / files["sd_pet"], pet_image(sim.sd))
    save_nifti(raw_dir / files["ld_pet"], pet_image(sim.ld))
    save_nifti(raw_dir / files["activity"], pet_image(phantom.activity))
    t1 = nib.Nifti1Image(phantom.t1.astype(np.float32), phantom.t1_affine)
    t1.set_qform(phantom.t1_affine, code=1)
    t1.header.set_xyzt_units("mm", "sec")
    save_nifti(raw_dir / files["mri"], t1)
    for m in present:
        img = nib.Nifti1Image(phantom.masks[m].astype(np.uint8), phantom.affine)
        img.set_qform(phantom.affine, code=1)
        save_nifti(raw_dir / files[f"mask_{m}"], img)
    record = {
        "subject_id": sid,
        "kind": kind,
        "split": split,
        "anatomy": variation,
        "drf": float(options.drf),
        "files": files,
        "fingerprint": options.fingerprint(),
        "phantom": phantom.info,
        "simulation": {k: v for k, v in sim.info.items() if k not in ("params",)},
        "seconds": {
            "phantom": round(t1_done - t0, 3),
            "simulation": round(t_sim, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    save_json(marker, record)
    return {**record, "reused": False}


def subjects_table(raw_dir: Path, records: list[dict[str, Any]]) -> Path:
    """Write ``raw_dir/subjects.csv`` (paths relative to it) from subject records."""
    import csv
    import io

    columns = [
        "subject_id",
        "ld_pet",
        "sd_pet",
        "mri",
        "split",
        "drf",
        *[f"mask_{m}" for m in MASK_NAMES],
        "activity",
        "pathology",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in sorted(records, key=lambda r: r["subject_id"]):
        row = {c: r["files"].get(c, "") for c in columns}
        row.update(subject_id=r["subject_id"], split=r["split"], drf=f"{r['drf']:g}", pathology=r["kind"])
        writer.writerow(row)
    return save_text(raw_dir / "subjects.csv", buf.getvalue())


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def generate_raw_cohort(raw_dir: Path, options: DemoOptions, progress: bool = True) -> tuple[Path, list[dict]]:
    """Generate (or reuse) every demo subject under ``raw_dir``; return the subjects table and the records."""
    from tqdm import tqdm

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    plan = subject_plan(options.subjects, options.heldout)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(plan), desc="demo subjects", unit="subject", disable=not progress)
    if options.workers <= 1 or len(plan) == 1:
        for sid, kind, split in plan:
            records.append(generate_subject(raw_dir, sid, kind, split, options))
            bar.update(1)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(options.workers, len(plan)), mp_context=ctx, initializer=_init_worker) as pool:
            pending = {pool.submit(generate_subject, raw_dir, sid, kind, split, options) for sid, kind, split in plan}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    records.append(future.result())
                    bar.update(1)
    bar.close()
    return subjects_table(raw_dir, records), records


def build_demo(out_dir: Path, manifest_path: Path, options: DemoOptions, progress: bool = True):
    """The whole demo: raw cohort under ``out_dir/raw``, preprocessed under ``out_dir/preprocessed``, manifest."""
    from .pipeline import PipelineOptions, run_pipeline

    out_dir = Path(out_dir)
    table, records = generate_raw_cohort(out_dir / "raw", options, progress)
    voxel = options.resolution * options.downsample
    notes = (
        f"{DEMO_NOTES} Grid {voxel} mm, DRF {options.drf:g}, seed {options.seed}, "
        f"{options.subjects} subjects + {options.heldout} held-out-anatomy test subjects "
        f"({HELDOUT_PREFIX}*), T1 style {options.t1_style}."
    )
    pipeline_options = PipelineOptions(
        transform=options.transform,
        size=options.grid_size(),
        seed=options.seed,
        spacing=options.spacing,
        workers=max(1, options.workers),
        normalization=options.normalization,
        notes=notes,
    )
    summary = run_pipeline(table, out_dir / "preprocessed", Path(manifest_path), pipeline_options)
    return summary, records


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (raw/, preprocessed/); a rerun reuses it, never writing over an input (docs/safety.md)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=Path("data_manifests/demo.json"),
        help="manifest to write (default %(default)s)",
    )
    parser.add_argument("--subjects", type=int, default=12, help="number of subjects (default %(default)s: 8/2/2)")
    parser.add_argument(
        "--heldout",
        type=int,
        default=2,
        help="extra test subjects with held-out anatomy, heldout-NNN (default %(default)s)",
    )
    parser.add_argument(
        "--t1-style",
        choices=("head", "stripped"),
        default="head",
        help="head: scanner-like T1 with skull, scalp and neck (default); stripped: template brain",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        choices=(1, 2),
        default=2,
        help="grid in mm: 2 (default, minutes on 2 cores) or 1 (the full-resolution cohort)",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="preprocessed cube edge (default 128 at 2 mm, 256 at 1 mm)"
    )
    parser.add_argument("--drf", type=float, default=DEMO_DRF, help="dose reduction factor (default %(default)g)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="subjects generated and preprocessed in parallel (default %(default)s)",
    )
    parser.add_argument(
        "--downsample", type=int, default=1, help="coarsen the template grid by this factor (2: 4 mm; for quick tests)"
    )
    parser.add_argument(
        "--transform",
        default="rigid",
        help="T1→PET registration: rigid (default: one subject's T1 and PET differ by a rigid "
        "motion; SyN deforms a with-skull T1's scalp into the PET brain) | affine | SyN",
    )
    parser.add_argument(
        "--normalization",
        default="shared",
        type=cli_method,
        metavar="|".join(METHODS),
        help="preprocessing normalization (default %(default)s; see m2diff-preprocess run --help)",
    )
    parser.add_argument(
        "--spacing",
        default="auto",
        help="voxel size the cubes are resampled to: auto (default: the cohort's median, i.e. the "
        "demo grid), X or X,Y,Z mm, or native; --size counts voxels at this spacing",
    )
    parser.add_argument("--raw-only", action="store_true", help="only generate the raw cohort (no preprocessing)")
    add_scanner_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        if not args.drf > 1:
            raise InputError(f"dose reduction factor must be > 1, got {args.drf}")
        if args.subjects < 3:
            raise InputError(f"--subjects must be at least 3 (train, val and test), got {args.subjects}")
        if args.downsample < 1 or args.workers < 1:
            raise InputError("--downsample and --workers must be >= 1")
        if args.heldout < 0:
            raise InputError(f"--heldout must be >= 0, got {args.heldout}")
        params = scanner_params(args)
        params.check()
        options = DemoOptions(
            subjects=args.subjects,
            resolution=args.resolution,
            size=args.size,
            drf=args.drf,
            seed=args.seed,
            workers=args.workers,
            downsample=args.downsample,
            transform=args.transform,
            spacing=args.spacing,
            backend=args.backend,
            normalization=args.normalization,
            scanner=params,
            heldout=args.heldout,
            t1_style=args.t1_style,
        )
        t0 = time.perf_counter()
        if args.raw_only:
            table, records = generate_raw_cohort(args.out / "raw", options)
            print(f"wrote {table} ({len(records)} subjects) in {time.perf_counter() - t0:.0f} s")
            return 0
        summary, records = build_demo(args.out, args.manifest, options)
    except (InputError, ValueError) as err:
        print_error("m2diff-preprocess", err.line() if isinstance(err, InputError) else str(err))
        return 2
    if summary.failed:
        for line in summary.failed.values():
            print(line.splitlines()[0], file=sys.stderr)
        return 1
    print(f"demo cohort: {len(records)} subjects, manifest {summary.manifest} ({time.perf_counter() - t0:.0f} s)")
    return 0


__all__ = [
    "DemoOptions",
    "HELDOUT_PREFIX",
    "MASK_NAMES",
    "build_demo",
    "configure",
    "generate_raw_cohort",
    "generate_subject",
    "main",
    "subject_plan",
    "subjects_table",
]
