"""The checkpoint owner (``m2diff_monai.checkpoint``): format round trip, the EMA/raw choice and its old spelling,
bad files as one-line InputErrors, and the network rebuilt from the stored config with exactly the saved weights."""

from __future__ import annotations

import pytest
import torch

from m2diff_monai.checkpoint import (
    CHECKPOINT_KEYS,
    EMA,
    RAW,
    load_model,
    load_weights,
    new_checkpoint,
    read_checkpoint,
    select_weights,
    weights_choice,
    write_checkpoint,
)
from m2diff_monai.errors import InputError
from m2diff_monai.networks.factory import build_network

TINY = {
    "name": "m2diff",
    "preset": "demo",
    "image_size": 16,
    "model_channels": 32,
    "channel_mult": [1],
    "attention_resolutions": [],
    "num_heads": 1,
}


def _perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.5 if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_network(TINY)


def _write(path, net, ema=True, **extras):
    raw = net.state_dict()
    config = {
        "network": net.config,
        "diffusion": {"timesteps": 50},
        "data": {"normalization": "shared"},
        "inference_defaults": {"steps": 3},
    }
    return write_checkpoint(
        path, new_checkpoint(raw, config, ema_state=_perturbed(raw) if ema else None, epoch=2, iteration=7, **extras)
    )


def _one_line(err: pytest.ExceptionInfo, path) -> str:
    line = str(err.value)
    assert "\n" not in line and str(path) in line
    return line


def test_round_trip_keeps_every_key_and_tensor_and_leaves_no_temp_file(tmp_path, net):
    path = _write(tmp_path / "c.pt", net, best_metric=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    checkpoint = read_checkpoint(path)
    assert set(checkpoint) == {*CHECKPOINT_KEYS, "best_metric"} and checkpoint["best_metric"] == 0.5
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (2, 7)
    assert checkpoint["config"]["network"] == net.config
    for key, value in net.state_dict().items():
        assert torch.equal(checkpoint["network"][key], value), key
    mapped = read_checkpoint(path, mmap=True)  # what the complexity table reads: same content
    assert all(torch.equal(mapped["ema"][k], v) for k, v in checkpoint["ema"].items())


def test_ema_is_the_default_and_raw_is_a_choice(tmp_path, net):
    checkpoint = read_checkpoint(_write(tmp_path / "c.pt", net))
    key = next(k for k, v in net.state_dict().items() if v.is_floating_point())
    choice, state = select_weights(checkpoint)
    assert choice == EMA and torch.equal(state[key], net.state_dict()[key] + 0.5)
    choice, state = select_weights(checkpoint, RAW)
    assert choice == RAW and torch.equal(state[key], net.state_dict()[key])


def test_without_ema_the_default_falls_back_but_an_explicit_ema_is_refused(tmp_path, net):
    path = _write(tmp_path / "noema.pt", net, ema=False)
    checkpoint = read_checkpoint(path)
    assert select_weights(checkpoint)[0] == RAW
    assert select_weights(checkpoint, EMA, fallback=True)[0] == RAW
    with pytest.raises(InputError, match="no EMA weights") as err:
        select_weights(checkpoint, EMA, path=path)
    _one_line(err, path)


def test_network_is_the_old_spelling_of_raw(tmp_path, net):
    assert weights_choice("network") == RAW and weights_choice(" RAW ") == RAW and weights_choice(None) is None
    with pytest.raises(InputError, match="weights must be one of ema, raw"):
        weights_choice("best")
    checkpoint = read_checkpoint(_write(tmp_path / "c.pt", net))
    assert select_weights(checkpoint, "network")[0] == RAW


def test_stage1_weights_network_in_a_bundle_still_loads_the_raw_weights(tmp_path, net):
    from m2diff_monai.engines.handlers import InitWeightsHandler

    path = _write(tmp_path / "stage1.pt", net)
    torch.manual_seed(1)
    target = build_network(TINY)
    handler = InitWeightsHandler(path, target, weights="network")
    assert handler.weights == RAW
    handler()
    assert all(torch.equal(target.state_dict()[k], v) for k, v in net.state_dict().items())
    InitWeightsHandler(path, target)()  # default: the EMA
    key = next(k for k, v in net.state_dict().items() if v.is_floating_point())
    assert torch.equal(target.state_dict()[key], net.state_dict()[key] + 0.5)


def test_export_cli_accepts_the_old_spelling():
    from m2diff_monai.export.cli import build_parser

    args = build_parser().parse_args(["--bundle", "b", "--checkpoint", "c.pt", "--out", "o", "--weights", "network"])
    assert weights_choice(args.weights) == RAW


def test_rebuilt_network_holds_exactly_the_chosen_saved_weights(tmp_path, net):
    path = _write(tmp_path / "c.pt", net)
    ema, raw = load_model(path), load_model(path, weights=RAW)
    assert (ema.weights, raw.weights) == (EMA, RAW)
    assert raw.network_config == net.config and raw.inference_defaults == {"steps": 3} and raw.epoch == 2
    for key, value in net.state_dict().items():
        assert torch.equal(raw.network.state_dict()[key], value), key
        expected = value + 0.5 if value.is_floating_point() else value
        assert torch.equal(ema.network.state_dict()[key], expected), key
    assert not raw.network.training and not any(p.requires_grad for p in raw.network.parameters())
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 7])
    net.eval()
    with torch.no_grad():
        expected = net(x, t, ld=x, mri=x, mri_available=torch.ones(2))["out"]
        sampled = raw.network(x, t, ld=x, mri=x, mri_available=torch.ones(2))
        assert torch.equal(sampled["out"], expected)
        assert "mri" not in sampled  # a loaded model samples: the MRI decoder (loss only) does not run


