"""One physical scale (``preprocessing.spacing``): preprocessing resamples every subject to one voxel size,
records it, training carries it into the checkpoint, and inference resamples a scan to it and the prediction back.

The inference checks use the identity "model" of ``test_inference`` (it returns its normalized LD input), so what
is tested is the pipeline's resampling round trip itself: against an independent scipy computation of the same
two trilinear resamplings (exact up to float32), and between a 2 mm and a 4 mm scan of the same analytic anatomy,
with a tolerance derived from the linear-interpolation error bound h²/8·max|f''| per axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from badinputs import centred_affine, save, world_coordinates, write_subject, write_table
from m2diff_monai.checkpoint import new_checkpoint, write_checkpoint
from m2diff_monai.data import grid
from m2diff_monai.engines.workflow import checkpoint_config
from m2diff_monai.errors import InputError
from m2diff_monai.inference import api
from m2diff_monai.inference.preprocess import resolve_preprocessing
from m2diff_monai.networks.factory import build_network
from preprocessing import spacing as sp
from preprocessing.pipeline import PipelineOptions, run_pipeline
from tiny_networks import IdentityRegressor, save_checkpoint  # noqa: F401  (registers inference_test_identity)

FAST = {"steps": 2, "batch_size": 64, "progress": False, "png": False, "device": "cpu", "fusion": "mean"}
FOV_SHAPE_2MM = (48, 56, 40)  # 96 x 112 x 80 mm
SEMI_AXES = (18.0, 22.0, 16.0)  # mm; smooth Gaussian "head"
HOT_CENTRE, HOT_SIGMA = (6.0, 5.0, 2.0), 7.0
BALL = np.ones((3, 3, 3), dtype=bool)  # erosion by whole voxels in every direction (diagonals included)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- helpers
def smooth_pet(points: np.ndarray) -> np.ndarray:
    """An analytic, smooth PET (Bq/ml-like) at world points (3, ...): a Gaussian head and a hot spot."""
    x, y, z = points
    a, b, c = SEMI_AXES
    head = 1000.0 * np.exp(-((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2))
    d2 = sum((p - q) ** 2 for p, q in zip((x, y, z), HOT_CENTRE, strict=True))
    return (head + 500.0 * np.exp(-d2 / (2 * HOT_SIGMA**2))).astype(np.float32)


def max_second_derivatives(step: float = 1.0) -> np.ndarray:
    """max |∂²f/∂x_i²| of :func:`smooth_pet` per axis, from the analytic derivatives on a 1 mm grid over the FOV
    (both Gaussians peak in curvature at their centres, which lie on that grid)."""
    axes = [np.arange(-n, n + step, step) for n in (48.0, 56.0, 40.0)]
    x = np.stack(np.meshgrid(*axes, indexing="ij"))
    head = 1000.0 * np.exp(-sum((x[i] / SEMI_AXES[i]) ** 2 for i in range(3)))
    d = x - np.asarray(HOT_CENTRE).reshape(3, 1, 1, 1)
    hot = 500.0 * np.exp(-(d**2).sum(axis=0) / (2 * HOT_SIGMA**2))
    second = [
        head * (4 * x[i] ** 2 / SEMI_AXES[i] ** 4 - 2 / SEMI_AXES[i] ** 2)
        + hot * (d[i] ** 2 / HOT_SIGMA**4 - 1 / HOT_SIGMA**2)
        for i in range(3)
    ]
    return np.array([np.abs(f2).max() for f2 in second])


def write_scan(path: Path, voxel_mm: float, flip_lps: bool = False) -> Path:
    shape = tuple(round(n * 2.0 / voxel_mm) for n in FOV_SHAPE_2MM)
    affine = centred_affine(shape, voxel_mm, flip_lps=flip_lps)
    return save(path, smooth_pet(world_coordinates(shape, affine)), affine)


def by_hand(data: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray) -> np.ndarray:
    """Independent trilinear resampling: scipy map_coordinates at the destination voxels' source coordinates."""
    idx = np.indices(tuple(dst_shape), dtype=np.float64).reshape(3, -1)
    m = np.linalg.solve(src_affine, dst_affine)
    coords = m[:3, :3] @ idx + m[:3, 3:4]
    return ndimage.map_coordinates(data, coords, order=1, mode="nearest").reshape(tuple(dst_shape))


