"""Stages 3–8 one by one: mask, normalization, crop/pad, slices, split, manifest (+ schema)."""

import json
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from nibabel.processing import resample_from_to
from nilearn import datasets
from scipy import ndimage

from m2diff_monai.data import manifest as manifest_owner
from m2diff_monai.errors import InputError
from preprocessing import crop, manifest, normalization, slices, split
from preprocessing.mask import bounding_box, brain_mask, dice


# ---------------------------------------------------------------------------------------------------- mask
def _mni_pet(noise: float = 0.0, seed: int = 0):
    gm = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2)
    pet = 1.0 * gm.get_fdata() + 0.3 * wm.get_fdata()
    pet = ndimage.gaussian_filter(pet, 6.0 / 2.3548 / 2.0) * 1000.0
    if noise:
        pet = np.clip(pet + noise * pet.max() * np.random.default_rng(seed).standard_normal(pet.shape), 0, None)
    return pet.astype(np.float32), gm.affine


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_brain_mask_matches_mni_brain_mask(noise):
    pet, _ = _mni_pet(noise)
    reference = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj) > 0
    mask = brain_mask(pet, (2.0, 2.0, 2.0))
    assert dice(mask, reference) > 0.85
    labels, count = ndimage.label(mask)
    assert count == 1  # one connected brain
    assert np.array_equal(ndimage.binary_fill_holes(mask), mask)  # no enclosed holes


def test_brain_mask_combine_modes_and_bbox():
    pet, _ = _mni_pet()
    mri = np.asarray(datasets.load_mni152_template(resolution=2).dataobj, dtype=np.float32)
    pet_only = brain_mask(pet, (2.0,) * 3)
    inter = brain_mask(pet, (2.0,) * 3, mri=mri, combine="intersection")
    union = brain_mask(pet, (2.0,) * 3, mri=mri, combine="union")
    assert inter.sum() <= pet_only.sum() <= union.sum()
    assert np.all(inter <= pet_only) and np.all(pet_only <= union)
    box = bounding_box(pet_only)
    for axis, (lo, hi) in enumerate(box):
        other = tuple(a for a in range(3) if a != axis)
        present = pet_only.any(axis=other)
        assert present[lo] and present[hi] and not present[:lo].any() and not present[hi + 1 :].any()
    with pytest.raises(ValueError):
        brain_mask(pet, (2.0,) * 3, combine="xor")


