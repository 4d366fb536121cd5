"""What ``m2diff-infer`` and the bundles' ``inference.json`` call: one raw subject, or a manifest's cohort.

``infer_subject``: raw LD PET (+ T1) NIfTI → intake, registration, mask, normalization, crop exactly as for the
training data (:mod:`.preprocess`) → three-orientation sampling and fusion (:mod:`.volume`) → uncrop, undo the
normalization and the canonical reorientation → float32 NIfTI on the LD PET's own grid, in its original units.
``infer_manifest``: the same from a manifest's already-preprocessed cubes (``volumes`` items), one model load for
the whole cohort, written as ``OUT_DIR/<subject>.nii.gz`` plus ``OUT_DIR/predictions.json``.

From a prepared subject on (sampling, mapping back, the files, the run record) both use :mod:`.subject`: every
output file is written to a temporary name and renamed only when all of a subject's files are complete; the
cohort's checks and output plan, shards and ranks are :mod:`.cohort`'s. Settings (resolved here): explicit
options > the checkpoint's stored ``inference_defaults`` (what training evaluated) > the bundle's
``inference.json`` > :class:`InferenceSettings` (:mod:`m2diff_monai.inference.defaults`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import m2diff_monai
from m2diff_monai.bundle_run import report_outputs
from m2diff_monai.checkpoint import LoadedModel
from m2diff_monai.data.manifest import canonical_split, read_manifest, select_volumes
from m2diff_monai.errors import InputError, UserFacingWarning
from m2diff_monai.inference import cohort
from m2diff_monai.inference.defaults import INFERENCE_DEFAULT_KEYS, SAMPLING_DEFAULTS_KEY, layered_settings
from m2diff_monai.inference.preprocess import prepare_cohort_item, prepare_subject, resolve_preprocessing
from m2diff_monai.inference.settings import SETTING_KEYS, InferenceSettings
from m2diff_monai.inference.subject import (
    NIFTI_SUFFIXES,
    build_inferer,
    check_model_inputs,
    checkpoint_file,
    load_for_inference,
    output_paths,
    predict_and_write,
    resolve_device,
    run_record,
    sampling_diffusion_config,
    subject_summary,
)
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json
from m2diff_monai.shipped import resolve_bundle
from preprocessing.intake import IntakeOptions


def read_bundle_settings(bundle: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fallback, explicit)`` settings of ``BUNDLE/inference.json`` (literal values only; ``$``/``@``
    expressions are skipped). ``fallback``: its ``sampling_defaults`` block and literal top-level keys that are not
    sampler settings (below the checkpoint's stored defaults); ``explicit``: non-null top-level sampler settings
    (above them, as on the bundle command line). See :mod:`m2diff_monai.inference.defaults`."""
    if bundle is None:
        return {}, {}
    folder = resolve_bundle(bundle)  # a folder or file, or the name of a bundle the wheel ships
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


def warn_if_untrained_start(model: LoadedModel, settings: InferenceSettings) -> None:
    """Warn when sampling starts above the timesteps the network was trained on (training with
    ``train_max_timestep``): such steps see inputs the network never learned, e.g. pure noise."""
    warn_untrained_start(model.trained_max_timestep, settings.start_step, model.path or "the checkpoint")


def warn_untrained_start(trained_max_timestep: int | None, start_step: int | None, name: str) -> None:
    """The check behind :func:`warn_if_untrained_start`, also run by ``m2diff-export`` on the sampler it writes."""
    if trained_max_timestep is None:
        return
    trained = int(trained_max_timestep)
    if start_step is None or start_step > trained:
        where = "pure noise (t = T−1)" if start_step is None else f"t = {start_step}"
        warnings.warn(
            f"{name} was trained only on timesteps 0..{trained} (train_max_timestep), "
            f"but sampling starts from {where}; use --start-step {trained} or lower",
            UserFacingWarning,
            stacklevel=3,
        )


