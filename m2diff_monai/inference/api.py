"""What ``m2diff-infer`` and the bundles' ``inference.json`` call: one raw subject, or a manifest's cohort.

``infer_subject``: raw LD PET (+ T1) NIfTI → intake, registration, mask, normalization, crop exactly as for the
training data (:mod:`.preprocess`) → three-orientation sampling and fusion (:mod:`.volume`) → uncrop, undo the
normalization and the canonical reorientation → float32 NIfTI on the LD PET's own grid, in its original units.
``infer_manifest``: the same from a manifest's already-preprocessed cubes (``volumes`` items), one model load for
the whole cohort, written as ``OUT_DIR/<subject>.nii.gz`` plus ``OUT_DIR/predictions.json``.

Every output file is written to a temporary name and renamed only when all of a subject's files are complete.
Settings: explicit options > the checkpoint's stored ``inference_defaults`` (what training evaluated) > the
bundle's ``inference.json`` > :class:`InferenceSettings` (:mod:`m2diff_monai.inference.defaults`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.affines import voxel_sizes

import m2diff_monai
from m2diff_monai.data.orientation import ORIENTATION_AXIS, parse_orientations
from m2diff_monai.engines.precision import runtime_record
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from m2diff_monai.inference import cohort
from m2diff_monai.inference.checkpoint import LoadedModel, load_model
from m2diff_monai.inference.consistency import consistency_sigma
from m2diff_monai.inference.defaults import INFERENCE_DEFAULT_KEYS, SAMPLING_DEFAULTS_KEY, layered_settings
from m2diff_monai.inference.fusion import FUSION_METHODS, describe_fusion
from m2diff_monai.inference.inferer import AMP_CHOICES, DiffusionSamplerInferer, resolve_amp
from m2diff_monai.inference.preprocess import (
    PreparedSubject,
    TrainingPreprocessing,
    prepare_cohort_item,
    prepare_subject,
    resolve_preprocessing,
)
from m2diff_monai.inference.volume import VolumePrediction, predict_volume
from m2diff_monai.io.atomic import atomic_path, save_json
from m2diff_monai.bundle_run import report_outputs
from preprocessing.intake import IntakeOptions
from preprocessing.normalization import recorded_method

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SPLIT_ALIASES = {"test": "test", "val": "val", "validation": "val", "train": "train", "training": "train", "all": None}


BOOL_SETTINGS = ("shared_noise", "save_orientations", "no_mri", "png", "use_ema", "progress")


def parse_clip_option(value: Any) -> str | bool | list[float] | None:
    """``--clip-denoised``: None (not set) → None; "auto" → "auto"; "none"/"false"/false → False (no clamp);
    "true"/true → [-1, 1]; "LO,HI" or a pair → [lo, hi]."""
    from m2diff_monai.diffusion import normalize_clip_range

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("none", "null", "false", "off", "no"):
            return False
        if text in ("true", "on", "yes"):
            return [-1.0, 1.0]
        value = [v for v in text.strip("[]()").split(",") if v.strip()]
    if value is False:
        return False
    try:
        lo, hi = normalize_clip_range(value)
    except (TypeError, ValueError):
        raise ValueError(f"clip_denoised must be auto, none or LO,HI; got {value!r}") from None
    return [lo, hi]


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class InferenceSettings:
    """Sampling and output options (CLI flags and bundle keys share these names)."""

    # Default: DDIM, 50 steps, η = 0 (deterministic) — see docs/inference.md for the benchmark behind it.
    sampler: str = "ddim"
    steps: int | None = 50  # None: all T steps (the papers' 1000-step ancestral sampler with sampler="ancestral")
    eta: float = 0.0
    # None: start from pure noise (both papers). t0: start from the LD PET noised to t0 (truncated start).
    start_step: int | None = None
    orientations: tuple[str, ...] = ("axial", "coronal", "sagittal")
    # Not the papers' "wavelet-stripe": the same stripe filter on what only each orientation holds, so that hot
    # spots all orientations agree on are not damped (inference/fusion.py; docs/inference.md, audit).
    fusion: str = "wavelet-stripe-residual"
    samples: int = 1
    shared_noise: bool = False
    # None: off (both papers). FWHM (mm) of the Gaussian below which the fused volume takes the LD PET's band
    # (inference/consistency.py; the demo recipes turn it on).
    ld_consistency_fwhm: float | None = None
    seed: int | None = 0
    batch_size: int = 16
    device: str = "auto"
    amp: str = "auto"
    save_orientations: bool = False
    no_mri: bool = False
    png: bool = True
    use_ema: bool = True
    progress: bool = True
    # None: the checkpoint's clip range. "auto" | "none" | "LO,HI" | [lo, hi]: override it (e.g. "auto" for a
    # checkpoint trained before "auto" existed, whose stored (−1, 1) cuts hot lesions of shared-normalized data).
    clip_denoised: Any = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "clip_denoised", parse_clip_option(self.clip_denoised))
        if self.sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be ancestral or ddim, got {self.sampler!r}")
        steps = self.steps
        if isinstance(steps, str):
            text = steps.strip().lower()
            if text not in ("", "all", "none", "full") and not text.isdigit():
                raise ValueError(f"steps must be a whole number >= 1 or 'all', got {steps!r}")
            steps = None if text in ("", "all", "none", "full") else int(text)
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be >= 1 or 'all', got {steps}")
        set_(self, "steps", None if steps is None else int(steps))
        start_step = self.start_step
        if isinstance(start_step, str):
            start_step = None if start_step.strip().lower() in ("", "none", "null", "noise") else int(start_step)
        if start_step is not None and int(start_step) < 1:
            raise ValueError(f"start step must be >= 1 (or none: start from noise), got {start_step}")
        set_(self, "start_step", None if start_step is None else int(start_step))
        set_(self, "orientations", parse_orientations(self.orientations))
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"fusion must be one of {', '.join(FUSION_METHODS)}, got {self.fusion!r}")
        if int(self.samples) < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        set_(self, "samples", int(self.samples))
        fwhm = self.ld_consistency_fwhm
        if isinstance(fwhm, str):
            fwhm = None if fwhm.strip().lower() in ("", "none", "null", "off") else float(fwhm)
        if fwhm is not None and not float(fwhm) > 0:
            raise ValueError(f"ld_consistency_fwhm must be a FWHM > 0 mm (or none: off), got {fwhm}")
        set_(self, "ld_consistency_fwhm", None if fwhm is None else float(fwhm))
        if int(self.batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        set_(self, "batch_size", int(self.batch_size))
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if str(self.amp).lower() not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        set_(self, "eta", float(self.eta))
        for name in BOOL_SETTINGS:  # `--progress false` on the MONAI bundle CLI arrives as the string "false"
            set_(self, name, _as_bool(getattr(self, name), name))
        set_(self, "seed", None if self.seed is None else int(self.seed))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["orientations"] = list(self.orientations)
        return out


SETTING_KEYS = tuple(InferenceSettings.__dataclass_fields__)


def read_bundle_settings(bundle: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fallback, explicit)`` settings of ``BUNDLE/inference.json`` (literal values only; ``$``/``@``
    expressions are skipped). ``fallback``: its ``sampling_defaults`` block and literal top-level keys that are not
    sampler settings (below the checkpoint's stored defaults); ``explicit``: non-null top-level sampler settings
    (above them, as on the bundle command line). See :mod:`m2diff_monai.inference.defaults`."""
    if bundle is None:
        return {}, {}
    folder = Path(bundle)
    path = folder / "inference.json" if folder.is_dir() else folder
    if not path.is_file():
        raise InputError("bundle has no inference.json", path=path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"inference.json is not valid JSON ({err})", path=path) from None
    return split_bundle_settings(config)


