"""Slices per second of the training data path (manifest items → LoadSliced → DataLoader batches).

Writes synthetic npy slice triplets (LD PET, SD PET, MRI; float32 (1, S, S)) and a manifest to a temp folder,
then times full passes of the MONAI DataLoader with 0 and N workers (the first pass warms the page cache and is
not timed). For comparison, the same pass through MONAI ``LoadImaged(reader="NumpyReader")``.
Target: ≥ 1000 slices/s at 256² with 2 workers.

    .venv/bin/python benchmarks/bench_datapath.py [--size 256] [--items 256] [--workers 0,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, LoadImaged

from m2diff_monai.data.datasets import build_dataset, build_loader, load_slice_items
from m2diff_monai.data.manifest import provenance, write_manifest
from m2diff_monai.data.transforms import slice_transforms
from m2diff_monai.io.atomic import save_json


def write_items(root: Path, size: int, items: int) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(items):
        names = {}
        for key in ("ld_pet", "sd_pet", "mri"):
            names[key] = f"s/{key}_{i:05d}.npy"
            path = root / names[key]
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, rng.random((1, size, size), dtype=np.float32))
        entries.append(
            {
                **names,
                "mri_available": int(i % 10 < 7),
                "subject": f"sub-{i // 64:03d}",
                "orientation": "axial",
                "slice": i % 64,
            }
        )
    for e in entries:
        if not e["mri_available"]:
            e["mri"] = ""
    return write_manifest(
        root / "manifest.json",
        {
            "name": "bench",
            "training": entries,
            "validation": [],
            "test": [],
            "volumes": [],
            "provenance": provenance("benchmarks/bench_datapath.py", {}),
        },
    )


def time_loader(loader, passes: int) -> float:
    for _ in loader:  # warm-up: page cache, worker start
        pass
    n = 0
    start = time.perf_counter()
    for _ in range(passes):
        for batch in loader:
            n += batch["ld_pet"].shape[0]
    return n / (time.perf_counter() - start)


def monai_loadimage_loader(items, batch_size: int, workers: int):
    keys = ["ld_pet", "sd_pet", "mri"]
    data = [{**i, "mri": i["mri"] or i["ld_pet"]} for i in items]  # LoadImaged cannot express "no MRI"
    transform = Compose(
        [
            LoadImaged(keys=keys, reader="NumpyReader", image_only=True),
            Lambdad(keys="mri_available", func=lambda v: torch.tensor(float(v))),
            EnsureChannelFirstd(keys=keys, channel_dim=0),
        ]
    )
    return DataLoader(Dataset(data, transform), batch_size=batch_size, shuffle=True, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the main process (collation with 0 workers); workers always use 1",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_items(Path(tmp), args.size, args.items)
        items = load_slice_items(manifest, "training")
        for w in workers:
            loader = build_loader(build_dataset(items, slice_transforms(), cache="none"), args.batch, True, w)
            rows.append(
                {"path": "LoadSliced (this project)", "workers": w, "slices_per_s": time_loader(loader, args.passes)}
            )
            loader = monai_loadimage_loader(items, args.batch, w)
            rows.append(
                {
                    "path": "MONAI LoadImaged(NumpyReader)",
                    "workers": w,
                    "slices_per_s": time_loader(loader, args.passes),
                }
            )
    print(f"data path, {args.size}² slices (3 npy files per item), batch {args.batch}, {args.items} items")
    print(f"{'path':32s} {'workers':>7s} {'slices/s':>10s}")
    for r in rows:
        print(f"{r['path']:32s} {r['workers']:7d} {r['slices_per_s']:10.0f}")
    if args.json:
        save_json(
            args.json,
            {
                "size": args.size,
                "batch": args.batch,
                "items": args.items,
                "rows": rows,
                "torch_threads": torch.get_num_threads(),
            },
        )


if __name__ == "__main__":
    main()
