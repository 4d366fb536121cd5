"""The demo cohort: phantom anatomy and pathology, warps, misalignment, raw cohort files, the demo command."""

from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from preprocessing.phantom import jacobian_determinant, load_anatomy, make_subject, random_displacement, warp
from preprocessing.simulation import ScannerParams

FAST_ARGS = ["--downsample", "2", "--iterations", "1", "--subsets", "7", "--transform", "rigid", "--workers", "1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2DIFF_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def anatomy():
    return load_anatomy(2, 2)  # MNI152 at 4 mm: seconds


def test_phantom_gm_wm_ratio_and_masks(anatomy):
    s = make_subject(anatomy, np.random.default_rng(0), "healthy")
    gm = warp(anatomy.gm, s.displacement)
    wm = warp(anatomy.wm, s.displacement)
    ratio = s.activity[gm > 0.9].mean() / s.activity[wm > 0.9].mean()
    assert 3.0 < ratio < 5.0  # GM ≈ 4 × WM (tissue level 3.6–4.4; pure-voxel partial volume lowers it a little)
    csf = warp(anatomy.csf, s.displacement) > 0.95
    assert s.activity[csf].mean() < 0.25 * s.activity[wm > 0.9].mean()  # CSF ≈ 0 (up to GM partial volume)
    assert set(s.masks) == {"gm", "wm"} and all(m.dtype == np.uint8 and m.any() for m in s.masks.values())


def test_pathology_in_pet_only(anatomy):
    healthy = make_subject(anatomy, np.random.default_rng(3), "healthy")
    sick = make_subject(anatomy, np.random.default_rng(3), "hypometabolism+lesions")
    assert {"hypometabolism", "lesion_hot", "lesion_cold"} <= set(sick.masks)
    hot, cold = sick.masks["lesion_hot"] > 0, sick.masks["lesion_cold"] > 0
    hypo = sick.masks["hypometabolism"] > 0
    assert hot.any() and cold.any() and hypo.any()
    assert sick.activity[hot].mean() > 1.5 * healthy.activity[hot].mean()
    assert sick.activity[cold].mean() < 0.5 * healthy.activity[cold].mean()
    assert sick.activity[hypo].mean() < 0.95 * healthy.activity[hypo].mean()
    outside = ~ndimage.binary_dilation(hot | cold | hypo, iterations=2)  # the lesions' soft edges
    np.testing.assert_allclose(sick.activity[outside], healthy.activity[outside], rtol=0.35)
    np.testing.assert_array_equal(sick.t1, healthy.t1)  # the MRI does not show the pathology
    np.testing.assert_array_equal(sick.displacement, healthy.displacement)


def test_subjects_differ_and_warps_are_invertible(anatomy):
    a = make_subject(anatomy, np.random.default_rng(10), "healthy")
    b = make_subject(anatomy, np.random.default_rng(11), "healthy")
    brain = anatomy.brain > 0.5
    assert np.corrcoef(a.activity[brain], b.activity[brain])[0, 1] < 0.99
    assert np.abs(a.activity - b.activity)[brain].mean() > 0.1 * a.activity[brain].mean()
    assert not np.array_equal(a.t1, b.t1)
    for s in (a, b):
        assert s.info["jacobian_min"] > 0
        assert s.info["max_displacement_mm"] > 1.0  # a real deformation, not the identity
    for seed in range(3):
        disp = random_displacement(anatomy.shape, anatomy.spacing, np.random.default_rng(seed), 6.0)
        assert jacobian_determinant(disp).min() > 0


def test_t1_is_rigidly_misaligned_on_its_own_grid(anatomy):
    s = make_subject(anatomy, np.random.default_rng(4), "healthy")
    assert s.t1.shape != s.activity.shape or not np.allclose(s.t1_affine, s.affine)
    assert max(abs(a) for a in s.info["t1_rotation_deg"]) > 0.1
    assert np.linalg.norm(s.info["t1_translation_mm"]) > 0.5
    # Undoing the recorded rigid motion brings the T1 back onto the PET anatomy; ignoring it does not.
    rigid = np.array(s.info["t1_rigid_world"])
    reference = warp(anatomy.t1, s.displacement)  # the subject's T1 anatomy on the PET grid
    inside = warp(anatomy.brain, s.displacement) > 0.5

    def similarity(world_motion):
        m = np.linalg.inv(s.t1_affine) @ world_motion @ s.affine  # PET voxel → T1 voxel
        t1_on_pet = ndimage.affine_transform(s.t1, m[:3, :3], offset=m[:3, 3], output_shape=s.activity.shape,
                                             order=1)
        return np.corrcoef(t1_on_pet[inside], reference[inside])[0, 1]

    assert similarity(np.linalg.inv(rigid)) > 0.9
    assert similarity(np.linalg.inv(rigid)) > similarity(np.eye(4)) + 0.1


def test_raw_cohort_files_and_idempotent_rerun(tmp_path):
    from preprocessing.demo import DemoOptions, generate_raw_cohort
    from preprocessing.subjects import read_subjects

    options = DemoOptions(subjects=3, downsample=2, drf=20, scanner=ScannerParams(iterations=1, subsets=7))
    table, records = generate_raw_cohort(tmp_path / "raw", options, progress=False)
    rows = read_subjects(table)
    assert [r.split for r in rows] == ["train", "val", "test"]
    assert all(r.drf == 20 for r in rows)
    assert {"gm", "wm"} <= set(rows[0].masks) and "hypometabolism" in rows[1].masks
    assert {"lesion_hot", "lesion_cold"} <= set(rows[2].masks)
    for r in rows:
        ld, sd, mri = (nib.load(p) for p in (r.ld_pet, r.sd_pet, r.mri))
        assert ld.shape == sd.shape == nib.load(r.masks["gm"]).shape
        assert np.allclose(ld.affine, sd.affine) and not np.allclose(mri.affine, ld.affine)
        ld_data, sd_data = ld.get_fdata(), sd.get_fdata()
        brain = nib.load(r.masks["gm"]).get_fdata() > 0
        assert ld_data[brain].std() > sd_data[brain].std()  # low dose is noisier
        assert ld_data[brain].mean() == pytest.approx(sd_data[brain].mean(), rel=0.05)  # same units
    assert all(not r["reused"] for r in records)
    stamp = rows[0].ld_pet.stat().st_mtime_ns
    _, again = generate_raw_cohort(tmp_path / "raw", options, progress=False)
    assert all(r["reused"] for r in again) and rows[0].ld_pet.stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "raw" / "demo-001" / "subject.json").read_text())
    assert record["simulation"]["mode"] == "nested" and record["drf"] == 20


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    from monai.data import load_decathlon_datalist

    from preprocessing import demo

    manifest = tmp_path / "manifests" / "demo.json"
    parser = demo.configure(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path / "demo"), "--manifest", str(manifest), "--subjects", "3",
                              *FAST_ARGS])
    assert demo.main(args) == 0
    for key in ("training", "validation", "test"):
        items = load_decathlon_datalist(str(manifest), is_segmentation=False, data_list_key=key)
        assert items and all(np.load(i["ld_pet"]).shape == (1, 64, 64) for i in items[:3])
    volumes = load_decathlon_datalist(str(manifest), is_segmentation=False, data_list_key="volumes")
    by_split = {v["split"]: v for v in volumes}
    assert set(by_split) == {"train", "val", "test"}
    assert {"lesion_hot", "lesion_cold"} <= set(by_split["test"]["regions"])
    data = json.loads(manifest.read_text())
    assert "Simulated PET on real MNI152 anatomy" in json.dumps(data["provenance"])
