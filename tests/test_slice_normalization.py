"""``--normalization slice`` (the official loader's per-slice min–max of LD, SD and T1) and the ``paper`` → ``volume``
rename: the math, the training slices of all three orientations, the way back to original units at inference, and
old records that say ``paper``."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from badinputs import write_subject, write_table
from m2diff_monai.data.datasets import load_slice_items
from m2diff_monai.data.orientation import ORIENTATIONS, axis_of
from m2diff_monai.data.transforms import slice_transforms
from m2diff_monai.errors import InputError
from m2diff_monai.inference import api, cohort
from m2diff_monai.inference.preprocess import TrainingPreprocessing, prepare_subject, resolve_preprocessing
from m2diff_monai.inference.volume import brain_slice_indices
from m2diff_monai.networks.factory import build_network, register_network
from preprocessing import normalization
from preprocessing.normalization import SliceRange, minmax_slices, recorded_method
from preprocessing.pipeline import PipelineOptions, run_pipeline
from tiny_networks import save_checkpoint

CUBE = 32
FAST = {"steps": 2, "batch_size": 64, "progress": False, "png": False, "device": "cpu", "fusion": "mean"}
K = 0.8  # the scaled oracle's factor


class ScaledLD(nn.Module):
    """A regressor returning k × its (normalized) LD input: its answer in original units is known exactly."""

    is_diffusion = False

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x_t=None, t=None, ld=None, mri=None, mri_available=None):
        self.inputs.append(ld.detach().clone())
        return {"out": float(self.config.get("k", 1.0)) * ld}


register_network("slicenorm_test_scaled_ld", ScaledLD)


def checkpoint(path: Path, recorded: str, k: float = 1.0) -> Path:
    net = build_network({"name": "slicenorm_test_scaled_ld", "k": k})
    data = {"size": CUBE, "normalization": recorded, "transform": "rigid", "space": "pet"}
    return save_checkpoint(path, net, None, data)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- the math
def test_minmax_slices_is_per_slice_minmax_and_inverts_exactly():
    rng = np.random.default_rng(0)
    stack = (rng.gamma(2.0, 800.0, (5, 12, 10)) + np.arange(5)[:, None, None] * 300).astype(np.float32)
    stack[1] -= 900.0  # negative values: the minimum is not 0
    stack[2] = 7.5  # constant (degenerate) slice
    norm, ranges = minmax_slices(stack)
    assert norm.dtype == np.float32 and norm.shape == stack.shape
    for i in (0, 1, 3, 4):
        x = stack[i].astype(np.float64)
        assert norm[i].min() == 0.0 and norm[i].max() == 1.0  # exactly
        np.testing.assert_allclose(norm[i], (x - x.min()) / (x.max() - x.min()), rtol=0, atol=1e-7)
    assert not norm[2].any()  # degenerate → zeros
    span = float(stack.max() - stack.min())
    np.testing.assert_allclose(ranges.invert(norm), stack, rtol=1e-6, atol=1e-6 * span)  # LD back from its own range
    # per-slice min–max ignores any positive affine map: the cube's units do not matter
    np.testing.assert_allclose(minmax_slices(3.7 * stack + 11.0)[0], norm, rtol=0, atol=1e-6)
    # an oracle predicting k·(normalized LD) maps back to k·(LD − min) + min, i.e. k·LD where the slice minimum is 0
    lo = stack.reshape(5, -1).min(axis=1)[:, None, None]
    np.testing.assert_allclose(ranges.invert(K * norm), K * (stack - lo) + lo, rtol=1e-6, atol=1e-6 * span)
    zero_min = stack.copy()
    zero_min[:, 0, 0] = 0.0
    zero_min = np.abs(zero_min)
    z_norm, z_ranges = minmax_slices(zero_min)
    np.testing.assert_allclose(
        z_ranges.invert(K * z_norm)[[0, 1, 3, 4]], K * zero_min[[0, 1, 3, 4]], rtol=1e-6, atol=1e-6 * span
    )
    np.testing.assert_array_equal(SliceRange.of(stack[:1]).lo, [stack[0].min()])


def test_slice_cubes_keep_the_shared_scale_and_an_unclipped_t1():
    rng = np.random.default_rng(3)
    ld = rng.gamma(2.0, 500.0, (12, 12, 12)).astype(np.float32)
    mask = np.zeros(ld.shape, bool)
    mask[3:9, 3:9, 3:9] = True
    assert normalization.pet_scalings("slice", ld, ld, mask) == normalization.pet_scalings("shared", ld, ld, mask)
    mri = rng.normal(300, 60, ld.shape).astype(np.float32)
    s = normalization.mri_scaling(mri, mask)
    unclipped = normalization.normalize_mri(mri, s, clip=False)
    assert unclipped.max() > 1.0 and unclipped.min() < 0.0
    np.testing.assert_allclose(unclipped, (mri - s.offset) / s.scale, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- training slices
@pytest.fixture(scope="module")
def slice_cohort(tmp_path_factory) -> Path:
    """Two subjects (one MRI-free) through ``run_pipeline`` with ``normalization="slice"``, all in training."""
    root = tmp_path_factory.mktemp("slicecohort")
    rows = [write_subject(root / "raw", "n01", seed=11), write_subject(root / "raw", "n02", seed=12, with_mri=False)]
    manifest = root / "manifest.json"
    run_pipeline(
        write_table(root / "raw" / "subjects.csv", rows),
        root / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=CUBE, split=(1.0, 0.0, 0.0), normalization="slice"),
    )
    return manifest


def test_training_slices_of_every_orientation_are_minmax_normalized(slice_cohort):
    content = json.loads(slice_cohort.read_text())
    assert content["provenance"]["parameters"]["normalization"] == "slice"
    items = load_slice_items(slice_cohort, "training")
    assert {i["orientation"] for i in items} == set(ORIENTATIONS)
    transform = slice_transforms()
    cubes: dict[tuple[str, str], np.ndarray] = {}
    checked = {o: 0 for o in ORIENTATIONS}
    for item in items:
        out = transform(item)
        volume = next(v for v in content["volumes"] if v["subject"] == item["subject"])
        for key in ("ld_pet", "sd_pet", "mri"):
            if key == "mri" and not item["mri_available"]:
                assert not out["mri"].any()
                continue
            plane = out[key][0].numpy()
            if (item["subject"], key) not in cubes:
                cubes[item["subject"], key] = np.asarray(
                    nib.load(slice_cohort.parent / volume[key]).dataobj, dtype=np.float64
                )
            source = np.take(cubes[item["subject"], key], item["slice"], axis=axis_of(item["orientation"]))
            if source.max() > source.min():
                assert plane.min() == 0.0 and plane.max() == 1.0
                expected = (source - source.min()) / (source.max() - source.min())  # independent of minmax_slices
                np.testing.assert_allclose(plane, expected, rtol=0, atol=2e-6)
            else:
                assert not plane.any()
        checked[item["orientation"]] += 1
    assert min(checked.values()) > 5
    record = json.loads((slice_cohort.parent / content["volumes"][0]["subject_json"]).read_text())
    assert record["normalization"]["method"] == "slice"
    assert record["normalization"]["slices"] == "per-slice min-max"
    mri_cube = cubes.get(("n01", "mri"))
    assert mri_cube is not None and mri_cube.max() > 1.0  # the T1 cube is not clipped under `slice`


# ------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def pet_subjects(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``zero_min``: LD PET ≥ 0 with background 0, so every cube slice has minimum 0; ``negative_min``: the same
    minus 30, so the slices' minima are < 0 and the LD-range way back differs from a plain scale."""
    root = tmp_path_factory.mktemp("pet")
    cells = write_subject(root, "p01", seed=21)
    img = nib.load(root / cells["ld_pet"])
    ld = np.asarray(img.dataobj, dtype=np.float32)
    assert ld.min() == 0.0
    nib.save(nib.Nifti1Image(ld - 30.0, img.affine, img.header), root / "ld_shifted.nii.gz")
    return {
        "zero_min": {"ld_pet": root / cells["ld_pet"], "mri": root / cells["mri"]},
        "negative_min": {"ld_pet": root / "ld_shifted.nii.gz", "mri": root / cells["mri"]},
    }


