"""Small helpers the bundle configs call, so the JSON only wires objects (no logic in ``$`` expressions).

Device/seed set-up, the checkpoint configuration, channels-last, and torchrun/DDP glue (the MONAI model-zoo
``multi_gpu_train.json`` convention: DDP network, ``DistributedSampler``, rank-0-only handlers).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.handlers import LrScheduleHandler, ValidationHandler

from m2diff_monai.data.datasets import load_slice_items  # noqa: F401 (re-exported)
from m2diff_monai.data.manifest import provenance_parameters
from m2diff_monai.diffusion import normalize_diffusion_config, resolve_clip
from m2diff_monai.engines.ema import unwrap
from m2diff_monai.engines.precision import resolve_precision
from m2diff_monai.runtime import configure_threads

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # explicit names; "auto" also accepted


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (0 without torchrun) when CUDA is available, else CPU. Also sizes the CPU thread pools
    for a shared node (``m2diff_monai.runtime``; once per process) since every bundle asks for its device."""
    configure_threads()
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def amp_dtype(name: str | None, device: Any = None) -> torch.dtype | None:
    """ "auto" / "bfloat16" / "float16" → torch dtype for ``device`` (default: :func:`default_device`); None/"" →
    None (fp32). "auto" = bf16 only where the hardware computes it natively (``engines.precision``)."""
    return resolve_precision(name, default_device() if device is None else device)


