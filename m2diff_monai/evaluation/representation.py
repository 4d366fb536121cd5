"""Paper §III-G: linear CKA between the PET- and MRI-conditioned branches of an M2Diff checkpoint.

For every pair (PET-branch layer i, MRI-branch layer j) of the encoders, and of the decoders, the linear CKA
(:mod:`.cka`) of their activations over the same inputs; written as two heatmaps (the paper's Fig. 8 a/b) and a
JSON file with the matrices.

Layers are the UNet blocks: ``pet_encoder.blocks.<i>`` vs ``mri_encoder.blocks.<j>`` and ``pet_decoder.blocks.<i>``
vs ``mri_decoder.blocks.<j>`` (each block's output: after its ResBlock / attention / downsample or upsample).
Only networks with both branches have them (M2Diff V3, V5, V6); V1/V2 (one UNet) and V4 (one decoder) do not.

Inputs (the paper does not state them; Assumption, configurable): axial slices of the split's preprocessed cubes
(the training domain: normalized LD PET, T1 and SD PET) with an MRI, the ones with the most brain, spread over
the subjects; each slice is noised to ``x_t = q_sample(SD, t)`` at ``timesteps`` (default 10 %, 50 % and 90 % of
T), the same x_t and t going to both branches, MRI available. Activations are average-pooled to at most
``pool``² per channel before CKA to bound memory (``pool=None``: exact; 2× upsampling of smaller maps by the
adaptive pool repeats each value uniformly, which leaves linear CKA unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from m2diff_monai.data.manifest import item_path
from m2diff_monai.errors import InputError
from m2diff_monai.evaluation.cka import cka_matrix, collect_activations, save_cka_heatmap
from m2diff_monai.io.atomic import save_json

BRANCH_PARTS = {"encoder": ("pet_encoder", "mri_encoder"), "decoder": ("pet_decoder", "mri_decoder")}


def branch_layers(network: torch.nn.Module) -> dict[str, tuple[list[str], list[str]]]:
    """``{"encoder": (pet block names, mri block names), "decoder": (...)}``; InputError for one-branch networks."""
    modules = dict(network.named_modules())
    out = {}
    for part, (pet, mri) in BRANCH_PARTS.items():
        if pet not in modules or mri not in modules:
            continue
        names = []
        for branch in (pet, mri):
            blocks = getattr(modules[branch], "blocks", None)
            if blocks is None:
                break
            names.append([f"{branch}.blocks.{i}" for i in range(len(blocks))])
        if len(names) == 2:
            out[part] = (names[0], names[1])
    if "encoder" not in out or "decoder" not in out:
        config = getattr(network, "config", {}) or {}
        label = " ".join(str(config.get(k)) for k in ("name", "variant") if config.get(k)) or type(network).__name__
        raise InputError(
            f"CKA needs a two-branch M2Diff network (PET and MRI encoders and decoders: V3, V5, V6); "
            f"this checkpoint holds {label}"
        )
    return out


def load_two_branch_model(checkpoint: str | Path, device: str = "cpu", use_ema: bool = True):
    """The checkpoint's network (EMA weights when present), checked to have both branches."""
    from m2diff_monai.checkpoint import RAW, load_model

    model = load_model(checkpoint, device=torch.device(device), weights=None if use_ema else RAW, sampling=False)
    try:
        branch_layers(model.network)
    except InputError as err:
        raise InputError(err.problem, path=checkpoint) from None
    return model


