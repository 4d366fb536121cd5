"""Volume inference: checkpoint → preprocessing as in training → three-orientation sampling → fusion → the input's
own grid and units.

Exact checks use the known-answer stand-in networks of ``tiny_networks`` (``inference_test_identity`` returns the
LD PET; ``inference_test_oracle`` predicts x̂0 = LD PET). Sampling paths that need randomness use a tiny M2Diff.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from badinputs import centred_affine, write_subject, write_table
from inference_checkpoints import (
    CUBE,
    DATA_CONFIG,
    TINY_M2DIFF,
    identity_checkpoint,
    save_checkpoint,
    tiny_m2diff_checkpoint,
)
from m2diff_monai.checkpoint import load_model, read_checkpoint
from m2diff_monai.data.grid import SourceGrid
from m2diff_monai.errors import InputError
from m2diff_monai.inference import api
from m2diff_monai.inference.inferer import DiffusionSamplerInferer
from m2diff_monai.inference.preprocess import (
    TrainingPreprocessing,
    prepare_from_manifest_item,
    prepare_subject,
    resolve_preprocessing,
)
from m2diff_monai.inference.volume import SliceGeometry, _coverage_count, fuse_with_coverage
from m2diff_monai.networks.factory import build_network

FAST = {"steps": 2, "batch_size": 64, "progress": False, "png": False, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Good subjects stored RAS, LPS and oblique (PET 24x28x20 at 2 mm, T1 on its own 1.6 mm grid)."""
    root = tmp_path_factory.mktemp("subjects")
    out = {}
    for name, kwargs in (("basic", {}), ("lps", {"flip_lps": True}), ("oblique", {"rotation_deg": 12.0})):
        cells = write_subject(root / name, "s01", seed=5, **kwargs)
        out[name] = {k: root / name / v for k, v in cells.items() if k in ("ld_pet", "mri") and v}
    return out