def _prepared_and_region(files: dict[str, Path]):
    prepared = prepare_subject(
        files["ld_pet"], files["mri"], TrainingPreprocessing(size=CUBE, normalization="slice", transform="rigid"), "p01"
    )
    count = np.zeros(prepared.mask.shape, np.float32)
    for o in ORIENTATIONS:
        sampled = np.zeros(prepared.mask.shape[axis_of(o)], np.float32)
        sampled[brain_slice_indices(prepared.mask, o, sampled.size)] = 1
        count += sampled.reshape([-1 if a == axis_of(o) else 1 for a in range(3)])
    return prepared, prepared.to_source(count) > 0


def test_slice_inference_returns_original_units(tmp_path, pet_subjects):
    """Identity model: LD back exactly. Oracle k·LD_norm on slices whose minimum is 0: k·LD in original units."""
    files = pet_subjects["zero_min"]
    ld = np.asarray(nib.load(files["ld_pet"]).dataobj, dtype=np.float32)
    _, region = _prepared_and_region(files)
    assert region.sum() > 500
    out = tmp_path / "id.nii.gz"
    summary = api.infer_subject(checkpoint(tmp_path / "id.pt", "slice"), files["ld_pet"], out, files["mri"], **FAST)
    assert summary["preprocessing"]["normalization"] == "slice"
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj)[region], ld[region], rtol=1e-5, atol=1e-3)
    out = tmp_path / "k.nii.gz"
    api.infer_subject(checkpoint(tmp_path / "k.pt", "slice", k=K), files["ld_pet"], out, files["mri"], **FAST)
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj)[region], K * ld[region], rtol=1e-5, atol=1e-3)