# ---------------------------------------------------------------------------------------------------- normalization
def test_shared_normalization_formula_and_round_trip():
    rng = np.random.default_rng(0)
    ld = rng.gamma(2.0, 500.0, size=(20, 20, 20)).astype(np.float32)
    sd = (ld * 0.9 + 10).astype(np.float32)
    mask = np.zeros(ld.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    ld_s, sd_s = normalization.pet_scalings("shared", ld, sd, mask)
    assert ld_s is sd_s or ld_s == sd_s  # one scale for LD and SD
    assert ld_s.offset == 0.0
    assert ld_s.scale == pytest.approx(float(np.percentile(ld[mask], 99.5)), rel=1e-6)
    norm = ld_s.apply(ld)
    assert norm.dtype == np.float32
    assert np.mean(norm[mask] <= 1.0) == pytest.approx(0.995, abs=0.002)  # not clipped: ~0.5 % above 1
    np.testing.assert_allclose(ld_s.invert(norm), ld, rtol=1e-6, atol=1e-3)  # original = norm*scale + offset
    np.testing.assert_allclose(norm * ld_s.scale + ld_s.offset, ld, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(sd_s.apply(sd), sd / ld_s.scale, rtol=1e-6)


def test_volume_normalization_is_per_volume_minmax():
    rng = np.random.default_rng(1)
    ld = rng.normal(100, 30, (10, 10, 10)).astype(np.float32)
    sd = rng.normal(500, 50, (10, 10, 10)).astype(np.float32)
    ld_s, sd_s = normalization.pet_scalings("volume", ld, sd, np.ones(ld.shape, bool))
    for vol, s in ((ld, ld_s), (sd, sd_s)):
        n = s.apply(vol)
        assert n.min() == pytest.approx(0.0, abs=1e-6) and n.max() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(n * s.scale + s.offset, vol, rtol=1e-5, atol=1e-3)
    assert ld_s.offset == pytest.approx(float(ld.min()))
    for unknown in ("zscore", "paper"):  # the retired name is read only from old records (recorded_method)
        with pytest.raises(ValueError):
            normalization.pet_scalings(unknown, ld, sd, None)


def test_mri_normalization_robust_and_clipped():
    rng = np.random.default_rng(2)
    mri = rng.normal(300, 60, (30, 30, 30)).astype(np.float32)
    mask = np.ones(mri.shape, bool)
    s = normalization.mri_scaling(mri, mask)
    lo, hi = np.percentile(mri, (0.5, 99.5))
    assert s.offset == pytest.approx(lo, rel=1e-5) and s.scale == pytest.approx(hi - lo, rel=1e-5)
    n = normalization.normalize_mri(mri, s)
    assert n.min() == 0.0 and n.max() == 1.0
    assert np.mean(n == 1.0) == pytest.approx(0.005, abs=0.002)


# ---------------------------------------------------------------------------------------------------- crop
def _oblique_affine():
    a = np.eye(4)
    a[:3, :3] = np.diag([2.0, 2.5, 3.0])
    a[:3, 3] = (-40.0, -55.0, 17.0)
    return a


@pytest.mark.parametrize("shape,size", [((40, 50, 30), 64), ((90, 70, 80), 48)])  # pad / crop
def test_crop_pad_keeps_world_coordinates_and_round_trips_exactly(shape, size):
    rng = np.random.default_rng(3)
    data = rng.random(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[10:30, 12:40, 5:25] = True
    affine = _oblique_affine()
    box = crop.crop_box(mask, size)
    cube = crop.crop_or_pad(data, box)
    cube_affine = crop.cropped_affine(affine, box)
    assert cube.shape == (size,) * 3
    # the brain is inside and centred (bounding-box centre within half a voxel of the cube centre)
    assert crop.crop_or_pad(mask, box).sum() == mask.sum()
    (x0, x1), _, _ = bounding_box(mask)
    assert abs((x0 + x1) / 2 - box.start[0] - (size - 1) / 2) <= 0.5
    # world coordinates: cube voxel v is source voxel v + start
    v = np.array([3, 7, 11, 1.0])
    np.testing.assert_allclose(cube_affine @ v, affine @ (v + np.r_[box.start, 0]))
    # exact placement back, and exact resampling back to the source grid by affines
    back = crop.uncrop(cube, box, shape)
    inside = crop.uncrop(np.ones_like(cube, dtype=bool), box, shape, fill=False)
    np.testing.assert_array_equal(back[inside], data[inside])
    assert np.all(back[~inside] == 0)
    resampled = resample_from_to(nib.Nifti1Image(cube, cube_affine), (shape, affine), order=1).get_fdata()
    np.testing.assert_allclose(resampled[inside], data[inside], atol=1e-5)
    assert np.all(np.abs(resampled[~inside]) < 1e-6)


def test_crop_rejects_too_large_brain_and_bad_sizes():
    mask = np.zeros((80, 80, 80), bool)
    mask[5:75, 10:20, 10:20] = True
    with pytest.raises(InputError, match=r"sub-7.*larger --size \(e\.g\. 80\)"):
        crop.crop_box(mask, 64, subject="sub-7")
    with pytest.raises(InputError, match="empty brain mask"):
        crop.crop_box(np.zeros((8, 8, 8), bool), 16, subject="s")
    for bad in (100, 0, -16, 250):
        with pytest.raises(ValueError, match="multiple of 16"):
            crop.validate_size(bad)
    assert crop.validate_size(128) == 128


# ---------------------------------------------------------------------------------------------------- slices
def test_slice_selection_all_and_n(tmp_path):
    mask = np.zeros((32, 32, 32), bool)
    mask[8:20, 4:30, 10:27] = True  # axial extent 10..26 (17 slices)
    assert slices.select_slices(mask, "axial", None) == list(range(10, 27))
    assert slices.select_slices(mask, "sagittal", None) == list(range(8, 20))
    five = slices.select_slices(mask, "axial", 5)
    assert len(five) == 5 and five[0] == 10 and five[-1] == 26 and five == sorted(set(five))
    np.testing.assert_allclose(np.diff(five), 4, atol=1)  # uniform across the extent
    assert slices.select_slices(mask, "coronal", 1000) == list(range(4, 30))  # N > available: all
    assert slices.parse_slices_per_subject("all") is None and slices.parse_slices_per_subject("7") == 7
    with pytest.raises(ValueError):
        slices.parse_slices_per_subject("0")
    vol = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    written = slices.write_slices(tmp_path, {"ld_pet": vol}, {"coronal": [4, 9]})
    assert written == {"coronal": {"ld_pet": ["slices/coronal/ld_pet_004.npy", "slices/coronal/ld_pet_009.npy"]}}
    arr = np.load(tmp_path / "slices/coronal/ld_pet_009.npy")
    assert arr.shape == (1, 32, 32) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0], vol[:, 9, :])


# ---------------------------------------------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_complete():
    ids = [f"s{i:02d}" for i in range(20)]
    a = split.assign_splits(ids, ratios=(0.8, 0.1, 0.1), seed=0)
    b = split.assign_splits(list(reversed(ids)), ratios=(0.8, 0.1, 0.1), seed=0)
    assert a == b  # independent of table order
    assert set(a) == set(ids)
    counts = {s: sum(v == s for v in a.values()) for s in split.SPLITS}
    assert counts == {"train": 16, "val": 2, "test": 2}
    assert split.assign_splits(ids, ratios=(0.8, 0.1, 0.1), seed=1) != a


def test_split_tiny_cohorts_explicit_and_targetless():
    assert sorted(split.assign_splits(["a", "b", "c"]).values()) == ["test", "train", "val"]
    assert list(split.assign_splits(["a"]).values()) == ["train"]
    res = split.assign_splits(
        ["a", "b", "c", "d", "e"], explicit={"a": "test", "b": None}, has_target={"e": False}, seed=3
    )
    assert res["a"] == "test" and res["e"] == "test"
    assert sorted(res[s] for s in "bcd") == ["test", "train", "val"]
    assert split.parse_ratios("8,1,1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("0.8,0.2", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError):
            split.parse_ratios(bad)


# ---------------------------------------------------------------------------------------------------- manifest
def _fake_subject(root: Path, sid: str, with_sd: bool, with_mri: bool) -> tuple[dict, Path]:
    folder = root / "subjects" / sid
    files = {
        "ld_pet": "ld_pet.nii.gz",
        "brain_mask": "brain_mask.nii.gz",
        "regions": {"lesion": "regions/lesion.nii.gz"},
    }
    mods = ["ld_pet"] + (["sd_pet"] if with_sd else []) + (["mri"] if with_mri else [])
    if with_sd:
        files["sd_pet"] = "sd_pet.nii.gz"
    if with_mri:
        files["mri"] = "mri.nii.gz"
    for rel in [files[m] for m in mods] + ["brain_mask.nii.gz", "regions/lesion.nii.gz", "subject.json"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("x")
    slice_files = {}
    for m in mods:
        slice_files[m] = []
        for k in (3, 5):
            rel = f"slices/axial/{m}_{k:03d}.npy"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / rel, np.zeros((1, 16, 16), np.float32))
            slice_files[m].append(rel)
    record = {
        "subject": sid, "space": "pet", "files": files, "drf": 4.0,
        "slices": {"axial": {"indices": [3, 5], "files": slice_files}},
        "normalization": {"scale": 123.5, "offset": 0.0},
        "source": {"ld_pet": str(root / "raw" / f"{sid}_ld.nii.gz"), "sd_pet": None, "mri": None},
    }  # fmt: skip
    return record, folder


def test_manifest_loads_with_monai_and_validates(tmp_path):
    entries = []
    for sid, split_name, sd, mri in (("a", "train", True, True), ("b", "val", True, False), ("c", "test", False, True)):
        record, folder = _fake_subject(tmp_path / "out", sid, sd, mri)
        entries.append((record, folder, split_name))
    path = tmp_path / "manifests" / "demo.json"
    prov = manifest.provenance({"orientations": ["axial"], "size": 16, "space": "pet"}, notes="simulated PET")
    m = manifest.build_manifest("demo", entries, path, prov)
    manifest.write_manifest(path, m)
    stored = json.loads(path.read_text())
    assert stored["provenance"]["notes"] == "simulated PET" and stored["provenance"]["version"]
    for key, n in (("training", 2), ("validation", 2), ("test", 2), ("volumes", 3)):
        items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=key)
        assert len(items) == n
        for item in items:
            assert Path(item["ld_pet"]).is_file()  # relative paths resolve against the manifest folder
    train = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key="training")[0]
    assert set(train) >= {"ld_pet", "sd_pet", "mri", "mri_available", "subject", "orientation", "slice"}
    assert train["mri_available"] == 1 and Path(train["mri"]).is_file()
    val = stored["validation"][0]
    assert val["mri"] == "" and val["mri_available"] == 0
    assert stored["test"][0]["sd_pet"] == ""
    vol = {v["subject"]: v for v in stored["volumes"]}
    assert vol["c"]["split"] == "test" and vol["c"]["sd_pet"] == "" and vol["a"]["scale"] == 123.5
    assert vol["a"]["regions"] == {"lesion": "../out/subjects/a/regions/lesion.nii.gz"}
    assert vol["a"]["source_ld_pet"] == "../out/raw/a_ld.nii.gz"
    for v in stored["volumes"]:
        for key in ("ld_pet", "brain_mask", "preprocessed_dir"):
            assert not Path(v[key]).is_absolute() and (path.parent / v[key]).exists()


