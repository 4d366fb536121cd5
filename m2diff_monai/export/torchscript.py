"""TorchScript (and optional ONNX) export of the denoiser ``(x_t, t, ld, mri, mri_available) -> out``.

Why tracing here and not MONAI's ``ckpt_export``: ``ckpt_export`` scripts the network or traces it with one input,
and these networks take five inputs and return a dict (facts §5). Scripting fails on their Python-side input
checks and optional arguments; tracing a thin positional wrapper records exactly the computation a sampler runs.

What the trace fixes, checked on M2Diff V1–V6 and the MFdiff rows:

* The input checks (``x_t`` is 4D with a size divisible by ``2**(levels-1)``, ``mri_available`` has B entries,
  MFdiff's "MRI missing but the model was built with ``allow_missing_mri=False``") run at trace time only: the
  traced module does not repeat them. Callers must pass valid shapes (documented in ``metadata.json``).
* ``mri`` and ``mri_available`` are always given, so the trace records the per-sample path
  (``torch.where(mri_available > 0.5, ...)``): an MRI-free sample is ``mri = 0`` with ``mri_available = 0``, which
  gives the same ``out`` as the eager call with ``mri=None``. ``mri_available`` must be float (0/1).
* Shapes are not baked in: attention, Restormer and MFdiff's ``t = 0`` reshape with ``x.shape`` values that the
  tracer records as ``aten::size`` ops, so other batch sizes and image sizes (any multiple of the downsampling
  factor, square or not) give the eager result; :func:`trace_denoiser` verifies this on two other shapes with
  ``check_trace`` and a numeric comparison, and refuses to return a module that disagrees.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

INPUT_NAMES = ("x_t", "t", "ld", "mri", "mri_available")
OUTPUT_NAME = "out"
CONFIG_EXTRA_FILE = "inference.json"
# Absolute/relative tolerance of the eager-vs-TorchScript check (float32, same kernels: differences are ~1e-7).
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-4


class ExportError(RuntimeError):
    """The export could not produce a correct artefact (e.g. a traced module that disagrees with the network)."""


class DenoiserForExport(nn.Module):
    """Positional, tensor-only front of a project network: what TorchScript/ONNX consumers call.

    ``forward(x_t (B,1,H,W) float, t (B,) int64, ld (B,1,H,W), mri (B,1,H,W), mri_available (B,) float 0/1)``
    returns ``network(...)["out"]`` (B, 1 or 2, H, W). Regression rows (``is_diffusion = False``) ignore
    ``x_t`` and ``t``.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.is_diffusion = bool(getattr(network, "is_diffusion", True))

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ld: torch.Tensor,
        mri: torch.Tensor,
        mri_available: torch.Tensor,
    ) -> torch.Tensor:
        if self.is_diffusion:
            return self.network(x_t, t, ld, mri=mri, mri_available=mri_available)["out"]
        return self.network(None, None, ld, mri=mri, mri_available=mri_available)["out"]


def accepts_missing_mri(network: nn.Module) -> bool:
    """False for networks that refuse a sample without MRI (MFdiff built with ``allow_missing_mri=False``): their
    example and check inputs must flag every sample's MRI as given."""
    return not (getattr(network, "uses_mri", False) and getattr(network, "allow_missing_mri", True) is False)


def _flags_for(network: nn.Module, flags: list[float]) -> list[float]:
    return list(flags) if accepts_missing_mri(network) else [1.0] * len(flags)


def spatial_multiple(network: nn.Module) -> int:
    """The factor every image side must be a multiple of (``2 ** (levels - 1)`` of the UNet inside)."""
    for module in (network, getattr(network, "unet", None)):
        levels = getattr(module, "levels", None)
        if isinstance(levels, int) and levels > 0:
            return 2 ** (levels - 1)
    config = getattr(network, "config", {}) or {}
    mult = config.get("channel_mult") or (config.get("unet") or {}).get("channel_mult")
    if mult:
        return 2 ** (len(mult) - 1)
    return 16


