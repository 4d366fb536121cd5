"""MONAI dictionary transforms around :class:`~m2diff_monai.deploy.PETEnhancementInferer`: original units on the
model's grid → normalized cubes + brain mask (the training pipeline's mask and normalization stage functions), and
the enhanced cube back to original units."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from m2diff_monai.data.grid import voxel_spacing
from preprocessing.mask import brain_mask
from preprocessing.normalization import Scaling, mri_scaling, normalize_mri, pet_scalings, recorded_method

SCALING_KEY = "ld_scaling"
MASK_KEY = "brain_mask"


def _array(value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    return np.asarray(array, dtype=np.float32)


def _like(array: np.ndarray, template: Any) -> torch.Tensor:
    """Channel-first (1, D, H, W) tensor; a MetaTensor template passes on its metadata (affine)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if hasattr(template, "meta"):
        from monai.data import MetaTensor

        return MetaTensor(tensor, meta=dict(template.meta))  # the meta holds the affine
    return tensor


class PreparePETd(MapTransform):
    """LD PET (+ T1) in original units, already on the model's ``size``³ grid (registered and cropped as the
    training data: m2diff-preprocess) → normalized channel-first cubes, ``brain_mask`` and ``ld_scaling``.

    The brain mask and scales come from the pipeline's own stage functions, with the LD PET standing in for the
    SD PET as in ``m2diff-infer`` (docs/inference.md). Voxel spacing (for the mask's smoothing): the MetaTensor's
    affine, else ``spacing_mm``. A volume of another shape is refused: raw NIfTI goes through ``m2diff-infer``.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image",),
        mri_key: str | None = "mri",
        normalization: str = "shared",
        size: int | None = None,
        spacing_mm: Sequence[float] | None = None,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mri_key = mri_key
        self.normalization = recorded_method(normalization)
        self.size = None if size is None else int(size)
        self.spacing_mm = None if spacing_mm is None else [float(s) for s in spacing_mm]

    def _spacing(self, value: Any) -> list[float]:
        if hasattr(value, "affine"):
            return list(voxel_spacing(np.asarray(value.affine)))
        if self.spacing_mm is None:
            raise ValueError("the LD PET carries no affine (not a MetaTensor): give PreparePETd spacing_mm")
        return self.spacing_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            ld = _array(out[key])
            if self.size is not None and ld.shape != (self.size,) * 3:
                raise ValueError(
                    f"{key}: shape {ld.shape} is not the model's {self.size}^3 grid; preprocess raw "
                    "scans with m2diff-preprocess or run m2diff-infer on the NIfTI"
                )
            mask = brain_mask(ld, self._spacing(out[key]))
            scaling, _ = pet_scalings(self.normalization, ld, None, mask)
            template = out[key]
            out[key] = _like(scaling.apply(ld), template)
            out[MASK_KEY] = _like(mask.astype(np.float32), template)
            out[SCALING_KEY] = scaling.as_dict()
            mri = out.get(self.mri_key) if self.mri_key else None
            if mri is not None:
                mri_array = _array(mri)
                if mri_array.shape != ld.shape:
                    raise ValueError(f"{self.mri_key}: shape {mri_array.shape} differs from the LD PET's {ld.shape}")
                out[self.mri_key] = _like(
                    normalize_mri(mri_array, mri_scaling(mri_array, mask), clip=self.normalization != "slice"), mri
                )
        return out


def prepare_pet(
    data_config: Mapping[str, Any] | None,
    network_config: Mapping[str, Any] | None = None,
    keys: Sequence[Hashable] = ("image",),
    mri_key: str | None = "mri",
    spacing_mm: Sequence[float] | None = None,
) -> PreparePETd:
    """The bundle's ``preprocessing`` step: :class:`PreparePETd` with the normalization and grid size the model was
    trained with, resolved from the bundle's ``data_config`` (which ``m2diff-export`` embeds, preprocessing
    frozen) and ``network_config`` the way ``m2diff-infer`` resolves them."""
    from m2diff_monai.inference.preprocess import resolve_preprocessing

    image_size = dict(network_config or {}).get("image_size")
    prep = resolve_preprocessing(dict(data_config or {}), {}, image_size)
    return PreparePETd(keys, mri_key=mri_key, normalization=prep.normalization, size=prep.size, spacing_mm=spacing_mm)


class RestorePETd(MapTransform):
    """Enhanced cube(s) in normalized units → original units with the LD PET's scaling from :class:`PreparePETd`
    (``original = normalized · scale + offset``, as ``m2diff-infer`` maps its predictions back)."""

    def __init__(
        self, keys: Sequence[Hashable] = ("pred",), scaling_key: str = SCALING_KEY, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaling_key = scaling_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        if self.scaling_key not in out:
            raise KeyError(f"no {self.scaling_key!r} in the data: run PreparePETd first")
        scaling = Scaling(**{k: float(v) for k, v in dict(out[self.scaling_key]).items()})
        for key in self.key_iterator(out):
            value = out[key]
            out[key] = value * float(scaling.scale) + float(scaling.offset)
        return out
