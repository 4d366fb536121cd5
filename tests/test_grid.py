"""The grid owner (m2diff_monai.data.grid) against math and independent references: nibabel's own canonical
reorientation, world coordinates of voxel centres, resampling by affines, and ANTs transforms whose inverse is known."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy.spatial.transform import Rotation

from m2diff_monai.data import grid
from m2diff_monai.errors import InputError

SHAPE = (7, 6, 5)


def _affine(permutation, signs, zooms=(2.0, 2.5, 3.0), rotation_deg=(0.0, 0.0, 0.0), origin=(10.0, -20.0, 30.0)):
    """Voxel axes mapped to a permutation of world axes with flips, voxel sizes and an oblique rotation."""
    linear = np.zeros((3, 3))
    for axis, (world, sign) in enumerate(zip(permutation, signs, strict=True)):
        linear[world, axis] = sign * zooms[axis]
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix() @ linear
    affine[:3, 3] = origin
    return affine


ORIENTATIONS = [
    (perm, signs, rot)
    for perm, signs, rot in itertools.product(
        itertools.permutations(range(3)), [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)], [(0.0, 0.0, 0.0), (12.0, -7.0, 20.0)]
    )
]


def _world(affine, shape):
    """World coordinates (3, *shape) of every voxel centre."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


@pytest.mark.parametrize("perm,signs,rot", ORIENTATIONS)
def test_reorientation_matches_nibabel_keeps_every_voxel_in_place_and_inverts_exactly(perm, signs, rot):
    affine = _affine(perm, signs, rotation_deg=rot)
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    canonical, canonical_affine = grid.to_canonical(data, affine)
    reference = nib.as_closest_canonical(nib.Nifti1Image(data, affine))  # the independent reference
    np.testing.assert_array_equal(canonical, np.asarray(reference.dataobj))
    np.testing.assert_allclose(canonical_affine, reference.affine, atol=1e-12)
    assert "".join(nib.aff2axcodes(canonical_affine)) == "RAS" and canonical.flags.c_contiguous
    # the same voxel sits at the same world position: sorting voxels by world position gives the same values
    np.testing.assert_allclose(
        np.sort(_world(canonical_affine, canonical.shape).reshape(3, -1), axis=1),
        np.sort(_world(affine, SHAPE).reshape(3, -1), axis=1),
        atol=1e-9,
    )
    shape_c, affine_c = grid.canonical_grid(SHAPE, affine)
    assert shape_c == canonical.shape
    np.testing.assert_allclose(affine_c, canonical_affine, atol=1e-12)
    np.testing.assert_array_equal(grid.from_canonical(canonical, affine), data)
    # voxel size along the canonical axes = the canonical affine's column norms, with or without given zooms
    np.testing.assert_allclose(grid.canonical_spacing(affine), np.linalg.norm(canonical_affine[:3, :3], axis=0))
    np.testing.assert_allclose(grid.canonical_spacing(affine, (2.0, 2.5, 3.0)), grid.voxel_spacing(canonical_affine))


def test_a_voxel_keeps_its_world_position_through_reorientation():
    affine = _affine((2, 0, 1), (-1, 1, -1), rotation_deg=(5.0, 0.0, -9.0))
    data = np.zeros(SHAPE, dtype=np.float32)
    data[1, 4, 2] = 1.0
    canonical, canonical_affine = grid.to_canonical(data, affine)
    where = np.argwhere(canonical == 1.0)[0]
    np.testing.assert_allclose(canonical_affine @ [*where, 1], affine @ [1, 4, 2, 1], atol=1e-9)


def test_source_grid_writes_on_the_file_grid(tmp_path):
    affine = _affine((1, 0, 2), (-1, -1, 1), rotation_deg=(0.0, 10.0, 0.0))
    data = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "x.nii.gz")
    source = grid.SourceGrid.from_file(tmp_path / "x.nii.gz")
    canonical, canonical_affine = grid.to_canonical(data, affine)
    assert source.canonical_shape == canonical.shape
    np.testing.assert_allclose(source.canonical_affine, canonical_affine, atol=1e-6)
    out = source.image(source.from_canonical(canonical))
    np.testing.assert_array_equal(np.asarray(out.dataobj), data)
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    with pytest.raises(InputError, match="does not exist"):
        grid.SourceGrid.from_file(tmp_path / "missing.nii.gz", subject="s01")


