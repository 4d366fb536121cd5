"""Low-dose PET simulation: projector maths, count statistics, reconstruction quality, determinism, CLI."""

from __future__ import annotations

import argparse
import csv
import math

import nibabel as nib
import numpy as np
import pytest

from preprocessing.simulation import ScannerParams, draw_counts, simulate_image, simulate_volume
from preprocessing.simulation.forward_model import PlaneStackScanner
from preprocessing.simulation.projector import build_joseph_matrix, make_geometry, subset_operators
from preprocessing.simulation.recon import SinogramBlur, SubsetModel, make_ops

FAST = ScannerParams(iterations=2, subsets=6, disk_cache=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2DIFF_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def brain():
    """MNI152 anatomy at 4 mm: FDG-like activity (GM 4 × WM) and the brain mask."""
    from preprocessing.phantom_anatomy import load_anatomy

    a = load_anatomy(2, 2)
    activity = (a.gm * 4.0 + a.wm) * 2500.0
    return activity.astype(np.float32), a.spacing, (a.gm + a.wm) > 0.5


def _psnr(x, ref, mask):
    return 10 * math.log10(ref[mask].max() ** 2 / np.mean((x[mask] - ref[mask]) ** 2))


def test_adjoint_identity_of_subset_matrices_and_full_operator():
    geom = make_geometry(23, 19, 2.0, 2.5, n_angles=12)
    ops = subset_operators(geom, 4, disk_cache=False)
    rng = np.random.default_rng(0)
    nz = 3
    for k in range(ops.n_subsets):
        x = rng.random((geom.n_pixels, nz))
        y = rng.random((ops.forward[k].shape[0], nz))
        lhs, rhs = np.sum((ops.forward[k] @ x) * y), np.sum(x * (ops.adjoint[k] @ y))
        assert lhs == pytest.approx(rhs, rel=1e-12)
    # the whole system model: attenuation/scale weights, sinogram PSF blur along bins and planes, projector
    weights = rng.random((geom.n_angles, geom.n_bins, nz)).astype(np.float32) + 0.5
    for backend in ("numpy", "torch"):
        model = SubsetModel(make_ops(ops, SinogramBlur(1.3, 0.8), backend, "cpu"), weights, np.zeros_like(weights))
        arith = model.arith
        for k in range(ops.n_subsets):
            x = rng.random((geom.n_pixels, nz)).astype(np.float32)
            y = rng.random((ops.forward[k].shape[0], nz)).astype(np.float32)
            fx = arith.to_numpy(model.expected(k, arith.asarray(x))).astype(np.float64)
            aty = arith.to_numpy(model.adjoint(k, arith.asarray(y))).astype(np.float64)
            assert np.sum(fx * y) == pytest.approx(np.sum(x * aty), rel=1e-5)


def test_torch_backend_matches_numpy():
    geom = make_geometry(20, 20, 2.0, 2.0, n_angles=8)
    ops = subset_operators(geom, 2, disk_cache=False)
    x = np.random.default_rng(1).random((geom.n_pixels, 4)).astype(np.float32)
    outs = []
    for backend in ("numpy", "torch"):
        a = make_ops(ops, SinogramBlur(1.0, 1.0), backend, "cpu")
        outs.append(a.to_numpy(a.blur(a.project(1, a.asarray(x)), 4)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_uniform_disk_projects_to_analytic_chord_lengths():
    d, n, radius = 2.0, 64, 40.0
    geom = make_geometry(n, n, d, d, n_angles=30)
    centres = (np.arange(n) - (n - 1) / 2) * d
    disk = (centres[:, None] ** 2 + centres[None, :] ** 2 <= radius**2).astype(np.float32)
    proj = (build_joseph_matrix(geom) @ disk.ravel()).reshape(geom.n_angles, geom.n_bins)
    s = geom.bin_centres()
    chord = 2 * np.sqrt(np.clip(radius**2 - s**2, 0, None))
    inner = np.abs(s) < 0.9 * radius
    err = np.abs(proj[:, inner] - chord[inner]) / chord.max()
    assert err.mean() < 0.02 and err.max() < 0.06
    assert np.all(proj[:, np.abs(s) > radius + 2 * d] == 0)


def test_counts_scale_with_one_over_drf_and_thinning_is_nested():
    expected = np.random.default_rng(2).random((30, 40, 5)) * 50.0
    rng = np.random.default_rng(3)
    y_sd, y_ld = draw_counts(expected, 10.0, "nested", rng)
    assert np.all(y_ld <= y_sd)
    total = expected.sum()
    assert y_sd.sum() == pytest.approx(total, abs=5 * math.sqrt(total))
    assert y_ld.sum() == pytest.approx(total / 10, abs=5 * math.sqrt(total / 10))
    _, y_ind = draw_counts(expected, 10.0, "independent", np.random.default_rng(4), want_sd=False)
    assert y_ind.sum() == pytest.approx(total / 10, abs=5 * math.sqrt(total / 10))


def test_expected_counts_match_requested_level(brain):
    activity, spacing, _ = brain
    params = ScannerParams(
        counts=1e7, scatter_fraction=0.3, randoms_fraction=0.2, iterations=1, subsets=4, disk_cache=False
    )
    mu = np.where(activity > 0, 0.0096, 0.0).astype(np.float32)
    scanner = PlaneStackScanner(activity, spacing, mu, params)
    assert scanner.true_counts == pytest.approx(1e7, rel=1e-4)
    prompts = scanner.expected.sum(dtype=np.float64)
    randoms = prompts - scanner.true_counts / (1 - 0.3)
    assert randoms / prompts == pytest.approx(0.2, rel=1e-3)


def test_psnr_falls_monotonically_with_drf_and_brain_mean_is_preserved(brain):
    activity, spacing, mask = brain
    results = {
        drf: simulate_volume(activity, spacing, drf, seed=5, mode="nested", params=FAST, calibration_mask=mask)
        for drf in (2, 10, 50)
    }
    nf = results[2].noise_free
    psnr_nf = [_psnr(results[d].ld, nf, mask) for d in (2, 10, 50)]
    psnr_truth = [_psnr(results[d].ld, activity, mask) for d in (2, 10, 50)]
    assert psnr_nf[0] > psnr_nf[1] > psnr_nf[2]
    assert psnr_truth[0] > psnr_truth[1] > psnr_truth[2]
    truth_mean = activity[mask].mean()
    # Stated tolerance: brain mean within 1 % (noise-free), 2 % (SD), 3 % (LD at DRF 10) of the input's.
    assert nf[mask].mean() == pytest.approx(truth_mean, rel=0.01)
    assert results[10].sd[mask].mean() == pytest.approx(truth_mean, rel=0.02)
    assert results[10].ld[mask].mean() == pytest.approx(truth_mean, rel=0.03)
    assert results[10].info["prompts_ld"] == pytest.approx(results[10].info["prompts_sd"] / 10, rel=0.02)


def test_same_seed_same_output_different_seed_differs(brain):
    activity, spacing, _ = brain
    a = simulate_volume(activity, spacing, 20, seed=7, params=FAST).ld
    b = simulate_volume(activity, spacing, 20, seed=7, params=FAST).ld
    c = simulate_volume(activity, spacing, 20, seed=8, params=FAST).ld
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError):
        simulate_volume(activity, spacing, 1.0, seed=7, params=FAST)


def test_simulate_image_keeps_grid_and_handles_orientation(brain):
    activity, spacing, _ = brain
    affine = np.diag([*spacing, 1.0])
    ras = nib.Nifti1Image(activity, affine)
    # the same data stored flipped in x and with axes permuted (z, y, x): identical anatomy, other voxel order
    las = np.flip(activity, axis=0).transpose(2, 1, 0)
    perm = np.array(
        [
            [0, 0, -spacing[0], (activity.shape[0] - 1) * spacing[0]],
            [0, spacing[1], 0, 0],
            [spacing[2], 0, 0, 0],
            [0, 0, 0, 1.0],
        ]
    )
    other = nib.Nifti1Image(np.ascontiguousarray(las), perm)
    ld_ras, _, _ = simulate_image(ras, 10, seed=1, params=FAST)
    ld_other, _, info = simulate_image(other, 10, seed=1, params=FAST)
    assert ld_other.shape == other.shape and np.allclose(ld_other.affine, other.affine)
    assert ld_other.get_data_dtype() == np.float32
    back = np.flip(np.asarray(ld_other.dataobj).transpose(2, 1, 0), axis=0)
    np.testing.assert_allclose(back, np.asarray(ld_ras.dataobj), rtol=1e-5, atol=1e-3)
    assert info["calibration_scale"] > 0


def _run_cli(argv):
    from preprocessing import simulate

    parser = simulate.configure(argparse.ArgumentParser())
    return simulate.main(parser.parse_args(argv))


def test_cli_single_image_and_subjects_table(tmp_path, brain, capsys):
    activity, spacing, _ = brain
    img = nib.Nifti1Image(activity, np.diag([*spacing, 1.0]))
    nib.save(img, tmp_path / "sd.nii.gz")
    fast = ["--iterations", "1", "--subsets", "4"]
    assert (
        _run_cli(["--sd-pet", str(tmp_path / "sd.nii.gz"), "--drf", "20", "--out", str(tmp_path / "ld.nii.gz"), *fast])
        == 0
    )
    ld = nib.load(tmp_path / "ld.nii.gz")
    assert ld.shape == img.shape and np.allclose(ld.affine, img.affine)
    assert (tmp_path / "ld.json").exists()
    assert _run_cli(["--sd-pet", str(tmp_path / "sd.nii.gz"), "--drf", "1", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "dose reduction factor" in capsys.readouterr().err
    assert _run_cli(["--sd-pet", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err

    (tmp_path / "in").mkdir()
    nib.save(img, tmp_path / "in" / "a_sd.nii.gz")
    nib.save(img, tmp_path / "in" / "b_sd.nii.gz")
    (tmp_path / "in" / "subjects.csv").write_text(
        "subject_id,ld_pet,sd_pet,mri,drf,mask_brain\na,,a_sd.nii.gz,,4,a_sd.nii.gz\nb,b_sd.nii.gz,b_sd.nii.gz,,,\n"
    )
    out = tmp_path / "out"
    assert _run_cli(["--subjects", str(tmp_path / "in" / "subjects.csv"), "--out", str(out), *fast]) == 0
    with open(out / "subjects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["ld_pet"] == "a/ld_pet.nii.gz" and rows[0]["drf"] == "4"
    assert (out / rows[0]["sd_pet"]).resolve() == (tmp_path / "in" / "a_sd.nii.gz").resolve()
    assert (out / rows[0]["mask_brain"]).exists()
    assert (out / rows[1]["ld_pet"]).resolve() == (tmp_path / "in" / "b_sd.nii.gz").resolve()
    stamp = (out / "a" / "ld_pet.nii.gz").stat().st_mtime_ns
    assert _run_cli(["--subjects", str(tmp_path / "in" / "subjects.csv"), "--out", str(out), *fast]) == 0
    assert (out / "a" / "ld_pet.nii.gz").stat().st_mtime_ns == stamp  # rerun skips finished subjects
