"""Where a training run stands: a tqdm bar per epoch, an epoch line with the time left, one line per validation.

Why: a demo training took 25.7 min on a loaded machine against the ~7 min the README promised, with nothing but
one log line per iteration to tell where it stood. Rank-0-only (no ``all_ranks``; see
``m2diff_monai.engines.workflow.handlers_for_rank``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events

from m2diff_monai.engines.workflow import loss_output

logger = logging.getLogger(__name__)


def _loss_value(output: Any) -> float | None:
    try:
        loss = loss_output(output)
        return float(loss.detach() if hasattr(loss, "detach") else loss)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError):
        return None


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def validation_line(validator: Engine, epoch: int | None = None) -> str:
    """``validation epoch 5: val_psnr 27.31, val_ssim 0.8120 (best val_psnr 27.31 at epoch 5)``."""
    state = validator.state
    metrics = {k: v for k, v in (state.metrics or {}).items() if isinstance(v, (int, float))}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    epoch = epoch if epoch is not None else getattr(state, "epoch", None)
    key = getattr(state, "key_metric_name", None)
    best, best_epoch = getattr(state, "best_metric", None), getattr(state, "best_metric_epoch", None)
    best_text = ""
    if key and best is not None and best_epoch is not None and best_epoch >= 0:
        best_text = f" (best {key} {best:.4g} at epoch {best_epoch})"
    return f"validation epoch {epoch}: {shown or 'no metrics'}{best_text}"


class TrainingProgress:
    """Attach to the trainer: a tqdm bar per epoch (iterations, loss, elapsed<remaining) when ``enabled`` and
    stderr is a terminal; always one log line per epoch (mean loss, seconds, estimated time left for the run) and,
    given the ``validator``, one line per validation (its metrics and the best key metric so far).

    ``enabled`` is the bundle's ``progress`` key (false for logs only, e.g. in batch jobs; a non-terminal stderr
    disables the bar by itself)."""

    def __init__(self, validator: Engine | None = None, enabled: bool = True) -> None:
        self.validator = validator
        self.enabled = str(enabled).strip().lower() not in ("false", "0", "no", "off", "none", "")
        self.bar: Any = None
        self._epoch_start = 0.0
        self._epoch_seconds: list[float] = []
        self._losses: list[float] = []

    def bar_wanted(self) -> bool:
        return self.enabled and sys.stderr.isatty()

    def attach(self, engine: Engine) -> None:
        if self.bar_wanted():
            from ignite.handlers import ProgressBar

            self.bar = ProgressBar(persist=False)
            self.bar.attach(engine, output_transform=lambda output: {"loss": _loss_value(output) or float("nan")})
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()
        self._losses = []

    def _iteration_completed(self, engine: Engine) -> None:
        value = _loss_value(engine.state.output)
        if value is not None:
            self._losses.append(value)

    def _epoch_completed(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self._epoch_seconds.append(seconds)
        state = engine.state
        left_epochs = max(0, int(state.max_epochs or 0) - int(state.epoch))
        mean_epoch = sum(self._epoch_seconds) / len(self._epoch_seconds)
        loss = f"mean loss {sum(self._losses) / len(self._losses):.4g}, " if self._losses else ""
        logger.info(
            "epoch %d/%s: %s%s; about %s left at this pace (validation included)",
            state.epoch,
            state.max_epochs,
            loss,
            _format_seconds(seconds),
            _format_seconds(left_epochs * mean_epoch),
        )

    def _validation_completed(self, validator: Engine) -> None:
        logger.info(validation_line(validator))


def every(interval: int | None) -> bool | Callable[[Engine, int], bool]:
    """``StatsHandler(iteration_log=...)``: log every ``interval``-th iteration (the bundle's ``log_interval``);
    1 or None: every iteration; 0: never (the progress bar and epoch lines only)."""
    if interval is None or int(interval) == 1:
        return True
    if int(interval) <= 0:
        return False
    step = int(interval)
    return lambda engine, event_count: event_count % step == 0
