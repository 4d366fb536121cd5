"""What a perfect network would read after the LD consistency: ``SD + G_σ * (LD − SD)``.

Why: the consistency (:mod:`.consistency`) hands the band below its Gaussian back to the LD PET, and the LD's
noise in that band comes with it. A network whose output equalled the standard dose would still inherit that
error. On small lesions it can exceed a ±5 % target by itself: on the demo's validation subjects at 7 mm it reads
+10.4 % and +3.9 % on cold lesions, and the LD alone +12.6 % and +4.2 %. Scoring this floor beside the
candidates of ``scripts/tune_consistency.sh`` separates what the network adds to a bias from what the
measurement and the consistency impose.

It needs the standard-dose PET, so it is a diagnostic for validation (or any split with references), never an
inference setting. Each floor volume is written on the LD PET's own grid, like an ``m2diff-infer`` prediction, so
``m2diff-evaluate --pred floor-7=DIR/floor-7`` scores it with the same masks and metrics as the candidates.
``m2diff-evaluate --floor-fwhm 7`` computes the same row in memory and shows it beside every bias target. The
filter runs on that grid with the file's voxel size. The product filters the preprocessed cube, which has the
same voxel size when preprocessing keeps the native spacing (the demo) and differs only by resampling otherwise.

    python -m m2diff_monai.inference.consistency_floor --manifest data_manifests/demo.json --split val \\
        --fwhm 6 7 8 --out-dir work/consistency-tuning/m2diff
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from m2diff_monai.cli_runner import run_cli
from m2diff_monai.data.manifest import item_path, read_manifest, select_volumes
from m2diff_monai.errors import InputError
from m2diff_monai.inference.consistency import consistency_sigma, ld_consistency
from m2diff_monai.inference.consistency_tuning import FLOOR_PREFIX, fwhm_label
from m2diff_monai.io.atomic import save_nifti

PROG = "python -m m2diff_monai.inference.consistency_floor"


def floor_row(fwhm_mm: float) -> str:
    """The name a floor is scored under: ``floor-7`` (as ``m2diff-evaluate --floor-fwhm 7`` and the tuning use)."""
    return f"{FLOOR_PREFIX}{fwhm_label(fwhm_mm)}"


def is_floor_row(method: str) -> bool:
    """A floor row is a reference, never a method to judge."""
    return str(method).startswith(FLOOR_PREFIX)


def floor_volume(sd: np.ndarray, ld: np.ndarray, fwhm_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """The consistency applied to the standard dose itself: what an exact network would be corrected to."""
    return ld_consistency(sd, ld, consistency_sigma(fwhm_mm, spacing_mm))


def floor_volumes(reference: np.ndarray, ld: np.ndarray, spacing_mm: Sequence[float], fwhm_mm: float | None) -> dict:
    """``{floor-<mm>: the floor}`` for ``m2diff-evaluate --floor-fwhm`` (its grid, its voxel size); ``{}`` without."""
    return {} if fwhm_mm is None else {floor_row(fwhm_mm): floor_volume(reference, ld, fwhm_mm, spacing_mm)}


def reject_floor_names(methods: Sequence[str], fwhm_mm: float | None) -> None:
    """A ``--pred`` method may not take the floor row's name when ``--floor-fwhm`` adds that row."""
    taken = sorted(m for m in methods if is_floor_row(m)) if fwhm_mm is not None else []
    if taken:
        raise InputError(f"--pred method name {taken[0]!r} is the name of the --floor-fwhm row; rename the method")


def _load(path: Path | None, subject: str, what: str) -> nib.Nifti1Image:
    if path is None or not path.is_file():
        raise InputError(f"no {what} file: the floor needs both PETs of every subject", subject=subject, path=path)
    return nib.load(str(path))


def write_floors(
    manifest_path: str | Path,
    split: str,
    fwhms_mm: Sequence[float],
    out_dir: str | Path,
    subjects: Sequence[str] | None = None,
) -> dict[str, Path]:
    """``OUT/floor-<mm>/<subject>.nii.gz`` for every subject of ``split`` and every FWHM; returns the folders."""
    if not fwhms_mm or any(not np.isfinite(f) or f <= 0 for f in fwhms_mm):
        raise InputError(f"--fwhm needs positive values in mm, got {list(fwhms_mm)}")
    manifest_path = Path(manifest_path)
    base = manifest_path.resolve().parent
    items = select_volumes(read_manifest(manifest_path), split, subjects, manifest_path, "compute the floor of")
    folders = {floor_row(f): Path(out_dir) / floor_row(f) for f in fwhms_mm}
    for item in items:
        sid = str(item["subject"])
        ld_img = _load(item_path(base, item.get("source_ld_pet")), sid, "low-dose PET (source_ld_pet)")
        sd_img = _load(item_path(base, item.get("source_sd_pet")), sid, "standard-dose PET (source_sd_pet)")
        ld = np.asarray(ld_img.dataobj, dtype=np.float32)
        sd = np.asarray(sd_img.dataobj, dtype=np.float32)
        if ld.shape != sd.shape or not np.allclose(ld_img.affine, sd_img.affine, atol=1e-4):
            raise InputError("the SD PET is not on the LD PET's grid", subject=sid, path=item.get("source_sd_pet"))
        spacing = tuple(float(z) for z in ld_img.header.get_zooms()[:3])
        for fwhm, folder in zip(fwhms_mm, folders.values(), strict=True):
            image = nib.Nifti1Image(floor_volume(sd, ld, float(fwhm), spacing), ld_img.affine)
            image.set_qform(ld_img.affine, code=1)
            image.set_sform(ld_img.affine, code=1)
            save_nifti(folder / f"{sid}.nii.gz", image)
    return folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write SD + G*(LD - SD), the LD consistency applied to the standard dose (what a perfect "
        "network would read after it), for every subject of a split with references, as predictions on the LD "
        "grid under OUT/floor-<mm>/ for m2diff-evaluate --pred.",
    )
    p.add_argument("--manifest", type=Path, required=True, help="a manifest from m2diff-preprocess")
    p.add_argument("--split", default="val", help="split to use (default val)")
    p.add_argument("--fwhm", type=float, nargs="+", required=True, help="consistency FWHM(s) in mm")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for floor-<mm>/<subject>.nii.gz")
    p.add_argument("--subjects", nargs="+", default=None, help="only these subject ids")
    return p


def _run(args: argparse.Namespace) -> int:
    folders = write_floors(args.manifest, args.split, args.fwhm, args.out_dir, args.subjects)
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
