"""A MONAI ``Inferer`` from a normalized 3D LD PET cube (+ T1) to the enhanced cube: three-orientation sampling
and fusion by :func:`m2diff_monai.inference.volume.predict_volume`, the same code ``m2diff-infer`` runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from m2diff_monai.inference.consistency import consistency_sigma
from m2diff_monai.inference.inferer import DiffusionSamplerInferer
from m2diff_monai.inference.volume import predict_volume


class ScriptedDenoiser(torch.nn.Module):
    """The exported TorchScript ``model.ts`` (positional ``x_t, t, ld, mri, mri_available`` → tensor) behind the
    project networks' keyword interface (``→ {"out": ...}``), so the sampler drives either. Without an MRI it
    feeds zeros with ``mri_available`` 0, which the exported models read as "no MRI" (network_data_format)."""

    def __init__(self, module: torch.nn.Module, is_diffusion: bool = True) -> None:
        super().__init__()
        self.module = module
        self.is_diffusion = is_diffusion

    def forward(self, x_t=None, t=None, ld=None, mri=None, mri_available=None) -> dict[str, torch.Tensor]:
        batch = ld.shape[0]
        if x_t is None:  # regression models ignore x_t and t, but the traced graph still takes them
            x_t, t = torch.zeros_like(ld), torch.zeros(batch, dtype=torch.long, device=ld.device)
        if mri is None:
            mri, mri_available = torch.zeros_like(ld), torch.zeros(batch, device=ld.device)
        elif mri_available is None:
            mri_available = torch.ones(batch, device=ld.device)
        return {"out": self.module(x_t, t, ld, mri, mri_available.to(ld.dtype))}


def as_project_network(network: torch.nn.Module, is_diffusion: bool = True) -> torch.nn.Module:
    """A TorchScript module gets the :class:`ScriptedDenoiser` front; a project network is used as it is."""
    if isinstance(network, torch.jit.ScriptModule):
        return ScriptedDenoiser(network, is_diffusion=is_diffusion)
    return network


def _volume(value: torch.Tensor | np.ndarray | None, name: str) -> np.ndarray | None:
    """(D, H, W), (1, D, H, W) or (1, 1, D, H, W) → float32 (D, H, W)."""
    if value is None:
        return None
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be one 3D volume ((1, 1,) D, H, W), got shape {tuple(np.shape(value))}")
    return np.ascontiguousarray(array, dtype=np.float32)


class PETEnhancementInferer(Inferer):
    """``inferer(ld, network, mri=None, brain_mask=None)`` → the enhanced volume, shaped and typed like ``ld``.

    ``ld`` (and ``mri``) are normalized cubes on the model's grid (what :class:`~m2diff_monai.deploy.PreparePETd`
    makes from original units); ``brain_mask`` selects the slices to sample, as in training (None: every slice).
    ``settings``: any :class:`m2diff_monai.inference.settings.InferenceSettings` field (``sampler``, ``steps``,
    ``orientations``, ``fusion``, ``samples``, ``seed``, ``batch_size``, ``amp``, ...), validated the same way;
    ``device`` is ignored — sampling runs where ``ld`` is. ``data_config``: the checkpoint's data config, for the
    training slices' in-plane size and the ``slice`` normalization's per-slice min–max.
    """

    def __init__(
        self,
        diffusion_config: Mapping[str, Any] | None,
        data_config: Mapping[str, Any] | None = None,
        network_image_size: int | None = None,
        is_diffusion: bool = True,
        sampling_defaults: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        from m2diff_monai.inference.defaults import layered_settings
        from m2diff_monai.inference.preprocess import resolve_preprocessing
        from m2diff_monai.inference.settings import InferenceSettings

        super().__init__()
        if diffusion_config is None:  # a source bundle's inference.json leaves the embedded configs null
            from m2diff_monai.errors import InputError

            raise InputError(
                "the inferer needs the bundle's diffusion_config: export the bundle with m2diff-export "
                "(a source bundle leaves it null)"
            )
        # as m2diff-infer: a non-null setting wins over the bundle's sampling_defaults (which export fills with the
        # sampler the checkpoint was evaluated with), which win over the package defaults
        values, _ = layered_settings(bundle=sampling_defaults, options=settings)
        self.settings = InferenceSettings(**values)
        self.preprocessing = resolve_preprocessing(dict(data_config or {}), {}, network_image_size)
        self.diffusion_config = dict(diffusion_config)
        self.is_diffusion = is_diffusion
        DiffusionSamplerInferer(
            self.diffusion_config,
            sampler=self.settings.sampler,
            steps=self.settings.steps,
            start_step=self.settings.start_step,
        )  # bad sampler settings fail here, not later

    def _consistency_sigma(self, inputs: torch.Tensor) -> tuple[float, ...] | None:
        """σ (voxels) of the LD consistency on the cube: the checkpoint's training spacing (the cube's, by
        construction), else the voxel size of the input MetaTensor's affine."""
        if self.settings.ld_consistency_fwhm is None:
            return None
        affine = getattr(inputs, "affine", None)
        if self.preprocessing.spacing is not None:
            spacing = tuple(self.preprocessing.spacing)
        elif affine is not None:
            from nibabel.affines import voxel_sizes

            spacing = tuple(voxel_sizes(np.asarray(affine, dtype=np.float64).reshape(-1, 4, 4)[0]))
        else:
            raise ValueError("ld_consistency_fwhm needs the cube's voxel size: give a MetaTensor with its affine")
        return consistency_sigma(self.settings.ld_consistency_fwhm, spacing)

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args: Any,
        mri: torch.Tensor | None = None,
        brain_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:  # type: ignore[override]
        cfg = self.settings
        device = inputs.device if isinstance(inputs, torch.Tensor) else torch.device("cpu")
        ld = _volume(inputs, "the LD PET")
        mri_volume = None if cfg.no_mri else _volume(mri, "the MRI")
        mask = _volume(brain_mask, "the brain mask")
        if mri_volume is not None and mri_volume.shape != ld.shape or mask is not None and mask.shape != ld.shape:
            raise ValueError(f"the MRI and brain mask must have the LD PET's shape {ld.shape}")
        sampler = DiffusionSamplerInferer.from_settings(self.diffusion_config, cfg, device)
        prediction = predict_volume(
            as_project_network(network, self.is_diffusion).to(device),
            sampler,
            ld,
            mri_volume,
            brain_mask=None if mask is None else mask > 0.5,
            orientations=cfg.orientations,
            fusion=cfg.fusion,
            samples=cfg.samples,
            batch_size=cfg.batch_size,
            device=device,
            progress=False,
            spatial_size=self.preprocessing.spatial_size,
            slice_minmax=self.preprocessing.normalization == "slice",
            ld_consistency_sigma=self._consistency_sigma(inputs),
        )
        fused = torch.from_numpy(prediction.fused).reshape(inputs.shape).to(device)
        if hasattr(inputs, "meta"):  # a MetaTensor keeps its affine and metadata
            from monai.utils import convert_to_dst_type

            return convert_to_dst_type(fused, dst=inputs)[0]
        return fused
