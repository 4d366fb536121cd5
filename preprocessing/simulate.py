"""``m2diff-preprocess simulate``: low-dose PET from standard-dose PET at a dose reduction factor.

Two modes: one image (``--sd-pet SD.nii.gz --drf 100 --out LD.nii.gz``), or a subjects table
(``--subjects S.csv --out DIR``) where every row without an ``ld_pet`` gets one, at its ``drf`` (or ``--drf``), and a
new table ``DIR/subjects.csv`` lists the result (all columns kept, paths relative to the new table).
The standard-dose image is taken as the true activity; the low-dose image is ``Poisson(ȳ/DRF)`` counts
reconstructed like a standard-dose scan (``--mode independent``). ``--mode nested`` draws standard-dose counts and
thins them binomially instead, and can write the matching re-simulated standard-dose image (``--sd-out``).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from m2diff_monai.cli_runner import print_error
from m2diff_monai.errors import InputError
from m2diff_monai.io.atomic import save_json, save_nifti, save_text

DEFAULT_DRF = 100.0


def add_scanner_arguments(parser: argparse.ArgumentParser) -> None:
    """Acquisition/reconstruction options shared by ``simulate`` and ``demo``."""
    from .simulation import DEFAULT_COUNTS

    g = parser.add_argument_group("acquisition and reconstruction model")
    g.add_argument(
        "--counts",
        type=float,
        default=DEFAULT_COUNTS,
        help="true (unscattered) coincidences of the standard-dose scan, all planes (default %(default).3g)",
    )
    g.add_argument("--psf-fwhm", type=float, default=4.5, help="scanner resolution, mm FWHM (default %(default)s)")
    g.add_argument("--scatter-fraction", type=float, default=0.30, help="scatter/(trues+scatter) (default %(default)s)")
    g.add_argument("--randoms-fraction", type=float, default=0.15, help="randoms/prompts (default %(default)s)")
    g.add_argument("--iterations", type=int, default=3, help="OSEM iterations (default %(default)s, as DaCRA)")
    g.add_argument("--subsets", type=int, default=21, help="OSEM subsets (default %(default)s, as DaCRA)")
    g.add_argument(
        "--postfilter-fwhm", type=float, default=5.0, help="Gaussian post-filter, mm FWHM (default %(default)s)"
    )
    g.add_argument("--no-psf-recon", action="store_true", help="do not model the PSF in reconstruction")
    g.add_argument(
        "--backend",
        choices=("numpy", "torch"),
        default="numpy",
        help="projector arithmetic: scipy.sparse, or torch.sparse (GPU if available) (default %(default)s)",
    )
    g.add_argument("--device", default=None, help="torch device for --backend torch (default: cuda if available)")


def scanner_params(args: argparse.Namespace):
    from .simulation import ScannerParams

    return ScannerParams(
        counts=args.counts,
        psf_fwhm_mm=args.psf_fwhm,
        scatter_fraction=args.scatter_fraction,
        randoms_fraction=args.randoms_fraction,
        iterations=args.iterations,
        subsets=args.subsets,
        postfilter_fwhm_mm=args.postfilter_fwhm,
        psf_in_recon=not args.no_psf_recon,
    )


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = __doc__.split("\n\n")[0]
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--sd-pet", type=Path, help="standard-dose PET NIfTI (one image)")
    src.add_argument("--subjects", type=Path, help="subjects table: fill ld_pet for rows that lack it")
    parser.add_argument(
        "--out", type=Path, required=True, help="LD NIfTI path (with --sd-pet) or output folder (with --subjects)"
    )
    parser.add_argument(
        "--drf",
        type=float,
        default=None,
        help=f"dose reduction factor > 1 (with --subjects: for rows without a drf; default "
        f"{DEFAULT_DRF:g} for --sd-pet)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (per subject: seed and subject_id)")
    parser.add_argument(
        "--mode",
        choices=("independent", "nested"),
        default="independent",
        help="LD counts: independent Poisson(ybar/DRF) draws, or binomial thinning of simulated "
        "SD counts (default %(default)s)",
    )
    parser.add_argument(
        "--sd-out",
        type=Path,
        default=None,
        help="with --sd-pet: also write the re-simulated standard-dose image (implies counts for SD)",
    )
    parser.add_argument(
        "--mu-map",
        type=Path,
        default=None,
        help="with --sd-pet: attenuation map on the PET grid in 1/cm (water 0.096); default: water "
        "inside the head outline",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --subjects: redo subjects already simulated (rewrites only files this tool "
        "wrote; never an input: see docs/safety.md)",
    )
    add_scanner_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def subject_seed(seed: int, subject_id: str) -> int:
    """A stable per-subject seed (independent of row order)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(subject_id.encode())]).generate_state(1)[0])


