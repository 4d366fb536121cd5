"""One prepared subject through the model: load the weights, build the sampler, sample every orientation and
fuse (:mod:`.volume`), map the prediction back to the source grid and units, write every file atomically, and
the run record (what produced a prediction) the single-subject and cohort summaries share.

:mod:`.api` (``infer_subject``, ``infer_manifest``) resolves the settings and prepares the subjects; everything
from a prepared subject to its files is here, so both entry points write the same files the same way.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.affines import voxel_sizes

from m2diff_monai.checkpoint import RAW, LoadedModel, load_model
from m2diff_monai.data.orientation import ORIENTATION_AXIS
from m2diff_monai.engines.precision import runtime_record
from m2diff_monai.errors import InputError
from m2diff_monai.inference.consistency import consistency_sigma
from m2diff_monai.inference.defaults import check_stored_defaults
from m2diff_monai.inference.fusion import describe_fusion
from m2diff_monai.inference.inferer import DiffusionSamplerInferer
from m2diff_monai.inference.preprocess import PreparedSubject, TrainingPreprocessing
from m2diff_monai.inference.settings import InferenceSettings
from m2diff_monai.inference.volume import VolumePrediction, predict_volume
from m2diff_monai.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    return device


def output_paths(output: str | Path, settings: InferenceSettings) -> dict[str, Path]:
    """``PRED.nii.gz`` → the prediction, ``PRED_std.nii.gz`` (K > 1), ``PRED_<orientation>.nii.gz``, ``PRED.png``."""
    output = Path(output)
    name = output.name
    suffix = next((s for s in NIFTI_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        raise InputError("output must be a NIfTI file name ending in .nii.gz or .nii", path=output)
    stem = output.with_name(name[: -len(suffix)])
    paths = {"prediction": output}
    if settings.samples > 1:
        paths["std"] = Path(f"{stem}_std{suffix}")
    if settings.save_orientations:
        for o in settings.orientations:
            paths[o] = Path(f"{stem}_{o}{suffix}")
    if settings.png:
        paths["png"] = Path(f"{stem}.png")
    return paths


@dataclass
class SubjectResult:
    subject: str
    files: dict[str, str]
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    sampled_slices: dict[str, int] = field(default_factory=dict)


def check_model_inputs(model: LoadedModel, has_mri: bool, subject: str, path: str | Path | None) -> None:
    if model.requires_mri and not has_mri:
        raise InputError(
            f"this {model.network_config.get('name', 'model')} {model.network_config.get('variant', '')} checkpoint "
            "needs an MRI (it was built with allow_missing_mri=false); give --mri, or use an MRI-free model",
            subject=subject,
            path=path,
        )


def sampling_diffusion_config(model: LoadedModel, settings: InferenceSettings) -> dict[str, Any]:
    """The checkpoint's diffusion config, with ``settings.clip_denoised`` (when given) in place of its clip range;
    ``"auto"`` resolves from the checkpoint's training-data normalization."""
    from m2diff_monai.diffusion import resolve_clip

    config = dict(model.diffusion_config)
    if settings.clip_denoised is not None:
        config["clip_denoised"] = settings.clip_denoised
    return resolve_clip(config, model.data_config)


def build_inferer(model: LoadedModel, settings: InferenceSettings, device: torch.device) -> DiffusionSamplerInferer:
    try:
        return DiffusionSamplerInferer.from_settings(sampling_diffusion_config(model, settings), settings, device)
    except ValueError as err:
        raise InputError(f"sampler settings: {err}", path=model.path or None) from None


def predict_and_write(
    prepared: PreparedSubject,
    model: LoadedModel,
    settings: InferenceSettings,
    preprocessing: TrainingPreprocessing,
    paths: dict[str, Path],
    device: torch.device,
    inferer: DiffusionSamplerInferer,
    use_mri: bool,
) -> SubjectResult:
    """Sample, map back, write every file of one subject atomically (all or nothing)."""
    t0 = time.perf_counter()
    mri = prepared.mri if use_mri else None
    check_model_inputs(model, mri is not None, prepared.subject, prepared.source.path)
    try:
        prediction = predict_volume(
            model.network,
            inferer,
            prepared.ld,
            mri,
            brain_mask=prepared.mask,
            orientations=settings.orientations,
            fusion=settings.fusion,
            samples=settings.samples,
            batch_size=settings.batch_size,
            device=device,
            progress=settings.progress,
            spatial_size=preprocessing.spatial_size,
            slice_minmax=preprocessing.normalization == "slice",
            ld_consistency_sigma=consistency_sigma(settings.ld_consistency_fwhm, voxel_sizes(prepared.cube_affine)),
        )
    except ValueError as err:  # e.g. a cube size the network's downsampling cannot take
        raise InputError(
            f"the model cannot run on this input ({err})", subject=prepared.subject, path=prepared.source.path
        ) from None
    t1 = time.perf_counter()
    images = _output_images(prepared, prediction, paths)
    with ExitStack() as stack:  # every file lands together, or none does
        import nibabel as nib

        for key, image in images.items():
            tmp = stack.enter_context(atomic_path(paths[key]))
            nib.save(image, str(tmp))
        if "png" in paths:
            tmp = stack.enter_context(atomic_path(paths["png"]))
            save_views_png(tmp, prepared, prediction, use_mri=mri is not None, settings=settings)
    t2 = time.perf_counter()
    return SubjectResult(
        subject=prepared.subject,
        files={k: str(v) for k, v in paths.items()},
        seconds={"sampling": round(t1 - t0, 3), "writing": round(t2 - t1, 3)},
        warnings=list(prepared.warnings),
        sampled_slices=dict(prediction.sampled_slices),
    )


