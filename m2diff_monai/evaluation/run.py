"""What ``m2diff-evaluate`` and the bundles' ``evaluate.json`` call: score predictions of a manifest's cohort
against the standard-dose reference and write the report folder.

Where metrics are computed (``space``):

- ``native`` (default): on the LD PET's own voxel grid — the grid ``m2diff-infer`` writes predictions on — in
  original units. Reference = ``source_sd_pet`` (the SD PET file; the intake guarantees it is on the LD grid),
  LD row = ``source_ld_pet``. The brain mask and region masks of the preprocessed folder are carried back with
  nearest neighbour: for ``--space pet`` cubes that is an exact placement (the cube's affine is the source
  affine shifted by whole voxels), for ``--space mri`` cubes ANTs' inverse registration with
  ``nearestNeighbor``. Every array is reordered to RAS+ (flips/permutations only: the same voxels), so
  ``axial`` slices are planes of constant z whatever the file's storage order.
- ``preprocessed``: in the ``size``³ cube of the preprocessed folder, in original units (cube × the volume's own
  scaling from ``subject.json``); predictions are cut out of the native grid exactly (``--space pet`` cubes only).

One data range per subject: the reference's peak inside the brain mask, used by every method's PSNR, SSIM and
LPIPS (:mod:`.metrics`). Predictions are looked up as ``DIR/<subject>.nii.gz`` (or ``.nii``): the names
``m2diff-infer --manifest ... --out-dir DIR`` writes. The report folder is built in a temporary sibling folder
and moved into place at the end, so a failed run never leaves a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import m2diff_monai
from m2diff_monai.data import grid
from m2diff_monai.data.orientation import ORIENTATION_AXIS, ORIENTATIONS, parse_orientations
from m2diff_monai.data.manifest import canonical_split, read_manifest, select_volumes
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json, save_text, staged_folder
from m2diff_monai.runtime import configure_threads

TOOL = "m2diff-evaluate"
LD_METHOD = "LD"
REFERENCE = "SD"
PRED_SUFFIXES = (".nii.gz", ".nii")
SPACES = ("native", "preprocessed")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
READ_THREADS = 4

# Metric columns: (column, label, higher_is_better). Bias: the smallest |value| is best (None).
VOLUME_METRICS = (("ssim", "SSIM", True), ("psnr", "PSNR (dB)", True), ("nmse", "NMSE", False),
                  ("lpips", "LPIPS", False))
SLICE_METRICS = (("ssim_2d_axial", "SSIM", True), ("psnr_2d_axial", "PSNR (dB)", True),
                 ("nmse_2d_axial", "NMSE", False), ("lpips", "LPIPS", False))
MEAN2D_METRICS = (("ssim_2d", "SSIM", True), ("psnr_2d", "PSNR (dB)", True), ("nmse_2d", "NMSE", False))
PAPER_METRICS = ("ssim_paper", "psnr_paper", "nmse_paper", "lpips_paper")  # the papers' protocol (paper_protocol.py)


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class EvaluationOptions:
    """Everything that changes the numbers or the files written (recorded in ``run.json``)."""

    split: str = "test"
    space: str = "native"
    subjects: tuple[str, ...] | None = None
    per_slice: bool = False
    lpips: bool = True
    lpips_weights: str | None = None
    lpips_orientation: str = "axial"
    figures: bool = True
    orientations: tuple[str, ...] = ORIENTATIONS
    min_slice_voxels: int = 16
    keep_going: bool = False
    progress: bool = True
    workers: int = 2
    paper_scaling: str = "reference"  # the papers' protocol (paper_protocol.PaperOptions)
    paper_pad: int = 256
    paper_min_size: int | None = None
    baselines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        canonical_split(self.split, allow_all=True)
        if self.space not in SPACES:
            raise InputError(f"unknown evaluation space {self.space!r}; choose native or preprocessed")
        try:
            object.__setattr__(self, "orientations", parse_orientations(self.orientations))
        except ValueError as err:
            raise InputError(str(err)) from None
        if self.lpips_orientation not in ORIENTATION_AXIS:
            raise InputError(f"unknown LPIPS orientation {self.lpips_orientation!r}")
        if int(self.min_slice_voxels) < 1:
            raise InputError("min_slice_voxels must be >= 1")
        if int(self.workers) < 1:
            raise InputError("workers must be >= 1")
        try:
            self.paper_options()
        except ValueError as err:
            raise InputError(str(err)) from None
        if self.subjects is not None:
            object.__setattr__(self, "subjects", tuple(str(s) for s in self.subjects))
        from m2diff_monai.evaluation.baselines import parse_baselines

        object.__setattr__(self, "baselines", parse_baselines(self.baselines))

    def paper_options(self):
        from m2diff_monai.evaluation.paper_protocol import PaperOptions

        return PaperOptions(scaling=self.paper_scaling, pad_to=int(self.paper_pad), min_size=self.paper_min_size)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def parse_method_map(values: Mapping[str, Any] | Sequence[str] | str | None, what: str) -> dict[str, str]:
    """``{"M2Diff": "dir"}``, ``["M2Diff=dir", ...]`` or ``"M2Diff=dir,IDDPM=dir2"`` → ordered dict.

    Method names: letters, digits and ``_.+-``; ``LD``/``SD`` are reserved (the input and the reference)."""
    if values is None or values == "" or values == {}:
        return {}
    if isinstance(values, Mapping):
        pairs = [(str(k), str(v)) for k, v in values.items()]
    else:
        items = [v for v in (values.split(",") if isinstance(values, str) else values) if str(v).strip()]
        pairs = []
        for item in items:
            name, sep, value = str(item).partition("=")
            if not sep or not name.strip() or not value.strip():
                raise InputError(f"{what} must be METHOD=PATH, got {item!r}")
            pairs.append((name.strip(), value.strip()))
    out: dict[str, str] = {}
    for name, value in pairs:
        if not METHOD_NAME.match(name):
            raise InputError(f"{what}: method name {name!r} must use letters, digits and _ . + - only")
        if name.upper() in (LD_METHOD, REFERENCE):
            raise InputError(f"{what}: method name {name!r} is reserved (LD is the input row, SD the reference)")
        if name in out:
            raise InputError(f"{what}: method {name!r} given twice")
        out[name] = value
    return out


def prediction_path(pred_dir: str | Path, subject: str) -> Path | None:
    """``DIR/<subject>.nii.gz`` or ``DIR/<subject>.nii`` (m2diff-infer's cohort naming), None when absent.
    ``subject`` must be a safe name (InputError otherwise): a prediction is never read from outside ``DIR``."""
    safety.check_name(subject, "subject id")
    for suffix in PRED_SUFFIXES:
        candidate = Path(pred_dir) / f"{subject}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _path(base: Path, value: Any) -> Path | None:
    return base / str(value) if value not in (None, "") else None


def _has_reference(item: dict, base: Path) -> bool:
    return any(_path(base, item.get(k)) is not None and _path(base, item.get(k)).is_file()
               for k in ("source_sd_pet", "sd_pet"))


# ------------------------------------------------------------------------------------------- volumes
@dataclass
class SubjectVolumes:
    """One subject on the evaluation grid (canonical RAS+ voxel order), original units."""

    subject: str
    reference: np.ndarray
    volumes: dict[str, np.ndarray]  # "LD" then each method, in order
    mask: np.ndarray
    regions: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    notes: list[str] = field(default_factory=list)


def _read(path: Path, subject: str, what: str) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(f"{what} does not exist", subject=subject, path=path) from None
    except Exception as err:  # nibabel raises many types for bad files
        raise InputError(f"cannot read the {what} ({type(err).__name__}: {' '.join(str(err).split())})",
                         subject=subject, path=path) from None
    return img


def _canonical(img: nib.Nifti1Image, path: Path, subject: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Full read (nibabel raises on truncated files), 4D with one frame squeezed, reordered to RAS+."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise InputError(f"cannot read the {what}'s voxels ({type(err).__name__}: {' '.join(str(err).split())})",
                         subject=subject, path=path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what} must be a 3D volume, found shape {data.shape}", subject=subject, path=path)
    return grid.to_canonical(data, img.affine)


def _subject_record(item: dict, base: Path, subject: str) -> dict:
    folder = _path(base, item.get("preprocessed_dir")) or base
    path = _path(base, item.get("subject_json")) or folder / "subject.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read subject.json ({err})", subject=subject, path=path) from None


class _MaskMapper:
    """Carries the preprocessed folder's masks (cube grid) onto the evaluation grid with nearest neighbour."""

    def __init__(self, item: dict, base: Path, record: dict, subject: str, dst_shape, dst_affine, space: str):
        self.subject, self.dst_shape, self.dst_affine, self.space = subject, tuple(dst_shape), dst_affine, space
        self.cube_space = str(record.get("space", item.get("space", "pet")))
        folder = _path(base, item.get("preprocessed_dir")) or base
        self.transforms = grid.stored_inverse_transforms(record, folder)

    def __call__(self, path: Path, what: str) -> np.ndarray:
        img = _read(path, self.subject, what)
        try:
            cube = np.asarray(img.dataobj) > 0.5
        except Exception as err:
            raise InputError(f"cannot read the {what}'s voxels ({type(err).__name__})", subject=self.subject,
                             path=path) from None
        if cube.ndim != 3:
            raise InputError(f"{what} must be a 3D volume, found shape {cube.shape}", subject=self.subject, path=path)
        affine = np.asarray(img.affine, dtype=np.float64)
        if self.space == "preprocessed":
            return cube
        if self.cube_space == "mri":  # the T1 grid: back through the inverse registration, nearest neighbour
            return grid.map_back_through_registration(cube, affine, self.dst_shape, self.dst_affine, self.transforms,
                                                      order=0, subject=self.subject) > 0.5
        return grid.to_grid(cube.astype(np.uint8), affine, self.dst_shape, self.dst_affine, order=0) > 0


def load_subject(item: dict, base: Path, predictions: Mapping[str, Path], space: str = "native") -> SubjectVolumes:
    """Reference, LD, predictions and masks of one manifest ``volumes`` item on the evaluation grid.

    ``predictions``: ``{method: prediction file}`` (on the LD PET's own grid, original units, as m2diff-infer
    writes). Raises :class:`InputError` naming the subject and file for anything unreadable or off-grid."""
    sid = str(item.get("subject"))
    record = _subject_record(item, base, sid)
    notes: list[str] = []
    source_ld = _path(base, item.get("source_ld_pet"))
    if source_ld is None:
        raise InputError("manifest volume item has no 'source_ld_pet' (the grid predictions are written on)",
                         subject=sid)
    source_sd = _path(base, item.get("source_sd_pet")) if space == "native" else None
    if source_sd is not None and not source_sd.is_file():
        source_sd = None
    # gzip decompression releases the GIL: the LD, SD and prediction files are read concurrently
    reads = {LD_METHOD: (source_ld, "low-dose PET")}
    reads.update({m: (Path(p), f"{m} prediction") for m, p in predictions.items()})
    if source_sd is not None:
        reads[REFERENCE] = (source_sd, "standard-dose PET")
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(reads))) as pool:
        futures = {k: pool.submit(lambda p, w: _canonical(_read(p, sid, w), p, sid, w), *v) for k, v in reads.items()}
        loaded = {k: f.result() for k, f in futures.items()}
    ld_native, native_affine = loaded.pop(LD_METHOD)

    def on_ld_grid(key: str) -> np.ndarray:
        data, affine = loaded.pop(key)
        path, what = reads[key]
        if not grid.same_grid(data.shape, affine, ld_native.shape, native_affine):
            hint = ("the SD PET must share the LD PET's grid, as preprocessing requires" if key == REFERENCE else
                    f"m2diff-infer writes predictions on the LD PET's own grid ({source_ld})")
            raise InputError(f"{what} is not on the low-dose PET's grid (shape {data.shape} vs {ld_native.shape}, "
                             f"or another affine); {hint}", subject=sid, path=path)
        if not np.isfinite(data).all():
            raise InputError(f"{what} contains NaN or infinite values", subject=sid, path=path)
        return data

    preds_native = {m: on_ld_grid(m) for m in predictions}

    if space == "native":
        if source_sd is not None:
            reference = on_ld_grid(REFERENCE)
        else:
            reference = _cube_in_original_units(item, base, record, sid, "sd_pet")
            reference = grid.to_grid(reference[0], reference[1], ld_native.shape, native_affine, order=1)
            notes.append("reference: preprocessed SD cube mapped back (no source_sd_pet in the manifest)")
        grid_shape, grid_affine = ld_native.shape, native_affine
        volumes = {LD_METHOD: ld_native, **preds_native}
    else:
        reference, grid_affine = _cube_in_original_units(item, base, record, sid, "sd_pet")
        ld_cube, _ = _cube_in_original_units(item, base, record, sid, "ld_pet")
        grid_shape = reference.shape
        offset = grid.integer_offset(native_affine, grid_affine)
        if offset is None:
            raise InputError("--space preprocessed needs cubes cut from the PET's own grid (--space pet "
                             "preprocessing at the PET's native --spacing); use --space native", subject=sid)
        volumes = {LD_METHOD: ld_cube, **{m: grid.place(v, offset, grid_shape) for m, v in preds_native.items()}}
    if not np.isfinite(reference).all():
        raise InputError("standard-dose reference contains NaN or infinite values", subject=sid)

    mapper = _MaskMapper(item, base, record, sid, grid_shape, grid_affine, space)
    mask_path = _path(base, item.get("brain_mask"))
    if mask_path is None:
        raise InputError("manifest volume item has no 'brain_mask'", subject=sid)
    mask = mapper(mask_path, "brain mask")
    if not mask.any():
        raise InputError("brain mask is empty on the evaluation grid", subject=sid, path=mask_path)
    if not (reference[mask] > 0).any():
        raise InputError("standard-dose reference has no positive value inside the brain mask", subject=sid)
    regions = {}
    for name, rel in sorted((item.get("regions") or {}).items()):
        safety.check_name(name, f"subject {sid}: region name")  # it names report columns
        region_path = _path(base, rel)
        if region_path is not None:
            regions[str(name)] = mapper(region_path, f"region mask {name!r}")
    return SubjectVolumes(sid, reference, volumes, mask, regions, grid.voxel_spacing(grid_affine), grid_affine, notes)