def check_drf(drf: float | None, subject: str | None = None, path: Path | None = None) -> float:
    if drf is None or not math.isfinite(drf) or drf <= 1:
        raise InputError(f"dose reduction factor must be a number > 1, got {drf}", subject=subject, path=path)
    return float(drf)


def load_pet(path: Path, subject: str | None = None):
    """Read a 3D PET NIfTI fully with nibabel (which, unlike ITK, refuses truncated files) and check its values."""
    import nibabel as nib

    if not path.exists():
        raise InputError("file does not exist", subject=subject, path=path)
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types for broken files
        raise InputError(f"cannot read NIfTI ({type(err).__name__}: {err})", subject=subject, path=path) from None
    data = np.squeeze(data) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {data.shape}", subject=subject, path=path)
    if not np.isfinite(data).all():
        raise InputError("image contains NaN or Inf values", subject=subject, path=path)
    if not (data > 0).any():
        raise InputError("image has no positive voxel (not a PET activity image?)", subject=subject, path=path)
    image = nib.Nifti1Image(data, image.affine, image.header)
    return image


def simulate_file(
    sd_path: Path,
    out_path: Path,
    drf: float,
    *,
    seed: int,
    mode: str,
    params,
    backend: str,
    device: str | None,
    sd_out: Path | None = None,
    mu_map_path: Path | None = None,
    subject: str | None = None,
) -> dict[str, Any]:
    """Simulate one LD image next to ``out_path`` (and ``sd_out``); write a JSON sidecar; return its content."""
    from . import simulation

    image = load_pet(sd_path, subject)
    mu = None
    if mu_map_path is not None:
        mu_img = load_pet(mu_map_path, subject)
        if mu_img.shape != image.shape or not np.allclose(mu_img.affine, image.affine, atol=1e-3):
            raise InputError("mu-map is not on the PET grid (shape/affine differ)", subject=subject, path=mu_map_path)
        mu_cm = np.asarray(mu_img.dataobj, np.float32)
        if mu_cm.max() > 1.0:
            raise InputError(
                f"mu-map maximum {mu_cm.max():.3g} is not in 1/cm (water is 0.096/cm)",
                subject=subject,
                path=mu_map_path,
            )
        mu = np.clip(mu_cm, 0, None) / 10.0
    ld, sd, info = simulation.simulate_image(
        image,
        drf,
        seed=seed,
        mode=mode,
        params=params,
        mu_map=mu,
        return_sd=sd_out is not None,
        backend=backend,
        device=device,
    )
    save_nifti(out_path, ld)
    if sd_out is not None and sd is not None:
        save_nifti(sd_out, sd)
    info.update(source_sd_pet=str(sd_path), output=str(out_path), units="same as the input image")
    save_json(sidecar(out_path), info)
    return info


def sidecar(nifti_path: Path) -> Path:
    name = nifti_path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return nifti_path.with_name(name + ".json")