@pytest.mark.parametrize("start", [(0, 0, 0), (2, 1, 3), (-3, -2, -1), (4, -3, 2)])
def test_placement_round_trip_is_exact_for_integer_shifts(start):
    rng = np.random.default_rng(2)
    shape, size = (10, 9, 8), 6
    volume = rng.random(shape).astype(np.float32) + 1.0
    block = grid.crop(volume, start, size, fill=-1.0)
    for axis in range(3):  # every block voxel is the volume voxel at start + index, or fill outside the volume
        assert block.shape[axis] == size
    idx = np.indices((size,) * 3).reshape(3, -1).T + np.asarray(start)
    inside = np.all((idx >= 0) & (idx < shape), axis=1)
    flat = block.reshape(-1)
    np.testing.assert_array_equal(flat[inside], volume[tuple(idx[inside].T)])
    assert np.all(flat[~inside] == -1.0)
    back = grid.place(block, start, shape, fill=0.0)
    covered = grid.place(np.ones((size,) * 3, dtype=bool), start, shape, fill=False)
    np.testing.assert_array_equal(back[covered], volume[covered])
    assert np.all(back[~covered] == 0.0)
    # the cube's affine is the source affine shifted by whole voxels; integer_offset finds the shift again
    affine = _affine((0, 1, 2), (1, 1, 1), rotation_deg=(10.0, 5.0, -3.0))
    cube_affine = grid.shifted_affine(affine, start)
    np.testing.assert_array_equal(grid.integer_offset(cube_affine, affine), start)
    np.testing.assert_array_equal(
        grid.to_grid(block, cube_affine, shape, affine, order=1), grid.place(block, start, shape)
    )
    # ... and resampling by affines (an interpolation; edge mode, as rounding puts border voxels a hair outside)
    # agrees with the exact placement inside the block
    resampled = np.asarray(
        resample_from_to(nib.Nifti1Image(block, cube_affine), (shape, affine), order=1, mode="nearest").dataobj
    )
    np.testing.assert_allclose(resampled[covered], back[covered], atol=1e-5)


def test_non_integer_or_rotated_grids_have_no_integer_offset_and_are_resampled():
    affine = _affine((0, 1, 2), (1, 1, 1))
    half = affine.copy()
    half[:3, 3] += affine[:3, :3] @ [0.5, 0.0, 0.0]
    assert grid.integer_offset(half, affine) is None
    assert grid.integer_offset(_affine((0, 1, 2), (1, 1, 1), rotation_deg=(0, 0, 3.0)), affine) is None
    # trilinear resampling reproduces a linear function of world position exactly inside the field of view
    data = (np.tensordot([1.0, -2.0, 0.5], _world(half, SHAPE), axes=1) + 50).astype(np.float32)
    out = grid.to_grid(data, half, SHAPE, affine, order=1, mode="nearest")
    truth = np.tensordot([1.0, -2.0, 0.5], _world(affine, SHAPE), axes=1) + 50
    np.testing.assert_allclose(out[1:], truth[1:], atol=1e-4)


def test_grid_distance_and_same_grid():
    affine = _affine((0, 1, 2), (1, 1, 1), zooms=(2.0, 2.0, 2.0))
    moved = affine.copy()
    moved[:3, 3] += [0.3, 0.0, -0.4]
    assert grid.grid_distance(affine, moved, SHAPE) == pytest.approx(0.5)  # a translation moves every voxel by |t|
    assert grid.same_grid(SHAPE, affine, SHAPE, moved, tolerance_voxels=0.3)
    assert not grid.same_grid(SHAPE, affine, SHAPE, moved, tolerance_voxels=0.2)
    assert not grid.same_grid(SHAPE, affine, (7, 6, 6), affine)
    rotated = _affine((0, 1, 2), (1, 1, 1), zooms=(2.0, 2.0, 2.0), rotation_deg=(0, 0, 90.0))
    # a 90° turn about the origin moves the far corner (12, 10, 8) mm by |R c - c|
    corner = np.array([12.0, 10.0, 8.0])
    expected = np.linalg.norm(Rotation.from_euler("z", 90, degrees=True).as_matrix() @ corner - corner)
    assert grid.grid_distance(affine, rotated, SHAPE) == pytest.approx(expected)


def test_inverse_flags_follow_antspyx_invtransforms_order():
    assert grid.inverse_flags(["reg_0GenericAffine.mat", "reg_1InverseWarp.nii.gz"]) == [True, False]
    assert grid.inverse_flags(["pet_to_mri_0GenericAffine.mat"]) == [True]
    assert grid.inverse_flags([]) == []


def _blob(shape, affine, centre, sigma=8.0):
    world = _world(affine, shape)
    return np.exp(-np.sum((world - np.reshape(centre, (3, 1, 1, 1))) ** 2, axis=0) / (2 * sigma**2)).astype(np.float32)