def identity_checkpoint(path: Path, size: int, spacing) -> Path:
    """The identity 'model' as training saves it, with the preprocessing a manifest at ``spacing`` records
    (None: no spacing recorded, as in checkpoints from before ``--spacing``; "native": recorded as native)."""
    net = build_network({"name": "inference_test_identity"})
    preprocessing = {"size": size, "normalization": "shared", "transform": "Rigid", "space": "pet"}
    if spacing is not None:
        preprocessing["spacing"] = None if spacing == "native" else list(spacing)
    return save_checkpoint(path, net, None, {"size": size, "preprocessing": preprocessing})


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


# ------------------------------------------------------------------------------------------- units
def test_parse_spacing_values_and_errors():
    assert sp.parse_spacing("auto") == "auto" and sp.parse_spacing(None) == "auto"
    assert sp.parse_spacing("Native") == "native"
    assert sp.parse_spacing("2") == (2.0, 2.0, 2.0) and sp.parse_spacing(2.5) == (2.5, 2.5, 2.5)
    assert sp.parse_spacing("2,2,3.27") == (2.0, 2.0, 3.27) and sp.parse_spacing([1, 1, 2]) == (1.0, 1.0, 2.0)
    for bad in ("fine", "2,2", "0", "-1", "nan", "2,2,40"):
        with pytest.raises(ValueError, match="--spacing"):
            sp.parse_spacing(bad)
    assert sp.recorded_spacing(None) is None and sp.recorded_spacing("native") is None
    assert sp.recorded_spacing([4, 4, 4]) == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        sp.recorded_spacing("auto")


def test_cohort_spacing_is_the_per_axis_lower_median():
    spacings = [(2.0, 2.0, 3.0), (4.0, 4.0, 2.0), (4.0, 1.0, 2.0), None]  # None: unreadable header, ignored
    assert sp.cohort_spacing(spacings) == (4.0, 2.0, 2.0)
    assert sp.cohort_spacing([(2.0, 2.0, 2.0), (4.0, 4.0, 4.0)]) == (2.0, 2.0, 2.0)  # even count: the lower one
    with pytest.raises(InputError, match="--spacing auto"):
        sp.cohort_spacing([None])


def test_canonical_spacing_follows_the_intake_reorientation(tmp_path):
    affine = np.array([[0, 0, 3.0, 0], [-2.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])  # stored as (A, S, R)-ish
    path = save(tmp_path / "x.nii.gz", np.zeros((4, 5, 6), np.float32), affine)
    expected = np.linalg.norm(nib.as_closest_canonical(nib.load(str(path))).affine[:3, :3], axis=0)
    assert sp.header_spacing(path) == pytest.approx(tuple(expected)) == (3.0, 2.0, 1.5)
    assert sp.header_spacing(tmp_path / "missing.nii.gz") is None


def test_target_grid_keeps_the_field_of_view_and_linear_functions_resample_exactly():
    shape, affine = (48, 56, 40), centred_affine((48, 56, 40), 2.0, rotation_deg=12.0)
    new_shape, new_affine = sp.target_grid(shape, affine, (4.0, 4.0, 2.5))
    assert new_shape == (24, 28, 32)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), (4.0, 4.0, 2.5))

    def centre(s, a):
        return a[:3, :3] @ ((np.asarray(s) - 1) / 2.0) + a[:3, 3]

    np.testing.assert_allclose(centre(new_shape, new_affine), centre(shape, affine), atol=1e-9)
    np.testing.assert_allclose(new_affine[:3, :3] / (4.0, 4.0, 2.5), affine[:3, :3] / 2.0, atol=1e-12)
    # trilinear interpolation reproduces an affine function exactly wherever it does not extrapolate
    coeffs = np.array([3.0, -2.0, 0.5])
    data = np.tensordot(coeffs, world_coordinates(shape, affine), axes=1) + 100.0
    out = grid.resample(data, affine, new_shape, new_affine)
    truth = np.tensordot(coeffs, world_coordinates(new_shape, new_affine), axes=1) + 100.0
    inside = (slice(2, -2),) * 3
    np.testing.assert_allclose(out[inside], truth[inside], rtol=1e-5, atol=1e-3)
    assert sp.same_spacing(new_affine, (4.0, 4.0, 2.5)) and not sp.same_spacing(affine, (4.0, 4.0, 2.5))
    assert sp.same_spacing(affine, None)


