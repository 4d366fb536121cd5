"""What was evaluated is what a user gets: the sampler a checkpoint stores (``config["inference_defaults"]``) is
used by ``m2diff-infer``, the bundle's ``inference.json`` and cohort inference unless an explicit option says
otherwise; precedence: option > checkpoint > bundle > package defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from badinputs import write_subject, write_table
from m2diff_monai.engines.workflow import checkpoint_config
from m2diff_monai.errors import InputError
from m2diff_monai.inference import api
from m2diff_monai.inference.cli import main as infer_main
from m2diff_monai.networks.factory import build_network, register_network
from tiny_networks import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "m2diff"
CUBE = 32
QUICK = {"orientations": "axial", "fusion": "mean", "batch_size": 64, "progress": False, "png": False, "device": "cpu"}


class StepCounter(nn.Module):
    """x̂0 = LD; records every timestep it is called with (class-level: the bundle rebuilds it from the checkpoint)."""

    is_diffusion = True
    timesteps: list[int] = []

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)

    def forward(self, x_t=None, t=None, ld=None, mri=None, mri_available=None):
        StepCounter.timesteps.extend(int(v) for v in t.unique())
        return {"out": ld.clone()}


register_network("defaults_test_counter", StepCounter)


def distinct_steps() -> int:
    steps = len(set(StepCounter.timesteps))
    StepCounter.timesteps.clear()
    return steps


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    StepCounter.timesteps.clear()
    yield
    torch.set_num_threads(before)


def counter_checkpoint(path: Path, inference_defaults: dict | None) -> Path:
    net = build_network({"name": "defaults_test_counter"})
    data = {"size": CUBE, "normalization": "shared", "transform": "rigid", "space": "pet"}
    return save_checkpoint(path, net, None, data, inference_defaults)


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subject")
    cells = write_subject(root, "s01", seed=4, with_mri=False)
    return root / cells["ld_pet"]


# ------------------------------------------------------------------------------------------- resolution
def test_precedence_option_over_checkpoint_over_bundle_over_defaults():
    stored = {"sampler": "ancestral", "steps": 7, "start_step": 120}
    cfg = api.resolve_settings(BUNDLE, stored)
    assert (cfg.sampler, cfg.steps, cfg.start_step) == ("ancestral", 7, 120)
    assert cfg.sources["steps"] == "checkpoint" and cfg.sources["fusion"] == "bundle"
    cfg = api.resolve_settings(BUNDLE, stored, steps=3, start_step="none")
    assert (cfg.sampler, cfg.steps, cfg.start_step) == ("ancestral", 3, None)
    assert cfg.sources["steps"] == cfg.sources["start_step"] == "option"
    cfg = api.resolve_settings(BUNDLE, {})  # a checkpoint that stores nothing: the bundle's block
    assert (cfg.sampler, cfg.steps, cfg.sources["steps"]) == ("ddim", 50, "bundle")
    assert api.resolve_settings(None, {}).steps == 50 and api.resolve_settings(None, {}).sources == {}
    # stored nulls state something: the full chain and pure noise, over the bundle's 50 steps
    cfg = api.resolve_settings(BUNDLE, {"steps": None, "start_step": None})
    assert cfg.steps is None and cfg.start_step is None and cfg.sources["steps"] == "checkpoint"


def test_checkpoint_config_rejects_defaults_it_cannot_honour():
    net = build_network({"name": "defaults_test_counter"})
    with pytest.raises(ValueError, match="unknown inference_defaults"):
        checkpoint_config(net, {}, {}, {"device": "cuda"})  # the machine is not the model's to fix
    with pytest.raises(ValueError, match="sampler"):
        checkpoint_config(net, {}, {}, {"sampler": "euler"})
    assert checkpoint_config(net, {}, {}, None)["inference_defaults"] == {}


# ------------------------------------------------------------------------------------------- end to end
def test_infer_without_sampler_flags_samples_as_the_run_was_evaluated(tmp_path, subject, capsys):
    ckpt = counter_checkpoint(tmp_path / "evaluated.pt", {"sampler": "ddim", "steps": 3, "start_step": None})
    summary = api.infer_subject(ckpt, subject, tmp_path / "a.nii.gz", bundle=BUNDLE, **QUICK)
    assert distinct_steps() == 3 and summary["settings"]["steps"] == 3
    assert summary["settings_sources"]["steps"] == "checkpoint"
    summary = api.infer_subject(ckpt, subject, tmp_path / "b.nii.gz", bundle=BUNDLE, steps=2, **QUICK)
    assert distinct_steps() == 2 and summary["settings_sources"]["steps"] == "option"
    # the command line: no sampler flag → the stored 3 steps; --steps wins
    base = [
        "--bundle",
        str(BUNDLE),
        "--checkpoint",
        str(ckpt),
        "--ld-pet",
        str(subject),
        "--no-png",
        "--no-progress",
        "--orientations",
        "axial",
        "--fusion",
        "mean",
        "--device",
        "cpu",
    ]
    assert infer_main([*base, "--out", str(tmp_path / "c.nii.gz")]) == 0 and distinct_steps() == 3
    assert infer_main([*base, "--out", str(tmp_path / "d.nii.gz"), "--steps", "4"]) == 0 and distinct_steps() == 4
    # a checkpoint that stores nothing samples with the bundle's 50 steps (T = 100 here)
    plain = counter_checkpoint(tmp_path / "plain.pt", None)
    api.infer_subject(plain, subject, tmp_path / "e.nii.gz", bundle=BUNDLE, **QUICK)
    assert distinct_steps() == 50
    capsys.readouterr()


def test_the_bundle_run_resolves_like_the_cli(tmp_path, subject):
    """``python -m monai.bundle run inference --config_file bundles/m2diff/inference.json``: its null top-level
    sampler keys let the checkpoint's defaults through; a key set on the bundle command line wins."""
    ckpt = counter_checkpoint(tmp_path / "evaluated.pt", {"steps": 3})

    def run(out: str, **overrides) -> dict:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "inference.json"))
        for key, value in {
            "checkpoint": str(ckpt),
            "ld_pet": str(subject),
            "output": str(tmp_path / out),
            "png": False,
            "progress": False,
            "device": "cpu",
            "orientations": "axial",
            "fusion": "mean",
            **overrides,
        }.items():
            parser[key] = value
        return parser.get_parsed_content("inference")

    summary = run("a.nii.gz")
    assert distinct_steps() == 3 and summary["settings_sources"]["steps"] == "checkpoint"
    assert summary["settings_sources"]["sampler"] == "bundle" and summary["settings"]["sampler"] == "ddim"
    summary = run("b.nii.gz", steps=2)
    assert distinct_steps() == 2 and summary["settings_sources"]["steps"] == "option"