def _output_images(prepared: PreparedSubject, prediction: VolumePrediction, paths: dict[str, Path]) -> dict:
    """Normalized cubes → original units on the source grid (``original = normalized * scale + offset``; the
    std scales by ``scale`` only). Voxels outside the cube are normalized 0 (background), like unsampled ones.
    ``slice`` normalization: the prediction is already in cube units (each slice mapped back with its LD slice's
    range before fusion), so the same cube scaling completes the way back."""

    def original(cube: np.ndarray) -> np.ndarray:
        return prepared.denormalize(prepared.to_source(cube, fill=0.0))

    images = {"prediction": prepared.source.image(original(prediction.fused))}
    if "std" in paths and prediction.std is not None:
        std = prepared.to_source(prediction.std, fill=0.0) * np.float32(prepared.scaling.scale)
        images["std"] = prepared.source.image(np.maximum(std, 0.0))
    for o in ORIENTATION_AXIS:
        if o in paths and o in prediction.per_orientation:
            images[o] = prepared.source.image(original(prediction.per_orientation[o]))
    return images


def save_views_png(
    path: str | Path,
    prepared: PreparedSubject,
    prediction: VolumePrediction,
    use_mri: bool,
    settings: InferenceSettings,
) -> None:
    """Rows axial / coronal / sagittal through the brain's centre; columns LD PET | prediction (| std for K > 1),
    normalized units, one window for LD and prediction (0 to the LD's 99.5th brain percentile; titles give each
    volume's brain maximum). Neurological display (subject's right on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = prepared.mask
    centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)] if mask.any() else [s // 2 for s in mask.shape]
    columns = [("LD PET", prepared.ld, "hot"), ("prediction", prediction.fused, "hot")]
    if prediction.std is not None:
        columns.append(("std (uncertainty)", prediction.std, "viridis"))
    inside = prepared.ld[mask] if mask.any() else prepared.ld.ravel()
    vmax = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    # The window saturates hot spots (99.5th percentile of the LD): each title states the volume's maximum in the
    # brain, so a lesion kept (prediction max ≈ LD max) and one flattened (max ≈ 1) are told apart.
    columns = [
        (f"{title} (max {float((vol[mask] if mask.any() else vol).max()):.2f})", vol, cmap)
        for title, vol, cmap in columns
    ]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.8 * len(columns), 8.0), squeeze=False)
    for row, orientation in enumerate(("axial", "coronal", "sagittal")):
        axis = ORIENTATION_AXIS[orientation]
        for col, (title, volume, cmap) in enumerate(columns):
            ax = axes[row, col]
            plane = np.take(volume, centre[axis], axis=axis).T
            top = vmax if cmap == "hot" else max(float(plane.max()), 1e-6)
            ax.imshow(plane, cmap=cmap, vmin=0.0, vmax=top, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        axes[row, 0].set_ylabel(f"{orientation} {centre[axis]}")
    steps = "all" if settings.steps is None else settings.steps
    if settings.start_step is not None:
        steps = f"{steps} (from LD at t={settings.start_step})"
    fusion = describe_fusion(settings.fusion, prediction.fused.shape) if len(prediction.per_orientation) > 1 else ""
    fig.suptitle(
        f"{prepared.subject}: {settings.sampler} {steps} steps, {fusion or 'one orientation'}, "
        f"K={settings.samples}"
        f"{'' if use_mri else ', MRI-free'}",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        fig.savefig(str(path), format="png", dpi=80)
    finally:
        plt.close(fig)


def load_for_inference(checkpoint: str | Path | LoadedModel, device: torch.device, use_ema: bool) -> LoadedModel:
    """The model on ``device``: EMA weights when asked for and present, else raw; its stored sampler checked."""
    if isinstance(checkpoint, LoadedModel):
        model = checkpoint
        model.network.to(device).eval()
    else:
        model = load_model(checkpoint, device=device, weights=None if use_ema else RAW)
    model.inference_defaults = check_stored_defaults(model.inference_defaults, model.path or None)
    return model


def checkpoint_file(checkpoint: str | Path | LoadedModel) -> str | Path | None:
    return checkpoint.path if isinstance(checkpoint, LoadedModel) else checkpoint


def run_record(
    model: LoadedModel, cfg: InferenceSettings, prep: TrainingPreprocessing, device: torch.device
) -> dict[str, Any]:
    """What produced a prediction (weights, resolved settings and where each came from, clip range,
    preprocessing), shared by the single-subject and cohort summaries so both record the same."""
    return {
        "checkpoint": model.path,
        "weights": model.weights,
        "settings": {**cfg.as_dict(), "device": str(device), **runtime_record(cfg.amp, device)},
        "settings_sources": dict(getattr(cfg, "sources", {})),
        "clip_denoised": sampling_diffusion_config(model, cfg)["clip_denoised"],
        "preprocessing": prep.as_dict(),
    }


def subject_summary(
    result: SubjectResult,
    model: LoadedModel,
    cfg: InferenceSettings,
    prep: TrainingPreprocessing,
    device: torch.device,
    mri_used: bool,
    extra: dict,
) -> dict[str, Any]:
    return {
        "subject": result.subject,
        "files": result.files,
        "seconds": result.seconds,
        "sampled_slices": result.sampled_slices,
        "warnings": result.warnings,
        "mri_used": mri_used,
        **run_record(model, cfg, prep, device),
        **({"registration": extra["registration"]} if "registration" in extra else {}),
    }
