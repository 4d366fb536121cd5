"""What ``m2diff-evaluate`` and the bundles' ``evaluate.json`` call: score predictions of a manifest's cohort
against the standard-dose reference and write the report folder.

The steps have their own modules: :mod:`.inputs` (options, prediction files, the plan), :mod:`.volumes` (one
subject on the evaluation grid), :mod:`.scoring` (its metric rows), :mod:`.subject_figure`, :mod:`.tables`
(CSV) and :mod:`.report` (Markdown). The report folder is built in a temporary sibling folder and moved into
place at the end, so a failed run never leaves a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import m2diff_monai
from m2diff_monai.data.manifest import read_manifest, select_volumes
from m2diff_monai.data.orientation import ORIENTATIONS
from m2diff_monai.errors import InputError
from m2diff_monai.evaluation import paper_protocol
from m2diff_monai.evaluation.inputs import (
    LD_METHOD,
    TOOL,
    EvaluationOptions,
    Plan,
    has_reference,
    item_path,
    parse_method_map,
    plan_subjects,
)
from m2diff_monai.evaluation.report import report_markdown, summary_markdown, ttests_markdown
from m2diff_monai.evaluation.scoring import score_subject
from m2diff_monai.evaluation.subject_figure import write_figure
from m2diff_monai.evaluation.tables import (
    PAPER_METRICS,
    order_columns,
    region_names,
    summary_frame,
    summary_metrics,
    ttest_frame,
    ttest_metrics,
    write_csv,
)
from m2diff_monai.evaluation.volumes import load_subject
from m2diff_monai.inference.consistency_floor import floor_volumes, reject_floor_names
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json, save_text, staged_folder
from m2diff_monai.runtime import configure_threads


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
            raise InputError(
                "folder exists and is not an m2diff-evaluate report (no run.json from this tool); "
                "choose an empty or new --out",
                path=out_dir,
            )


def _run_inputs(
    manifest: Path,
    content: dict,
    pred_dirs: Mapping[str, Path],
    checkpoints: Mapping[str, Path],
    timings: Mapping[str, Path],
    cka_checkpoint: str | Path | None,
    lpips_weights: str | Path | None,
) -> safety.RunInputs:
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
    subsets: Mapping[str, Any] | Sequence[str] | None = None,
    targets: str | Mapping[str, Any] | None = "default",
    floor_fwhm: float | None = None,
) -> dict[str, Any]:
    """Score every ``split`` subject of ``manifest`` (LD first, then each method of ``predictions``) against its SD
    reference and write the report folder ``out_dir`` (see docs/evaluation.md). Returns the ``run.json`` dict.

    ``lpips``: True (AlexNet weights from ``lpips_weights`` / ``$M2DIFF_LPIPS_ALEXNET_WEIGHTS``; unavailable →
    NaN column and a one-line reason), False (skip), or a ready :class:`~.lpips_metric.LPIPSMetric`.
    ``checkpoints`` / ``timings``: ``{method: file}`` for the complexity table; ``cka_checkpoint``: an M2Diff
    checkpoint whose PET/MRI branches are compared with linear CKA (``cka_options`` go to
    :func:`.representation.cka_analysis`). ``baselines``: ``"gaussian,nlm,bm3d"`` or a list — classical filters
    of the LD scored as rows after LD, tuned on the validation split (:mod:`.baselines`; ``baseline_settings``: a
    :class:`.baselines.BaselineSettings` or a dict of its fields, e.g. the FWHM grid). ``subsets``:
    ``["held-out=heldout-*", ...]`` or ``{name: patterns}`` — groups of subjects also summarised on their own
    (:mod:`.subsets`). ``targets``: the acceptance targets judged per method on all subjects and each subset
    (:mod:`.targets`; ``"off"`` drops them). ``floor_fwhm``: also score the reference row ``floor-<mm>``
    (:mod:`m2diff_monai.inference.consistency_floor`). Raises :class:`InputError`
    (one line) on bad input; nothing is written then. Under ``keep_going`` failing subjects are listed in
    ``run.json['failed']`` instead.
    """
    started = time.perf_counter()
    options = EvaluationOptions(
        split=split,
        space=space,
        subjects=tuple(subjects) if subjects else None,
        per_slice=bool(per_slice),
        lpips=lpips is not False,
        lpips_weights=None if lpips_weights in (None, "") else str(lpips_weights),
        figures=bool(figures),
        orientations=orientations,
        min_slice_voxels=int(min_slice_voxels),
        keep_going=bool(keep_going),
        progress=bool(progress),
        workers=int(workers),
        paper_scaling=paper_scaling,
        paper_pad=int(paper_pad),
        paper_min_size=paper_min_size,
        baselines=baselines or (),
        floor_fwhm=floor_fwhm,
        subsets=subsets or (),
        targets=targets,
    )
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
    reject_floor_names(list(pred_dirs), options.floor_fwhm)
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
    from m2diff_monai.evaluation.subsets import check_subsets

    check_subsets(options.subsets, [str(item["subject"]) for item in items])
    if not plan.items:
        reasons = {**plan.skipped, **plan.failed}
        first = next(iter(reasons.items()), ("", "no subject"))
        raise InputError(
            f"no subject of the '{options.split}' split can be evaluated (e.g. {first[0]}: {first[1]})", path=manifest
        )

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
        summary = _run(
            plan,
            base,
            pred_dirs,
            options,
            lpips_metric,
            lpips_status,
            staging,
            manifest,
            complexity_inputs,
            cka_model,
            cka_checkpoint,
            cka_options,
            content,
            started,
            baseline_settings,
        )
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
    status = {
        "available": bool(metric.available),
        "reason": str(getattr(metric, "reason", "")),
        "weights": None if getattr(metric, "weights_path", None) is None else str(metric.weights_path),
        "orientation": options.lpips_orientation,
    }
    return (metric if metric.available else None), status


def _progress(iterable, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=TOOL,
        unit="subject",
        disable=None if enabled else True,
        file=sys.stderr,
        leave=False,
    )


def _run(
    plan: Plan,
    base: Path,
    pred_dirs,
    options: EvaluationOptions,
    lpips_metric,
    lpips_status,
    staging: Path,
    manifest: Path,
    complexity_inputs,
    cka_model,
    cka_checkpoint,
    cka_options,
    content: dict,
    started: float,
    baseline_settings: Any | None = None,
) -> dict[str, Any]:
    import pandas as pd

    from m2diff_monai.evaluation import baselines as baselines_mod
    from m2diff_monai.evaluation import complexity as complexity_mod
    from m2diff_monai.evaluation.quantitation import units_of

    chosen = baselines_mod.tune_on_validation(
        content["volumes"],
        options.baselines,
        lambda it: load_subject(it, base, {}, options.space),
        lambda it: has_reference(it, base),
        [str(it.get("subject")) for it in plan.items],
        baselines_mod.as_settings(baseline_settings),
    )
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
            filtered, chosen.seconds[sid] = baselines_mod.apply_baselines(
                data.volumes[LD_METHOD], data.mask, data.spacing, chosen, sid
            )
            data.volumes = baselines_mod.with_baselines(data.volumes, filtered, LD_METHOD)
            pictured = data.volumes  # the floor is scored, not pictured
            floor = floor_volumes(data.reference, pictured[LD_METHOD], data.spacing, options.floor_fwhm)
            data.volumes = {**pictured, **floor}
            units[sid] = units_of(item, item_path(base, item.get("source_ld_pet")))
            t1, c1 = time.perf_counter(), time.process_time()
            try:
                subject_rows, subject_slices = score_subject(data, options, lpips_metric, options.workers)
            except ValueError as err:  # e.g. a brain mask too thin for the SSIM window: this subject's data
                raise InputError(f"cannot score this subject ({err})", subject=sid) from None
            t2, c2 = time.perf_counter(), time.process_time()
            if options.figures:
                figure = write_figure(replace(data, volumes=pictured), staging / "figures" / f"{sid}.png", units[sid])
                figures[sid] = figure.relative_to(staging).as_posix()
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
        seconds[sid] = {
            "load": round(tb - t0, 3),
            "baselines": round(t1 - tb, 3),
            "metrics": round(t2 - t1, 3),
            "figure": round(t3 - t2, 3),
            "cpu_load": round(cb - c0, 3),
            "cpu_baselines": round(c1 - cb, 3),
            "cpu_metrics": round(c2 - c1, 3),
            "cpu_figure": round(c3 - c2, 3),
        }
        del data
    if not rows:
        first = next(iter(plan.failed.items()))
        raise InputError(f"no subject could be evaluated (e.g. {first[0]}: {first[1]})", path=manifest)

    per_subject = order_columns(pd.DataFrame(rows))
    methods = list(dict.fromkeys(per_subject["method"]))
    write_csv(staging / "per_subject.csv", per_subject)
    if options.per_slice:
        write_csv(
            staging / "per_slice.csv",
            pd.DataFrame(
                slice_rows, columns=["subject", "method", "orientation", "slice", "psnr", "ssim", "nmse", "lpips"]
            ),
        )
    regions = region_names(per_subject)
    summary_df = summary_frame(per_subject, summary_metrics(per_subject))
    write_csv(staging / "summary.csv", summary_df)
    save_text(staging / "summary.md", summary_markdown(per_subject, regions, lpips_status))
    ttests = ttest_frame(per_subject, ttest_metrics(per_subject))
    subset_rows = None
    if options.subsets:
        from m2diff_monai.evaluation.subsets import subset_table

        subset_rows = subset_table(per_subject, options.subsets, regions)
        write_csv(staging / "subsets.csv", subset_rows)
    target_rows = None
    if options.targets is not None:
        from m2diff_monai.evaluation.subsets import subset_table
        from m2diff_monai.evaluation.targets import target_groups, target_table

        group_means = subset_table(per_subject, target_groups(options.subsets), regions)
        target_rows = target_table(group_means, chosen.rows, options.targets)
        write_csv(staging / "targets.csv", target_rows)
    write_csv(staging / "ttests.csv", ttests)
    save_text(staging / "ttests.md", ttests_markdown(ttests))

    complexity_rows = complexity_mod.complexity_rows(complexity_inputs)
    save_text(staging / "complexity.md", complexity_mod.complexity_markdown(complexity_rows))
    save_json(staging / "complexity.json", complexity_rows)

    cka_result = None
    if cka_model is not None:
        from m2diff_monai.evaluation import representation

        cka_result = representation.cka_analysis(
            cka_model,
            manifest,
            staging / "cka",
            split=options.split,
            **{k: v for k, v in (cka_options or {}).items() if k != "device"},
        )
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
        "reference": "source_sd_pet (original units)"
        if options.space == "native"
        else "preprocessed sd_pet cube (original units)",
        "regions": regions,
        "units": ", ".join(sorted(set(units.values()))) or None,
        "baselines": chosen.as_dict(),
        "lpips": lpips_status,
        "threads": configure_threads(),
        "paper_protocol": paper_protocol.run_record(options.paper_options(), PAPER_METRICS),
        "subjects": list(dict.fromkeys(per_subject["subject"])),
        "skipped": plan.skipped,
        "failed": plan.failed,
        "notes": notes,
        "figures": figures,
        "cka": cka_result,
        "complexity": complexity_rows,
        "seconds": {"subjects": seconds, "total": round(time.perf_counter() - started, 3)},
        "files": sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        + ["report.md", "run.json"],
    }
    report = {**summary, "_baselines": chosen, "_subsets": subset_rows, "_targets": target_rows}
    save_text(staging / "report.md", report_markdown(report, per_subject, ttests, staging))
    save_json(staging / "run.json", summary)
    return summary


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
    return evaluate_cohort(
        manifest,
        predictions,
        output_dir,
        split=split,
        space=space,
        per_slice=bool(per_slice),
        lpips=bool(lpips),
        lpips_weights=_none_if_empty(lpips_weights),
        figures=bool(figures),
        keep_going=bool(keep_going),
        progress=bool(progress),
        workers=int(workers or 1),
        checkpoints=_none_if_empty(checkpoints),
        timings=_none_if_empty(timings),
        cka_checkpoint=_none_if_empty(cka_checkpoint),
        subjects=_none_if_empty(subjects),
        baselines=_none_if_empty(baselines),
    )


__all__ = ["evaluate_cohort", "run_bundle_evaluation"]