def test_cohort_inference_obeys_the_same_precedence(tmp_path):
    from preprocessing.pipeline import PipelineOptions, run_pipeline

    raw = tmp_path / "raw"
    row = write_subject(raw, "c01", seed=1, with_mri=False)
    row["split"] = "test"
    manifest = tmp_path / "manifest.json"
    run_pipeline(
        write_table(raw / "subjects.csv", [row]),
        tmp_path / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=CUBE, split=(0.0, 0.0, 1.0)),
    )
    ckpt = counter_checkpoint(tmp_path / "evaluated.pt", {"steps": 3})
    summary = api.infer_manifest(ckpt, manifest, tmp_path / "preds", bundle=BUNDLE, **QUICK)
    assert distinct_steps() == 3 and summary["settings"]["steps"] == 3
    assert summary["settings_sources"]["steps"] == "checkpoint"
    listed = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert listed["settings"]["steps"] == 3 and listed["clip_denoised"] == [-1.0, 10.0]
    api.infer_manifest(ckpt, manifest, tmp_path / "preds2", bundle=BUNDLE, steps=2, **QUICK)
    assert distinct_steps() == 2


def test_bad_stored_defaults_are_one_line_input_errors(tmp_path, subject):
    ckpt = counter_checkpoint(tmp_path / "ok.pt", {"steps": 3})
    content = torch.load(ckpt, weights_only=True)
    content["config"]["inference_defaults"] = {"steps": 0}
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="inference_defaults"):
        api.infer_subject(tmp_path / "bad.pt", subject, tmp_path / "x.nii.gz", **QUICK)
    assert not (tmp_path / "x.nii.gz").exists()


def test_clip_option_parses_and_overrides_the_checkpoint():
    assert api.InferenceSettings(clip_denoised="auto").clip_denoised == "auto"
    assert api.InferenceSettings(clip_denoised="none").clip_denoised is False
    assert api.InferenceSettings(clip_denoised="-1,4").clip_denoised == [-1.0, 4.0]
    with pytest.raises(ValueError, match="clip_denoised"):
        api.InferenceSettings(clip_denoised="4,-1")


def test_sampling_above_the_trained_timesteps_warns():
    import warnings

    from m2diff_monai.checkpoint import LoadedModel
    from m2diff_monai.inference.settings import InferenceSettings

    def model(training):
        return LoadedModel(nn.Identity(), {}, {}, {}, "ema", path="demo.pt", training=training)

    truncated = model({"train_max_timestep": 200})
    assert truncated.trained_max_timestep == 200
    with pytest.warns(UserWarning, match=r"demo.pt was trained only on timesteps 0..200 .*pure noise"):
        api.warn_if_untrained_start(truncated, InferenceSettings())
    with pytest.warns(UserWarning, match=r"starts from t = 300; use --start-step 200 or lower"):
        api.warn_if_untrained_start(truncated, InferenceSettings(start_step=300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.warn_if_untrained_start(truncated, InferenceSettings(start_step=200, steps=10))
        api.warn_if_untrained_start(model({}), InferenceSettings())  # the papers' U{0..T−1}: any start is fine
        api.warn_if_untrained_start(model({"train_max_timestep": None}), InferenceSettings())