def _cube(base: Path, item: dict, key: str, sid: str) -> np.ndarray:
    path = item_path(base, item.get(key))
    if path is None or not path.is_file():
        raise InputError(f"preprocessed {key} does not exist", subject=sid, path=path or base)
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def select_slices(
    manifest: str | Path,
    split: str = "test",
    n_slices: int = 48,
    axis: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(ld, mri, sd) arrays (n, 1, H, W) of normalized slices with the most brain, spread over subjects with MRI."""
    from m2diff_monai.data.manifest import read_manifest, select_volumes

    manifest = Path(manifest)
    base = manifest.resolve().parent
    items = [
        it
        for it in select_volumes(read_manifest(manifest), split, path=manifest, purpose="compute CKA on")
        if int(it.get("mri_available", 0)) and it.get("sd_pet")
    ]
    if not items:
        raise InputError(f"CKA needs '{split}' subjects with an MRI and an SD PET in the manifest", path=manifest)
    per_subject = max(1, -(-int(n_slices) // len(items)))
    ld, mri, sd, labels = [], [], [], []
    for item in items:
        sid = str(item.get("subject"))
        cubes = {k: _cube(base, item, k, sid) for k in ("ld_pet", "mri", "sd_pet", "brain_mask")}
        brain = (cubes["brain_mask"] > 0.5).sum(axis=tuple(a for a in range(3) if a != axis))
        candidates = np.flatnonzero(brain > 0)
        if candidates.size == 0:
            continue
        best = candidates[np.argsort(brain[candidates])[::-1][: max(per_subject * 3, per_subject)]]
        chosen = np.sort(best)[np.linspace(0, len(best) - 1, min(per_subject, len(best))).round().astype(int)]
        for k in np.unique(chosen):
            ld.append(np.take(cubes["ld_pet"], k, axis=axis))
            mri.append(np.take(cubes["mri"], k, axis=axis))
            sd.append(np.take(cubes["sd_pet"], k, axis=axis))
            labels.append(f"{sid}:{int(k)}")
    if not ld:
        raise InputError("CKA found no slice with brain voxels", path=manifest)
    keep = np.linspace(0, len(ld) - 1, min(int(n_slices), len(ld))).round().astype(int)
    stack = lambda xs: np.stack([xs[i] for i in keep])[:, None].astype(np.float32)  # noqa: E731
    return stack(ld), stack(mri), stack(sd), [labels[i] for i in keep]


def _fit(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Centre pad/crop slices to the network's image size (the training transform does the same)."""
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    from monai.transforms import ResizeWithPadOrCrop

    fit = ResizeWithPadOrCrop((size, size))
    return torch.stack([torch.as_tensor(fit(s)) for s in x])


def _layer_shapes(network: torch.nn.Module, names: Sequence[str], run) -> dict[str, tuple[int, ...]]:
    """Each layer's output shape (C, H, W) from one forward pass (for the heatmap labels)."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(network.named_modules())

    def hook(name: str):
        def record(_module, _inputs, output) -> None:  # returning None keeps the module's output unchanged
            out = output[0] if isinstance(output, (tuple, list)) else output
            shapes.setdefault(name, tuple(out.shape[1:]))

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return shapes


def cka_analysis(
    model,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    n_slices: int = 48,
    timesteps: Sequence[int] | None = None,
    pool: int | None = 16,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Encoder and decoder CKA matrices (PET rows × MRI columns) → ``cka_encoder.png``, ``cka_decoder.png`` and
    ``cka.json`` in ``out_dir``. ``model``: a :class:`~m2diff_monai.checkpoint.LoadedModel` or a path."""
    from m2diff_monai.diffusion import build_diffusion

    if not hasattr(model, "network"):
        model = load_two_branch_model(model)
    network = model.network.eval()
    layers = branch_layers(network)
    device = next(network.parameters()).device
    diffusion = build_diffusion(model.diffusion_config)
    total = int(diffusion.num_timesteps)
    steps = [int(round(f * (total - 1))) for f in (0.1, 0.5, 0.9)] if timesteps is None else [int(t) for t in timesteps]
    if not steps or any(not 0 <= t < total for t in steps):
        raise InputError(f"CKA timesteps must lie in 0..{total - 1}, got {steps}")
    ld, mri, sd, labels = select_slices(manifest, split, n_slices)
    config = getattr(network, "config", None)
    size = config.get("image_size") if isinstance(config, dict) else None
    ld, mri, sd = (_fit(torch.from_numpy(a), size) for a in (ld, mri, sd))
    n = ld.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    t = torch.tensor([steps[i % len(steps)] for i in range(n)], dtype=torch.long)
    x_t = diffusion.q_sample(sd, t, torch.randn(sd.shape, generator=generator))
    net_t = diffusion.model_timesteps(t) if hasattr(diffusion, "model_timesteps") else t

    def forward(index: slice) -> None:
        network(
            x_t[index].to(device),
            net_t[index].to(device),
            ld=ld[index].to(device),
            mri=mri[index].to(device),
            mri_available=torch.ones(x_t[index].shape[0], device=device),
        )

    def run_all() -> None:
        for start in range(0, n, int(batch_size)):
            forward(slice(start, start + int(batch_size)))

    names = [name for pair in layers.values() for branch in pair for name in branch]
    shapes = _layer_shapes(network, names, lambda: forward(slice(0, 1)))
    activations = collect_activations(network, names, run_all, pool=pool)
    out_dir = Path(out_dir)
    result: dict[str, Any] = {
        "examples": int(n),
        "slices": labels,
        "timesteps": steps,
        "pool": pool,
        "heatmaps": {},
        "matrices": {},
        "layers": {},
    }
    for part, (pet_names, mri_names) in layers.items():
        matrix = cka_matrix([activations[m] for m in pet_names], [activations[m] for m in mri_names])

        def label(name: str) -> str:
            shape = shapes.get(name, ())
            return f"{name.split('.')[-1]} ({shape[0]}×{shape[-1]}²)" if len(shape) == 3 else name.split(".")[-1]

        png = f"cka_{part}.png"
        save_cka_heatmap(
            matrix,
            out_dir / png,
            [label(m) for m in pet_names],
            [label(m) for m in mri_names],
            title=f"CKA {part}: PET vs MRI",
            xlabel=f"MRI {part} block",
            ylabel=f"PET {part} block",
        )
        result["heatmaps"][part] = png
        result["matrices"][part] = matrix.tolist()
        result["layers"][part] = {
            "pet": pet_names,
            "mri": mri_names,
            "shapes": {k: list(shapes.get(k, ())) for k in (*pet_names, *mri_names)},
        }
        result[f"{part}_diagonal"] = [float(v) for v in np.diag(matrix)] if matrix.shape[0] == matrix.shape[1] else None
    save_json(out_dir / "cka.json", result)
    return result


__all__ = ["branch_layers", "cka_analysis", "load_two_branch_model", "select_slices"]
