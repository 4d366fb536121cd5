"""Training progress lines (m2diff_monai.engines.progress): epoch time left, one line per validation, log cadence."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

from m2diff_monai.engines import progress
from m2diff_monai.engines.progress import TrainingProgress, every, validation_line


def fake_validator() -> Engine:
    """An engine shaped like MONAI's evaluator after a run: metrics and the best key metric so far."""
    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.COMPLETED)
    def _metrics(engine: Engine) -> None:
        engine.state.metrics = {"val_psnr": 20.0 + engine.state.epoch, "val_ssim": 0.5}
        engine.state.key_metric_name = "val_psnr"
        engine.state.best_metric = 20.0 + engine.state.epoch
        engine.state.best_metric_epoch = engine.state.epoch

    return validator


def test_epoch_and_validation_lines(caplog):
    validator = fake_validator()
    trainer = Engine(lambda engine, batch: {"loss": float(batch)})
    handler = TrainingProgress(validator=validator, enabled=True)
    handler.attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED(every=2))
    def _validate(engine: Engine) -> None:
        validator.run([0], max_epochs=engine.state.epoch)

    with caplog.at_level(logging.INFO, logger=progress.__name__):
        trainer.run([1.0, 3.0], max_epochs=4)
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 4
    assert epoch_lines[0].startswith("epoch 1/4: mean loss 2, ")
    assert "left at this pace (validation included)" in epoch_lines[0]
    assert epoch_lines[-1].endswith("about 0:00 left at this pace (validation included)")
    validation = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation ")]
    assert validation == [
        "validation epoch 2: val_psnr 22, val_ssim 0.5 (best val_psnr 22 at epoch 2)",
        "validation epoch 4: val_psnr 24, val_ssim 0.5 (best val_psnr 24 at epoch 4)",
    ]
    assert handler.bar is None  # pytest's stderr is not a terminal: no bar, lines only


def test_bar_only_on_a_terminal_and_when_enabled(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert TrainingProgress(enabled=True).bar_wanted()
    assert not TrainingProgress(enabled=False).bar_wanted() and not TrainingProgress(enabled="false").bar_wanted()
    trainer = Engine(lambda engine, batch: {"loss": 1.0})
    handler = TrainingProgress(enabled=True)
    handler.attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    assert handler.bar is not None


def test_validation_line_without_best():
    validator = Engine(lambda engine, batch: None)
    validator.state.metrics = {"val_psnr": 30.123456}
    assert validation_line(validator, epoch=3) == "validation epoch 3: val_psnr 30.12"


def test_every_filters_iterations():
    assert every(None) is True and every(1) is True and every(0) is False
    keep = every(10)
    assert [n for n in range(1, 31) if keep(None, n)] == [10, 20, 30]