def split_bundle_settings(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`read_bundle_settings` of an already parsed ``inference.json``."""
    block = config.get(SAMPLING_DEFAULTS_KEY)
    fallback = {k: v for k, v in (block if isinstance(block, dict) else {}).items() if k in SETTING_KEYS}
    explicit = {}
    for key in SETTING_KEYS:
        value = config.get(key)
        if value is None or (isinstance(value, str) and value.startswith(("$", "@", "%"))):
            continue
        (explicit if key in INFERENCE_DEFAULT_KEYS else fallback)[key] = value
    return fallback, explicit


def bundle_defaults(bundle: str | Path | None) -> dict[str, Any]:
    """What ``BUNDLE/inference.json`` alone sets (both layers of :func:`read_bundle_settings`)."""
    fallback, explicit = read_bundle_settings(bundle)
    return {**fallback, **explicit}


def resolve_settings(
    bundle: str | Path | None = None,
    checkpoint_defaults: dict[str, Any] | None = None,
    bundle_fallback: dict[str, Any] | None = None,
    **overrides: Any,
) -> InferenceSettings:
    """:class:`InferenceSettings` from, highest first: ``overrides`` (None = not given; ``steps="all"``,
    ``start_step="none"`` spell the full chain and pure noise) and the bundle's explicit keys, the checkpoint's
    ``inference_defaults``, the bundle's ``sampling_defaults`` (``bundle_fallback`` when the bundle run passes
    them), the dataclass defaults. ``.sources`` of the result names where each given setting came from."""
    unknown = set(overrides) - set(SETTING_KEYS)
    if unknown:
        raise ValueError(f"unknown inference settings {sorted(unknown)}; allowed: {list(SETTING_KEYS)}")
    fallback, explicit = read_bundle_settings(bundle)
    fallback = {**fallback, **{k: v for k, v in (bundle_fallback or {}).items() if k in SETTING_KEYS}}
    stored = {k: v for k, v in (checkpoint_defaults or {}).items() if k in INFERENCE_DEFAULT_KEYS}
    values, sources = layered_settings(fallback, stored, {**explicit, **overrides})
    try:
        settings = InferenceSettings(**values)
    except (TypeError, ValueError) as err:
        raise InputError(f"inference settings: {err}") from None
    object.__setattr__(settings, "sources", sources)
    return settings


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


def _check_model_inputs(model: LoadedModel, has_mri: bool, subject: str, path: str | Path | None) -> None:
    if model.requires_mri and not has_mri:
        raise InputError(
            f"this {model.network_config.get('name', 'model')} {model.network_config.get('variant', '')} checkpoint "
            "needs an MRI (it was built with allow_missing_mri=false); give --mri, or use an MRI-free model",
            subject=subject, path=path,
        )


def sampling_diffusion_config(model: LoadedModel, settings: InferenceSettings) -> dict[str, Any]:
    """The checkpoint's diffusion config, with ``settings.clip_denoised`` (when given) in place of its clip range;
    ``"auto"`` resolves from the checkpoint's training-data normalization."""
    from m2diff_monai.diffusion import resolve_clip

    config = dict(model.diffusion_config)
    if settings.clip_denoised is not None:
        config["clip_denoised"] = settings.clip_denoised
    return resolve_clip(config, model.data_config)


