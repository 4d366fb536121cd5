"""Default precision ("auto"): bf16 only where the hardware computes it natively; explicit values win."""

from __future__ import annotations

import logging

import pytest
import torch

from m2diff_monai.engines import precision


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    """Point ``cpu_flags`` at a fake /proc/cpuinfo with the given flags."""

    read_flags = precision.cpu_flags.__wrapped__

    def _set(flags: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(
            f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
            "processor\t: 1\nflags\t\t: fpu\n"
        )
        monkeypatch.setattr(precision, "cpu_flags", lambda: read_flags(str(path)))

    return _set


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("", None),
        ("avx512f avx512bw avx512vl", None),  # AVX-512 without bf16 units: emulated bf16, slower than fp32
        ("avx512f avx512_bf16", torch.bfloat16),
        ("amx_tile amx_bf16", torch.bfloat16),
    ],
)
def test_auto_on_cpu_follows_native_bf16_flags(fake_cpuinfo, flags, expected):
    fake_cpuinfo(flags)
    assert precision.resolve_precision("auto", "cpu") is expected
    assert precision.resolve_precision("AUTO", torch.device("cpu")) is expected


def test_cpu_flags_reads_first_processor_and_survives_missing_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: sse2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: sse2\n")
    assert precision.cpu_flags.__wrapped__(str(info)) == frozenset({"sse2", "amx_bf16"})
    assert precision.cpu_flags.__wrapped__(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_follows_is_bf16_supported(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert precision.resolve_precision("auto", "cuda:0") is (torch.bfloat16 if supported else None)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (None, None),
        ("", None),
        ("none", None),
        ("fp32", None),
    ],
)
def test_explicit_values_pass_through_regardless_of_hardware(fake_cpuinfo, name, expected):
    fake_cpuinfo("")  # no native bf16: an explicit bf16 still wins
    assert precision.resolve_precision(name, "cpu") is expected


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="float8"):
        precision.resolve_precision("float8", "cpu")


def test_training_and_inference_share_the_rule(fake_cpuinfo):
    from m2diff_monai.engines.workflow import amp_dtype
    from m2diff_monai.inference.inferer import resolve_amp

    for flags, expected in (("", None), ("amx_bf16", torch.bfloat16)):
        fake_cpuinfo(flags)
        assert amp_dtype("auto", "cpu") is expected
        assert resolve_amp("auto", torch.device("cpu")) is expected
    assert amp_dtype("float16", "cpu") is torch.float16 and resolve_amp("none", torch.device("cpu")) is None


def test_autocast_inferer_auto_logs_precision_and_threads(fake_cpuinfo, caplog):
    from m2diff_monai.engines.amp import AutocastInferer, needs_grad_scaler

    conv = torch.nn.Conv2d(1, 1, 3)
    x = torch.rand(1, 1, 8, 8)
    fake_cpuinfo("")
    with caplog.at_level(logging.INFO, logger="m2diff_monai.engines.amp"):
        assert AutocastInferer("auto")(x, conv).dtype == torch.float32
    assert (
        f"training precision: fp32 autocast on cpu (asked: auto), {torch.get_num_threads()} torch threads"
        in caplog.text
    )
    fake_cpuinfo("avx512_bf16")
    assert AutocastInferer("auto")(x, conv).dtype == torch.bfloat16
    assert not needs_grad_scaler("auto")


def test_runtime_record_names_precision_and_threads(fake_cpuinfo):
    fake_cpuinfo("")
    assert precision.runtime_record("auto", "cpu") == {"precision": "fp32", "threads": torch.get_num_threads()}
    assert precision.runtime_record("bf16", "cpu")["precision"] == "bf16"


def test_bundles_default_to_auto():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bundles"
    for bundle in ("m2diff", "mfdiff"):
        assert json.loads((root / bundle / "train.json").read_text())["amp_dtype"] == "auto"
