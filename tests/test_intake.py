"""Intake: every broken file is refused with a one-line reason; good files come out canonical and unchanged."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from badinputs import (
    MRI_SHAPE,
    MRI_VOXEL_MM,
    PET_SHAPE,
    PET_VOXEL_MM,
    centred_affine,
    make_bad_input_corpus,
    make_good_input_corpus,
    phantom,
    save,
    write_subject,
)
from m2diff_monai.errors import InputError
from preprocessing.intake import (
    Finding,
    IntakeOptions,
    check_overlap,
    load_subject,
    load_volume,
    validate_subjects,
)
from preprocessing.subjects import SubjectRow, read_subjects

AFFINE = centred_affine(PET_SHAPE, PET_VOXEL_MM)


@pytest.fixture()
def pet(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = phantom(PET_SHAPE, AFFINE, "pet", seed=3)
    return save(tmp_path / "pet.nii.gz", data, AFFINE), data


def _raises(path, fragment: str, role: str = "ld_pet", options: IntakeOptions = IntakeOptions()) -> InputError:
    with pytest.raises(InputError) as info:
        load_volume(path, "sub-01", role, options)
    err = info.value
    assert fragment in str(err), str(err)
    assert err.subject == "sub-01" and err.path == str(path)
    assert "\n" not in str(err)
    return err


def assert_same_world_content(source: np.ndarray, source_affine: np.ndarray, out: nib.Nifti1Image):
    """Every output voxel holds the source voxel that sits at the same world position."""
    idx_out = np.indices(out.shape).reshape(3, -1).astype(np.float64)
    world = out.affine[:3, :3] @ idx_out + out.affine[:3, 3:4]
    inv = np.linalg.inv(source_affine)
    idx_src = inv[:3, :3] @ world + inv[:3, 3:4]
    rounded = np.rint(idx_src)
    np.testing.assert_allclose(idx_src, rounded, atol=1e-6)  # a pure permutation/flip of voxels
    i, j, k = rounded.astype(int)
    np.testing.assert_array_equal(np.asarray(out.dataobj).reshape(-1), source[i, j, k])


# ----------------------------------------------------------------------------------------------- good inputs
def test_good_volume_is_float32_canonical_with_consistent_header(pet):
    path, data = pet
    warnings: list[str] = []
    img = load_volume(path, "sub-01", "ld_pet", warnings_out=warnings)
    assert warnings == []
    assert img.get_data_dtype() == np.float32 and np.asarray(img.dataobj).dtype == np.float32
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    qform, qcode = img.header.get_qform(coded=True)
    sform, scode = img.header.get_sform(coded=True)
    assert qcode > 0 and scode > 0
    np.testing.assert_allclose(qform, img.affine, atol=1e-5)
    np.testing.assert_allclose(sform, img.affine, atol=1e-5)


@pytest.mark.parametrize("kind", ["lps", "oblique", "las-permuted"])
def test_lps_oblique_and_permuted_inputs_keep_every_voxel_at_its_world_position(tmp_path, kind):
    if kind == "lps":
        affine = centred_affine(PET_SHAPE, PET_VOXEL_MM, flip_lps=True)
    elif kind == "oblique":
        affine = centred_affine(PET_SHAPE, PET_VOXEL_MM, rotation_deg=20.0)
    else:  # axes stored as (y, x, z) with x flipped
        affine = np.eye(4)
        affine[:3, :3] = np.array([[0, -2.0, 0], [1.5, 0, 0], [0, 0, 2.5]])
        affine[:3, 3] = (10.0, -30.0, -20.0)
    data = phantom(PET_SHAPE, affine, "pet", seed=4)
    img = load_volume(save(tmp_path / "x.nii.gz", data, affine), "s", "sd_pet")
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert_same_world_content(data, affine, img)
    # the brain's hot spot is at the same world position whatever the storage order
    hot_out = np.unravel_index(np.argmax(np.asarray(img.dataobj)), img.shape)
    hot_in = np.unravel_index(np.argmax(data), data.shape)
    np.testing.assert_allclose(
        nib.affines.apply_affine(img.affine, hot_out), nib.affines.apply_affine(affine, hot_in), atol=1e-6
    )


def test_mni152_template_loads_and_its_lps_copy_is_the_same_image(tmp_path):
    from nilearn.datasets import load_mni152_template

    mni = load_mni152_template(resolution=2)
    data = np.asarray(mni.dataobj)
    save(tmp_path / "mni.nii.gz", data, mni.affine)
    ras = load_volume(tmp_path / "mni.nii.gz", "mni", "mri")
    np.testing.assert_array_equal(np.asarray(ras.dataobj), data.astype(np.float32))
    np.testing.assert_allclose(ras.affine, mni.affine)

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # store as LPS: reverse i and j, same world positions
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    save(tmp_path / "mni_lps.nii.gz", data[::-1, ::-1, :], mni.affine @ flip)
    lps = load_volume(tmp_path / "mni_lps.nii.gz", "mni", "mri")
    np.testing.assert_allclose(lps.affine, ras.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(lps.dataobj), np.asarray(ras.dataobj))
    assert check_overlap(ras, lps, "mni", "a", "b") == 1.0


def test_trailing_singleton_dimension_is_a_3d_volume(tmp_path, pet):
    _, data = pet
    img = load_volume(save(tmp_path / "x.nii.gz", data[..., None], AFFINE), "s", "mri")
    assert img.shape == PET_SHAPE


def test_scaled_integer_data_is_read_in_physical_units(tmp_path):
    raw = (phantom(PET_SHAPE, AFFINE, "pet", seed=5)).astype(np.int16)
    nii = nib.Nifti1Image(raw, AFFINE)
    nii.header.set_slope_inter(0.5, 10.0)
    nib.save(nii, str(tmp_path / "x.nii.gz"))
    img = load_volume(tmp_path / "x.nii.gz", "s", "ld_pet")
    np.testing.assert_allclose(np.asarray(img.dataobj), raw * 0.5 + 10.0)


# ------------------------------------------------------------------------------------------------- 4D PET
@pytest.fixture()
def pet4d(tmp_path) -> tuple[Path, np.ndarray]:
    frames = np.stack([phantom(PET_SHAPE, AFFINE, "pet", seed=s) * (s + 1) for s in range(3)], axis=-1)
    return save(tmp_path / "dyn.nii.gz", frames, AFFINE), frames


def test_4d_pet_needs_a_frame_choice_and_frame_or_sum_work(pet4d):
    path, frames = pet4d
    err = _raises(path, "4D with 3 frames")
    assert "--frame N (0..2)" in str(err) and "--sum-frames" in str(err)
    one = load_volume(path, "s", "ld_pet", IntakeOptions(frame=1))
    np.testing.assert_array_equal(np.asarray(one.dataobj), frames[..., 1])
    total = load_volume(path, "s", "ld_pet", IntakeOptions(sum_frames=True))
    np.testing.assert_allclose(np.asarray(total.dataobj), frames.astype(np.float64).sum(axis=-1), rtol=1e-6)
    _raises(path, "--frame 3 is out of range: the file has 3 frames (0..2)", options=IntakeOptions(frame=3))


def test_only_pet_may_be_4d_and_5d_is_refused(tmp_path, pet4d):
    path, frames = pet4d
    _raises(path, "only PET may be 4D", role="mri", options=IntakeOptions(frame=0))
    five = save(tmp_path / "five.nii.gz", frames[..., None].repeat(2, axis=-1), AFFINE)
    _raises(five, "image has 5 dimensions", options=IntakeOptions(frame=0))


def test_intake_options_reject_contradictions():
    with pytest.raises(ValueError):
        IntakeOptions(frame=0, sum_frames=True)
    with pytest.raises(ValueError):
        IntakeOptions(qform_policy="ignore")
    with pytest.raises(ValueError):
        IntakeOptions(frame=-1)


# ---------------------------------------------------------------------------------------------- broken files
def test_truncated_gzip_and_plain_nifti(tmp_path, pet):
    path, data = pet
    raw = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    _raises(cut, "truncated")
    plain = save(tmp_path / "plain.nii", data, AFFINE)
    plain.write_bytes(plain.read_bytes()[:-100])  # only the last voxels are missing
    _raises(plain, "truncated")


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.nan, "3 of 13440 voxels are not finite (3 NaN, 0 Inf)"),
        (np.inf, "(0 NaN, 3 Inf)"),
        (-np.inf, "(0 NaN, 3 Inf)"),
    ],
)
def test_non_finite_voxels_are_counted(tmp_path, pet, bad, fragment):
    _, data = pet
    data = data.copy()
    data[1, 2, 3] = data[4, 5, 6] = data[20, 20, 10] = bad
    _raises(save(tmp_path / "x.nii.gz", data, AFFINE), fragment)


def test_file_level_problems(tmp_path, pet):
    path, data = pet
    _raises(tmp_path / "absent.nii.gz", "file does not exist")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _raises(tmp_path / "empty.nii.gz", "file is empty (0 bytes)")
    plain = save(tmp_path / "plain.nii", data, AFFINE)
    fake_gz = tmp_path / "fake.nii.gz"
    fake_gz.write_bytes(plain.read_bytes())
    _raises(fake_gz, "not gzip-compressed")
    gz_as_nii = tmp_path / "gz.nii"
    gz_as_nii.write_bytes(path.read_bytes())
    _raises(gz_as_nii, "gzip-compressed but named .nii")
    (tmp_path / "folder.nii.gz").mkdir()
    _raises(tmp_path / "folder.nii.gz", "not a file")
    _raises(_copy(path, tmp_path / "x.mgz"), "not a NIfTI file name")
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"\x00" * 400)
    _raises(garbage, "cannot read the NIfTI header")


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_content_problems(tmp_path):
    _raises(
        save(tmp_path / "zero.nii.gz", np.zeros(PET_SHAPE, np.float32), AFFINE), "image is empty (every voxel is 0)"
    )
    _raises(
        save(tmp_path / "const.nii.gz", np.full(PET_SHAPE, 7.5, np.float32), AFFINE),
        "image is constant (every voxel is 7.5)",
    )
    _raises(save(tmp_path / "slice.nii.gz", np.ones((24, 28, 1), np.float32), AFFINE), "not a 3D volume")


def test_negative_pet(tmp_path, pet):
    _, data = pet
    _raises(save(tmp_path / "neg.nii.gz", -data, AFFINE), "negative-dominated")
    noisy = data - 0.1 * data.max() * (np.indices(PET_SHAPE).sum(axis=0) % 2)  # many negative background voxels
    warnings: list[str] = []
    load_volume(save(tmp_path / "noisy.nii.gz", noisy, AFFINE), "s", "ld_pet", warnings_out=warnings)
    assert len(warnings) == 1 and "negative voxels hold" in warnings[0] and "subject s" in warnings[0]
    mri = load_volume(save(tmp_path / "mri.nii.gz", -data, AFFINE), "s", "mri")  # sign means nothing for MRI
    assert float(np.asarray(mri.dataobj).min()) < 0


def test_masks_must_be_binary(tmp_path):
    mask = np.zeros(PET_SHAPE, np.uint8)
    mask[5:10, 5:10, 5:10] = 1
    img = load_volume(save(tmp_path / "m.nii.gz", mask, AFFINE), "s", "mask")
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    _raises(save(tmp_path / "soft.nii.gz", mask * 0.5, AFFINE), "mask is not binary", role="mask")
    _raises(save(tmp_path / "none.nii.gz", mask * 0, AFFINE), "image is empty", role="mask")


# ----------------------------------------------------------------------------------------------- affines
def _save_sform_only(path: Path, data: np.ndarray, sform: np.ndarray) -> Path:
    """The qform cannot even hold a singular affine (nibabel refuses), so these headers carry only an sform."""
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(sform, code="scanner")
    nib.save(img, str(path))
    return path


def test_singular_and_non_finite_affines(tmp_path, pet):
    _, data = pet
    flat = AFFINE.copy()
    flat[:3, 2] = 0.0
    _raises(_save_sform_only(tmp_path / "flat.nii.gz", data, flat), "sform affine is singular")
    colinear = AFFINE.copy()
    colinear[:3, 1] = colinear[:3, 0]
    _raises(_save_sform_only(tmp_path / "colinear.nii.gz", data, colinear), "sform affine is singular")
    nan_affine = AFFINE.copy()
    nan_affine[0, 3] = np.nan
    _raises(_save_sform_only(tmp_path / "nan.nii.gz", data, nan_affine), "sform affine has non-finite entries")


def test_qform_differing_from_sform_warn_uses_sform_and_reject_refuses(tmp_path, pet):
    _, data = pet
    shifted = AFFINE.copy()
    shifted[:3, 3] += (3.0, 0.0, 0.0)
    path = save(tmp_path / "qs.nii.gz", data, AFFINE, qform=shifted)
    warnings: list[str] = []
    img = load_volume(path, "s", "ld_pet", IntakeOptions(qform_policy="warn"), warnings)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)  # the sform, as nibabel reads it
    np.testing.assert_allclose(img.header.get_qform(), AFFINE, atol=1e-5)  # and now the qform agrees
    assert len(warnings) == 1 and "qform and sform disagree" in warnings[0] and "3 mm" in warnings[0]
    _raises(path, "qform and sform disagree", options=IntakeOptions(qform_policy="reject"))
    # float32 rounding between the two forms is not a disagreement
    nearly = AFFINE.copy()
    nearly[:3, 3] += 1e-5
    assert (
        load_volume(
            save(tmp_path / "ok.nii.gz", data, AFFINE, qform=nearly),
            "s",
            "ld_pet",
            IntakeOptions(qform_policy="reject"),
        )
        is not None
    )


def test_qform_only_and_no_orientation(tmp_path, pet):
    _, data = pet
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(AFFINE, code="scanner")
    img.header.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "q.nii.gz"))
    warnings: list[str] = []
    out = load_volume(tmp_path / "q.nii.gz", "s", "ld_pet", warnings_out=warnings)
    np.testing.assert_allclose(out.affine, AFFINE, atol=1e-5)
    assert warnings == []
    bare = nib.Nifti1Image(data, None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    load_volume(tmp_path / "bare.nii.gz", "s", "ld_pet", warnings_out=warnings)
    assert len(warnings) == 1 and "orientation unknown" in warnings[0]


# ------------------------------------------------------------------------------------------- across files
def _cube(offset_x_mm: float) -> nib.Nifti1Image:
    affine = np.eye(4)
    affine[0, 3] = offset_x_mm
    return nib.Nifti1Image(np.ones((20, 20, 20), np.float32), affine)


def test_overlap_fraction_is_the_share_of_the_moving_object_inside_the_fixed_field_of_view():
    fixed = _cube(0.0)
    assert check_overlap(fixed, _cube(0.0), "s", "f", "m") == 1.0
    assert check_overlap(fixed, _cube(10.0), "s", "f", "m", min_fraction=0.4) == pytest.approx(0.5)
    with pytest.raises(InputError, match="PET and MRI do not overlap in world space") as info:
        check_overlap(fixed, _cube(10.0), "s", "f.nii", "m.nii", min_fraction=0.6)
    assert info.value.path == "m.nii" and "f.nii" in str(info.value)
    with pytest.raises(InputError, match="0.0% of this image's object"):
        check_overlap(fixed, _cube(300.0), "s", "f", "m")


def _row(folder: Path, cells: dict[str, str]) -> SubjectRow:
    def p(key):
        return folder / cells[key] if cells.get(key) else None

    masks = {k[len("mask_") :]: folder / v for k, v in cells.items() if k.startswith("mask_") and v}
    return SubjectRow(cells["subject_id"], p("ld_pet"), p("sd_pet"), p("mri"), None, None, masks)


def test_load_subject_good_and_mri_free(tmp_path):
    row = _row(tmp_path, write_subject(tmp_path, "s1", with_mask=True))
    loaded = load_subject(row)
    assert loaded.ld_pet.shape == loaded.sd_pet.shape == PET_SHAPE
    assert loaded.mri.shape == MRI_SHAPE and set(loaded.masks) == {"lesion"} and loaded.warnings == []
    free = load_subject(_row(tmp_path, write_subject(tmp_path, "s2", with_mri=False)))
    assert free.mri is None and free.ld_pet is not None


def test_load_subject_refuses_sd_off_the_ld_grid_and_masks_off_the_pet_grid(tmp_path):
    cells = write_subject(tmp_path, "s1", with_mask=True)
    row = _row(tmp_path, cells)
    sd = phantom(PET_SHAPE, AFFINE, "pet")
    moved = AFFINE.copy()
    moved[:3, 3] += 0.5 * PET_VOXEL_MM
    save(row.sd_pet, sd, moved)
    with pytest.raises(InputError, match="standard-dose PET is not on the low-dose PET's grid") as info:
        load_subject(row)
    assert info.value.path == str(row.sd_pet)
    save(row.sd_pet, sd, AFFINE)
    save(row.masks["lesion"], np.ones(MRI_SHAPE, np.uint8), centred_affine(MRI_SHAPE, MRI_VOXEL_MM))
    with pytest.raises(InputError, match="mask lesion is not on the PET grid"):
        load_subject(row)


def test_validate_subjects_reports_every_file_and_never_raises(tmp_path):
    corpus = make_bad_input_corpus(tmp_path / "bad")
    good = make_good_input_corpus(tmp_path / "good")
    for case in ("nan", "no_overlap", "truncated"):
        csv, fragment = corpus[case]
        findings = validate_subjects(read_subjects(csv), IntakeOptions())
        assert all(isinstance(f, Finding) for f in findings)
        errors = [f for f in findings if f.level == "error"]
        assert len(errors) == 1 and errors[0].subject == "bad01" and fragment in errors[0].message
        assert {f.level for f in findings if f.subject == "good01"} == {"ok"}
    for csv in good.values():
        findings = validate_subjects(read_subjects(csv), IntakeOptions())
        assert findings and {f.level for f in findings} == {"ok"}
    csv, _ = corpus["qform_sform"]
    levels = {f.level for f in validate_subjects(read_subjects(csv), IntakeOptions()) if f.subject == "bad01"}
    assert levels == {"ok", "warning"}


def test_a_sheared_sform_is_kept_and_flagged(tmp_path, pet):
    _, data = pet
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.4  # x depends on j: a shear no quaternion can express
    warnings: list[str] = []
    img = load_volume(_save_sform_only(tmp_path / "shear.nii.gz", data, sheared), "s", "ld_pet", warnings_out=warnings)
    np.testing.assert_allclose(img.affine, sheared, atol=1e-5)
    assert len(warnings) == 1 and "shear" in warnings[0]
