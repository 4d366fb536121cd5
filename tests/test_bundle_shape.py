"""Source and exported bundles share one structure: the source ``inference.json`` declares ``network_def``,
``model``, the MONAI Deploy ids and the ``inference`` entry, and ``m2diff-export`` only rewrites the values it
documents (``m2diff_monai.export.configs.REWRITTEN_IDS`` and the top-level inference settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from m2diff_monai.checkpoint import LoadedModel, load_model
from m2diff_monai.errors import InputError
from m2diff_monai.export import bundle as export_mod
from m2diff_monai.export.configs import CHECKPOINT_EXPR, EMBEDDED_CONFIGS, REQUIRED_IDS, REWRITTEN_IDS
from m2diff_monai.inference.settings import SETTING_KEYS
from test_export import TINY_MFDIFF, TINY_V6, write_checkpoint

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"m2diff": TINY_V6, "mfdiff": TINY_MFDIFF}


def _dollar_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("$") else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _dollar_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _dollar_strings(v)]
    return []


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def exported_pair(request, tmp_path_factory):
    """(source inference.json, exported inference.json, checkpoint path) for one bundle."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = write_checkpoint(root / "best.pt", BUNDLES[request.param])
    out = root / "exported"
    export_mod.export_bundle(REPO / "bundles" / request.param, checkpoint, out, check=False)
    source = json.loads((REPO / "bundles" / request.param / "inference.json").read_text())
    return source, json.loads((out / "configs" / "inference.json").read_text()), checkpoint


def test_source_declares_the_parts_of_a_zoo_bundle_without_logic(exported_pair):
    source, _, _ = exported_pair
    assert set(REQUIRED_IDS) <= set(source)
    assert source["network_def"]["_target_"] == "m2diff_monai.checkpoint.bundle_network"
    assert source["inference"]["checkpoint"] == "@model" and source["run"] == "@inference"
    assert all(source[key] is None for key in EMBEDDED_CONFIGS)  # taken from the checkpoint
    assert all(s.startswith("$import ") for s in _dollar_strings(source))  # configs declare, Python implements


def test_export_keeps_the_ids_and_rewrites_only_paths_and_defaults(exported_pair):
    source, exported, checkpoint = exported_pair
    assert set(exported) == set(source)
    rewritable = set(REWRITTEN_IDS) | set(SETTING_KEYS)
    assert {key: exported[key] for key in set(source) - rewritable} == {
        key: source[key] for key in set(source) - rewritable
    }
    assert exported["bundle_root"] == "." and exported["checkpoint"] == CHECKPOINT_EXPR
    stored = torch.load(checkpoint, weights_only=True)["config"]
    assert exported["network_config"] == stored["network"]
    assert exported["diffusion_config"]["timesteps"] == stored["diffusion"]["timesteps"]
    assert exported["data_config"]["preprocessing"]["size"] == 16  # frozen: runs without the training manifest


def test_source_bundle_builds_its_network_and_model_from_the_checkpoint(exported_pair):
    source, _, checkpoint = exported_pair
    parser = ConfigParser(source)
    parser["checkpoint"] = str(checkpoint)
    model = parser.get_parsed_content("model")
    assert isinstance(model, LoadedModel) and model.weights == "ema"
    reference = load_model(checkpoint)
    for key, value in reference.network.state_dict().items():
        assert torch.equal(model.network.state_dict()[key], value)


def test_source_bundle_without_checkpoint_is_one_input_error():
    parser = ConfigParser(json.loads((REPO / "bundles" / "m2diff" / "inference.json").read_text()))
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps what the component raised
        parser.get_parsed_content("network_def")
    chain, error = [], caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, InputError) and "add --checkpoint PATH" in str(e) for e in chain)


def test_export_refuses_a_source_that_does_not_declare_the_structure():
    source = json.loads((REPO / "bundles" / "m2diff" / "inference.json").read_text())
    del source["network_def"]
    with pytest.raises(InputError, match="network_def"):
        export_mod.rewrite_inference_config(source, {"config": {"network": {}, "diffusion": {}, "data": {}}})