def seed_everything(seed: int | None) -> None:
    """Seed python, numpy and torch; each DDP rank gets ``seed + rank`` so ranks draw different t, noise and MRI
    dropout (DDP broadcasts rank 0's initial weights anyway). Unlike ``monai.utils.set_determinism`` this leaves
    cuDNN autotuning on (deterministic kernels cost speed; ask for them with MONAI's function if needed)."""
    if seed is None:
        return
    seed = int(seed) + (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_network(network: torch.nn.Module, device: Any, channels_last: bool = False) -> torch.nn.Module:
    """Move ``network`` to ``device``, in channels-last memory format when asked (faster convs with AMP on
    tensor-core GPUs)."""
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def check_network_diffusion(network: torch.nn.Module, diffusion_config: dict[str, Any]) -> None:
    """Fail early when the network's output channels cannot match the diffusion's variance type."""
    config = getattr(unwrap(network), "config", {}) or {}
    if "learn_sigma" not in config:
        return
    learned = normalize_diffusion_config(diffusion_config)["model_var_type"] == "learned_range"
    if bool(config["learn_sigma"]) != learned:
        raise ValueError(
            f"network learn_sigma={config['learn_sigma']} but diffusion model_var_type="
            f"{diffusion_config.get('model_var_type')!r}: use learn_sigma=true exactly with 'learned_range'"
        )


def checkpoint_config(
    network: torch.nn.Module,
    diffusion_config: dict[str, Any] | None,
    data_config: dict[str, Any] | None = None,
    inference_defaults: dict[str, Any] | None = None,
    training_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config`` stored in every checkpoint: the network's resolved config (``net.config``, enough for
    ``build_network`` to rebuild it), the normalized diffusion config with ``clip_denoised: "auto"`` resolved from
    the training data's normalization (``diffusion.clip``), the data settings, the sampler settings the run
    was evaluated with (``inference_defaults``: ``m2diff-infer`` and ``m2diff-export`` use them when no flag says
    otherwise; ``{}`` when the config declares none) and, when given, the training recipe (``training``: losses,
    MRI dropout, optimiser settings), so that a checkpoint says how it was trained without its run folder."""
    check_network_diffusion(network, diffusion_config or {})
    net_config = getattr(unwrap(network), "config", None)
    if not isinstance(net_config, dict):
        raise ValueError("the network has no .config dict; build it with m2diff_monai.networks.factory.build_network")
    data = {} if data_config is None else dict(data_config)
    if data.get("orientations") is not None and not isinstance(data["orientations"], str):
        data["orientations"] = list(data["orientations"])
    if data.get("manifest") is not None:
        data["manifest"] = str(data["manifest"])
        if "preprocessing" not in data:
            data["preprocessing"] = manifest_preprocessing(data["manifest"])
    from m2diff_monai.inference.defaults import check_inference_defaults

    config = {
        "network": dict(net_config),
        "diffusion": resolve_clip(diffusion_config or {}, data),
        "data": data,
        "inference_defaults": check_inference_defaults(inference_defaults),
    }
    if training_config is not None:
        config["training"] = dict(training_config)
    return config


def manifest_preprocessing(manifest: str | Path) -> dict[str, Any]:
    """The preprocessing parameters recorded in a manifest's provenance, so a checkpoint is self-contained:
    inference must register, normalize and crop new scans exactly as the training data were."""
    return provenance_parameters(manifest)


def resolve_manifest(manifest: str | Path, bundle_root: str | Path | None = None) -> str:
    """A relative manifest path is taken from the current directory (the repository root in the documented
    commands); if it is not there but exists relative to the repository holding ``bundle_root``
    (``bundles/<name>`` → ``../..``), that one is used. Missing everywhere: the path as given (the loader then
    raises an ``InputError`` naming the command that creates it)."""
    path = Path(manifest)
    if path.is_absolute() or path.exists() or bundle_root is None:
        return str(path)
    candidate = Path(bundle_root).resolve().parent.parent / path
    return str(candidate) if candidate.exists() else str(path)


# ---------------------------------------------------------------------------------------------- distributed
def distributed_backend() -> str:
    """nccl on CUDA machines, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> int:
    """``init_process_group`` from torchrun's environment (once); selects this rank's GPU. Returns the rank."""
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or distributed_backend())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(
    network: torch.nn.Module, device: Any, find_unused_parameters: bool = True
) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around ``network`` (already on ``device``); ``device_ids`` only for CUDA. ``find_unused_parameters``
    defaults to True because some variants (MFdiff regressors, V4) leave parameters without gradient."""
    device = torch.device(device)
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        network, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def _runs_on_all_ranks(handler: Any) -> bool:
    # Validation runs on every rank: ignite metrics all-reduce over the process group, so a rank-0-only
    # evaluator would wait forever; each rank validates its DistributedSampler share.
    # Learning-rate schedules must step on every rank too, or the ranks' optimizers would drift apart.
    return bool(getattr(handler, "all_ranks", False)) or isinstance(handler, (ValidationHandler, LrScheduleHandler))


def handlers_for_rank(handlers: Sequence[Any] | None, rank: int | None = None) -> list[Any]:
    """All handlers on rank 0; on other ranks only those that must run everywhere: ``ValidationHandler``,
    ``LrScheduleHandler`` and handlers whose class sets ``all_ranks = True`` (EMA updates, resume, weight
    initialisation, gradient clipping). Logging and checkpoints: rank 0."""
    if handlers is None:
        return []
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return list(handlers) if rank == 0 else [h for h in handlers if _runs_on_all_ranks(h)]


def loss_output(output: Any) -> Any:
    """The loss from ``engine.state.output`` (the trainer runs with ``decollate=False``, so it is a dict);
    for ``StatsHandler`` / ``TensorBoardStatsHandler`` ``output_transform``."""
    if isinstance(output, dict):
        return output["loss"]
    if isinstance(output, list) and output and isinstance(output[0], dict):
        return output[0]["loss"]
    return output


# ------------------------------------------------------------------------------------- iteration budgets
def epochs_for_iterations(max_iterations: int | None, epoch_length: int | None, max_epochs: int | None = None) -> int:
    """``max_epochs`` for a run specified in optimizer steps (MFdiff: 50k external, 20k internal iterations):
    ``max_iterations / epoch_length`` epochs of ``epoch_length`` iterations each (checkpoints and validation stay
    epoch-level; ignite restarts the data loader whenever an epoch outlasts it). ``max_iterations`` must be a
    multiple of ``epoch_length`` so the run stops exactly there. ``max_iterations`` None → ``max_epochs``."""
    if max_iterations is None:
        if max_epochs is None:
            raise ValueError("give max_iterations or max_epochs")
        return int(max_epochs)
    if not epoch_length or int(epoch_length) < 1:
        raise ValueError(f"an iteration budget needs epoch_length >= 1, got {epoch_length!r}")
    if int(max_iterations) < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    epochs, rest = divmod(int(max_iterations), int(epoch_length))
    if rest:
        raise ValueError(f"max_iterations {max_iterations} is not a multiple of epoch_length {epoch_length}")
    return epochs


def warmup_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_iterations: int | None = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear learning-rate warm-up per optimizer step, DDPM's ``lr · min((step + 1) / warmup, 1)``; 0/None
    keeps the learning rate constant. Step it per iteration (MONAI ``LrScheduleHandler(epoch_level=False)``)."""
    warmup = int(warmup_iterations or 0)
    if warmup < 0:
        raise ValueError(f"warmup_iterations must be >= 0, got {warmup}")

    def factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_manifests(manifests: str | Path | Sequence[str | Path], bundle_root: str | Path | None = None) -> list[str]:
    """``resolve_manifest`` for each of several manifests (single-stage mixed training)."""
    if isinstance(manifests, (str, Path)):
        manifests = [manifests]
    return [resolve_manifest(m, bundle_root) for m in manifests]