def example_inputs(
    batch: int,
    height: int,
    width: int,
    mri_available: Sequence[float] | None = None,
    num_timesteps: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Random inputs in the documented ranges: x_t ~ N(0, 1), t in [0, T), ld/mri in [0, 1], 0/1 MRI flags."""
    gen = torch.Generator().manual_seed(seed)
    flags = [float(i % 2 == 0) for i in range(batch)] if mri_available is None else list(mri_available)
    if len(flags) != batch:
        raise ValueError(f"{len(flags)} MRI flags for a batch of {batch}")
    tensors = (
        torch.randn(batch, 1, height, width, generator=gen),
        torch.randint(0, int(num_timesteps), (batch,), generator=gen, dtype=torch.long),
        torch.rand(batch, 1, height, width, generator=gen),
        torch.rand(batch, 1, height, width, generator=gen),
        torch.tensor(flags, dtype=torch.float32),
    )
    return tuple(x.to(device) for x in tensors)


def _check_shapes(multiple: int) -> list[tuple[int, int, int, list[float]]]:
    """Two shapes other than the traced one: another batch, a non-square image, flags unlike the trace's."""
    return [(3, 3 * multiple, 2 * multiple, [0.0, 1.0, 1.0]), (1, 2 * multiple, 4 * multiple, [1.0])]


def trace_denoiser(
    network: nn.Module,
    size: int | None = None,
    batch: int = 2,
    num_timesteps: int = 1000,
    check: bool = True,
) -> torch.jit.ScriptModule:
    """Trace ``DenoiserForExport(network)`` on CPU in eval mode (the network is left in eval mode).

    ``size``: side of the square example images (default ``2 * spatial_multiple``: small and fast; the trace does
    not depend on it). With ``check`` the trace is run through ``torch.jit.trace(check_trace=True)`` on another
    batch size and a non-square image size, then compared numerically with the eager network on two shapes;
    :class:`ExportError` when they differ.
    """
    network = network.eval()
    wrapper = DenoiserForExport(network).eval()
    multiple = spatial_multiple(network)
    size = int(size or 2 * multiple)
    if size % multiple:
        raise ValueError(f"trace size {size} must be a multiple of {multiple}")
    device = next(network.parameters()).device
    trace_flags = _flags_for(network, [1.0, 0.0] * (batch // 2) + [1.0] * (batch % 2))
    trace_inputs = example_inputs(batch, size, size, trace_flags, num_timesteps, seed=0, device=device)
    check_inputs = [
        example_inputs(b, h, w, _flags_for(network, flags), num_timesteps, seed=1, device=device)
        for b, h, w, flags in _check_shapes(multiple)
    ]
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-side input check (they run at trace time only, by design) and that
        # torch.jit is deprecated in favour of torch.export; TorchScript is still what MONAI bundles ship.
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(
                wrapper,
                trace_inputs,
                check_trace=check,
                check_inputs=check_inputs[:1] if check else None,
                check_tolerance=CHECK_ATOL,
            )
        except Exception as err:  # TracingCheckError, or a baked-in shape failing on the check inputs
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"torch.jit.trace failed{' its check' if check else ''}: {first}") from err
    if check:
        verify_traced(traced, wrapper, check_inputs)
    return traced


def verify_traced(traced: nn.Module, eager: nn.Module, inputs: Sequence[Sequence[torch.Tensor]]) -> float:
    """Largest |traced - eager| over ``inputs``; :class:`ExportError` when a shape or value disagrees."""
    worst = 0.0
    with torch.no_grad():
        for args in inputs:
            expected = eager(*args)
            got = traced(*args)
            shape = tuple(args[0].shape)
            if got.shape != expected.shape:
                raise ExportError(
                    f"traced module returned {tuple(got.shape)} for input {shape}, eager {tuple(expected.shape)}"
                )
            if not torch.allclose(got, expected, atol=CHECK_ATOL, rtol=CHECK_RTOL):
                diff = float((got - expected).abs().max())
                raise ExportError(f"traced module differs from the network by {diff:.3g} for input {shape}")
            worst = max(worst, float((got - expected).abs().max()))
    return worst


def save_torchscript(
    traced: torch.jit.ScriptModule,
    path: str | Path,
    meta_values: Mapping[str, Any],
    inference_config: Mapping[str, Any] | None = None,
) -> Path:
    """``monai.data.save_net_with_metadata``: ``meta_values`` as the module's metadata (plus MONAI/torch/numpy
    versions), the inference config as the extra file ``inference.json``. ``path`` must end in ``.ts``."""
    from monai.data import save_net_with_metadata

    path = Path(path)
    if path.suffix != ".ts":
        raise ValueError(f"TorchScript file name must end in .ts, got {path.name}")
    extra = {}
    if inference_config is not None:
        extra[CONFIG_EXTRA_FILE] = json.dumps(inference_config, indent=2).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.save is deprecated": still MONAI's format
        save_net_with_metadata(
            traced, str(path), include_config_vals=True, meta_values=dict(meta_values), more_extra_files=extra
        )
    return path


def load_torchscript(path: str | Path, map_location: Any = "cpu") -> tuple[torch.jit.ScriptModule, dict, dict]:
    """``(module, metadata, {"inference.json": dict})`` of an exported ``model.ts``."""
    from monai.data import load_net_with_metadata

    module, meta, extra = load_net_with_metadata(
        str(path), map_location=map_location, more_extra_files=(CONFIG_EXTRA_FILE,)
    )
    configs = {}
    raw = extra.get(CONFIG_EXTRA_FILE)
    if raw:
        configs[CONFIG_EXTRA_FILE] = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return module, meta, configs


ONNX_MISSING = (
    "--onnx needs the 'onnx' package, which is not installed in this environment "
    "(install onnx, or export without --onnx)"
)


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(network: nn.Module, path: str | Path, num_timesteps: int = 1000, opset: int = 17) -> Path:
    """ONNX of the denoiser with dynamic batch/height/width, checked with ``onnx.checker``.

    Uses the TorchScript-based exporter (``dynamo=False``) with ``dynamic_axes``: it needs only ``onnx``
    (the dynamo exporter also needs ``onnxscript``). Raises :class:`ExportError` when ``onnx`` is missing.
    """
    if not onnx_available():
        raise ExportError(ONNX_MISSING)
    import onnx

    network = network.eval()
    wrapper = DenoiserForExport(network).eval()
    multiple = spatial_multiple(network)
    device = next(network.parameters()).device
    args = example_inputs(2, 2 * multiple, 2 * multiple, _flags_for(network, [1.0, 0.0]), num_timesteps, device=device)
    image_axes = {0: "batch", 2: "height", 3: "width"}
    dynamic_axes = {
        "x_t": image_axes,
        "t": {0: "batch"},
        "ld": image_axes,
        "mri": image_axes,
        "mri_available": {0: "batch"},
        OUTPUT_NAME: image_axes,
    }
    path = Path(path)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            buffer,
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    model = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    path.write_bytes(buffer.getvalue())
    return path


__all__ = [
    "CONFIG_EXTRA_FILE",
    "DenoiserForExport",
    "ExportError",
    "INPUT_NAMES",
    "ONNX_MISSING",
    "OUTPUT_NAME",
    "example_inputs",
    "export_onnx",
    "load_torchscript",
    "onnx_available",
    "save_torchscript",
    "spatial_multiple",
    "trace_denoiser",
    "verify_traced",
]