def _cube_in_original_units(item: dict, base: Path, record: dict, sid: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed cube × its own scaling (``subject.json`` per-volume record; the item's LD scaling else)."""
    path = _path(base, item.get(key))
    if path is None:
        raise InputError(f"manifest volume item has no '{key}'", subject=sid)
    img = _read(path, sid, f"preprocessed {key}")
    data, affine = _canonical(img, path, sid, f"preprocessed {key}")
    per_volume = ((record.get("normalization") or {}).get("per_volume") or {}).get(key) or {}
    scale = float(per_volume.get("scale", item.get("scale", 1.0)))
    offset = float(per_volume.get("offset", item.get("offset", 0.0)))
    return (data * np.float32(scale) + np.float32(offset)).astype(np.float32), affine


# ------------------------------------------------------------------------------------------- metrics
def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` (None when empty)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def region_metrics(volume: np.ndarray, reference: np.ndarray, regions: Mapping[str, tuple]) -> dict[str, float]:
    """``bias_<r>``, ``mean_pred_<r>``, ``mean_target_<r>`` exactly as :func:`.metrics.evaluate_volume` defines
    them (:func:`.metrics.relative_bias`, NaN for an empty region), computed on each region's bounding box:
    the same voxels, a fraction of the passes over a 256³ volume. ``regions``: ``{name: (mask, box)}``."""
    from m2diff_monai.evaluation.metrics import relative_bias

    row: dict[str, float] = {}
    for name, (region, box) in regions.items():
        if box is None:
            row[f"bias_{name}"] = row[f"mean_pred_{name}"] = row[f"mean_target_{name}"] = float("nan")
            continue
        inside = region[box]
        pred, target = volume[box], reference[box]
        row[f"bias_{name}"] = relative_bias(pred, target, inside)
        row[f"mean_pred_{name}"] = float(np.mean(pred[inside], dtype=np.float64))
        row[f"mean_target_{name}"] = float(np.mean(target[inside], dtype=np.float64))
    return row


def score_subject(
    data: SubjectVolumes,
    options: EvaluationOptions,
    lpips_metric: Any | None,
    workers: int = 2,
) -> tuple[list[dict], list[dict]]:
    """(per-subject rows, per-slice rows) for the LD row and each method.

    The non-learned metrics of the rows run in ``workers`` threads (scipy.ndimage and numpy release the GIL);
    LPIPS runs after them, one row at a time (torch has its own threads)."""
    from m2diff_monai.evaluation import paper_protocol
    from m2diff_monai.evaluation.metrics import evaluate_volume, per_slice_metrics, resolve_data_range
    from m2diff_monai.evaluation.quantitation import lesion_recovery

    data_range = resolve_data_range(data.reference, data.mask)
    regions = {name: (region, _box(region)) for name, region in data.regions.items()}
    paper_ref = paper_protocol.prepare_reference(data.reference, data.spacing, options.paper_options())

    def volume_metrics(volume: np.ndarray) -> tuple[dict, dict]:
        row = evaluate_volume(volume, data.reference, data.mask, None, data.spacing, data_range=data_range,
                              orientations=options.orientations, min_slice_voxels=options.min_slice_voxels)
        row.update(region_metrics(volume, data.reference, regions))
        row.update(paper_protocol.score_volume(volume, paper_ref)[0])
        row.update(lesion_recovery(volume, data.reference, regions))
        per_slice = {}
        if options.per_slice:
            per_slice = {o: per_slice_metrics(volume, data.reference, data.mask, data_range, ORIENTATION_AXIS[o],
                                              min_slice_voxels=options.min_slice_voxels) for o in options.orientations}
        return row, per_slice

    methods = list(data.volumes)
    if workers > 1 and len(methods) > 1:
        with ThreadPoolExecutor(max_workers=min(int(workers), len(methods))) as pool:
            results = list(pool.map(volume_metrics, [data.volumes[m] for m in methods]))
    else:
        results = [volume_metrics(data.volumes[m]) for m in methods]

    rows, slice_rows = [], []
    lp_axis = ORIENTATION_AXIS[options.lpips_orientation]
    for method, (row, per_slice) in zip(methods, results):
        lp_values = None
        if lpips_metric is not None and getattr(lpips_metric, "available", False):
            lp_values = lpips_metric.slice_values(data.volumes[method], data.reference, data.mask, data_range,
                                                  slice_axis=lp_axis, min_slice_voxels=options.min_slice_voxels)
        finite = lp_values is not None and np.isfinite(lp_values).any()
        row["lpips"] = float(np.nanmean(lp_values)) if finite else float("nan")
        if lp_values is not None and getattr(lpips_metric, "model", None) is not None:
            row["lpips_paper"] = paper_protocol.lpips_volume(data.volumes[method], paper_ref, lpips_metric.model,
                                                             lpips_metric.device)
        rows.append({"subject": data.subject, "method": method, **row})
        for orientation, values in per_slice.items():
            if orientation == options.lpips_orientation and lp_values is not None:
                values["lpips"] = lp_values
            for k in np.flatnonzero(~np.isnan(values["psnr"])):
                slice_rows.append({"subject": data.subject, "method": method, "orientation": orientation,
                                   "slice": int(k), **{m: float(v[k]) for m, v in values.items()}})
    return rows, slice_rows


def _brain_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    box = _box(mask)
    return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(box, mask.shape))


def write_figure(data: SubjectVolumes, out_png: Path, units: str | None = None) -> Path:
    """LD | methods | SD | |method − SD| per method, three orientations, cropped to the brain (+4 voxels); a
    second set of rows at the full range through the lesions' hottest SD voxel; brain and lesion contours."""
    from m2diff_monai.evaluation.figures import figure_panel
    from m2diff_monai.evaluation.quantitation import UNKNOWN_UNITS, is_lesion

    box = _brain_box(data.mask)
    volumes = {name: v[box] for name, v in data.volumes.items()}
    volumes[REFERENCE] = data.reference[box]
    methods = [m for m in data.volumes if m != LD_METHOD]
    lesions = {name: region[box] for name, region in data.regions.items() if is_lesion(name)}
    return figure_panel(volumes, out_png, error_against=REFERENCE, input_key=LD_METHOD,
                        error_maps="each" if methods else "first", mask=data.mask[box],
                        title=f"{data.subject}: LD | {' | '.join(methods) + ' | ' if methods else ''}SD | error maps",
                        units=units or UNKNOWN_UNITS, contours=lesions, full_range=True)


# ------------------------------------------------------------------------------------------- tables
_LEADING = ("subject", "method", "ssim", "psnr", "nmse", "lpips", "bias")
_DIGITS = {"ssim": 4, "psnr": 2, "nmse": 4, "lpips": 4, "bias": 2}


def write_csv(path: Path, df) -> Path:
    """CSV written atomically; floats in full precision (the file round-trips the numbers)."""
    from m2diff_monai.io.atomic import write_with

    return write_with(path, lambda tmp: df.to_csv(tmp, index=False))


def region_names(df) -> list[str]:
    return [c[len("bias_"):] for c in df.columns if c.startswith("bias_")]


def order_columns(df):
    """subject, method, SSIM, PSNR, NMSE, LPIPS, bias (brain), bias per region, 2D metrics, the rest."""
    regions = [f"bias_{r}" for r in region_names(df)]
    two_d = [c for c in df.columns if c.startswith(("psnr_2d", "ssim_2d", "nmse_2d"))]
    first = [c for c in (*_LEADING, *regions, *two_d) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def summary_metrics(df) -> list[str]:
    regions = [f"bias_{r}" for r in region_names(df)]
    candidates = ["ssim", "psnr", "nmse", "lpips", "bias", *regions, "ssim_2d_axial", "psnr_2d_axial",
                  "nmse_2d_axial", "ssim_2d", "psnr_2d", "nmse_2d",
                  *[f"{m}_2d_{o}" for o in ("coronal", "sagittal") for m in ("ssim", "psnr", "nmse")], *PAPER_METRICS]
    from m2diff_monai.evaluation.quantitation import recovery_metrics

    return [c for c in candidates if c in df.columns] + recovery_metrics(df)


def ttest_metrics(df) -> list[str]:
    import pandas as pd

    regions = [f"bias_{r}" for r in region_names(df)]
    candidates = ["ssim", "psnr", "nmse", "lpips", "bias", *regions, "ssim_2d_axial", "psnr_2d_axial", "nmse_2d_axial",
                  *PAPER_METRICS]
    return [c for c in candidates if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any()]


def _stats(df, metric: str) -> dict[str, tuple[float, float, int]]:
    """method → (mean, sample std, n) with :func:`.stats.summary_table` (NaN and ±inf rows left out)."""
    import pandas as pd

    from m2diff_monai.evaluation.stats import summary_table

    clean = df[["method", metric]].copy()
    clean[metric] = pd.to_numeric(clean[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
    table = summary_table(clean, [metric])
    return {r["method"]: (r[f"{metric}_mean"], r[f"{metric}_std"], int(r["n"])) for _, r in table.iterrows()}


def summary_frame(df, metrics: Sequence[str]):
    """One row per method (LD first): ``<metric>_mean``, ``<metric>_std`` (ddof 1), ``<metric>_n``."""
    import pandas as pd

    methods = list(dict.fromkeys(df["method"]))
    rows = [{"method": m, "subjects": int((df["method"] == m).sum())} for m in methods]
    for metric in metrics:
        values = _stats(df, metric)
        for row in rows:
            mean, std, n = values.get(row["method"], (float("nan"), float("nan"), 0))
            row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_n": n})
    return pd.DataFrame(rows)


def ttest_frame(df, metrics: Sequence[str]):
    """Paired two-tailed t-tests (:func:`.stats.paired_ttests`): LD against each method, then every method pair."""
    import pandas as pd

    from m2diff_monai.evaluation.stats import paired_ttests

    parts = []
    for metric in metrics:
        clean = df[["subject", "method", metric]].copy()
        clean[metric] = pd.to_numeric(clean[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
        part = paired_ttests(clean, metric)
        part.insert(0, "metric", metric)
        parts.append(part)
    columns = ["metric", "method_a", "method_b", "n", "mean_a", "mean_b", "mean_diff", "t", "p"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def _label(metric: str, *, percent: bool = True, plane: bool = False) -> str:
    """Display name; ``plane`` adds "2D axial"/"2D mean" to slice metrics, ``percent`` the bias unit."""
    unit = " (%)" if percent else ""
    if metric == "bias":
        return f"bias brain{unit}"
    if metric.startswith("bias_"):
        return f"bias {metric[len('bias_'):]}{unit}"
    base, _, rest = metric.partition("_2d")
    name = {"ssim": "SSIM", "psnr": "PSNR (dB)", "nmse": "NMSE", "lpips": "LPIPS"}.get(base, metric)
    if plane and _ == "_2d":
        name += f" 2D {rest.lstrip('_') or 'mean'}"
    if metric.endswith("_paper"):
        name = {"ssim": "SSIM", "psnr": "PSNR (dB)", "nmse": "NMSE", "lpips": "LPIPS"}[base[:-len("_paper")]]
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


def _table(df, metrics: Sequence[str], bold_best: bool = True) -> str:
    """Markdown "mean ± std" table, one row per method (LD first), best method (LD excluded) in bold."""
    import pandas as pd

    from m2diff_monai.evaluation.stats import to_markdown_table

    methods = list(dict.fromkeys(df["method"]))
    stats = {metric: _stats(df, metric) for metric in metrics}
    cells = {m: {"method": m, "n": str(int((df["method"] == m).sum()))} for m in methods}
    for metric in metrics:
        contenders = {m: v[0] for m, v in stats[metric].items() if m != LD_METHOD and np.isfinite(v[0])}
        best = None
        if bold_best and len(contenders) >= 2:
            key = {"high": lambda m: -contenders[m], "low": lambda m: contenders[m],
                   "abs": lambda m: abs(contenders[m])}[_better(metric)]
            best = min(contenders, key=key)
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
    "with the papers' tables.\n")


def _lpips_line(lpips_status: Mapping[str, Any]) -> str:
    """The LPIPS sentence of summary.md (report.md lists LPIPS once in its header and drops this one)."""
    lpips_line = ("LPIPS: AlexNet (lpips 0.1.4), mean over " + str(lpips_status.get("orientation", "axial")) +
                  " slices with brain" if lpips_status.get("available") else
                  str(lpips_status.get("reason") or "LPIPS unavailable"))
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

    lines = ["# Paired two-tailed t-tests (scipy.stats.ttest_rel), paired by subject\n",
             "mean_diff = A − B; * p < 0.05, ** p < 0.01, *** p < 0.001, n.s. otherwise; n/a with fewer than 2 "
             "subjects. Bias values are fractions (0.01 = 1 %).\n"]
    if tt.empty:
        return "\n".join(lines + ["No metric could be tested.\n"])
    frame = tt.copy()
    frame["metric"] = [_label(m, percent=False, plane=True) for m in frame["metric"]]
    frame["sig."] = [_stars(float(p)) for p in frame["p"]]
    frame = frame.rename(columns={"method_a": "A", "method_b": "B"})
    frame["n"] = frame["n"].astype(str)
    lines.append(to_markdown_table(pd.DataFrame(frame), ["metric", "A", "B", "n", "mean_a", "mean_b", "mean_diff",
                                                         "t", "p", "sig."]))
    return "\n".join(lines)


def report_markdown(summary: Mapping[str, Any], df, tt, staging: Path) -> str:
    """The page a person opens first: what was evaluated, quantitation (regional bias, lesion recovery), the
    image-quality tables, the pictures, links to every file."""
    from m2diff_monai.evaluation import baselines as baselines_mod
    from m2diff_monai.evaluation.quantitation import MIN_TTEST_SUBJECTS, UNKNOWN_UNITS, quantitation_markdown

    opts = summary["options"]
    where = ("the low-dose PET's own grid (RAS+ voxel order), original units; reference = the source SD PET"
             if opts["space"] == "native" else "the preprocessed cube, original units (cube × its scaling)")
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
    summary_md = (staging / "summary.md").read_text().split("\n", 1)[1].replace("\n" + _lpips_line(lpips), "", 1)
    lines += ["## Image quality (mean ± std over subjects)\n", summary_md.replace("\n## ", "\n### ")]
    versus_ld = tt[(tt["method_a"] == LD_METHOD)] if not tt.empty else tt
    if not tt.empty:
        lines.append(f"## Paired t-tests against LD (p shown with ≥ {MIN_TTEST_SUBJECTS} subjects; every pair and "
                     "value: [ttests.md](ttests.md))\n")
        lines.append("| metric | method | mean (method − LD) | p | |")
        lines.append("| --- | --- | ---: | ---: | --- |")
        for _, r in versus_ld.iterrows():
            diff = -float(r["mean_diff"])
            scale = 100.0 if str(r["metric"]).startswith("bias") else 1.0
            p = float(r["p"])
            p_text = "n/a" if not np.isfinite(p) else f"{p:.2e}" if p < 1e-4 else f"{p:.4f}"
            if int(r["n"]) < MIN_TTEST_SUBJECTS:  # the report states it; ttests.md keeps every value
                p, p_text = float("nan"), f"n = {int(r['n'])} < {MIN_TTEST_SUBJECTS}: no t-test"
            lines.append(f"| {_label(r['metric'], plane=True)} | {r['method_b']} | {diff * scale:+.4g} | {p_text} "
                         f"| {_stars(p)} |")
        lines.append("")
    if summary["figures"]:
        lines.append("## Figures: LD | methods | SD | |method − SD| (axial, coronal, sagittal)\n")
        for sid, png in summary["figures"].items():
            lines.append(f"### {sid}\n\n![{sid}]({png})\n")
    if summary.get("cka"):
        cka = summary["cka"]
        lines.append("## Representation similarity: linear CKA between the PET and MRI branches (paper §III-G)\n")
        lines.append(f"Checkpoint `{cka['checkpoint']}`; {cka['examples']} slices, timesteps {cka['timesteps']}, "
                     f"activations average-pooled to ≤ {cka['pool']}² per channel. "
                     "Details: [cka/cka.json](cka/cka.json).\n")
        for part, png in cka["heatmaps"].items():
            lines.append(f"![{part} CKA](cka/{png})\n")
    lines.append("## Complexity\n")
    lines.append((staging / "complexity.md").read_text().split("\n", 1)[1])
    lines.append("\n## Files\n")
    described = {
        "per_subject.csv": "one row per (subject, method): every metric",
        "per_slice.csv": "one row per (subject, method, orientation, slice): 2D PSNR, SSIM, NMSE (+ LPIPS, axial)",
        "summary.csv": "mean, std and n per method and metric",
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


# ------------------------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """Which subjects are scored with which files; decided before any heavy work."""

    items: list[dict]
    files: dict[str, dict[str, Path]]  # subject → method → prediction file
    skipped: dict[str, str]  # subject → why (no reference, or missing prediction under keep_going)
    failed: dict[str, str] = field(default_factory=dict)


def plan_subjects(items: list[dict], base: Path, pred_dirs: Mapping[str, Path], keep_going: bool) -> Plan:
    """Every subject needs an SD reference (else skipped, noted) and a prediction from every method (else an
    :class:`InputError` naming the subject and the file looked for; skipped under ``keep_going``)."""
    plan = Plan(items=[], files={}, skipped={})
    for item in items:
        sid = str(item.get("subject"))
        if not _has_reference(item, base):
            plan.skipped[sid] = "no standard-dose reference (source_sd_pet / sd_pet) in the manifest"
            continue
        files: dict[str, Path] = {}
        for method, folder in pred_dirs.items():
            found = prediction_path(folder, sid)
            if found is None:
                err = InputError(f"no {method} prediction (looked for {sid}.nii.gz or {sid}.nii in {folder})",
                                 subject=sid, path=Path(folder) / f"{sid}.nii.gz")
                if not keep_going:
                    raise err
                plan.failed[sid] = err.line()
                break
            files[method] = found
        else:
            plan.items.append(item)
            plan.files[sid] = files
    return plan


def _check_out_dir(out_dir: Path, inputs: safety.RunInputs | Sequence[Path]) -> None:
    """Refuse to replace a folder that is not a previous report, or one that is or holds an input."""
    if not isinstance(inputs, safety.RunInputs):
        inputs = safety.RunInputs((str(p), p) for p in inputs)
    inputs.check(out_dir, "--out")
    out_dir = out_dir.resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError("report path exists and is not a folder", path=out_dir)
        if any(out_dir.iterdir()) and not _is_report(out_dir):
            raise InputError("folder exists and is not an m2diff-evaluate report (no run.json from this tool); "
                             "choose an empty or new --out", path=out_dir)


def _run_inputs(manifest: Path, content: dict, pred_dirs: Mapping[str, Path], checkpoints: Mapping[str, Path],
                timings: Mapping[str, Path], cka_checkpoint: str | Path | None,
                lpips_weights: str | Path | None) -> safety.RunInputs:
    """Everything the evaluation reads: the report folder (replaced as a whole) must be and hold none of it."""
    inputs = safety.RunInputs([("--cka-checkpoint", cka_checkpoint), ("--lpips-weights", lpips_weights)])
    inputs.add_manifest(manifest, content)
    for option, mapping in (("--pred", pred_dirs), ("--checkpoint", checkpoints), ("--timings", timings)):
        for method, path in mapping.items():
            inputs.add(f"{option} {method}", path)
    return inputs


def _is_report(folder: Path) -> bool:
    try:
        return json.loads((folder / "run.json").read_text()).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def evaluate_cohort(
    manifest: str | Path,
    predictions: Mapping[str, str | Path] | Sequence[str] | str,
    out_dir: str | Path,
    *,
    split: str = "test",
    space: str = "native",
    subjects: Sequence[str] | None = None,
    per_slice: bool = False,
    lpips: bool | Any = True,
    lpips_weights: str | Path | None = None,
    figures: bool = True,
    orientations: Sequence[str] | str = ORIENTATIONS,
    min_slice_voxels: int = 16,
    keep_going: bool = False,
    progress: bool = True,
    workers: int = 2,
    checkpoints: Mapping[str, str | Path] | Sequence[str] | str | None = None,
    timings: Mapping[str, str | Path] | Sequence[str] | str | None = None,
    cka_checkpoint: str | Path | None = None,
    cka_options: Mapping[str, Any] | None = None,
    paper_scaling: str = "reference",
    paper_pad: int = 256,
    paper_min_size: int | None = None,
    baselines: Sequence[str] | str | None = None,
    baseline_settings: Any | None = None,
) -> dict[str, Any]:
    """Score every ``split`` subject of ``manifest`` (LD first, then each method of ``predictions``) against its SD
    reference and write the report folder ``out_dir`` (see docs/evaluation.md). Returns the ``run.json`` dict.

    ``lpips``: True (AlexNet weights from ``lpips_weights`` / ``$M2DIFF_LPIPS_ALEXNET_WEIGHTS``; unavailable →
    NaN column and a one-line reason), False (skip), or a ready :class:`~.lpips_metric.LPIPSMetric`.
    ``checkpoints`` / ``timings``: ``{method: file}`` for the complexity table; ``cka_checkpoint``: an M2Diff
    checkpoint whose PET/MRI branches are compared with linear CKA (``cka_options`` go to
    :func:`.representation.cka_analysis`). ``baselines``: ``"gaussian,nlm,bm3d"`` or a list — classical filters
    of the LD scored as rows after LD, tuned on the validation split (:mod:`.baselines`; ``baseline_settings``: a
    :class:`.baselines.BaselineSettings` or a dict of its fields, e.g. the FWHM grid). Raises :class:`InputError`
    (one line) on bad input; nothing is written then. Under ``keep_going`` failing subjects are listed in
    ``run.json['failed']`` instead.
    """
    started = time.perf_counter()
    options = EvaluationOptions(split=split, space=space, subjects=tuple(subjects) if subjects else None,
                                per_slice=bool(per_slice), lpips=lpips is not False,
                                lpips_weights=None if lpips_weights in (None, "") else str(lpips_weights),
                                figures=bool(figures), orientations=orientations,
                                min_slice_voxels=int(min_slice_voxels), keep_going=bool(keep_going),
                                progress=bool(progress), workers=int(workers), paper_scaling=paper_scaling,
                                paper_pad=int(paper_pad), paper_min_size=paper_min_size, baselines=baselines or ())
    manifest = Path(manifest)
    base = manifest.resolve().parent
    pred_dirs = {m: Path(p) for m, p in parse_method_map(predictions, "--pred").items()}
    for method, folder in pred_dirs.items():
        if not folder.is_dir():
            raise InputError(f"{method} prediction folder does not exist", path=folder)
    from m2diff_monai.evaluation.baselines import BASELINE_ROWS

    clash = sorted({BASELINE_ROWS[b] for b in options.baselines} & set(pred_dirs))
    if clash:
        raise InputError(f"--pred method name {clash[0]!r} is the name of a --baselines row; rename the method")
    checkpoint_map = {m: Path(p) for m, p in parse_method_map(checkpoints, "--checkpoint").items()}
    timing_map = {m: Path(p) for m, p in parse_method_map(timings, "--timings").items()}
    for name, mapping in (("--checkpoint", checkpoint_map), ("--timings", timing_map)):
        for method, path in mapping.items():
            if not path.is_file():
                raise InputError(f"{name} file for {method} does not exist", path=path)
    content = read_manifest(manifest)
    items = select_volumes(content, options.split, options.subjects, manifest, purpose="evaluate")
    out_dir = Path(out_dir)
    inputs = _run_inputs(manifest, content, pred_dirs, checkpoint_map, timing_map, cka_checkpoint, lpips_weights)
    _check_out_dir(out_dir, inputs)
    plan = plan_subjects(items, base, pred_dirs, options.keep_going)
    if not plan.items:
        reasons = {**plan.skipped, **plan.failed}
        first = next(iter(reasons.items()), ("", "no subject"))
        raise InputError(f"no subject of the '{options.split}' split can be evaluated (e.g. {first[0]}: {first[1]})",
                         path=manifest)

    # Cheap checks of the optional parts first, so a bad checkpoint fails before minutes of scoring.
    from m2diff_monai.evaluation import complexity as complexity_mod

    complexity_inputs = complexity_mod.gather_inputs(list(pred_dirs), pred_dirs, checkpoint_map, timing_map)
    cka_model = None
    if cka_checkpoint:
        from m2diff_monai.evaluation import representation

        device = (cka_options or {}).get("device", "cpu")
        cka_model = representation.load_two_branch_model(cka_checkpoint, device=device)

    lpips_metric, lpips_status = _lpips(lpips, options)
    with staged_folder(out_dir, inputs=inputs) as staging:  # a previous report is replaced only when complete
        summary = _run(plan, base, pred_dirs, options, lpips_metric, lpips_status, staging, manifest,
                       complexity_inputs, cka_model, cka_checkpoint, cka_options, content, started,
                       baseline_settings)
    summary["out_dir"] = str(out_dir)
    return summary


def _lpips(lpips: bool | Any, options: EvaluationOptions) -> tuple[Any | None, dict[str, Any]]:
    if lpips is False:
        return None, {"available": False, "reason": "LPIPS not computed (--no-lpips)"}
    if lpips is True:
        from m2diff_monai.evaluation.lpips_metric import LPIPSMetric

        metric = LPIPSMetric(weights_path=options.lpips_weights)
    else:
        metric = lpips
    status = {"available": bool(metric.available), "reason": str(getattr(metric, "reason", "")),
              "weights": None if getattr(metric, "weights_path", None) is None else str(metric.weights_path),
              "orientation": options.lpips_orientation}
    return (metric if metric.available else None), status


def _progress(iterable, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=TOOL, unit="subject", disable=None if enabled else True,
                file=sys.stderr, leave=False)


def _run(plan: Plan, base: Path, pred_dirs, options: EvaluationOptions, lpips_metric, lpips_status, staging: Path,
         manifest: Path, complexity_inputs, cka_model, cka_checkpoint, cka_options, content: dict,
         started: float, baseline_settings: Any | None = None) -> dict[str, Any]:
    import pandas as pd

    from m2diff_monai.evaluation import baselines as baselines_mod
    from m2diff_monai.evaluation import complexity as complexity_mod
    from m2diff_monai.evaluation.quantitation import units_of

    chosen = baselines_mod.tune_on_validation(
        content["volumes"], options.baselines, lambda it: load_subject(it, base, {}, options.space),
        lambda it: _has_reference(it, base), [str(it.get("subject")) for it in plan.items],
        baselines_mod.as_settings(baseline_settings))
    units: dict[str, str] = {}
    rows: list[dict] = []
    slice_rows: list[dict] = []
    seconds: dict[str, dict[str, float]] = {}
    figures: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    for item in _progress(plan.items, len(plan.items), options.progress):
        sid = str(item.get("subject"))
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            data = load_subject(item, base, plan.files[sid], options.space)
            tb, cb = time.perf_counter(), time.process_time()
            filtered, chosen.seconds[sid] = baselines_mod.apply_baselines(data.volumes[LD_METHOD], data.mask,
                                                                          data.spacing, chosen, sid)
            data.volumes = baselines_mod.with_baselines(data.volumes, filtered, LD_METHOD)
            units[sid] = units_of(item, _path(base, item.get("source_ld_pet")))
            t1, c1 = time.perf_counter(), time.process_time()
            try:
                subject_rows, subject_slices = score_subject(data, options, lpips_metric, options.workers)
            except ValueError as err:  # e.g. a brain mask too thin for the SSIM window: this subject's data
                raise InputError(f"cannot score this subject ({err})", subject=sid) from None
            t2, c2 = time.perf_counter(), time.process_time()
            if options.figures:
                figures[sid] = write_figure(data, staging / "figures" / f"{sid}.png",
                                            units[sid]).relative_to(staging).as_posix()
        except InputError as err:
            if not options.keep_going:
                raise
            plan.failed[sid] = err.line()
            continue
        rows.extend(subject_rows)
        slice_rows.extend(subject_slices)
        if data.notes:
            notes[sid] = data.notes
        t3, c3 = time.perf_counter(), time.process_time()  # CPU: all threads of this process
        seconds[sid] = {"load": round(tb - t0, 3), "baselines": round(t1 - tb, 3), "metrics": round(t2 - t1, 3),
                        "figure": round(t3 - t2, 3), "cpu_load": round(cb - c0, 3),
                        "cpu_baselines": round(c1 - cb, 3), "cpu_metrics": round(c2 - c1, 3),
                        "cpu_figure": round(c3 - c2, 3)}
        del data
    if not rows:
        first = next(iter(plan.failed.items()))
        raise InputError(f"no subject could be evaluated (e.g. {first[0]}: {first[1]})", path=manifest)

    per_subject = order_columns(pd.DataFrame(rows))
    methods = list(dict.fromkeys(per_subject["method"]))
    write_csv(staging / "per_subject.csv", per_subject)
    if options.per_slice:
        write_csv(staging / "per_slice.csv", pd.DataFrame(
            slice_rows, columns=["subject", "method", "orientation", "slice", "psnr", "ssim", "nmse", "lpips"]))
    regions = region_names(per_subject)
    summary_df = summary_frame(per_subject, summary_metrics(per_subject))
    write_csv(staging / "summary.csv", summary_df)
    save_text(staging / "summary.md", summary_markdown(per_subject, regions, lpips_status))
    ttests = ttest_frame(per_subject, ttest_metrics(per_subject))
    write_csv(staging / "ttests.csv", ttests)
    save_text(staging / "ttests.md", ttests_markdown(ttests))

    complexity_rows = complexity_mod.complexity_rows(complexity_inputs)
    save_text(staging / "complexity.md", complexity_mod.complexity_markdown(complexity_rows))
    save_json(staging / "complexity.json", complexity_rows)

    cka_result = None
    if cka_model is not None:
        from m2diff_monai.evaluation import representation

        cka_result = representation.cka_analysis(cka_model, manifest, staging / "cka", split=options.split,
                                                 **{k: v for k, v in (cka_options or {}).items() if k != "device"})
        cka_result = {**cka_result, "checkpoint": str(cka_checkpoint)}

    summary = {
        "tool": TOOL,
        "version": m2diff_monai.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(manifest),
        "manifest_name": content.get("name"),
        "options": options.as_dict(),
        "methods": methods,
        "predictions": {m: str(p) for m, p in pred_dirs.items()},
        "reference": "source_sd_pet (original units)" if options.space == "native" else "preprocessed sd_pet cube "
                     "(original units)",
        "regions": regions,
        "units": ", ".join(sorted(set(units.values()))) or None,
        "baselines": chosen.as_dict(),
        "lpips": lpips_status,
        "threads": configure_threads(),
        "paper_protocol": _paper_protocol_record(options),
        "subjects": list(dict.fromkeys(per_subject["subject"])),
        "skipped": plan.skipped,
        "failed": plan.failed,
        "notes": notes,
        "figures": figures,
        "cka": cka_result,
        "complexity": complexity_rows,
        "seconds": {"subjects": seconds, "total": round(time.perf_counter() - started, 3)},
        "files": sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()) + ["report.md",
                                                                                                       "run.json"],
    }
    save_text(staging / "report.md", report_markdown({**summary, "_baselines": chosen}, per_subject, ttests,
                                                     staging))
    save_json(staging / "run.json", summary)
    return summary


def _paper_protocol_record(options: EvaluationOptions) -> dict[str, Any]:
    import torchmetrics

    from m2diff_monai.evaluation.paper_protocol import describe

    return {"columns": list(PAPER_METRICS), "description": describe(options=options.paper_options()),
            "torchmetrics": torchmetrics.__version__, **options.paper_options().__dict__}


# ------------------------------------------------------------------------------------------- bundle entry
def _none_if_empty(value: Any) -> Any:
    return None if value in (None, "", {}, []) else value


def run_bundle_evaluation(
    manifest: str | Path | None = None,
    predictions: Mapping[str, str] | Sequence[str] | str | None = None,
    output_dir: str | Path | None = None,
    split: str = "test",
    space: str = "native",
    per_slice: bool = False,
    lpips: bool = True,
    lpips_weights: str | None = None,
    figures: bool = True,
    keep_going: bool = False,
    progress: bool = True,
    workers: int = 2,
    checkpoints: Mapping[str, str] | Sequence[str] | str | None = None,
    timings: Mapping[str, str] | Sequence[str] | str | None = None,
    cka_checkpoint: str | None = None,
    subjects: Sequence[str] | str | None = None,
    baselines: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """Entry point of the bundles' ``evaluate`` key (``python -m monai.bundle run evaluate --config_file
    bundles/m2diff/evaluate.json --manifest M --predictions "{'M2Diff': 'DIR'}" --output_dir OUT``)."""
    if not manifest:
        raise InputError("evaluation needs a manifest: add --manifest data_manifests/NAME.json")
    if not _none_if_empty(predictions):
        raise InputError("evaluation needs predictions: add --predictions \"{'METHOD': 'DIR'}\" (or METHOD=DIR)")
    if not output_dir:
        raise InputError("evaluation needs an output folder: add --output_dir DIR")
    if isinstance(subjects, str):
        subjects = [s.strip() for s in subjects.split(",") if s.strip()]
    return evaluate_cohort(manifest, predictions, output_dir, split=split, space=space, per_slice=bool(per_slice),
                           lpips=bool(lpips), lpips_weights=_none_if_empty(lpips_weights), figures=bool(figures),
                           keep_going=bool(keep_going), progress=bool(progress), workers=int(workers or 1),
                           checkpoints=_none_if_empty(checkpoints), timings=_none_if_empty(timings),
                           cka_checkpoint=_none_if_empty(cka_checkpoint), subjects=_none_if_empty(subjects),
                           baselines=_none_if_empty(baselines))


__all__ = [
    "EvaluationOptions",
    "SubjectVolumes",
    "evaluate_cohort",
    "load_subject",
    "parse_method_map",
    "plan_subjects",
    "prediction_path",
    "run_bundle_evaluation",
    "score_subject",
]