def simulate_subjects(
    table: Path,
    out_dir: Path,
    *,
    drf: float | None,
    seed: int,
    mode: str,
    params,
    backend: str,
    device: str | None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fill missing ``ld_pet`` of a subjects table; write ``out_dir/subjects.csv``; return its path."""
    from tqdm import tqdm

    from .outputs import guard_simulate_table
    from .subjects import MASK_PREFIX, PATH_COLUMNS, read_subjects

    rows = read_subjects(table, require=("sd_pet",))
    guard_simulate_table(Path(table), rows, Path(out_dir))
    with open(table, newline="", encoding="utf-8-sig") as fh:
        raw = [r for r in csv.DictReader(fh) if any((v or "").strip() for v in r.values())]
    columns = [c.strip() for c in raw[0]] if raw else []
    for extra in ("split", "drf"):
        if extra not in columns:
            columns.append(extra)
    todo = [r for r in rows if r.ld_pet is None]
    for r in todo:
        check_drf(r.drf if r.drf is not None else drf, r.subject_id, table)
    out_dir = out_dir.resolve()
    out_rows = []
    by_id = {r.subject_id: r for r in rows}
    bar = tqdm(total=len(todo), desc="simulate", unit="subject", disable=not progress)
    for cells in raw:
        cells = {k.strip(): (v or "").strip() for k, v in cells.items() if k is not None}
        row = by_id[cells["subject_id"]]
        new = dict(cells)
        for col in [*PATH_COLUMNS, *(c for c in columns if c.startswith(MASK_PREFIX))]:
            value = getattr(row, col, None) if col in PATH_COLUMNS else row.masks.get(col[len(MASK_PREFIX) :])
            new[col] = os.path.relpath(value, out_dir) if value is not None else ""
        if row.ld_pet is None:
            row_drf = check_drf(row.drf if row.drf is not None else drf, row.subject_id, table)
            target = out_dir / row.subject_id / "ld_pet.nii.gz"
            s = subject_seed(seed, row.subject_id)
            done = sidecar(target)
            if force or not _already(done, target, row_drf, s, mode, params):
                simulate_file(
                    row.sd_pet,
                    target,
                    row_drf,
                    seed=s,
                    mode=mode,
                    params=params,
                    backend=backend,
                    device=device,
                    subject=row.subject_id,
                )
            new["ld_pet"] = os.path.relpath(target, out_dir)
            new["drf"] = f"{row_drf:g}"
            bar.update(1)
        out_rows.append(new)
    bar.close()
    out_csv = out_dir / "subjects.csv"
    save_text(out_csv, _csv_text(columns, out_rows))
    return out_csv


def _already(sidecar_path: Path, target: Path, drf: float, seed: int, mode: str, params) -> bool:
    import json
    from dataclasses import asdict

    if not (sidecar_path.exists() and target.exists()):
        return False
    try:
        info = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("drf") == drf
        and info.get("seed") == seed
        and info.get("mode") == mode
        and info.get("params") == json.loads(json.dumps(asdict(params)))
    )


def _csv_text(columns: list[str], rows: list[dict[str, str]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    return buf.getvalue()


def main(args: argparse.Namespace) -> int:
    try:
        params = scanner_params(args)
        params.check()
    except ValueError as err:
        print_error("m2diff-preprocess", str(err))
        return 2
    try:
        if args.sd_pet is not None:
            drf = check_drf(args.drf if args.drf is not None else DEFAULT_DRF)
            if args.out.suffix not in (".nii", ".gz"):
                raise InputError("--out must be a .nii or .nii.gz path with --sd-pet", path=args.out)
            from .outputs import guard_simulate_file

            guard_simulate_file(
                args.sd_pet,
                args.mu_map,
                {"--out": args.out, "--out (its JSON sidecar)": sidecar(args.out), "--sd-out": args.sd_out},
            )
            info = simulate_file(
                args.sd_pet,
                args.out,
                drf,
                seed=args.seed,
                mode=args.mode,
                params=params,
                backend=args.backend,
                device=args.device,
                sd_out=args.sd_out,
                mu_map_path=args.mu_map,
            )
            print(f"wrote {args.out} (DRF {drf:g}, {info['prompts_ld']:,} low-dose prompts)")
        else:
            if args.drf is not None:
                check_drf(args.drf)
            out_csv = simulate_subjects(
                args.subjects,
                args.out,
                drf=args.drf,
                seed=args.seed,
                mode=args.mode,
                params=params,
                backend=args.backend,
                device=args.device,
                force=args.force,
            )
            print(f"wrote {out_csv}")
    except InputError as err:
        print_error("m2diff-preprocess", err.line())
        return 2
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="m2diff-preprocess simulate"))
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_standalone())
