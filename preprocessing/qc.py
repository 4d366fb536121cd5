"""Stage 9: quality control people can look at — one PNG montage per subject and a summary table per run.

Montage: rows axial / coronal / sagittal through the brain's centre of mass; columns LD PET, SD PET, registered
MRI (each present one) and an alignment overlay (MRI in grey with the PET's iso-contours in colour; without MRI,
the PET with the brain-mask contour). Display is neurological (subject's right on the screen's right), superior or
anterior up; all PET panels share the [0, 1] normalized window.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m2diff_monai.data.orientation import ORIENTATIONS, extract_slice
from m2diff_monai.io.atomic import save_text, write_with

SUMMARY_COLUMNS: tuple[str, ...] = (
    "subject", "status", "split", "space", "source_shape", "source_spacing", "shape", "spacing", "scale", "offset",
    "mattes_mi_before", "mattes_mi_after", "nmi_before", "nmi_after", "n_slices", "seconds", "warnings", "error",
)  # fmt: skip


def _display(plane: np.ndarray) -> np.ndarray:
    """Canonical 2D plane (first axis → screen x, second → screen y) for ``imshow(origin="lower")``."""
    return np.asarray(plane).T


def save_montage(
    path: Path,
    volumes: Mapping[str, np.ndarray],
    mask: np.ndarray,
    title: str,
) -> Path:
    """Write the QC montage for normalized cube volumes (keys among ``ld_pet``, ``sd_pet``, ``mri``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)] if mask.any() else [s // 2 for s in mask.shape]
    columns = [m for m in ("ld_pet", "sd_pet", "mri") if m in volumes]
    pet_for_contour = volumes.get("sd_pet", volumes["ld_pet"])
    ncols = len(columns) + 1
    fig, axes = plt.subplots(3, ncols, figsize=(2.6 * ncols, 7.8), squeeze=False)
    for row, orientation in enumerate(ORIENTATIONS):
        k = centre[{"sagittal": 0, "coronal": 1, "axial": 2}[orientation]]
        for col, modality in enumerate(columns):
            ax = axes[row, col]
            plane = _display(extract_slice(volumes[modality], orientation, k))
            cmap = "gray" if modality == "mri" else "hot"
            ax.imshow(plane, cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
            if row == 0:
                ax.set_title(modality)
        ax = axes[row, -1]
        contour = _display(extract_slice(pet_for_contour, orientation, k))
        if "mri" in volumes:
            ax.imshow(
                _display(extract_slice(volumes["mri"], orientation, k)), cmap="gray", vmin=0, vmax=1, origin="lower"
            )
            if contour.max() > 0.3:
                ax.contour(contour, levels=[0.3, 0.6], colors=["cyan", "yellow"], linewidths=0.7, origin="lower")
            label = "MRI + PET contours"
        else:
            ax.imshow(contour, cmap="hot", vmin=0, vmax=1, origin="lower")
            label = "PET + brain mask"
        m = _display(extract_slice(mask, orientation, k)).astype(float)
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=["lime"], linewidths=0.6, origin="lower")
        if row == 0:
            ax.set_title(label)
        for a in axes[row]:
            a.set_xticks([])
            a.set_yticks([])
        axes[row, 0].set_ylabel(f"{orientation} {k}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    finally:
        plt.close(fig)
    return Path(path)


def summary_row(subject: str, status: str, split: str = "", record: dict | None = None, error: str = "") -> dict:
    row = {c: "" for c in SUMMARY_COLUMNS}
    row.update(subject=subject, status=status, split=split, error=error)
    if record:
        reg = record.get("registration") or {}
        sim = reg.get("similarity") or {}
        row.update(
            space=record.get("space", ""),
            source_shape="x".join(str(v) for v in record.get("source_shape", [])),
            source_spacing="x".join(f"{v:.3g}" for v in record.get("source_spacing", [])),
            shape="x".join(str(v) for v in record.get("shape", [])),
            spacing="x".join(f"{v:.3g}" for v in record.get("spacing", [])),
            scale=f"{record['normalization']['scale']:.6g}",
            offset=f"{record['normalization']['offset']:.6g}",
            mattes_mi_before=_fmt(sim.get("mattes_mi", {}).get("before")),
            mattes_mi_after=_fmt(sim.get("mattes_mi", {}).get("after")),
            nmi_before=_fmt(sim.get("nmi", {}).get("before")),
            nmi_after=_fmt(sim.get("nmi", {}).get("after")),
            n_slices=sum(len(v["indices"]) for v in record.get("slices", {}).values()),
            seconds=_fmt(sum((record.get("timings") or {}).values())),
            warnings="; ".join(record.get("warnings", [])),
        )
    return row


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_summary(csv_path: Path, md_path: Path, rows: Sequence[dict]) -> None:
    """The per-run summary as CSV (for tools) and markdown (for people), both atomic."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    save_text(csv_path, buf.getvalue())

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in SUMMARY_COLUMNS) + " |" for row in rows]
    save_text(md_path, "# Preprocessing QC summary\n\n" + "\n".join(lines) + "\n")
