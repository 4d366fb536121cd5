import numpy as np
import pytest
import torch

from m2diff_monai.data.orientation import (
    ORIENTATIONS,
    extract_slice,
    parse_orientations,
    slices_to_volume,
    volume_to_slices,
)
from m2diff_monai.io.atomic import atomic_path, save_json


def _patterned_volume() -> np.ndarray:
    """A different pattern along each axis, so any transposition or flip changes the values."""
    x, y, z = np.meshgrid(np.arange(5), np.arange(7), np.arange(9), indexing="ij")
    return (x * 100 + y * 10 + z).astype(np.float32)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_slicing_and_restacking_is_exact(orientation):
    vol = _patterned_volume()
    stack = volume_to_slices(vol, orientation)
    assert stack.shape[0] == vol.shape[{"sagittal": 0, "coronal": 1, "axial": 2}[orientation]]
    for k in range(stack.shape[0]):
        np.testing.assert_array_equal(stack[k], extract_slice(vol, orientation, k))
    np.testing.assert_array_equal(slices_to_volume(np.ascontiguousarray(stack), orientation), vol)
    t = torch.from_numpy(vol)
    assert torch.equal(slices_to_volume(volume_to_slices(t, orientation), orientation), t)


def test_axial_slice_is_constant_z():
    vol = _patterned_volume()
    s = extract_slice(vol, "axial", 3)
    assert s.shape == (5, 7)
    assert np.all(s % 10 == 3)


def test_parse_orientations_rejects_unknown():
    assert parse_orientations("axial, sagittal") == ("axial", "sagittal")
    with pytest.raises(ValueError, match="transverse"):
        parse_orientations("axial,transverse")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    save_json(target, {"a": np.float32(1.5)})
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_uses_the_usual_file_mode(tmp_path):
    import os
    import stat

    target = tmp_path / "x.json"
    save_json(target, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
