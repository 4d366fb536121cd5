"""Ignite handlers for the training bundle: EMA updates, checkpoints in the project format, resume, loss terms.

Why not MONAI's ``CheckpointSaver`` / ``CheckpointLoader``: they store ``{name: obj.state_dict()}`` of ignite
objects only, so the checkpoint could not carry plain ints and the network/diffusion/data configuration that
``m2diff-infer`` rebuilds the network from (``docs/ARCHITECTURE.md``), nor write atomically.

Handlers whose class sets ``all_ranks = True`` must run on every DDP rank (EMA updates, resume); the others are
rank-0-only (see ``m2diff_monai.engines.workflow.handlers_for_rank``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel

from m2diff_monai.checkpoint import (
    EMA,
    RAW,
    load_weights,
    new_checkpoint,
    read_checkpoint,
    select_weights,
    weights_choice,
    write_checkpoint,
)
from m2diff_monai.engines.ema import load_ema_state, unwrap
from m2diff_monai.errors import InputError
from m2diff_monai.io.atomic import write_with

logger = logging.getLogger(__name__)


class EMAUpdateHandler:
    """Update the EMA after every ``interval``-th optimizer step (ITERATION_COMPLETED)."""

    all_ranks = True

    def __init__(self, ema: AveragedModel | None, network: torch.nn.Module, interval: int = 1) -> None:
        self.ema = ema
        self.network = network
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        if self.ema is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        self.ema.update_parameters(unwrap(self.network))


def _state_dict_or_none(obj: Any) -> dict | None:
    if obj is None:
        return None
    state = obj.state_dict()
    return state or None


class CheckpointHandler:
    """Save ``last.pt`` after every ``interval`` epochs and ``best.pt`` when validation improves the key metric.

    Checkpoint dict (``docs/ARCHITECTURE.md``): ``network`` (unwrapped state dict), ``ema`` (the EMA network's
    state dict or None), ``optimizer``, ``scaler`` (GradScaler state or None), ``epoch``, ``iteration``,
    ``config`` (``{"network", "diffusion", "data", "inference_defaults"}``), plus ``best_metric``/
    ``best_metric_epoch``/``ema_updates`` so a resumed run keeps its best and its EMA. Written and read by
    ``m2diff_monai.checkpoint`` (atomic write, ``torch.load(weights_only=True)``).

    Attach it to the trainer *after* ``ValidationHandler`` (the order of ``train_handlers``): at
    EPOCH_COMPLETED validation has then run and ``validator.state.best_metric_epoch`` tells if this epoch is
    the best so far.
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: dict[str, Any],
        ema: AveragedModel | None = None,
        validator: Engine | None = None,
        last_name: str = "last.pt",
        best_name: str = "best.pt",
        interval: int = 1,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.optimizer = optimizer
        self.config = config
        self.ema = ema
        self.validator = validator
        self.last_name = last_name
        self.best_name = best_name
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def checkpoint(self, engine: Engine) -> dict[str, Any]:
        vstate = getattr(self.validator, "state", None)
        return new_checkpoint(
            unwrap(self.network).state_dict(),
            self.config,
            ema_state=None if self.ema is None else self.ema.module.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=_state_dict_or_none(getattr(engine, "scaler", None)),
            epoch=int(engine.state.epoch),
            iteration=int(engine.state.iteration),
            best_metric=float(getattr(vstate, "best_metric", -1)),
            best_metric_epoch=int(getattr(vstate, "best_metric_epoch", -1)),
            ema_updates=0 if self.ema is None else int(self.ema.n_averaged),
        )

    def save(self, checkpoint: dict[str, Any], name: str) -> Path:
        return write_checkpoint(self.save_dir / name, checkpoint)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        validated_now = self.validator is not None and getattr(self.validator.state, "epoch", None) == epoch
        is_best = validated_now and self.validator.state.best_metric_epoch == epoch
        is_last_epoch = epoch >= (engine.state.max_epochs or epoch)
        if not (is_best or epoch % self.interval == 0 or is_last_epoch):
            return
        checkpoint = self.checkpoint(engine)
        path = self.save(checkpoint, self.last_name)
        logger.info(f"epoch {epoch}: saved {path}")
        if is_best:
            path = self.link_or_copy(path, self.best_name)
            key = getattr(self.validator.state, "key_metric_name", "metric")
            logger.info(f"epoch {epoch}: new best {key} = {self.validator.state.best_metric:.4f}, saved {path}")

    def link_or_copy(self, source: Path, name: str) -> Path:
        """``best.pt`` as a hard link to the just-written ``last.pt`` (no second serialisation of a multi-GB
        checkpoint); safe because every write replaces the file atomically with a new inode."""
        path = self.save_dir / name

        def _write(tmp: Path) -> None:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)

        write_with(path, _write)
        return path


