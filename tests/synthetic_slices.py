"""Test data for the training data path, the engines and the training bundles: small 2-D slice triplets and a manifest.

Test code, not product code (the product's demo cohort comes from ``m2diff-preprocess demo``). The manifest it
writes uses the manifest format's own split names and item keys, spelled out here so that the tests check the
format rather than restate the reader's constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2diff_monai.data.manifest import provenance, write_manifest
from m2diff_monai.io.atomic import save_npy

SPLITS = ("training", "validation", "test")


def write_synthetic_manifest(
    out_dir: str | Path,
    size: int = 32,
    subjects: dict[str, int] | None = None,
    slices_per_orientation: int = 2,
    orientations: Sequence[str] = ("axial", "coronal", "sagittal"),
    mri_free_subjects: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Write random-but-structured slices (smooth blobs as SD PET, SD + noise as LD PET, an edge-like "MRI")
    and a manifest with ``training``/``validation``/``test`` lists to ``out_dir``; returns the manifest path.

    ``subjects`` maps subject → split index 0/1/2 (default: two training subjects, one validation, one test);
    ``mri_free_subjects`` get ``"mri": ""`` and ``mri_available: 0``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    subjects = subjects or {"sub-01": 0, "sub-02": 0, "sub-03": 1, "sub-04": 2}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    content: dict[str, Any] = {"name": "synthetic", **{split: [] for split in SPLITS}}
    for subject, split_index in subjects.items():
        for orientation in orientations:
            for k in range(slices_per_orientation):
                sd = np.zeros((size, size), np.float32)
                for _ in range(3):
                    cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.08, 0.25)
                    sd += rng.uniform(0.3, 0.7) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
                sd = np.clip(sd / max(sd.max(), 1e-6), 0, 1).astype(np.float32)
                ld = np.clip(sd + rng.normal(0, 0.1, sd.shape), 0, 1).astype(np.float32)
                mri = np.clip(np.abs(np.gradient(sd)[0]) * size / 4 + 0.2 * (sd > 0.2), 0, 1).astype(np.float32)
                names = {}
                for name, array in (("ld_pet", ld), ("sd_pet", sd), ("mri", mri)):
                    names[name] = f"{subject}/{orientation}/{name}_{k:03d}.npy"
                    save_npy(out / names[name], array[None])
                has_mri = subject not in mri_free_subjects
                content[SPLITS[split_index]].append(
                    {
                        "ld_pet": names["ld_pet"],
                        "sd_pet": names["sd_pet"],
                        "mri": names["mri"] if has_mri else "",
                        "mri_available": int(has_mri),
                        "subject": subject,
                        "orientation": orientation,
                        "slice": k,
                    }
                )
    content["volumes"] = []
    # parameters stay empty: checkpoints copy them as their preprocessing record, and these slices had none
    content["provenance"] = provenance(
        "tests/synthetic_slices.py", {}, notes="random synthetic slices for tests", seed=seed
    )
    return write_manifest(out / "manifest.json", content)