def _build_inferer(model: LoadedModel, settings: InferenceSettings, device: torch.device) -> DiffusionSamplerInferer:
    try:
        return DiffusionSamplerInferer(
            sampling_diffusion_config(model, settings),
            sampler=settings.sampler,
            steps=settings.steps,
            eta=settings.eta,
            start_step=settings.start_step,
            shared_noise=settings.shared_noise,
            amp_dtype=resolve_amp(settings.amp, device),
            seed=settings.seed,
        )
    except ValueError as err:
        raise InputError(f"sampler settings: {err}", path=model.path or None) from None


def _run(
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
    _check_model_inputs(model, mri is not None, prepared.subject, prepared.source.path)
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
        raise InputError(f"the model cannot run on this input ({err})", subject=prepared.subject,
                         path=prepared.source.path) from None
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


def save_views_png(path: str | Path, prepared: PreparedSubject, prediction: VolumePrediction, use_mri: bool,
                   settings: InferenceSettings) -> None:
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
    columns = [(f"{title} (max {float((vol[mask] if mask.any() else vol).max()):.2f})", vol, cmap)
               for title, vol, cmap in columns]
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
    fig.suptitle(f"{prepared.subject}: {settings.sampler} {steps} steps, {fusion or 'one orientation'}, "
                 f"K={settings.samples}"
                 f"{'' if use_mri else ', MRI-free'}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(str(path), format="png", dpi=80)
    finally:
        plt.close(fig)


def _preprocessing_overrides(size=None, normalization=None, transform=None, space=None, spatial_size=None,
                             spacing=None) -> dict:
    return {"size": size, "normalization": normalization, "transform": transform, "space": space,
            "spatial_size": spatial_size, "spacing": spacing}


def _load(checkpoint: str | Path | LoadedModel, device: torch.device, use_ema: bool) -> LoadedModel:
    if isinstance(checkpoint, LoadedModel):
        checkpoint.network.to(device).eval()
        return checkpoint
    return load_model(checkpoint, device=device, use_ema=use_ema)


def infer_subject(
    checkpoint: str | Path | LoadedModel,
    ld_pet: str | Path,
    output: str | Path,
    mri: str | Path | None = None,
    *,
    bundle: str | Path | None = None,
    bundle_fallback: dict[str, Any] | None = None,
    subject: str | None = None,
    size: int | None = None,
    normalization: str | None = None,
    transform: str | None = None,
    space: str | None = None,
    spacing: str | Sequence[float] | None = None,
    frame: int | None = None,
    sum_frames: bool = False,
    qform_policy: str = "warn",
    **settings: Any,
) -> dict[str, Any]:
    """Enhance one raw LD PET (optionally with its T1) and write the prediction on the LD PET's own grid.

    ``settings``: any :class:`InferenceSettings` field (``steps``, ``sampler``, ``samples``, ...); missing ones
    come from the checkpoint's stored ``inference_defaults``, then the bundle's ``inference.json``, then the
    defaults (:mod:`.defaults`). The preprocessing parameters come from the checkpoint's data config unless given
    (``size``, ``normalization``, ``transform``, ``space``, ``spacing``: the scan is resampled to the model's
    voxel size and the prediction back to the scan's own grid).
    Returns a summary (files, seconds, settings, preprocessing and where each parameter came from).
    Raises :class:`InputError` (one line naming the subject and file) on bad input; nothing is written then.
    """
    if not ld_pet:
        raise InputError("no low-dose PET given (--ld-pet)")
    before_load = resolve_settings(bundle, None, bundle_fallback, **settings)  # device and weights to load with
    sid = subject or _subject_name(ld_pet)
    _check_distinct(output_paths(output, before_load),
                    [("--ld-pet", ld_pet), ("--mri", mri), ("--checkpoint", _checkpoint_file(checkpoint))])
    device = resolve_device(before_load.device)
    start = time.perf_counter()
    model = _load(checkpoint, device, before_load.use_ema)
    cfg = resolve_settings(bundle, model.inference_defaults, bundle_fallback, **settings)
    paths = output_paths(output, cfg)
    _check_distinct(paths, [("--ld-pet", ld_pet), ("--mri", mri), ("--checkpoint", _checkpoint_file(checkpoint))])
    prep = resolve_preprocessing(model.data_config,
                                 _preprocessing_overrides(size, normalization, transform, space, spacing=spacing),
                                 model.image_size)
    use_mri = mri is not None and not cfg.no_mri
    _check_model_inputs(model, use_mri or (prep.space == "mri" and mri is not None), sid, ld_pet)
    try:
        intake = IntakeOptions(frame=frame, sum_frames=sum_frames, qform_policy=qform_policy)
    except ValueError as err:
        raise InputError(str(err), subject=sid, path=ld_pet) from None
    t_load = time.perf_counter()
    # space=mri needs the T1 to define the grid even for MRI-free sampling
    prepared = prepare_subject(ld_pet, mri if (use_mri or prep.space == "mri") else None, prep, sid, intake)
    try:
        t_prep = time.perf_counter()
        result = _run(prepared, model, cfg, prep, paths, device, _build_inferer(model, cfg, device), use_mri)
    finally:
        prepared.cleanup()
    result.seconds = {"load_model": round(t_load - start, 3), "preprocess": round(t_prep - t_load, 3),
                      **result.seconds, "total": round(time.perf_counter() - start, 3)}
    return _summary(result, model, cfg, prep, device, mri_used=use_mri, extra=prepared.info)


def infer_manifest(
    checkpoint: str | Path | LoadedModel,
    manifest: str | Path,
    out_dir: str | Path,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    *,
    bundle: str | Path | None = None,
    bundle_fallback: dict[str, Any] | None = None,
    shard: str | tuple[int, int] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Enhance every ``volumes`` item of ``split`` (``test``/``val``/``train``/``all``) of a manifest.

    ``shard="I/N"`` (job arrays) or torchrun ranks enhance a share and write ``predictions.shard-I-of-N.json``
    (:mod:`.cohort`); under torchrun rank 0 then merges them into ``predictions.json``.

    The items' preprocessed cubes are used as they are (items whose cubes are at another voxel size than the
    model's are prepared from their source files instead); each prediction goes back onto its ``source_ld_pet``'s
    grid as ``OUT_DIR/<subject>.nii.gz`` (+ ``_std``, ``_<orientation>``, ``.png``). ``OUT_DIR/predictions.json``
    lists them with the settings. Stops at the first bad subject (its files are not written; earlier subjects
    stay complete).
    """
    before_load = resolve_settings(bundle, None, bundle_fallback, **settings)  # device and weights to load with
    manifest = Path(manifest)
    if split not in SPLIT_ALIASES:
        raise InputError(f"unknown split {split!r}; choose from test, val, train, all", path=manifest)
    content = _read_manifest(manifest)
    wanted = SPLIT_ALIASES[split]
    items = [it for it in content.get("volumes", []) if wanted is None or it.get("split") == wanted]
    if subjects:
        missing = sorted(set(subjects) - {it.get("subject") for it in items})
        if missing:
            raise InputError(f"subject(s) {', '.join(missing)} not in the manifest's {split} volumes", path=manifest)
        items = [it for it in items if it.get("subject") in set(subjects)]
    if not items:
        raise InputError(f"manifest has no '{split}' volumes to infer", path=manifest)
    out_dir = Path(out_dir)
    share = cohort.resolve_shard(shard)
    selected = [str(it.get("subject")) for it in items]
    mine = {id(it) for it in share.select(items)}

    def my_share(config: InferenceSettings) -> tuple[tuple, tuple]:
        planned_all = _plan_cohort_outputs(manifest, content, items, out_dir, config, checkpoint, share.summary_name)
        pairs = [(it, p) for it, p in zip(items, planned_all) if id(it) in mine]
        return tuple(zip(*pairs)) if pairs else ((), ())

    my_share(before_load)  # every output checked before any work
    device = resolve_device(cohort.shard_device(before_load.device, share))
    with safety.output_lock(out_dir, "m2diff-infer", "--out-dir", share.lock_name):
        start = time.perf_counter()
        model = _load(checkpoint, device, before_load.use_ema)
        cfg = resolve_settings(bundle, model.inference_defaults, bundle_fallback, **settings)
        # the checkpoint's stored sampler may add outputs (e.g. _std): check the final names too
        my_items, planned = my_share(cfg)
        prep = resolve_preprocessing(model.data_config, {}, model.image_size)
        _check_manifest_matches(content, prep, manifest)
        prep = _with_manifest_normalization(content, prep)
        inferer = _build_inferer(model, cfg, device)
        results = []
        for item, (sid, paths) in zip(my_items, planned):
            prepared = prepare_cohort_item(item, manifest.resolve().parent, prep)
            use_mri = prepared.mri is not None and not cfg.no_mri
            result = _run(prepared, model, cfg, prep, paths, device, inferer, use_mri)
            results.append({**asdict(result), "mri_used": use_mri, "split": item.get("split"),
                            "source_ld_pet": prepared.source.path})
        summary = {
            "tool": "m2diff-infer",
            "version": m2diff_monai.__version__,
            "manifest": str(manifest),
            "split": split,
            **_run_record(model, cfg, prep, device),
            "subjects": results,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if not share.whole:
            summary.update(shard=f"{share.index}/{share.count}", selected=selected,
                           checkpoint_fingerprint=cohort.checkpoint_fingerprint(model.path))
        save_json(out_dir / share.summary_name, summary)
    if share.distributed:
        return cohort.barrier_then_merge(share, out_dir) or summary
    return summary


def _check_manifest_matches(content: dict, prep: TrainingPreprocessing, manifest: Path) -> None:
    """The cubes must have been made like the training data; only parameters the checkpoint states are checked."""
    params = dict((content.get("provenance") or {}).get("parameters") or {})
    params.setdefault("size", content.get("size"))
    recorded = params.get("spacing")
    if prep.spacing is not None and recorded is not None and not np.allclose(recorded, prep.spacing):
        return  # cubes at another voxel size: prepare_cohort_item prepares the subjects from their source files
    for key in ("size", "normalization", "space"):
        known = prep.sources.get(key) in ("checkpoint", "option")
        recorded = params.get(key)
        if key == "normalization" and recorded is not None:
            try:
                recorded = recorded_method(recorded)  # legacy "paper" = "volume"
            except ValueError as err:
                raise InputError(f"manifest provenance: {err}", path=manifest) from None
        if known and recorded is not None and str(recorded) != str(getattr(prep, key)):
            raise InputError(f"manifest was preprocessed with {key}={recorded} but the model was trained with "
                             f"{key}={getattr(prep, key)}; preprocess the cohort again with the training settings",
                             path=manifest)


def _with_manifest_normalization(content: dict, prep: TrainingPreprocessing) -> TrainingPreprocessing:
    """A model whose normalization is known from nowhere (the default) takes the cohort manifest's: with ``slice``
    the per-slice min–max happens at sampling time, so it must be known (the cubes themselves carry their scale)."""
    recorded = ((content.get("provenance") or {}).get("parameters") or {}).get("normalization")
    if recorded is None or prep.sources.get("normalization") != "default":
        return prep
    from dataclasses import replace

    return replace(prep, normalization=recorded_method(recorded),
                   sources={**prep.sources, "normalization": "cohort manifest"})


def _read_manifest(path: Path) -> dict:
    from m2diff_monai.data.datasets import read_manifest

    return read_manifest(path, require="volumes")


def _subject_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _checkpoint_file(checkpoint: str | Path | LoadedModel) -> str | Path | None:
    return checkpoint.path if isinstance(checkpoint, LoadedModel) else checkpoint


def _check_distinct(paths: dict[str, Path], inputs: Sequence[tuple[str, str | Path | None]],
                    option: str = "--out") -> None:
    """No output file may be an input (:mod:`m2diff_monai.io.safety`)."""
    safety.RunInputs(inputs).check_all(paths.values(), option)


def _plan_cohort_outputs(manifest: Path, content: dict, items: list[dict], out_dir: Path, cfg: InferenceSettings,
                         checkpoint: str | Path | LoadedModel,
                         summary_name: str = "predictions.json") -> list[tuple[str, dict[str, Path]]]:
    """``(subject, output paths)`` per item, checked before any work: subject ids are safe file names, every file
    stays in ``out_dir`` and none is the checkpoint, the manifest or a file the manifest lists."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--out-dir exists and is not a folder", path=out_dir)
    inputs = safety.RunInputs([("--checkpoint", _checkpoint_file(checkpoint))])
    inputs.add_manifest(manifest, content)
    planned = []
    seen: dict[str, str] = {}
    for item in items:
        sid = safety.check_name(item.get("subject"), "manifest subject id", manifest)
        if sid.casefold() in seen:  # two items would write one prediction (case-insensitive file systems too)
            raise InputError(f"manifest subject id {sid!r} repeats {seen[sid.casefold()]!r}: both predictions "
                             "would be one file", path=manifest)
        seen[sid.casefold()] = sid
        paths = output_paths(safety.child(out_dir, f"{sid}.nii.gz", "--out-dir", "subject id"), cfg)
        inputs.check_all(paths.values(), "--out-dir", root=out_dir)
        planned.append((sid, paths))
    inputs.check(out_dir / "predictions.json", "--out-dir")
    if summary_name != "predictions.json":
        inputs.check(out_dir / summary_name, "--out-dir")
    return planned


def _run_record(model: LoadedModel, cfg: InferenceSettings, prep: TrainingPreprocessing,
                device: torch.device) -> dict[str, Any]:
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


def _summary(result: SubjectResult, model: LoadedModel, cfg: InferenceSettings, prep: TrainingPreprocessing,
             device: torch.device, mri_used: bool, extra: dict) -> dict[str, Any]:
    return {
        "subject": result.subject,
        "files": result.files,
        "seconds": result.seconds,
        "sampled_slices": result.sampled_slices,
        "warnings": result.warnings,
        "mri_used": mri_used,
        **_run_record(model, cfg, prep, device),
        **({"registration": extra["registration"]} if "registration" in extra else {}),
    }


def run_bundle_inference(
    checkpoint: str | Path,
    output: str | Path | None = None,
    ld_pet: str | Path | None = None,
    mri: str | Path | None = None,
    manifest: str | Path | None = None,
    out_dir: str | Path | None = None,
    split: str = "test",
    sampling_defaults: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Entry point of the bundles' ``inference`` key: one subject (``ld_pet`` + ``output``) or a manifest cohort
    (``manifest`` + ``out_dir``). Settings given as null in the bundle are not set: the checkpoint's stored
    ``inference_defaults``, then ``sampling_defaults`` (the bundle's block), then the defaults apply."""
    if not checkpoint:
        raise InputError("inference needs a checkpoint: add --checkpoint PATH")
    settings = {k: v for k, v in settings.items() if v is not None and v != ""}
    fallback = dict(sampling_defaults or {})
    mri = mri or None
    if manifest:
        if not out_dir:
            raise InputError("cohort inference needs out_dir: add --out_dir DIR", path=manifest)
        return report_outputs(infer_manifest(checkpoint, manifest, out_dir, split=split, bundle_fallback=fallback,
                                             **settings), out_dir)
    if not ld_pet or not output:
        raise InputError("bundle inference needs a scan and where to write: add --ld_pet PATH --output PATH "
                         "(or --manifest PATH --out_dir DIR for a cohort)")
    return report_outputs(infer_subject(checkpoint, ld_pet, output, mri, bundle_fallback=fallback, **settings))


__all__ = [
    "InferenceSettings",
    "bundle_defaults",
    "infer_manifest",
    "infer_subject",
    "output_paths",
    "read_bundle_settings",
    "resolve_settings",
    "sampling_diffusion_config",
    "split_bundle_settings",
    "run_bundle_inference",
]