def test_an_exported_file_reports_the_weights_it_was_exported_with(tmp_path, net):
    raw = net.state_dict()
    config = {"network": net.config, "diffusion": {"timesteps": 50}, "data": {}}
    path = write_checkpoint(tmp_path / "model.pt", new_checkpoint(_perturbed(raw), config, export={"weights": "ema"}))
    model = load_model(path)
    assert model.weights == EMA
    key = next(k for k, v in raw.items() if v.is_floating_point())
    assert torch.equal(model.network.state_dict()[key], raw[key] + 0.5)


class NotAllowed:
    """Unpickling this needs code: ``weights_only=True`` must refuse it."""


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "does not exist"),
        ("folder", "not a file"),
        ("garbage", "cannot read the checkpoint"),
        ("text", "cannot read the checkpoint"),
        ("code", "cannot read the checkpoint \\(UnpicklingError"),
        ("tensor", "holds a Tensor"),
        ("noconfig", "no config"),
        ("noweights", "no network weights"),
    ],
)
def test_bad_files_are_one_line_input_errors_naming_the_file(tmp_path, case, expected):
    path = tmp_path / f"{case}.pt"
    if case == "folder":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"\x00\x01 not a checkpoint")
    elif case == "text":
        path.write_text("epoch: 3\nthis is a text file\n")
    elif case == "code":
        torch.save({"network": {}, "config": {"network": {}}, "x": NotAllowed()}, path)
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "noconfig":
        torch.save({"network": {"w": torch.zeros(1)}}, path)
    elif case == "noweights":
        torch.save({"config": {"network": TINY}, "network": None, "ema": None}, path)
    with pytest.raises(InputError, match=expected) as err:
        read_checkpoint(path)
    _one_line(err, path)


def test_weights_that_do_not_fit_are_one_line(tmp_path, net):
    path = tmp_path / "other.pt"
    other = build_network({**TINY, "model_channels": 64})
    write_checkpoint(path, new_checkpoint(other.state_dict(), {"network": net.config}))
    with pytest.raises(InputError, match="raw weights do not fit") as err:
        load_model(path)
    _one_line(err, path)
    missing = load_weights(net, {"not.a.key": torch.zeros(1)}, strict=False)
    assert missing == sorted(net.state_dict())
