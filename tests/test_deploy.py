"""The exported bundle driven as MONAI Deploy's ``MonaiBundleInferenceOperator`` drives a bundle: ConfigParser
over metadata.json + inference.json, models/model.ts, then ``preprocessing`` → ``inferer`` → ``postprocessing`` on
an in-memory volume (m2diff_monai.deploy.runner documents the operator's sequence this mirrors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from badinputs import centred_affine, phantom
from m2diff_monai.checkpoint import load_model
from m2diff_monai.deploy import PETEnhancementInferer, load_bundle_network, run_bundle_on_volume
from m2diff_monai.deploy.runner import read_bundle_config
from m2diff_monai.inference.inferer import DiffusionSamplerInferer
from m2diff_monai.inference.volume import predict_volume
from preprocessing.cubes import prepare_cubes

torch.set_num_threads(1)  # as test_export: the tiny export and its sampling run fastest on one thread

FAST = {"steps": 2, "orientations": "axial,coronal", "sampler": "ancestral", "fusion": "mean", "amp": "none"}
SIZE, SPACING = 16, 3.0


@pytest.fixture(scope="module")
def volume() -> MetaTensor:
    """A PET phantom already on the tiny model's 16³ grid (3 mm voxels), in arbitrary 'original' units."""
    affine = centred_affine((SIZE,) * 3, SPACING)
    return MetaTensor(
        torch.from_numpy(100.0 * phantom((SIZE,) * 3, affine, "pet").astype(np.float32)), affine=torch.as_tensor(affine)
    )


def test_exported_config_declares_the_ids_the_deploy_operator_reads(exported):  # noqa: F811
    config = json.loads((exported / "configs" / "inference.json").read_text())
    assert {"preprocessing", "inferer", "postprocessing", "network_def"} <= set(config)
    parser = read_bundle_config(exported)
    assert isinstance(parser.get_parsed_content("preprocessing"), Compose)
    assert isinstance(parser.get_parsed_content("postprocessing"), Compose)
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, PETEnhancementInferer)
    # a null top-level setting means "not set": the sampler the checkpoint was evaluated with (sampling_defaults)
    expected = {
        k: config[k] if config.get(k) is not None else config["sampling_defaults"][k] for k in ("steps", "fusion")
    }
    assert (inferer.settings.steps, inferer.settings.fusion) == (expected["steps"], expected["fusion"])
    # network_data_format keeps describing model.ts honestly (the 2D denoiser), not the volume application
    assert list(parser["_meta_"]["network_data_format"]["inputs"])[0] == "x_t"


def test_in_memory_volume_matches_the_pipeline_and_sampler_route(exported, volume):  # noqa: F811
    out = run_bundle_on_volume(exported, volume, overrides=FAST)
    assert isinstance(out, MetaTensor) and tuple(out.shape) == (SIZE,) * 3
    assert torch.allclose(out.affine.double(), volume.affine.double())
    # independent route: the training pipeline's cube stage, the checkpoint loader and the volume sampler
    cubes = prepare_cubes(volume.numpy(), volume.affine.numpy(), normalization="volume", size=SIZE)
    model = load_model(exported / "models" / "model.pt", device="cpu")
    sampler = DiffusionSamplerInferer(model.diffusion_config, sampler="ancestral", steps=2, seed=0)
    reference = predict_volume(
        model.network, sampler, cubes.ld, None, brain_mask=cubes.mask, orientations=("axial", "coronal"), fusion="mean"
    )
    expected = cubes.ld_scaling.invert(reference.fused)
    # model.ts (traced) against the eager network: float rounding only
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-3 * float(np.abs(expected).max()))
    assert float(np.abs(expected).max()) > 0


def test_original_units_are_restored(exported, volume):  # noqa: F811
    """Normalization then restoration: twice the activity gives exactly twice the prediction."""
    parser = read_bundle_config(exported)
    network = load_bundle_network(exported, parser)
    once = run_bundle_on_volume(exported, volume, parser=parser, network=network, overrides=FAST)
    twice = run_bundle_on_volume(exported, volume * 2.0, parser=parser, network=network, overrides=FAST)
    np.testing.assert_allclose(twice.numpy(), 2.0 * once.numpy(), rtol=1e-5, atol=1e-4)


def test_eager_model_pt_route_equals_torchscript(exported, volume):  # noqa: F811
    parser = read_bundle_config(exported)
    eager = load_bundle_network(exported, parser, prefer="pt")
    scripted = load_bundle_network(exported, parser)
    assert isinstance(scripted, torch.jit.ScriptModule) and not isinstance(eager, torch.jit.ScriptModule)
    a = run_bundle_on_volume(exported, volume, parser=parser, network=eager, overrides=FAST)
    b = run_bundle_on_volume(exported, volume, parser=parser, network=scripted, overrides=FAST)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-3 * float(a.abs().max()))


def test_volume_off_the_model_grid_is_refused(exported):  # noqa: F811
    with pytest.raises(RuntimeError, match="PreparePETd") as caught:  # MONAI's Compose names the failing transform
        run_bundle_on_volume(exported, MetaTensor(torch.ones(12, 16, 16)), overrides=FAST)
    assert "not the model's 16^3 grid" in str(caught.value.__cause__)
    assert "m2diff-infer" in str(caught.value.__cause__)
