"""The demo cohort: phantom anatomy and pathology, warps, misalignment, raw cohort files, the demo command."""

from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from preprocessing.phantom import make_subject
from preprocessing.phantom_anatomy import HELDOUT_VARIATION, load_anatomy
from preprocessing.phantom_warps import jacobian_determinant, random_displacement, warp
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
        t1_on_pet = ndimage.affine_transform(s.t1, m[:3, :3], offset=m[:3, 3], output_shape=s.activity.shape, order=1)
        return np.corrcoef(t1_on_pet[inside], reference[inside])[0, 1]

    assert similarity(np.linalg.inv(rigid)) > 0.9
    assert similarity(np.linalg.inv(rigid)) > similarity(np.eye(4)) + 0.1


def test_raw_cohort_files_and_idempotent_rerun(tmp_path):
    from preprocessing.demo import DemoOptions, generate_raw_cohort
    from preprocessing.subjects import read_subjects

    options = DemoOptions(subjects=3, downsample=2, drf=20, scanner=ScannerParams(iterations=1, subsets=7), heldout=0)
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


def _world_to_t1(s, mask_on_pet: np.ndarray) -> np.ndarray:
    """A PET-grid mask carried onto the subject's T1 grid through the recorded rigid misplacement."""
    rigid = np.array(s.info["t1_rigid_world"])
    m = np.linalg.inv(s.affine) @ rigid @ s.t1_affine  # T1 voxel → PET voxel
    return (
        ndimage.affine_transform(
            mask_on_pet.astype(np.float32), m[:3, :3], offset=m[:3, 3], output_shape=s.t1.shape, order=0
        )
        > 0.5
    )


def test_head_t1_has_skull_scalp_neck_and_noise_outside_the_brain(anatomy):
    head = make_subject(anatomy, np.random.default_rng(5), "healthy")
    stripped = make_subject(anatomy, np.random.default_rng(5), "healthy", t1_style="stripped")
    np.testing.assert_array_equal(head.activity, stripped.activity)  # same subject, only the T1 differs
    brain = _world_to_t1(head, warp(anatomy.brain, head.displacement) > 0.5)
    wm = _world_to_t1(head, warp(anatomy.wm, head.displacement) > 0.9) & ~ndimage.binary_dilation(~brain, iterations=1)
    near = ndimage.binary_dilation(brain, iterations=6) & ~brain  # within about 24 mm of the brain
    wm_level = np.median(head.t1[wm])
    # Non-brain tissue around the brain: both dark (bone, CSF) and bright (fat, marrow) voxels, as on a scanner T1.
    assert np.mean(head.t1[near] > 0.8 * wm_level) > 0.05 and np.mean(head.t1[near] < 0.3 * wm_level) > 0.1
    # A neck below the brain: a large bright-ish region under the lowest brain voxel, absent from the stripped T1.
    lowest = np.argwhere(brain)[:, 2].min()
    below = head.t1[:, :, : max(lowest - 2, 1)]
    assert below.size and np.mean(below > 0.3 * wm_level) > 0.1
    # Rician noise floor in the air (magnitude image), while the stripped T1 is the template's zero background.
    air = ~ndimage.binary_dilation(head.t1 > 0.2 * wm_level, iterations=3)
    assert air.any() and 0 < np.median(head.t1[air]) < 0.1 * wm_level
    far = ~ndimage.binary_dilation(
        _world_to_t1(stripped, warp(anatomy.brain, stripped.displacement) > 0.5), iterations=4
    )
    assert np.abs(stripped.t1[far]).max() < 0.01 * stripped.t1.max()


def test_heldout_anatomy_is_outside_the_training_distribution(anatomy):
    rng_seeds = range(3)
    train = [make_subject(anatomy, np.random.default_rng(s), "healthy") for s in rng_seeds]
    held = [make_subject(anatomy, np.random.default_rng(s), "healthy", variation=HELDOUT_VARIATION) for s in rng_seeds]
    for t, h in zip(train, held, strict=True):
        assert {"ventricle_expansion", "atrophy", "asymmetry"} <= set(h.info)
        assert not {"ventricle_expansion", "atrophy", "asymmetry"} & set(t.info)
        assert h.info["jacobian_min"] > 0  # still invertible
        assert h.info["max_displacement_mm"] > t.info["max_displacement_mm"]

    # Enlarged ventricles: deep CSF volume grows; atrophy: less GM for the same warp family.
    def deep_csf(s):
        brain = warp(anatomy.brain, s.displacement) > 0.5
        csf = warp(anatomy.csf, s.displacement) > 0.5
        return (csf & (ndimage.distance_transform_edt(brain) * 4.0 > 15.0)).sum()

    assert np.mean([deep_csf(h) for h in held]) > 1.2 * np.mean([deep_csf(t) for t in train])
    gm_uptake = [h.activity[h.masks["gm"] > 0].sum() for h in held]
    assert all(np.isfinite(gm_uptake))


def test_heldout_subjects_are_test_only_and_in_no_training_item():
    from preprocessing.demo import HELDOUT_PREFIX, subject_plan

    plan = subject_plan(12, heldout=2)
    held = [p for p in plan if p[0].startswith(HELDOUT_PREFIX)]
    assert len(held) == 2 and all(split == "test" for _, _, split in held)
    assert all("lesions" in kind for _, kind, _ in held)
    # validation selects on lesions too: every validation and test subject carries them
    assert all("lesions" in kind for _, kind, split in plan if split in ("val", "test"))
    assert any(kind == "healthy" for _, kind, split in plan if split == "train")
    assert [p for p in plan if not p[0].startswith(HELDOUT_PREFIX)] == subject_plan(12)


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    from monai.data import load_decathlon_datalist

    from preprocessing import demo

    manifest = tmp_path / "manifests" / "demo.json"
    parser = demo.configure(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--out", str(tmp_path / "demo"), "--manifest", str(manifest), "--subjects", "3", "--heldout", "1", *FAST_ARGS]
    )
    assert demo.main(args) == 0
    for key in ("training", "validation", "test"):
        items = load_decathlon_datalist(str(manifest), is_segmentation=False, data_list_key=key)
        assert items and all(np.load(i["ld_pet"]).shape == (1, 64, 64) for i in items[:3])
    volumes = load_decathlon_datalist(str(manifest), is_segmentation=False, data_list_key="volumes")
    by_split = {v["split"]: v for v in volumes}
    assert set(by_split) == {"train", "val", "test"}
    assert {"lesion_hot", "lesion_cold"} <= set(by_split["test"]["regions"])
    # The held-out-anatomy subject is scored with the test split and is in no training or validation item.
    assert any(v["subject"].startswith("heldout-") and v["split"] == "test" for v in volumes)
    for key in ("training", "validation"):
        items = load_decathlon_datalist(str(manifest), is_segmentation=False, data_list_key=key)
        assert not any("heldout-" in json.dumps(i) for i in items)
    data = json.loads(manifest.read_text())
    assert "Simulated PET on real MNI152 anatomy" in json.dumps(data["provenance"])
