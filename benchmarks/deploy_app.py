"""A MONAI Deploy (App SDK) application around an exported m2diff bundle: NIfTI cube in → enhanced NIfTI out.

Not a test and not a dependency: it needs ``monai-deploy-app-sdk`` (Holoscan), which m2diff-monai does not
install. Three operators: a loader (nibabel, keeps the affine in a ``MonaiMetaTensor``), ``PETEnhancementOperator``
(hosts the exported bundle through :func:`m2diff_monai.deploy.run_bundle_on_volume`: the bundle's
``preprocessing`` → ``inferer`` → ``postprocessing`` ids, as ``MonaiBundleInferenceOperator`` calls them) and a
NIfTI writer. Why not the generic bundle operator: docs/export.md, "MONAI Deploy".

Run (docs/export.md says how the throwaway venv was set up)::

    python benchmarks/deploy_app.py --bundle EXPORTED_BUNDLE --ld LD_CUBE.nii.gz [--mri T1_CUBE.nii.gz] \
        --out PRED.nii.gz [--set steps=10]

``LD_CUBE``: the LD PET in original units on the model's grid (a cube as ``m2diff-preprocess`` writes before
normalization; raw scans go through ``m2diff-infer``). It prints the output path, shape and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from holoscan.conditions import CountCondition
from monai.data import MetaTensor
from monai.deploy.core import Application, Operator, OperatorSpec

from m2diff_monai.deploy import load_bundle_network, run_bundle_on_volume
from m2diff_monai.deploy.runner import read_bundle_config


def _load(path: Path | None) -> MetaTensor | None:
    if path is None:
        return None
    image = nib.load(str(path))
    return MetaTensor(
        torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32)), affine=torch.as_tensor(image.affine)
    )


class VolumeLoader(Operator):
    """Emits ``{"ld": MetaTensor, "mri": MetaTensor | None}`` once."""

    def __init__(self, fragment, *args, ld: Path, mri: Path | None, **kwargs) -> None:
        self.ld, self.mri = ld, mri
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("volumes")

    def compute(self, op_input, op_output, context) -> None:
        op_output.emit({"ld": _load(self.ld), "mri": _load(self.mri)}, "volumes")


class PETEnhancementOperator(Operator):
    """The exported bundle, loaded once (config, model.ts), applied to every volume it receives."""

    def __init__(self, fragment, *args, bundle: Path, overrides: dict, **kwargs) -> None:
        self.bundle, self.overrides = bundle, overrides
        self.parser = read_bundle_config(bundle)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network = load_bundle_network(bundle, self.parser, self.device)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volumes")
        spec.output("enhanced")

    def compute(self, op_input, op_output, context) -> None:
        volumes = op_input.receive("volumes")
        ld = volumes["ld"].to(self.device)
        mri = None if volumes["mri"] is None else volumes["mri"].to(self.device)
        out = run_bundle_on_volume(
            self.bundle, ld, mri, parser=self.parser, network=self.network, device=self.device, overrides=self.overrides
        )
        op_output.emit(out, "enhanced")


class NiftiWriter(Operator):
    def __init__(self, fragment, *args, out: Path, **kwargs) -> None:
        self.out = out
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("enhanced")

    def compute(self, op_input, op_output, context) -> None:
        volume = op_input.receive("enhanced")
        affine = np.asarray(volume.affine, dtype=np.float64)
        nib.save(nib.Nifti1Image(volume.detach().cpu().numpy().astype(np.float32), affine), str(self.out))


class PETEnhancementApp(Application):
    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__([sys.argv[0]])
        self.run_options = options  # after the base init: Holoscan's Application already has an `options`

    def compose(self) -> None:
        o = self.run_options
        overrides = dict(_parse_set(v) for v in o.set)
        loader = VolumeLoader(self, CountCondition(self, 1), ld=o.ld, mri=o.mri, name="loader")
        enhance = PETEnhancementOperator(self, bundle=o.bundle, overrides=overrides, name="pet_enhancement")
        writer = NiftiWriter(self, out=o.out, name="writer")
        self.add_flow(loader, enhance, {("volumes", "volumes")})
        self.add_flow(enhance, writer, {("enhanced", "enhanced")})


def _parse_set(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="an m2diff-export output folder")
    parser.add_argument("--ld", type=Path, required=True, help="LD PET cube NIfTI on the model's grid")
    parser.add_argument("--mri", type=Path, default=None, help="T1 cube NIfTI on the same grid")
    parser.add_argument("--out", type=Path, required=True, help="enhanced NIfTI to write")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE inference.json override (e.g. steps=10)")
    options = parser.parse_args(argv)
    start = time.perf_counter()
    PETEnhancementApp(options).run()
    image = nib.load(str(options.out))
    print(
        json.dumps(
            {
                "out": str(options.out),
                "shape": list(image.shape),
                "seconds": round(time.perf_counter() - start, 2),
                "max": float(np.asarray(image.dataobj).max()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