def test_each_orientation_maps_back_with_its_own_ld_slice_range(tmp_path, pet_subjects):
    """Slices whose minimum is < 0: orientation o's volume = k·(LD − min_o) + min_o, min_o the minimum of the LD
    slice of orientation o holding the voxel (computed here with plain numpy), before any fusion."""
    files = pet_subjects["negative_min"]
    prepared, _ = _prepared_and_region(files)
    api.infer_subject(
        checkpoint(tmp_path / "k.pt", "slice", k=K),
        files["ld_pet"],
        tmp_path / "k.nii.gz",
        files["mri"],
        save_orientations=True,
        **FAST,
    )
    cube_ld = prepared.ld.astype(np.float64)
    for o in ORIENTATIONS:
        axis = axis_of(o)
        lo = cube_ld.min(axis=tuple(a for a in range(3) if a != axis), keepdims=True)
        todo = brain_slice_indices(prepared.mask, o, cube_ld.shape[axis])
        assert (np.take(lo, todo, axis=axis) < 0).all()
        sampled = np.zeros(cube_ld.shape[axis], bool)
        sampled[todo] = True
        sampled = sampled.reshape([-1 if a == axis else 1 for a in range(3)])
        expected_cube = np.where(sampled, K * (cube_ld - lo) + lo, 0.0).astype(np.float32)
        reference = prepared.denormalize(prepared.to_source(expected_cube))
        got = np.asarray(nib.load(tmp_path / f"k_{o}.nii.gz").dataobj)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-2)


def test_slice_inference_feeds_the_network_minmax_slices(tmp_path, pet_subjects):
    from m2diff_monai.checkpoint import load_model

    model = load_model(checkpoint(tmp_path / "id.pt", "slice"))
    api.infer_subject(model, pet_subjects["negative_min"]["ld_pet"], tmp_path / "p.nii.gz", None, **FAST)
    batches = torch.cat(model.network.inputs)
    flat = batches.flatten(1)
    assert torch.all(flat.min(dim=1).values == 0.0) and torch.all(flat.max(dim=1).values == 1.0)


# ------------------------------------------------------------------------------------------- legacy "paper"
def test_recorded_paper_reads_as_volume_and_warns_once(monkeypatch):
    monkeypatch.setattr(normalization, "_warned_legacy", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert recorded_method("paper") == "volume"
        assert recorded_method("paper") == "volume"
        assert recorded_method("slice") == "slice"
    assert [w.category for w in caught] == [FutureWarning]
    assert "per-volume" in str(caught[0].message)
    with pytest.raises(ValueError, match="shared, volume, slice"):
        recorded_method("zscore")


@pytest.mark.filterwarnings("ignore:normalization 'paper':FutureWarning")
def test_manifest_that_records_paper_loads_as_volume(tmp_path):
    manifest = tmp_path / "old.json"
    manifest.write_text(json.dumps({"size": 64, "provenance": {"parameters": {"normalization": "paper"}}}))
    prep = resolve_preprocessing({"manifest": str(manifest)}, {}, 128)
    assert prep.normalization == "volume" and prep.sources["normalization"] == "manifest provenance"
    volume_model = TrainingPreprocessing(size=64, normalization="volume", sources={"normalization": "checkpoint"})
    cohort.check_manifest_matches(json.loads(manifest.read_text()), volume_model, manifest)  # paper == volume
    slice_model = TrainingPreprocessing(size=64, normalization="slice", sources={"normalization": "checkpoint"})
    with pytest.raises(InputError, match="normalization=volume but the model was trained with normalization=slice"):
        cohort.check_manifest_matches(json.loads(manifest.read_text()), slice_model, manifest)
    unknown = TrainingPreprocessing(size=64, sources={"normalization": "default"})
    assert cohort.with_manifest_normalization(json.loads(manifest.read_text()), unknown).normalization == "volume"


def test_command_lines_accept_slice_and_volume_and_refuse_paper(capsys):
    from m2diff_monai.inference.cli import build_parser
    from preprocessing import demo, pipeline

    run = pipeline.configure(argparse.ArgumentParser())
    base = ["--subjects", "s.csv", "--out", "o", "--manifest", "m.json"]
    for name in ("slice", "volume", "shared"):
        assert pipeline.options_from_args(run.parse_args([*base, "--normalization", name])).normalization == name
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args([*base, "--normalization", "paper"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "renamed" in error and "'volume'" in error and "'slice'" in error
    with pytest.raises(ValueError, match="renamed"):
        PipelineOptions(normalization="paper")
    assert (
        demo.configure(argparse.ArgumentParser()).parse_args(["--out", "d", "--normalization", "slice"]).normalization
        == "slice"
    )
    infer = build_parser()
    assert infer.parse_args(["--checkpoint", "c.pt", "--normalization", "slice"]).normalization == "slice"
    with pytest.raises(SystemExit):
        infer.parse_args(["--checkpoint", "c.pt", "--normalization", "paper"])
    assert "renamed" in capsys.readouterr().err