# ------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scans")
    return {
        "2mm": write_scan(root / "ld_2mm.nii.gz", 2.0, flip_lps=True),
        "4mm": write_scan(root / "ld_4mm.nii.gz", 4.0),
    }


def test_a_2mm_scan_runs_through_a_4mm_model_and_agrees_with_the_4mm_scan(tmp_path, scans):
    """Cube 16 at 4 mm (64 mm): the 2 mm brain (~22 voxels) no longer gets 'use a larger --size'."""
    ckpt = identity_checkpoint(tmp_path / "id4.pt", size=16, spacing=(4.0, 4.0, 4.0))
    with pytest.raises(InputError, match=r"voxels of 2 mm along axis .*larger --size"):
        api.infer_subject(ckpt, scans["2mm"], tmp_path / "refused.nii.gz", spacing="native", **FAST)
    assert not (tmp_path / "refused.nii.gz").exists()

    out = {}
    for key in ("2mm", "4mm"):
        summary = api.infer_subject(ckpt, scans[key], tmp_path / f"pred_{key}.nii.gz", **FAST)
        assert summary["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
        assert summary["preprocessing"]["sources"]["spacing"] == "checkpoint"
        raw, pred = nib.load(str(scans[key])), nib.load(str(tmp_path / f"pred_{key}.nii.gz"))
        assert pred.shape == raw.shape  # the scan's own grid, its voxel order and units
        np.testing.assert_allclose(pred.affine, raw.affine, atol=1e-6)
        out[key] = canonical(tmp_path / f"pred_{key}.nii.gz")
    ld2, a2 = canonical(scans["2mm"])
    ld4, a4 = canonical(scans["4mm"])
    pred2, pred4 = out["2mm"][0], out["4mm"][0]

    # the 4 mm scan is at the model's spacing: no interpolation, the identity gives the input back exactly
    defined4 = pred4 != 0
    assert defined4.sum() > 500
    np.testing.assert_allclose(pred4[defined4], ld4[defined4], rtol=1e-5, atol=1e-2)

    # the 2 mm scan went 2 mm → 4 mm → 2 mm: the same two trilinear resamplings computed independently
    grid4_shape, grid4_affine = sp.target_grid(ld2.shape, a2, (4.0, 4.0, 4.0))
    assert grid4_shape == ld4.shape and np.allclose(grid4_affine, a4, atol=1e-9)  # the same FOV as the 4 mm scan
    expected2 = by_hand(by_hand(ld2, a2, grid4_shape, grid4_affine), grid4_affine, ld2.shape, a2)
    # where the 4 mm prediction (0 outside the slices that hold brain) and its zeros meet, trilinear values mix:
    # compare 3 voxels (in every direction) inside the defined region
    inside = ndimage.binary_erosion(pred2 != 0, BALL, iterations=3)
    assert inside.sum() > 2000
    np.testing.assert_allclose(pred2[inside], expected2[inside], rtol=1e-4, atol=0.05)

    # agreement of the two scanners' predictions on the 2 mm grid: they differ by the 4 mm samples of the 2 mm
    # linear interpolant versus the exact 4 mm samples, at most Σ_i h²/8·max|∂²f/∂x_i²| with h = 2 mm
    bound = float((2.0**2 / 8.0) * max_second_derivatives().sum())
    pred4_on_2mm = by_hand(pred4, a4, ld2.shape, a2)
    both = inside & ndimage.binary_erosion(pred4_on_2mm != 0, BALL, iterations=3)
    difference = np.abs(pred2[both] - pred4_on_2mm[both])
    assert bound < 0.03 * float(ld2.max())  # the bound is a meaningful tolerance for this phantom
    assert difference.max() <= bound, (difference.max(), bound)
    # and both are close to the anatomy itself (down + up: Σ (2² + 4²)/8·max|f''|)
    truth = smooth_pet(world_coordinates(ld2.shape, a2))
    assert np.abs(pred2[inside] - truth[inside]).max() <= 2.5 * max_second_derivatives().sum()


@pytest.mark.parametrize("recorded, source", [(None, "default"), ("native", "checkpoint")])
def test_checkpoints_without_a_spacing_keep_the_native_grid(tmp_path, scans, recorded, source):
    """Checkpoints from before --spacing (nothing recorded) and --spacing native runs: no resampling."""
    ckpt = identity_checkpoint(tmp_path / "old.pt", size=32, spacing=recorded)
    summary = api.infer_subject(ckpt, scans["2mm"], tmp_path / "pred.nii.gz", **FAST)
    assert summary["preprocessing"]["spacing"] is None and summary["preprocessing"]["sources"]["spacing"] == source
    pred, ld = canonical(tmp_path / "pred.nii.gz")[0], canonical(scans["2mm"])[0]
    defined = pred != 0
    np.testing.assert_allclose(pred[defined], ld[defined], rtol=1e-5, atol=1e-2)  # no interpolation at all


# ------------------------------------------------------------------------------------------- a mixed cohort
@pytest.fixture(scope="module")
def mixed_cohort(tmp_path_factory) -> dict:
    """m01 at 2 mm (with a T1), m02 and m03 at 4 mm: `auto` → 4 mm (the median)."""
    root = tmp_path_factory.mktemp("mixed")
    raw = root / "raw"
    rows = [
        write_subject(raw, "m01", seed=1, pet_voxel_mm=2.0, with_mask=True),
        write_subject(raw, "m02", seed=2, pet_voxel_mm=4.0, with_mri=False),
        write_subject(raw, "m03", seed=3, pet_voxel_mm=4.0, with_mri=False),
    ]
    for row, split in zip(rows, ("test", "train", "val"), strict=True):
        row["split"] = split
    table = write_table(raw / "subjects.csv", rows)
    manifest = root / "manifests" / "mixed.json"
    summary = run_pipeline(table, root / "prep", manifest, PipelineOptions(transform="rigid", size=16))
    assert not summary.failed
    return {"root": root, "raw": raw, "rows": rows, "manifest": manifest, "table": table}


def test_mixed_cohort_is_preprocessed_at_one_spacing_and_recorded(mixed_cohort):
    content = json.loads(mixed_cohort["manifest"].read_text())
    params = content["provenance"]["parameters"]
    assert params["spacing"] == [4.0, 4.0, 4.0] and params["spacing_rule"] == "auto"
    base = mixed_cohort["manifest"].parent
    for item in content["volumes"]:
        record = json.loads((base / item["subject_json"]).read_text())
        assert record["spacing"] == pytest.approx([4.0, 4.0, 4.0])
        assert record["resampling"]["resampled"] is (item["subject"] == "m01")
        files = [item["ld_pet"], item["brain_mask"], *item["regions"].values()]
        files += [item[k] for k in ("sd_pet", "mri") if item[k]]
        for rel in files:
            img = nib.load(str(base / rel))
            assert img.shape == (16, 16, 16)
            np.testing.assert_allclose(img.header.get_zooms()[:3], (4.0, 4.0, 4.0), atol=1e-4)
    m01 = json.loads((base / content["volumes"][0]["subject_json"]).read_text())
    assert m01["source_spacing"] == pytest.approx([2.0, 2.0, 2.0]) and m01["source_shape"] == [24, 28, 20]
    assert m01["resampling"]["native_spacing"] == pytest.approx([2.0, 2.0, 2.0])
    slices = [it for it in content["training"] if it["subject"] == "m02"]
    assert slices and all(np.load(base / it["ld_pet"]).shape[-2:] == (16, 16) for it in slices)

    # training copies the manifest's parameters into the checkpoint; inference reads the spacing back
    net = build_network({"name": "inference_test_identity"})
    data = checkpoint_config(net, {"timesteps": 100}, {"manifest": str(mixed_cohort["manifest"])})["data"]
    assert data["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    prep = resolve_preprocessing(data, {}, None)
    assert prep.spacing == (4.0, 4.0, 4.0) and prep.sources["spacing"] == "checkpoint"
    # and an exported bundle freezes it (it must not need the manifest)
    from m2diff_monai.export.bundle import freeze_preprocessing

    frozen = freeze_preprocessing(data, None)["values"]
    assert frozen["spacing"] == [4.0, 4.0, 4.0]
    assert resolve_preprocessing({"preprocessing": frozen}, {}, None).spacing == (4.0, 4.0, 4.0)


def test_explicit_spacing_and_reruns(mixed_cohort, tmp_path):
    """An explicit spacing is used as given; changing it redoes the subjects, keeping it skips them."""
    manifest = tmp_path / "m.json"
    options = PipelineOptions(transform="rigid", size=32, spacing="2", split=(0.0, 0.0, 1.0))
    first = run_pipeline(mixed_cohort["table"], tmp_path / "prep", manifest, options)
    content = json.loads(manifest.read_text())
    assert content["provenance"]["parameters"]["spacing"] == [2.0, 2.0, 2.0]
    assert content["provenance"]["parameters"]["spacing_rule"] == "fixed"
    for item in content["volumes"]:
        zooms = nib.load(str(manifest.parent / item["ld_pet"])).header.get_zooms()[:3]
        np.testing.assert_allclose(zooms, (2.0, 2.0, 2.0), atol=1e-4)
    assert sorted(first.processed) == ["m01", "m02", "m03"]
    again = run_pipeline(mixed_cohort["table"], tmp_path / "prep", manifest, options)
    assert sorted(again.skipped) == ["m01", "m02", "m03"]
    native = run_pipeline(
        mixed_cohort["table"],
        tmp_path / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=32, spacing="native", split=(0.0, 0.0, 1.0)),
    )
    assert sorted(native.processed) == ["m01", "m02", "m03"]
    assert json.loads(manifest.read_text())["provenance"]["parameters"]["spacing"] is None


def test_cohort_inference_and_evaluation_map_4mm_cubes_back_to_the_2mm_scan(mixed_cohort, tmp_path):
    from m2diff_monai.evaluation.volumes import load_subject

    manifest = mixed_cohort["manifest"]
    ckpt = identity_checkpoint(tmp_path / "id4.pt", size=16, spacing=(4.0, 4.0, 4.0))
    api.infer_manifest(ckpt, manifest, tmp_path / "preds", split="test", **FAST)
    source = nib.load(str(mixed_cohort["raw"] / mixed_cohort["rows"][0]["ld_pet"]))
    pred_path = tmp_path / "preds" / "m01.nii.gz"
    pred = nib.load(str(pred_path))
    assert pred.shape == source.shape == (24, 28, 20)
    np.testing.assert_allclose(pred.affine, source.affine, atol=1e-6)
    values = np.asarray(pred.dataobj)
    assert (values != 0).sum() > 0.3 * values.size

    content = json.loads(manifest.read_text())
    item = next(it for it in content["volumes"] if it["subject"] == "m01")
    loaded = load_subject(item, manifest.parent, {"identity": pred_path})
    assert loaded.reference.shape == source.shape and loaded.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert loaded.mask.shape == source.shape and loaded.mask.sum() > 200
    assert set(loaded.regions) == {"lesion"} and loaded.regions["lesion"].any()
    # the 4 mm brain mask carried back to 2 mm by nearest neighbour covers the phantom's brain
    sd = np.asarray(nib.load(str(mixed_cohort["raw"] / mixed_cohort["rows"][0]["sd_pet"])).dataobj)
    assert sd[loaded.mask].mean() > 2.0 * sd[~loaded.mask].mean()


def test_cohort_inference_prepares_items_at_another_spacing_from_their_sources(mixed_cohort, tmp_path):
    """A 2 mm model given the 4 mm manifest: the cubes are not fed at the wrong scale."""
    ckpt = identity_checkpoint(tmp_path / "id2.pt", size=32, spacing=(2.0, 2.0, 2.0))
    summary = api.infer_manifest(ckpt, mixed_cohort["manifest"], tmp_path / "preds", split="test", **FAST)
    (result,) = summary["subjects"]
    assert any("prepared from the source files" in w for w in result["warnings"])
    source = canonical(mixed_cohort["raw"] / mixed_cohort["rows"][0]["ld_pet"])[0]
    pred = canonical(tmp_path / "preds" / "m01.nii.gz")[0]
    defined = pred != 0
    assert defined.sum() > 500
    np.testing.assert_allclose(pred[defined], source[defined], rtol=1e-5, atol=1e-2)  # 2 mm model, 2 mm scan


def test_command_lines_take_spacing(tmp_path, scans, monkeypatch):
    """``m2diff-preprocess run``/``demo`` parse --spacing into the pipeline options; ``m2diff-infer --spacing``
    reaches the preprocessing (here: native makes the 2 mm brain too big for a 16-voxel cube again)."""
    import argparse

    from m2diff_monai.inference import cli as infer_cli
    from preprocessing import demo, pipeline

    run_args = pipeline.configure(argparse.ArgumentParser()).parse_args(
        ["--subjects", "s.csv", "--out", "o", "--manifest", "m.json", "--spacing", "2,2,3"]
    )
    assert pipeline.options_from_args(run_args).target_spacing == (2.0, 2.0, 3.0)
    assert pipeline.options_from_args(run_args).manifest_parameters()["spacing"] == [2.0, 2.0, 3.0]
    default = pipeline.options_from_args(
        pipeline.configure(argparse.ArgumentParser()).parse_args(
            ["--subjects", "s.csv", "--out", "o", "--manifest", "m.json"]
        )
    )
    assert default.spacing == "auto" and default.target_spacing is None  # resolved over the table by run_pipeline
    demo_args = demo.configure(argparse.ArgumentParser()).parse_args(["--out", "o", "--spacing", "4"])
    assert demo_args.spacing == "4"

    ckpt = identity_checkpoint(tmp_path / "id4.pt", size=16, spacing=(4.0, 4.0, 4.0))
    common = [
        "--checkpoint",
        str(ckpt),
        "--ld-pet",
        str(scans["2mm"]),
        "--no-png",
        "--no-progress",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--fusion",
        "mean",
    ]
    assert infer_cli.main([*common, "--out", str(tmp_path / "ok.nii.gz")]) == 0
    assert infer_cli.main([*common, "--out", str(tmp_path / "no.nii.gz"), "--spacing", "native"]) == 2
    assert (tmp_path / "ok.nii.gz").is_file() and not (tmp_path / "no.nii.gz").exists()


def test_mri_space_resamples_the_t1_grid_and_maps_back_through_the_registration(tmp_path):
    """--space mri: the T1 (1.6 mm) is the grid that is resampled (to 2 mm); the PET is registered onto it once,
    and cohort inference maps the prediction back onto the LD PET's own 2 mm grid."""
    raw = tmp_path / "raw"
    row = write_subject(raw, "r01", seed=7)
    row["split"] = "test"
    manifest = tmp_path / "m.json"
    run_pipeline(
        write_table(raw / "subjects.csv", [row]),
        tmp_path / "prep",
        manifest,
        PipelineOptions(transform="rigid", space="mri", size=32, spacing="2"),
    )
    content = json.loads(manifest.read_text())
    (item,) = content["volumes"]
    record = json.loads((manifest.parent / item["subject_json"]).read_text())
    assert record["resampling"]["grid"] == "mri" and record["resampling"]["native_spacing"] == pytest.approx([1.6] * 3)
    assert record["grid_shape"] == [24, 27, 21]  # round(30/34/26 · 1.6 / 2)
    for key in ("ld_pet", "sd_pet", "mri"):
        np.testing.assert_allclose(
            nib.load(str(manifest.parent / item[key])).header.get_zooms()[:3], (2.0,) * 3, atol=1e-4
        )
    net = build_network({"name": "inference_test_identity"})
    data = checkpoint_config(net, {"timesteps": 100}, {"manifest": str(manifest)})["data"]
    config = {"network": net.config, "diffusion": {"timesteps": 100}, "data": data}
    ckpt = tmp_path / "id.pt"
    write_checkpoint(ckpt, new_checkpoint(net.state_dict(), config, epoch=1, iteration=1))
    api.infer_manifest(ckpt, manifest, tmp_path / "preds", split="test", **FAST)
    source = nib.load(str(raw / row["ld_pet"]))
    pred = nib.load(str(tmp_path / "preds" / "r01.nii.gz"))
    assert pred.shape == source.shape
    np.testing.assert_allclose(pred.affine, source.affine, atol=1e-6)
    values, ld = np.asarray(pred.dataobj), np.asarray(source.dataobj, dtype=np.float32)
    inside = ndimage.binary_erosion(values != 0, BALL, iterations=2)
    assert inside.sum() > 500
    # PET → T1 grid (registration, linear) → back (inverse, linear): the noisy phantom is smoothed by two
    # interpolations, so agreement is statistical, not voxel-exact
    assert np.corrcoef(values[inside], ld[inside])[0, 1] > 0.9
    assert abs(values[inside].mean() / ld[inside].mean() - 1) < 0.05