def _preprocessing_overrides(
    size=None, normalization=None, transform=None, space=None, spatial_size=None, spacing=None
) -> dict:
    return {
        "size": size,
        "normalization": normalization,
        "transform": transform,
        "space": space,
        "spatial_size": spatial_size,
        "spacing": spacing,
    }


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
    _check_distinct(
        output_paths(output, before_load),
        [("--ld-pet", ld_pet), ("--mri", mri), ("--checkpoint", checkpoint_file(checkpoint))],
    )
    device = resolve_device(before_load.device)
    start = time.perf_counter()
    model = load_for_inference(checkpoint, device, before_load.use_ema)
    cfg = resolve_settings(bundle, model.inference_defaults, bundle_fallback, **settings)
    warn_if_untrained_start(model, cfg)
    paths = output_paths(output, cfg)
    _check_distinct(paths, [("--ld-pet", ld_pet), ("--mri", mri), ("--checkpoint", checkpoint_file(checkpoint))])
    prep = resolve_preprocessing(
        model.data_config,
        _preprocessing_overrides(size, normalization, transform, space, spacing=spacing),
        model.image_size,
    )
    use_mri = mri is not None and not cfg.no_mri
    check_model_inputs(model, use_mri or (prep.space == "mri" and mri is not None), sid, ld_pet)
    try:
        intake = IntakeOptions(frame=frame, sum_frames=sum_frames, qform_policy=qform_policy)
    except ValueError as err:
        raise InputError(str(err), subject=sid, path=ld_pet) from None
    t_load = time.perf_counter()
    # space=mri needs the T1 to define the grid even for MRI-free sampling
    prepared = prepare_subject(ld_pet, mri if (use_mri or prep.space == "mri") else None, prep, sid, intake)
    try:
        t_prep = time.perf_counter()
        inferer = build_inferer(model, cfg, device)
        result = predict_and_write(prepared, model, cfg, prep, paths, device, inferer, use_mri)
    finally:
        prepared.cleanup()
    result.seconds = {
        "load_model": round(t_load - start, 3),
        "preprocess": round(t_prep - t_load, 3),
        **result.seconds,
        "total": round(time.perf_counter() - start, 3),
    }
    return subject_summary(result, model, cfg, prep, device, mri_used=use_mri, extra=prepared.info)


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
    canonical_split(split, allow_all=True, path=manifest)  # a bad split fails before the manifest is read
    content = read_manifest(manifest)
    items = select_volumes(content, split, subjects, manifest, purpose="infer")
    out_dir = Path(out_dir)
    share = cohort.resolve_shard(shard)
    selected = [str(it.get("subject")) for it in items]
    mine = {id(it) for it in share.select(items)}

    def my_share(config: InferenceSettings) -> tuple[tuple, tuple]:
        planned_all = cohort.plan_cohort_outputs(
            manifest, content, items, out_dir, config, checkpoint, share.summary_name
        )
        pairs = [(it, p) for it, p in zip(items, planned_all, strict=True) if id(it) in mine]
        return tuple(zip(*pairs, strict=True)) if pairs else ((), ())

    my_share(before_load)  # every output checked before any work
    device = resolve_device(cohort.shard_device(before_load.device, share))
    with safety.output_lock(out_dir, "m2diff-infer", "--out-dir", share.lock_name):
        start = time.perf_counter()
        model = load_for_inference(checkpoint, device, before_load.use_ema)
        cfg = resolve_settings(bundle, model.inference_defaults, bundle_fallback, **settings)
        warn_if_untrained_start(model, cfg)
        # the checkpoint's stored sampler may add outputs (e.g. _std): check the final names too
        my_items, planned = my_share(cfg)
        prep = resolve_preprocessing(model.data_config, {}, model.image_size)
        cohort.check_manifest_matches(content, prep, manifest)
        prep = cohort.with_manifest_normalization(content, prep)
        inferer = build_inferer(model, cfg, device)
        results = []
        for item, (_, paths) in zip(my_items, planned, strict=True):
            prepared = prepare_cohort_item(item, manifest.resolve().parent, prep)
            use_mri = prepared.mri is not None and not cfg.no_mri
            result = predict_and_write(prepared, model, cfg, prep, paths, device, inferer, use_mri)
            results.append(
                {
                    **asdict(result),
                    "mri_used": use_mri,
                    "split": item.get("split"),
                    "source_ld_pet": prepared.source.path,
                }
            )
        summary = {
            "tool": "m2diff-infer",
            "version": m2diff_monai.__version__,
            "manifest": str(manifest),
            "split": split,
            **run_record(model, cfg, prep, device),
            "subjects": results,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if not share.whole:
            summary.update(
                shard=f"{share.index}/{share.count}",
                selected=selected,
                checkpoint_fingerprint=cohort.checkpoint_fingerprint(model.path),
            )
        save_json(out_dir / share.summary_name, summary)
    if share.distributed:
        return cohort.barrier_then_merge(share, out_dir) or summary
    return summary


def _subject_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_distinct(
    paths: dict[str, Path], inputs: Sequence[tuple[str, str | Path | None]], option: str = "--out"
) -> None:
    """No output file may be an input (:mod:`m2diff_monai.io.safety`)."""
    safety.RunInputs(inputs).check_all(paths.values(), option)


def run_bundle_inference(
    checkpoint: str | Path,
    output: str | Path | None = None,
    ld_pet: str | Path | None = None,
    mri: str | Path | None = None,
    manifest: str | Path | None = None,
    out_dir: str | Path | None = None,
    split: str = "test",
    sampling_defaults: dict[str, Any] | None = None,
    shard: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Entry point of the bundles' ``inference`` key: one subject (``ld_pet`` + ``output``) or a manifest cohort
    (``manifest`` + ``out_dir``; ``shard="I/N"`` enhances one share of it, as ``m2diff-infer --shard``, merged by
    ``m2diff-infer merge``). Settings given as null in the bundle are not set: the checkpoint's stored
    ``inference_defaults``, then ``sampling_defaults`` (the bundle's block), then the defaults apply."""
    if not checkpoint:
        raise InputError("inference needs a checkpoint: add --checkpoint PATH")
    settings = {k: v for k, v in settings.items() if v is not None and v != ""}
    fallback = dict(sampling_defaults or {})
    mri = mri or None
    if manifest:
        if not out_dir:
            raise InputError("cohort inference needs out_dir: add --out_dir DIR", path=manifest)
        return report_outputs(
            infer_manifest(
                checkpoint, manifest, out_dir, split=split, bundle_fallback=fallback, shard=shard or None, **settings
            ),
            out_dir,
        )
    if shard:
        raise InputError("shard splits a cohort: give --manifest PATH --out_dir DIR with --shard I/N")
    if not ld_pet or not output:
        raise InputError(
            "bundle inference needs a scan and where to write: add --ld_pet PATH --output PATH "
            "(or --manifest PATH --out_dir DIR for a cohort)"
        )
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