def test_map_back_through_registration_inverts_the_forward_mapping(tmp_path):
    """A rigid transform written by ANTs: forward (PET grid → T1 grid) then back through the stored inverse list
    with the one rule gives the PET volume again (within linear-interpolation error), and a mask comes back
    nearest-neighbour."""
    import ants

    pet_shape, pet_affine = (24, 24, 20), _affine((0, 1, 2), (-1, 1, 1), zooms=(2.0, 2.0, 2.0), origin=(24, -22, -18))
    t1_shape, t1_affine = (
        (30, 32, 28),
        _affine((0, 1, 2), (1, 1, 1), zooms=(1.6, 1.5, 1.5), rotation_deg=(4, -3, 6), origin=(-24, -24, -21)),
    )
    centre = pet_affine[:3, :3] @ ((np.array(pet_shape) - 1) / 2) + pet_affine[:3, 3]
    pet = _blob(pet_shape, pet_affine, centre)
    tx = ants.create_ants_transform(
        transform_type="Euler3DTransform",
        dimension=3,
        center=tuple(centre * [-1, -1, 1]),
        parameters=(0.05, -0.03, 0.08, 1.5, -2.0, 1.0),
    )
    mat = tmp_path / "reg_0GenericAffine.mat"
    ants.write_transform(tx, str(mat))
    # forward: the PET moved onto the T1 grid (what --space mri preprocessing does with the forward list)
    on_t1 = grid.apply_ants_transforms(pet, pet_affine, t1_shape, t1_affine, [mat], order=1)
    assert on_t1.max() > 0.5  # the blob landed inside the T1 field of view
    back = grid.map_back_through_registration(on_t1, t1_affine, pet_shape, pet_affine, [mat], order=1)
    interior = pet > 0.2
    np.testing.assert_allclose(back[interior], pet[interior], atol=0.03)
    assert np.abs(back[interior] - pet[interior]).mean() < 0.01
    # without the inversion the way back is wrong: the rule matters
    wrong = grid.apply_ants_transforms(on_t1, t1_affine, pet_shape, pet_affine, [mat], invert=[False], order=1)
    assert np.abs(wrong[interior] - pet[interior]).mean() > 5 * np.abs(back[interior] - pet[interior]).mean()
    mask = pet > 0.5
    mask_back = (
        grid.map_back_through_registration(
            grid.apply_ants_transforms(mask.astype(np.float32), pet_affine, t1_shape, t1_affine, [mat], order=0),
            t1_affine,
            pet_shape,
            pet_affine,
            [mat],
            order=0,
        )
        > 0.5
    )
    assert np.setxor1d(np.flatnonzero(mask_back), np.flatnonzero(mask)).size <= 0.1 * mask.sum()


def test_map_back_without_transforms_is_a_one_line_input_error(tmp_path):
    data, affine = np.zeros(SHAPE, np.float32), np.eye(4)
    with pytest.raises(InputError, match="inverse transforms"):
        grid.map_back_through_registration(data, affine, SHAPE, affine, [], subject="s01")
    with pytest.raises(InputError, match="does not exist"):
        grid.map_back_through_registration(data, affine, SHAPE, affine, [tmp_path / "gone.mat"], subject="s01")


def test_stored_inverse_transforms_reads_subject_json(tmp_path):
    record = {"registration": {"transforms": {"inverse": ["transforms/pet_to_mri_0GenericAffine.mat"]}}}
    assert grid.stored_inverse_transforms(record, tmp_path) == [tmp_path / "transforms/pet_to_mri_0GenericAffine.mat"]
    assert grid.stored_inverse_transforms({"registration": None}, tmp_path) == []


def test_mask_box_matches_argwhere_and_says_empty():
    """The one bounding-box owner: extent = argwhere min/max, box grown by the margin only along ``axes`` and
    clipped to the array; an empty mask gives None (callers choose their own policy)."""
    rng = np.random.default_rng(3)
    mask = np.zeros((9, 11, 7), dtype=bool)
    mask[2:5, 0:4, 3:7] = rng.random((3, 4, 4)) > 0.3
    mask[2, 0, 3] = mask[4, 3, 6] = True
    points = np.argwhere(mask)
    expected = tuple((int(lo), int(hi)) for lo, hi in zip(points.min(0), points.max(0), strict=True))
    assert grid.mask_extent(mask) == expected
    assert grid.mask_box(mask) == tuple(slice(lo, hi + 1) for lo, hi in expected)
    assert grid.mask_box(mask, margin=2, axes=(0, 2)) == (slice(0, 7), slice(0, 4), slice(1, 7))
    np.testing.assert_array_equal(grid.occupied_indices(mask, 0), [2, 3, 4])
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert grid.mask_extent(empty) is None and grid.mask_box(empty, margin=1) is None
    assert grid.occupied_indices(empty, 1).size == 0