def _sampled_region(
    ld_path: Path, mri_path: Path | None, normalization: str = "shared"
) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of the raw LD grid that at least one orientation sampled (brain slices), from an independent
    preparation of the same subject."""
    settings = TrainingPreprocessing(size=CUBE, normalization=normalization, transform="rigid")
    prepared = prepare_subject(ld_path, mri_path, settings, "s01")
    count = _coverage_count(prepared.mask, ("axial", "coronal", "sagittal"), prepared.mask.shape).astype(np.float32)
    region = prepared.to_source(count) > 0
    brain = prepared.to_source(prepared.mask.astype(np.float32)) > 0
    return region, brain


# ------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("kwargs", [{}, {"flip_lps": True}, {"rotation_deg": 12.0}])
def test_source_grid_inverts_the_intake_reorientation(tmp_path, kwargs):
    shape = (9, 8, 7)
    affine = centred_affine(shape, 2.0, **kwargs)
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    grid = SourceGrid.from_file(path)
    canonical = nib.as_closest_canonical(nib.load(path))
    assert grid.canonical_shape == canonical.shape
    np.testing.assert_allclose(grid.canonical_affine, canonical.affine, atol=1e-6)
    assert np.array_equal(grid.from_canonical(np.asarray(canonical.dataobj)), data)
    img = grid.image(data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert img.get_data_dtype() == np.float32


@pytest.mark.parametrize("shape,size", [((32, 32), 24), ((30, 31), 37), ((33, 28), 31)])
def test_slice_geometry_matches_monai_and_inverts(shape, size):
    from monai.transforms import ResizeWithPadOrCrop

    batch = np.random.default_rng(1).random((2, *shape)).astype(np.float32)
    geometry = SliceGeometry(shape, size)
    forward = geometry.forward(batch)
    expected = np.stack([np.asarray(ResizeWithPadOrCrop((size, size))(b[None]))[0] for b in batch])
    assert np.array_equal(forward, expected)
    back = geometry.inverse(forward)
    kept = np.zeros(shape, dtype=bool)
    kept[np.ix_(geometry.src_rows, geometry.src_cols)] = True
    assert np.array_equal(back[:, kept], batch[:, kept]) and not back[:, ~kept].any()


def test_fusion_outside_the_brain_box_averages_only_the_orientations_that_sampled():
    shape = (6, 6, 6)
    mask = np.zeros(shape, dtype=bool)
    mask[2:4, 1:5, 3:5] = True
    orientations = ("axial", "coronal", "sagittal")
    count = _coverage_count(mask, orientations, shape)
    assert count[2, 1, 3] == 3 and count[0, 1, 3] == 2 and count[0, 0, 0] == 0
    vols = {}
    for i, o in enumerate(orientations):
        v = np.full(shape, float(i + 1), dtype=np.float32)
        axis = {"sagittal": 0, "coronal": 1, "axial": 2}[o]
        unsampled = np.ones(shape[axis], dtype=bool)
        unsampled[np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))] = False
        np.moveaxis(v, axis, 0)[unsampled] = 0.0
        vols[o] = v
    fused = fuse_with_coverage(vols, count, "mean")
    assert fused[2, 1, 3] == pytest.approx(2.0)  # all three: (1 + 2 + 3) / 3
    assert fused[0, 1, 3] == pytest.approx((1.0 + 2.0) / 2)  # sagittal slice 0 has no brain
    assert fused[0, 0, 0] == 0.0


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_rebuilds_network_and_prefers_ema(tmp_path):
    torch.manual_seed(0)
    net = build_network(TINY_M2DIFF)
    other = build_network(TINY_M2DIFF)
    path = save_checkpoint(tmp_path / "c.pt", net, ema_state=other.state_dict())
    ema = load_model(path)
    raw = load_model(path, weights="raw")
    assert ema.weights == "ema" and raw.weights == "raw"
    key = next(iter(net.state_dict()))
    assert torch.equal(ema.network.state_dict()[key], other.state_dict()[key])
    assert torch.equal(raw.network.state_dict()[key], net.state_dict()[key])
    assert ema.diffusion_config["timesteps"] == 100 and ema.image_size == CUBE
    no_ema = load_model(save_checkpoint(tmp_path / "n.pt", net, ema_state=None))
    assert no_ema.weights == "raw"


def test_bad_checkpoints_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read the checkpoint"):
        read_checkpoint(garbage)
    torch.save({"network": {}}, tmp_path / "noconfig.pt")
    with pytest.raises(InputError, match="config"):
        read_checkpoint(tmp_path / "noconfig.pt")


def test_preprocessing_parameters_resolution_order(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {
                "size": 64,
                "provenance": {
                    "parameters": {"normalization": "slice", "transform": "Affine", "spacing": [4.0, 4.0, 2.5]}
                },
            }
        )
    )
    prep = resolve_preprocessing({"manifest": str(manifest), "space": "pet"}, {"transform": "rigid"}, 128)
    assert (prep.size, prep.normalization, prep.transform, prep.space) == (64, "slice", "Rigid", "pet")
    assert prep.spacing == (4.0, 4.0, 2.5)
    assert prep.sources == {
        "size": "manifest provenance",
        "normalization": "manifest provenance",
        "transform": "option",
        "space": "checkpoint",
        "seed": "default",
        "spacing": "manifest provenance",
    }
    fallback = resolve_preprocessing({}, {}, 128)
    assert (fallback.size, fallback.normalization, fallback.transform) == (128, "shared", "SyN")
    assert fallback.spacing is None and fallback.sources["spacing"] == "default"  # old checkpoints: native


# ------------------------------------------------------------------------------------------- subjects
@pytest.mark.parametrize("case", ["basic", "lps", "oblique"])
def test_identity_model_gives_back_the_input_on_its_own_grid(tmp_path, subjects, case):
    files = subjects[case]
    ckpt = identity_checkpoint(tmp_path / "id.pt")
    out = tmp_path / "pred.nii.gz"
    summary = api.infer_subject(ckpt, files["ld_pet"], out, files["mri"], fusion="mean", **FAST)
    raw = nib.load(files["ld_pet"])
    pred = nib.load(out)
    assert pred.shape == raw.shape and pred.get_data_dtype() == np.float32
    np.testing.assert_allclose(pred.affine, raw.affine, atol=1e-6)
    region, brain = _sampled_region(files["ld_pet"], files["mri"])
    assert brain.sum() > 500 and np.all(region[brain])
    ld = np.asarray(raw.dataobj, dtype=np.float32)
    values = np.asarray(pred.dataobj)
    np.testing.assert_allclose(values[region], ld[region], rtol=1e-6, atol=1e-3)  # x/scale*scale in float32
    assert not values[~region].any()
    assert summary["mri_used"] and summary["preprocessing"]["sources"]["normalization"] == "checkpoint"
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.filterwarnings("ignore:normalization 'paper':FutureWarning")
@pytest.mark.parametrize("recorded", ["volume", "paper"])
def test_volume_normalization_round_trip_with_offset(tmp_path, subjects, recorded):
    """Per-volume min–max (offset = LD minimum ≠ 0 once shifted) maps back exactly too; a checkpoint that
    records the legacy name ``paper`` is read as ``volume``."""
    files = subjects["basic"]
    shifted = tmp_path / "ld_shifted.nii.gz"
    raw = nib.load(files["ld_pet"])
    data = np.asarray(raw.dataobj, dtype=np.float32) + 50.0
    nib.save(nib.Nifti1Image(data, raw.affine, raw.header), shifted)
    out = tmp_path / "pred.nii.gz"
    summary = api.infer_subject(
        identity_checkpoint(tmp_path / "id.pt", recorded), shifted, out, None, fusion="mean", **FAST
    )
    assert summary["preprocessing"]["normalization"] == "volume"
    region, _ = _sampled_region(shifted, None, "volume")
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj)[region], data[region], rtol=1e-5)


def test_oracle_diffusion_mri_free_path_gives_back_the_input(tmp_path, subjects):
    """DDIM (η = 0) with x̂0 = LD ends exactly on LD; ``no_mri`` must call the network without MRI."""
    files = subjects["lps"]
    net = build_network({"name": "inference_test_oracle"})
    ckpt = save_checkpoint(
        tmp_path / "oracle.pt",
        net,
        data={**DATA_CONFIG, "normalization": "volume"},
        diffusion={"timesteps": 50, "clip_denoised": [-1, 1]},
    )
    model = load_model(ckpt)
    out = tmp_path / "pred.nii.gz"
    summary = api.infer_subject(
        model, files["ld_pet"], out, files["mri"], no_mri=True, fusion="mean", **{**FAST, "steps": 3}
    )
    assert not summary["mri_used"]
    assert model.network.calls and all(c["mri"] is None for c in model.network.calls)
    assert {c["t"] for c in model.network.calls} == {0, 24, 49}  # respaced chain, original timesteps
    region, _ = _sampled_region(files["ld_pet"], None, "volume")
    ld = np.asarray(nib.load(files["ld_pet"]).dataobj, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj)[region], ld[region], rtol=1e-5, atol=1e-3)


@pytest.mark.filterwarnings("ignore:stripe filter")
def test_samples_write_mean_and_nonnegative_std(tmp_path, subjects):
    files = subjects["oblique"]
    out = tmp_path / "pred.nii.gz"
    summary = api.infer_subject(
        tiny_m2diff_checkpoint(tmp_path / "m.pt"),
        files["ld_pet"],
        out,
        files["mri"],
        samples=2,
        save_orientations=True,
        **{**FAST, "png": True},
    )
    raw = nib.load(files["ld_pet"])
    std = nib.load(tmp_path / "pred_std.nii.gz")
    assert std.shape == raw.shape
    np.testing.assert_allclose(std.affine, raw.affine, atol=1e-6)
    s = np.asarray(std.dataobj)
    assert np.isfinite(s).all() and (s >= 0).all() and s.max() > 0  # two DDIM draws from different x_T differ
    for o in ("axial", "coronal", "sagittal"):
        assert nib.load(tmp_path / f"pred_{o}.nii.gz").shape == raw.shape
    assert (tmp_path / "pred.png").stat().st_size > 1000
    assert set(summary["files"]) == {"prediction", "std", "axial", "coronal", "sagittal", "png"}


def test_mri_required_models_refuse_mri_free_input(tmp_path, subjects):
    torch.manual_seed(0)
    net = build_network({"name": "mfdiff", "preset": "demo", "image_size": CUBE, "variant": "CMUNet"})
    ckpt = save_checkpoint(tmp_path / "mf.pt", net)
    with pytest.raises(InputError, match="needs an MRI"):
        api.infer_subject(ckpt, subjects["basic"]["ld_pet"], tmp_path / "p.nii.gz", None, **FAST)
    assert not (tmp_path / "p.nii.gz").exists()


def test_inferer_shared_noise_and_seeds():
    net = build_network(TINY_M2DIFF).eval()
    ld = torch.rand(1, 1, CUBE, CUBE).expand(3, 1, CUBE, CUBE).contiguous()
    shared = DiffusionSamplerInferer({"timesteps": 50}, steps=2, shared_noise=True, seed=3)
    out = shared(ld, net)
    assert out.shape == ld.shape
    torch.testing.assert_close(out[0], out[2])  # same input, same noise path
    independent = DiffusionSamplerInferer({"timesteps": 50}, steps=2, seed=3)
    first = independent(ld, net)
    assert not torch.allclose(first[0], first[2])
    independent.reseed(3)
    torch.testing.assert_close(independent(ld, net), first)  # reproducible per draw


@pytest.mark.parametrize(
    "sampler,steps,start_step",
    [("ddim", 10, None), ("ddim", None, None), ("ancestral", None, None), ("ddim", 10, 200), ("ancestral", 50, 200)],
)
def test_inferer_eps_path_with_an_oracle_recovers_the_target(sampler, steps, start_step):
    """The ε parameterisation end to end (MFdiff's path): a network returning the exact ε of a known x_0 makes every
    sampler land on x_0; a failing ε-model is then a training matter, not a sampling bug."""
    from m2diff_monai.diffusion import build_diffusion

    diffusion_config = {"model_mean_type": "eps", "timesteps": 1000}
    alphas_cumprod = torch.tensor(build_diffusion(diffusion_config).alphas_cumprod, dtype=torch.float32)
    target = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))

    class EpsOracle(nn.Module):
        is_diffusion = True

        def forward(self, x_t, t, ld=None, mri=None, mri_available=None):
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            return {"out": (x_t - a.sqrt() * target) / (1 - a).sqrt()}

    ld = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(10))
    inferer = DiffusionSamplerInferer(diffusion_config, sampler=sampler, steps=steps, start_step=start_step)
    out = inferer(ld, EpsOracle(), mri=torch.zeros_like(ld))
    torch.testing.assert_close(out, target, atol=2e-4, rtol=0)


def test_inferer_truncated_start_begins_at_t0_from_the_noised_ld():
    class Recorder(nn.Module):
        is_diffusion = True

        def __init__(self):
            super().__init__()
            self.calls: list[tuple[int, torch.Tensor]] = []

        def forward(self, x_t, t, ld=None, mri=None, mri_available=None):
            self.calls.append((int(t[0]), x_t.clone()))
            return {"out": torch.zeros_like(x_t)}

    ld = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(123))  # not the sampler's seed 0
    net = Recorder()
    DiffusionSamplerInferer({"model_mean_type": "eps"}, steps=5, start_step=200)(ld, net)
    assert [t for t, _ in net.calls] == [200, 150, 100, 50, 0]
    first = net.calls[0][1]
    correlation = torch.corrcoef(torch.stack([first.flatten(), ld.flatten()]))[0, 1]
    assert correlation > 0.25  # √ᾱ_200·σ_LD ≈ 0.23 against √(1−ᾱ_200) ≈ 0.59 of noise: ≈ 0.37; pure noise: ≈ 0
    pure = Recorder()
    DiffusionSamplerInferer({"model_mean_type": "eps"}, steps=5)(ld, pure)
    assert pure.calls[0][0] == 999
    assert abs(torch.corrcoef(torch.stack([pure.calls[0][1].flatten(), ld.flatten()]))[0, 1]) < 0.2
    with pytest.raises(ValueError, match="start_step"):
        DiffusionSamplerInferer({"timesteps": 50}, steps=5, start_step=50)
    with pytest.raises(ValueError, match="exceeds"):
        DiffusionSamplerInferer({"timesteps": 50}, steps=30, start_step=20)
    assert api.InferenceSettings(start_step="none").start_step is None
    assert api.InferenceSettings(start_step="400").start_step == 400
    with pytest.raises(ValueError, match="start step"):
        api.InferenceSettings(start_step=0)
    flags = api.InferenceSettings(progress="false", png="True", no_mri="0", use_ema=1)  # as the bundle CLI passes them
    assert (flags.progress, flags.png, flags.no_mri, flags.use_ema) == (False, True, False, True)
    with pytest.raises(ValueError, match="progress must be true or false"):
        api.InferenceSettings(progress="maybe")


# ------------------------------------------------------------------------------------------- cohort mode
def test_manifest_cohort_maps_preprocessed_cubes_back_to_the_sources(tmp_path):
    from preprocessing.pipeline import PipelineOptions, run_pipeline

    raw = tmp_path / "raw"
    rows = [write_subject(raw, "c01", seed=1, flip_lps=True), write_subject(raw, "c02", seed=2, with_mri=False)]
    for row in rows:
        row["split"] = "test"
    table = write_table(raw / "subjects.csv", rows)
    manifest = tmp_path / "manifests" / "tiny.json"
    options = PipelineOptions(transform="rigid", size=CUBE, split=(0.0, 0.0, 1.0))
    run_pipeline(table, tmp_path / "prep", manifest, options)
    out_dir = tmp_path / "preds"
    summary = api.infer_manifest(
        identity_checkpoint(tmp_path / "id.pt"), manifest, out_dir, split="test", fusion="mean", **{**FAST, "png": True}
    )
    assert [s["subject"] for s in summary["subjects"]] == ["c01", "c02"]
    assert [s["mri_used"] for s in summary["subjects"]] == [True, False]
    listed = json.loads((out_dir / "predictions.json").read_text())
    assert len(listed["subjects"]) == 2
    # what ran is recorded: the resolved precision and torch's thread count
    assert listed["settings"]["threads"] == torch.get_num_threads()
    assert listed["settings"]["precision"] in ("fp32", "bf16")
    for row in rows:
        source = nib.load(raw / row["ld_pet"])
        pred = nib.load(out_dir / f"{row['subject_id']}.nii.gz")
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-6)
        assert (out_dir / f"{row['subject_id']}.png").is_file()
        # the pipeline's mask came from the SD PET: compare where the prediction is defined
        values, ld = np.asarray(pred.dataobj), np.asarray(source.dataobj, dtype=np.float32)
        defined = values != 0
        assert defined.sum() > 0.3 * values.size
        np.testing.assert_allclose(values[defined], ld[defined], rtol=1e-5, atol=1e-3)
    with pytest.raises(InputError, match="no 'val' volumes"):
        api.infer_manifest(identity_checkpoint(tmp_path / "id.pt"), manifest, out_dir, split="val", **FAST)


def test_raw_input_is_prepared_exactly_as_the_training_pipeline_prepared_it(tmp_path):
    """One implementation of mask → normalization → crop (preprocessing.cubes): an LD-only subject run through
    m2diff-preprocess and through inference's prepare_subject gives the same cube, mask, crop box and scaling."""
    from preprocessing.pipeline import PipelineOptions, run_pipeline

    raw = tmp_path / "raw"
    row = write_subject(raw, "e01", seed=4, flip_lps=True, with_mri=False)
    row.update(sd_pet="", split="test")
    manifest = tmp_path / "manifests" / "ld_only.json"
    run_pipeline(
        write_table(raw / "subjects.csv", [row]),
        tmp_path / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=CUBE, split=(0.0, 0.0, 1.0)),
    )
    content = json.loads(manifest.read_text())
    trained = prepare_from_manifest_item(content["volumes"][0], manifest.parent)
    raw_input = prepare_subject(raw / row["ld_pet"], None, TrainingPreprocessing(size=CUBE, transform="rigid"), "e01")
    assert raw_input.box == trained.box
    np.testing.assert_array_equal(raw_input.mask, trained.mask)
    assert raw_input.scaling.scale == pytest.approx(trained.scaling.scale, rel=1e-6)
    np.testing.assert_allclose(raw_input.ld, trained.ld, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(raw_input.cube_affine, trained.cube_affine, atol=1e-6)


def test_bundle_defaults_are_literal_settings():
    root = Path(__file__).resolve().parents[1]
    for name in ("m2diff", "mfdiff"):
        defaults = api.bundle_defaults(root / "bundles" / name)
        assert defaults["sampler"] == "ddim" and defaults["steps"] == 50 and "checkpoint" not in defaults
        assert api.resolve_settings(root / "bundles" / name, steps="all").steps is None
