"""``m2diff-export``: training checkpoints → standard MONAI bundles (configs, model.pt, model.ts, model card).

See ``docs/export.md``. ``export_bundle`` writes the folder; ``trace_denoiser`` / ``load_torchscript`` handle the
TorchScript denoiser on their own.
"""

from .bundle import ExportResult, export_bundle, load_exported_model
from .torchscript import DenoiserForExport, ExportError, load_torchscript, trace_denoiser

__all__ = [
    "DenoiserForExport",
    "ExportError",
    "ExportResult",
    "export_bundle",
    "load_exported_model",
    "load_torchscript",
    "trace_denoiser",
]