class ResumeHandler:
    """Resume training from a checkpoint at STARTED: network, EMA, optimizer, GradScaler, epoch and iteration
    (via the engine state, so ignite continues with the next epoch), and the validator's best metric.

    ``path`` None or "" does nothing, so the bundle's ``resume`` key can default to null. Put this handler first
    in ``train_handlers`` (before a ``ValidationHandler`` with ``exec_at_start``).
    """

    all_ranks = True

    def __init__(
        self,
        path: str | Path | None,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        ema: AveragedModel | None = None,
        validator: Engine | None = None,
        map_location: Any = None,
    ) -> None:
        self.path = str(path) if path else ""
        self.network = network
        self.optimizer = optimizer
        self.ema = ema
        self.validator = validator
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        if self.path:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        device = self.map_location
        if device is None:
            device = next(unwrap(self.network).parameters()).device
        checkpoint = read_checkpoint(self.path, map_location=device)
        _, raw = select_weights(checkpoint, RAW, path=self.path)
        load_weights(unwrap(self.network), raw, path=self.path, what="raw weights")
        if self.ema is not None:
            _, state = select_weights(checkpoint, EMA, fallback=True, path=self.path)
            load_ema_state(self.ema, state, checkpoint.get("ema_updates") or checkpoint.get("iteration", 1))
        if self.optimizer is not None and checkpoint.get("optimizer"):
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and checkpoint.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler"])
        epoch, iteration = int(checkpoint.get("epoch", 0)), int(checkpoint.get("iteration", 0))
        if engine.state.max_epochs is not None and epoch >= engine.state.max_epochs:
            logger.warning(
                f"checkpoint {self.path} is at epoch {epoch} >= max_epochs {engine.state.max_epochs}: "
                "nothing left to train (raise max_epochs to continue)"
            )
        engine.state.epoch = epoch
        engine.state.iteration = iteration
        if self.validator is not None and checkpoint.get("best_metric_epoch", -1) >= 0:
            self.validator.state.best_metric = checkpoint["best_metric"]
            self.validator.state.best_metric_epoch = checkpoint["best_metric_epoch"]
        logger.info(f"resumed from {self.path}: epoch {epoch}, iteration {iteration}")


class InitWeightsHandler:
    """Initialise the network (and its EMA) from another run's checkpoint at STARTED: MFdiff's internal stage
    starts from the external stage's weights (paper Sec. 3.3). Unlike ``ResumeHandler`` it restores weights only:
    fresh optimizer, iteration 0, no best metric.

    ``weights``: ``"ema"`` (default; falls back to the raw weights when the checkpoint has no EMA) or ``"raw"``
    (``"network"`` accepted as its old spelling). ``strict=False`` loads what fits (same name and shape) and logs
    the rest, e.g. to start an ablation row from another row's weights. ``path`` None or "" does nothing. Put it
    *before* ``ResumeHandler`` in ``train_handlers`` so a resumed fine-tuning run keeps its own progress.
    """

    all_ranks = True

    def __init__(
        self,
        path: str | Path | None,
        network: torch.nn.Module,
        ema: AveragedModel | None = None,
        weights: str = "ema",
        strict: bool = True,
        map_location: Any = None,
    ) -> None:
        self.weights = weights_choice(weights) or EMA
        self.path = str(path) if path else ""
        self.network = network
        self.ema = ema
        self.strict = bool(strict)
        self.map_location = map_location
        self.missing: list[str] = []

    def attach(self, engine: Engine) -> None:
        if self.path:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        network = unwrap(self.network)
        device = self.map_location if self.map_location is not None else next(network.parameters()).device
        checkpoint = read_checkpoint(self.path, map_location=device)
        source, state = select_weights(checkpoint, self.weights, fallback=self.weights == EMA, path=self.path)
        try:
            self.missing = load_weights(network, state, strict=self.strict, path=self.path, what=f"{source} weights")
        except InputError as err:
            theirs = checkpoint["config"]["network"]
            raise InputError(
                f"{err.problem}; the checkpoint's network config is {theirs}: use the same network_config and "
                "overlays as the run that wrote it, or non-strict loading",
                path=self.path,
            ) from None
        if self.ema is not None:
            load_ema_state(self.ema, network.state_dict(), 1)
        note = f"; not loaded (non-strict): {len(self.missing)} tensors" if self.missing else ""
        logger.info(f"initialised from {self.path} ({source} weights){note}")
        if self.missing:
            logger.warning(f"tensors kept at their initial values: {self.missing}")


class GradientClipHandler:
    """Clip the global gradient norm after backward and before the optimizer step (MONAI
    ``IterationEvents.BACKWARD_COMPLETED``); DDPM clips at 1.0. With a GradScaler (float16) the gradients are
    unscaled first (``GradScaler.step`` then does not unscale again). ``max_norm`` None/0: nothing attached."""

    all_ranks = True

    def __init__(self, network: torch.nn.Module, max_norm: float | None = 1.0) -> None:
        self.network = network
        self.max_norm = None if not max_norm else float(max_norm)
        self.last_norm: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        if self.max_norm is not None:
            from monai.engines.utils import IterationEvents

            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(engine.optimizer)
        self.last_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_norm)


class LossTermsLogger:
    """Every ``interval`` iterations, write the loss module's term means (``last_terms``: pet, mri, bias, vlb,
    mri_rate, ...) to TensorBoard as ``train_<term>`` (MONAI's TensorBoardStatsHandler logs only the loss in
    ``engine.state.output``). Rank-0-only."""

    def __init__(self, loss_function: Any, interval: int = 10, log_dir: str | Path | None = None) -> None:
        self.loss_function = loss_function
        self.interval = int(interval)
        self.log_dir = None if log_dir is None else str(log_dir)
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def close(self, engine: Engine | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __call__(self, engine: Engine) -> None:
        terms = {f"train_{k}": float(v) for k, v in getattr(self.loss_function, "last_terms", {}).items()}
        if not terms:
            return
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.log_dir)
            for key, value in terms.items():
                self._writer.add_scalar(key, value, engine.state.iteration)
