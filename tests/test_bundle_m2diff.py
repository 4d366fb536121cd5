"""The M2Diff training bundle: a ConfigWorkflow run of train.json (+ a tiny overlay), checkpoints, resume, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata

from m2diff_monai.errors import InputError
from m2diff_monai.inference.defaults import check_inference_defaults
from m2diff_monai.networks.factory import build_network
from tiny_networks import tiny_m2diff

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "m2diff"
TINY_NET = tiny_m2diff()


def tiny_overrides(manifest: Path, output_dir: Path, **extra) -> dict:
    return {
        "bundle_root": str(BUNDLE),
        "manifest_file": str(manifest),
        "output_dir": str(output_dir),
        "network_config": dict(TINY_NET),
        "diffusion_config#timesteps": 50,
        "max_epochs": 1,
        "batch_size": 4,
        "num_workers": 0,
        "cache": "memory",
        "val_num_slices": 2,
        "val_batch_size": 2,
        "val_steps": 2,
        "amp_dtype": None,
        **extra,
    }


def run_training(**overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "train.json"), workflow_type="train", run_id="training", **overrides
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def test_verify_metadata_offline():
    verify_metadata(meta_file=str(BUNDLE / "metadata.json"), filepath=str(REPO / "bundles/schema/meta_schema.json"))
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    assert meta["monai_version"] == __import__("monai").__version__


def test_local_schema_rejects_incomplete_metadata(tmp_path):
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["dtype"]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dtype"):
        verify_metadata(meta_file=str(path), filepath=str(REPO / "bundles/schema/meta_schema.json"))


def test_train_config_has_paper_defaults():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "train.json"))
    assert parser["network_config"] == {"name": "m2diff", "preset": "paper-256", "variant": "V6"}
    assert parser["diffusion_config"]["timesteps"] == 1000 and parser["diffusion_config"]["model_mean_type"] == "x0"
    assert parser["diffusion_config"]["schedule"] == "linear"
    assert parser["diffusion_config"]["model_var_type"] == "fixed_large"
    # "auto" = the official (-1, 1) for the paper's min-max data, a wide range for shared data (diffusion.clip)
    assert parser["diffusion_config"]["clip_denoised"] == "auto" and parser["inference_defaults"] is None
    assert (
        parser["max_epochs"] == 100
        and parser["learning_rate"] == 1e-4
        and parser["optimizer"]["_target_"] == "torch.optim.Adam"
    )
    assert (parser["lambda_task"], parser["lambda_bias"], parser["mri_drop_prob"]) == (0.4, 0.2, 0.3)
    # the official training loop's L_bias and MRI dropout, wired to both the loss and the batch preparation
    assert (parser["bias_loss"], parser["mri_dropout"]) == ("official_xprev", "official")
    assert parser["loss"]["bias_loss"] == "@bias_loss" and parser["train"]["prepare_batch"]["bias_loss"] == "@bias_loss"
    assert parser["train"]["prepare_batch"]["mri_dropout"] == "@mri_dropout"
    assert parser.get_parsed_content("manifest_file") == "data_manifests/demo.json"
    demo = ConfigParser()
    demo.read_config([str(BUNDLE / "train.json"), str(BUNDLE / "demo.json")])
    assert demo["network_config"]["preset"] == "demo" and demo["max_epochs"] < 100
    net = build_network(demo["network_config"])
    assert net.config["image_size"] == 64  # the 4 mm / 64³ demo cohort of the main job
    # the papers train on whole slices; the demo on 32² patches centred on uptake (4 per slice, 16 per step)
    assert (parser["train_crop_size"], parser["crops_per_slice"], parser["train_crop_centres"]) == (None, 1, "uptake")
    assert (demo["train_crop_size"], demo["crops_per_slice"], demo["batch_size"]) == (32, 4, 4)
    assert demo["train_crop_centres"] == "head"  # lesion-neutral centres: uptake-weighted ones neglect cold defects
    assert demo["train"]["preprocessing"]["crop_size"] == "@train_crop_size"
    # the sampler scripts/main_job.sh evaluates with is stored in the demo's checkpoints
    assert demo["inference_defaults"] == {
        "sampler": "ddim",
        "steps": 2,
        "eta": 0.0,
        "start_step": None,
        "ld_consistency_fwhm": 7.0,
    }
    check_inference_defaults(demo["inference_defaults"])
    # the last epoch validates, so the run writes the best.pt that scripts/main_job.sh samples with
    assert demo["max_epochs"] % demo["val_interval"] == 0


def test_training_run_writes_checkpoints_with_config_and_resume_continues(slice_manifest, tmp_path):
    out = tmp_path / "run"
    evaluated = {"sampler": "ddim", "steps": 2, "eta": 0.0, "start_step": None}
    workflow = run_training(**tiny_overrides(slice_manifest, out, inference_defaults=evaluated))
    assert workflow.check_properties() == []
    last, best = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    assert last.is_file() and best.is_file()
    assert list((out / "logs").glob("events.out.tfevents.*"))
    ckpt = torch.load(last, weights_only=True)
    assert set(ckpt) >= {"network", "ema", "optimizer", "scaler", "epoch", "iteration", "config"}
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3  # 12 training slices, batch 4
    assert ckpt["config"]["network"]["model_channels"] == 32 and ckpt["config"]["diffusion"]["timesteps"] == 50
    assert ckpt["config"]["data"]["orientations"] is None and ckpt["best_metric_epoch"] == 1
    # what the run was evaluated with travels too; "auto" is stored resolved (no normalization recorded by this
    # synthetic manifest: the wide range, which never cuts) and validation sampled with exactly that config
    assert ckpt["config"]["inference_defaults"] == evaluated
    # and how it was trained: the loss recipe (official L_bias and MRI dropout by default) and the optimiser
    training = ckpt["config"]["training"]
    assert training["bias_loss"] == "official_xprev" and training["mri_dropout"] == "official"
    assert training["mri_drop_prob"] == 0.3 and (training["lambda_task"], training["lambda_bias"]) == (0.4, 0.2)
    assert training["batch_size"] == 4 and training["max_epochs"] == 1 and training["amp_dtype"] is None
    assert training["learning_rate"] == 1e-4
    assert ckpt["config"]["diffusion"]["clip_denoised"] == [-1.0, 10.0]
    assert workflow.parser.get_parsed_content("validate#inferer").diffusion_config == ckpt["config"]["diffusion"]
    # the network config travels with the checkpoint: rebuild without knowing the overlay
    net = build_network(ckpt["config"]["network"])
    net.load_state_dict(ckpt["ema"])
    net.load_state_dict(ckpt["network"])
    from m2diff_monai.checkpoint import load_model  # what m2diff-infer does with the checkpoint

    loaded = load_model(best)
    assert loaded.weights == "ema" and loaded.network_config == ckpt["config"]["network"]
    assert loaded.inference_defaults == evaluated
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert adam_steps == {3}

    resumed = run_training(**tiny_overrides(slice_manifest, out, max_epochs=2, resume=str(last)))
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 6
    ckpt2 = torch.load(last, weights_only=True)
    assert ckpt2["epoch"] == 2 and ckpt2["iteration"] == 6 and ckpt2["ema_updates"] == 6
    # Adam continued from the restored state (a fresh optimizer would be at step 3)
    assert {int(s["step"]) for s in ckpt2["optimizer"]["state"].values()} == {6}
    assert any(not torch.equal(ckpt["network"][k], ckpt2["network"][k]) for k in ckpt["network"])


def test_single_orientation_model_from_config(slice_manifest, tmp_path):
    out = tmp_path / "axial"
    overrides = tiny_overrides(
        slice_manifest, out, orientations=["axial"], ema_decay=None, val_interval=2, amp_dtype="bfloat16"
    )
    run_training(**overrides)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 1 and ckpt["config"]["data"]["orientations"] == ["axial"]  # 4 axial slices
    assert ckpt["ema"] is None and not (out / "checkpoints" / "best.pt").exists()  # no validation ran


def test_training_on_patches_validates_on_whole_slices(slice_manifest, tmp_path):
    out = tmp_path / "patches"
    overrides = tiny_overrides(slice_manifest, out, train_crop_size=8, crops_per_slice=2, batch_size=2)
    workflow = run_training(**overrides)
    batch = next(iter(workflow.parser.get_parsed_content("train#dataloader")))
    assert batch["sd_pet"].shape == (4, 1, 8, 8)  # 2 slices × 2 patches of 8²
    val_batch = next(iter(workflow.parser.get_parsed_content("validate#dataloader")))
    assert val_batch["sd_pet"].shape[-2:] == (16, 16)  # validation samples whole slices
    ckpt = torch.load(out / "checkpoints" / "best.pt", weights_only=True)  # validation sampled whole 16² slices
    assert ckpt["iteration"] > 0 and "ema" in ckpt
    recipe = {k: ckpt["config"]["data"][k] for k in ("train_crop_size", "crops_per_slice", "train_crop_centres")}
    assert recipe == {"train_crop_size": 8, "crops_per_slice": 2, "train_crop_centres": "uptake"}  # the checkpoint says


def test_missing_manifest_error_names_the_demo_command(tmp_path):
    with pytest.raises(Exception) as err:
        run_training(**tiny_overrides(tmp_path / "missing.json", tmp_path / "run"))
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any(isinstance(x, InputError) and "m2diff-preprocess demo --out work/demo" in str(x) for x in chain)
