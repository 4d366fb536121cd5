"""Manifest slice items → MONAI datasets and data loaders for training and validation.

The items come from :func:`m2diff_monai.data.manifest.slice_items` (the manifest's one reader, which resolves
paths itself rather than with ``monai.data.load_decathlon_datalist``); they keep the manifest keys (``ld_pet``,
``sd_pet``, ``mri``, ``mri_available``, ``subject``, ``orientation``, ``slice``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset

from m2diff_monai.data.manifest import slice_items


def select_evenly(items: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` items spread evenly over the list (all subjects and orientations, not just the first
    subject's edge slices, which are mostly background)."""
    if limit is None or limit <= 0 or limit >= len(items):
        return items
    index = np.linspace(0, len(items) - 1, num=int(limit)).round().astype(int)
    return [items[i] for i in dict.fromkeys(index.tolist())]


def load_slice_items(
    manifest: str | Path,
    split: str = "training",
    orientations: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Slice items of ``split`` (``training``/``validation``/``test``, or ``train``/``val``) with absolute paths,
    optionally restricted to ``orientations`` (None = all: one model for all three orientations) and to ``limit``
    evenly spread items. Reading, validating and selecting are :mod:`m2diff_monai.data.manifest`'s."""
    return select_evenly(slice_items(manifest, split, orientations), limit)


def load_mixed_slice_items(
    manifests: Sequence[str | Path],
    split: str = "training",
    orientations: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The slice items of ``split`` from several manifests, concatenated (MFdiff's single-stage "mixed
    training", paper Table 7: simulated and in-vivo pairs in one training set). Each item gets ``"source"``, the
    index of its manifest. Assumption: plain concatenation, every slice drawn equally often (the paper gives no
    mixing ratio). ``limit`` applies to each manifest."""
    if isinstance(manifests, (str, Path)):
        manifests = [manifests]
    if not manifests:
        raise ValueError("give at least one manifest")
    items: list[dict[str, Any]] = []
    for index, manifest in enumerate(manifests):
        items += [{**item, "source": index} for item in load_slice_items(manifest, split, orientations, limit)]
    return items


def build_dataset(
    data: list[dict[str, Any]],
    transform: Any,
    cache: str = "none",
    cache_rate: float = 1.0,
    num_workers: int = 0,
) -> Dataset:
    """``cache="memory"``: MONAI ``CacheDataset`` (slices loaded once, RAM ≈ 3 × 4·H·W bytes per item);
    ``"none"``: MONAI ``Dataset`` (read each step; the npy path does ≥ 1000 slices/s with 2 workers)."""
    if cache == "memory":
        return CacheDataset(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers or None)
    if cache == "none":
        return Dataset(data=data, transform=transform)
    raise ValueError(f"unknown cache mode {cache!r}; choose 'memory' or 'none'")


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    sampler: Any = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """MONAI DataLoader with pinned memory on CUDA machines and persistent workers when ``num_workers`` > 0."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
    )