def test_schema_rejects_broken_manifests(tmp_path):
    schema = json.loads(manifest_owner.SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    record, folder = _fake_subject(tmp_path, "a", True, True)
    good = manifest.build_manifest(
        "x", [(record, folder, "train")], tmp_path / "x.json", manifest.provenance({"orientations": ["axial"]})
    )
    manifest_owner.validate_manifest(good)
    broken = json.loads(json.dumps(good))
    del broken["volumes"][0]["scale"]
    with pytest.raises(InputError, match=r"volumes\[0\]: 'scale' is a required property"):
        manifest_owner.validate_manifest(broken)
    broken = json.loads(json.dumps(good))
    broken["training"][0]["ld_pet"] = "/abs/path.npy"
    with pytest.raises(InputError, match=r"training\[0\]\.ld_pet"):
        manifest_owner.validate_manifest(broken)
    broken = json.loads(json.dumps(good))
    broken["training"][0]["orientation"] = "transverse"
    with pytest.raises(InputError, match="bad.json"):
        manifest.write_manifest(tmp_path / "bad.json", broken)
    assert not (tmp_path / "bad.json").exists()


def test_rebase_keeps_paths_pointing_at_the_same_files(tmp_path):
    record, folder = _fake_subject(tmp_path / "out", "a", True, True)
    m = manifest.build_manifest(
        "x", [(record, folder, "train")], tmp_path / "m1" / "x.json", manifest.provenance({"orientations": ["axial"]})
    )
    moved = manifest.rebase(m, tmp_path / "m1", tmp_path / "deeper" / "m2")
    for a, b in zip(m["training"] + m["volumes"], moved["training"] + moved["volumes"], strict=True):
        for key in ("ld_pet", "mri", "brain_mask"):
            if key in a and a[key]:
                assert (tmp_path / "m1" / a[key]).resolve() == (tmp_path / "deeper" / "m2" / b[key]).resolve()
