"""Bias that the ``slice`` normalization's way back leaves, with a perfect model (no network involved).

With ``--normalization slice`` every training slice is min–max normalized on its own, so a model predicts the SD
slice in the SD slice's own [0, 1] scale. At inference the SD's min/max are unknown; each predicted slice goes back
with its LD slice's range (``pred = pred_norm · (max_LD − min_LD) + min_LD``) before fusion. This script measures
what that leaves even for an oracle that returns the SD slice normalized by its own min–max exactly: the oracle's
slices are mapped back with the LD slices' ranges (per orientation, brain slices only, as inference samples them),
fused like inference (:func:`m2diff_monai.inference.volume.fuse_with_coverage`), and compared with the true SD
(relative mean bias, :func:`m2diff_monai.evaluation.metrics.relative_bias`) inside the brain mask and each region
mask of the manifest (lesions, hypometabolism, GM, WM). A model trained with ``shared`` has no such term.

    .venv/bin/python benchmarks/bias_slice_normalization.py --manifest M.json [--fusion mean,wavelet-stripe]
        [--json out.json]

``M.json`` from ``m2diff-preprocess demo ... --normalization slice`` (any manifest works: the cubes of ``slice``
and ``shared`` are the same).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from m2diff_monai.data.manifest import read_manifest
from m2diff_monai.data.orientation import ORIENTATIONS, slices_to_volume, volume_to_slices
from m2diff_monai.evaluation.metrics import relative_bias
from m2diff_monai.inference.volume import _coverage_count, brain_slice_indices, fuse_with_coverage
from preprocessing.normalization import minmax_slices


def oracle_orientation(ld: np.ndarray, sd: np.ndarray, mask: np.ndarray, orientation: str) -> np.ndarray:
    """The SD's own per-slice min–max (a perfect ``slice`` model), mapped back with the LD slices' ranges."""
    ld_stack, sd_stack = volume_to_slices(ld, orientation), volume_to_slices(sd, orientation)
    out = np.zeros(ld_stack.shape, np.float32)
    todo = brain_slice_indices(mask, orientation, ld_stack.shape[0])
    _, ld_range = minmax_slices(ld_stack[todo])
    sd_norm, _ = minmax_slices(sd_stack[todo])
    out[todo] = ld_range.invert(sd_norm)
    return slices_to_volume(out, orientation)


def subject_bias(item: dict, base: Path, fusions: list[str]) -> dict[str, float]:
    def cube(rel: str, dtype=np.float32) -> np.ndarray:
        return np.asarray(nib.load(str(base / rel)).dataobj, dtype=dtype)

    ld, sd, mask = cube(item["ld_pet"]), cube(item["sd_pet"]), cube(item["brain_mask"]) > 0.5
    regions = {"brain": mask, **{n: cube(p) > 0.5 for n, p in sorted((item.get("regions") or {}).items())}}
    regions = {n: r for n, r in regions.items() if r.any()}
    per_orientation = {o: oracle_orientation(ld, sd, mask, o) for o in ORIENTATIONS}
    count = _coverage_count(mask, ORIENTATIONS, ld.shape)
    row: dict[str, float] = {}
    volumes = {
        **{f"only_{o}": v for o, v in per_orientation.items()},
        **{f"fused_{f}": fuse_with_coverage(per_orientation, count, f) for f in fusions},
    }
    for name, volume in volumes.items():
        for region, region_mask in regions.items():
            row[f"{name}/{region}"] = relative_bias(volume, sd, region_mask)
    # what drives it: the LD slice's range against the SD slice's, in the brain slices of the axial stack
    todo = brain_slice_indices(mask, "axial", ld.shape[2])
    ld_span = np.ptp(volume_to_slices(ld, "axial")[todo].reshape(len(todo), -1), axis=1)
    sd_span = np.ptp(volume_to_slices(sd, "axial")[todo].reshape(len(todo), -1), axis=1)
    row["axial_span_ratio_median"] = float(np.median(ld_span / np.maximum(sd_span, 1e-12)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--fusion", default="mean,wavelet-stripe", help="fusion methods to report (comma list)")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-subject numbers here")
    args = parser.parse_args()
    content = read_manifest(args.manifest, require="volumes")
    base = args.manifest.resolve().parent
    fusions = [f.strip() for f in args.fusion.split(",") if f.strip()]
    rows = {}
    for item in content["volumes"]:
        if item.get("sd_pet"):
            rows[item["subject"]] = subject_bias(item, base, fusions)
    keys = sorted({k for r in rows.values() for k in r})
    summary = {}
    for key in keys:
        values = np.array([r[key] for r in rows.values() if key in r and np.isfinite(r[key])])
        summary[key] = {
            "n": int(values.size),
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    params = (content.get("provenance") or {}).get("parameters") or {}
    print(
        f"{len(rows)} subjects, manifest {args.manifest} (normalization {params.get('normalization')}); "
        "relative mean bias (pred - SD) / SD of the slice-oracle mapped back with the LD slice range"
    )
    print(f"{'volume/region':40s} {'n':>3s} {'mean':>8s} {'min':>8s} {'max':>8s}")
    for key, s in summary.items():
        print(f"{key:40s} {s['n']:3d} {s['mean']:+8.3f} {s['min']:+8.3f} {s['max']:+8.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "subjects": rows}, indent=1))


if __name__ == "__main__":
    main()
