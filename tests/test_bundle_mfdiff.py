"""The MFdiff training bundle: both stages of supervise-assisted learning via ConfigWorkflow with a tiny overlay,
stage-1 → stage-2 weight hand-over, a non-diffusion ablation row, the mixed single-stage option, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata

from m2diff_monai.engines.workflow import epochs_for_iterations, warmup_lr_scheduler
from m2diff_monai.errors import InputError
from m2diff_monai.networks.factory import build_network
from synthetic_slices import write_synthetic_manifest
from tiny_networks import tiny_mfdiff

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "mfdiff"
TRAIN, FINETUNE, MIXED, DEMO = (str(BUNDLE / f) for f in ("train.json", "finetune.json", "mixed.json", "demo.json"))
TINY_NET = tiny_mfdiff()


def tiny_overrides(simulated: Path, invivo: Path, output_root: Path, **extra) -> dict:
    return {
        "bundle_root": str(BUNDLE),
        "simulated_manifest_file": str(simulated),
        "invivo_manifest_file": str(invivo),
        "output_root": str(output_root),
        "network_config": dict(TINY_NET),
        "spatial_size": None,
        "diffusion_config#timesteps": 50,
        "external_iterations": 3,
        "internal_iterations": 3,
        "epoch_length": 3,
        "batch_size": 4,
        "num_workers": 0,
        "cache": "memory",
        "val_interval": 1,
        "val_num_slices": 2,
        "val_batch_size": 2,
        "val_steps": 2,
        "amp_dtype": None,
        **extra,
    }


def make_workflow(config_files: list[str], **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=config_files, workflow_type="train", run_id="training", **overrides)
    workflow.initialize()
    return workflow


def finish(workflow: ConfigWorkflow) -> ConfigWorkflow:
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, slice_manifest):
    """A 'simulated' (the shared slice manifest) and an 'in-vivo' manifest (different seeds, 16², every slice
    with MRI)."""
    simulated = slice_manifest
    invivo = write_synthetic_manifest(
        tmp_path_factory.mktemp("invivo"),
        size=16,
        subjects={"viv-01": 0, "viv-02": 1},
        slices_per_orientation=2,
        seed=1,
    )
    return simulated, invivo


def test_verify_metadata_offline():
    verify_metadata(meta_file=str(BUNDLE / "metadata.json"), filepath=str(REPO / "bundles/schema/meta_schema.json"))
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    assert meta["monai_version"] == __import__("monai").__version__
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [192, 192]


def test_configs_have_paper_defaults():
    parser = ConfigParser()
    parser.read_config(TRAIN)
    assert parser["network_config"]["preset"] == "paper-192" and parser["network_config"]["variant"] == "MFdiff"
    diffusion = parser["diffusion_config"]
    assert (diffusion["timesteps"], diffusion["schedule"], diffusion["model_mean_type"]) == (1000, "linear", "eps")
    assert diffusion["clip_denoised"] == "auto" and parser["inference_defaults"] is None
    assert parser["optimizer"]["_target_"] == "torch.optim.AdamW" and parser["learning_rate"] == 1e-4
    assert parser["batch_size"] == 4 and parser["spatial_size"] == 192 and parser["mri_drop_prob"] == 0.0
    assert parser.get_parsed_content("max_iterations") == 50000
    assert parser.get_parsed_content("max_epochs") * parser["epoch_length"] == 50000
    assert parser.get_parsed_content("manifest_file") == "data_manifests/demo.json"
    assert parser.get_parsed_content("output_dir") == "runs/mfdiff/external"
    assert parser["stage1_checkpoint"] is None

    stage2 = ConfigParser()
    stage2.read_config([TRAIN, FINETUNE])
    assert stage2.get_parsed_content("max_iterations") == 20000
    assert stage2.get_parsed_content("manifest_file") == "data_manifests/invivo.json"
    assert stage2.get_parsed_content("output_dir") == "runs/mfdiff/internal"
    assert stage2.get_parsed_content("stage1_checkpoint") == "runs/mfdiff/external/checkpoints/last.pt"

    # the demo overlay commutes with the stage overlay: small lengths, demo paths, either order
    for files in ([TRAIN, DEMO, FINETUNE], [TRAIN, FINETUNE, DEMO]):
        demo = ConfigParser()
        demo.read_config(files)
        assert demo.get_parsed_content("max_iterations") == 200
        assert demo.get_parsed_content("stage1_checkpoint") == "runs/mfdiff-demo-bundle/external/checkpoints/last.pt"
        assert demo.get_parsed_content("manifest_file") == "data_manifests/demo.json"
    assert build_network(demo["network_config"]).config["image_size"] == 64
    stage1_demo = ConfigParser()
    stage1_demo.read_config([TRAIN, DEMO])
    assert stage1_demo.get_parsed_content("max_iterations") == 1200
    assert stage1_demo.get_parsed_content("validate#inferer").start_step == 300  # truncated start (docs/inference.md)
    # the sampler scripts/mfdiff_demo.sh evaluates with is stored in the demo's checkpoints
    assert stage1_demo.get_parsed_content("checkpoint_config")["inference_defaults"] == {
        "sampler": "ddim",
        "steps": 10,
        "eta": 0.0,
        "start_step": 300,
        "ld_consistency_fwhm": 7.0,
    }
    # ... and it trains only on the steps that sampler takes; the paper's config on all T
    assert stage1_demo.get_parsed_content("train#prepare_batch").max_timestep == 300
    assert stage1_demo.get_parsed_content("checkpoint_config")["training"]["train_max_timestep"] == 300
    assert parser.get_parsed_content("train#prepare_batch").max_timestep is None
    # like M2Diff's demo: 32² patches centred on uptake, 4 per slice; train.json keeps the paper's whole slices
    assert (stage1_demo["train_crop_size"], stage1_demo["crops_per_slice"], stage1_demo["batch_size"]) == (32, 4, 4)
    assert (parser["train_crop_size"], parser["crops_per_slice"]) == (None, 1)

    mixed = ConfigParser()
    mixed.read_config([TRAIN, MIXED])
    assert mixed.get_parsed_content("max_iterations") == 70000
    assert mixed.get_parsed_content("mixed_manifest_files") == [
        "data_manifests/demo.json",
        "data_manifests/invivo.json",
    ]


def test_iteration_budget_and_warmup_helpers():
    assert epochs_for_iterations(50000, 1000) == 50 and epochs_for_iterations(20000, 1000) == 20
    assert epochs_for_iterations(None, None, max_epochs=4) == 4
    for bad in ((10, 0), (7, 3), (0, 1)):
        with pytest.raises(ValueError):
            epochs_for_iterations(*bad)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_lr_scheduler(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_two_stage_training_hands_stage1_weights_to_stage2(manifests, tmp_path):
    simulated, invivo = manifests
    root = tmp_path / "runs"
    # stage 1 (external): 3 iterations of batch 4 on the simulated manifest (12 training slices)
    stage1 = finish(make_workflow([TRAIN], **tiny_overrides(simulated, invivo, root)))
    assert stage1.check_properties() == []
    last1 = root / "external" / "checkpoints" / "last.pt"
    ckpt1 = torch.load(last1, weights_only=True)
    assert ckpt1["iteration"] == 3 and ckpt1["config"]["diffusion"]["model_mean_type"] == "eps"
    assert ckpt1["config"]["data"]["stage"] == "external" and ckpt1["config"]["network"]["variant"] == "MFdiff"
    assert isinstance(stage1.parser.get_parsed_content("optimizer"), torch.optim.AdamW)
    training = ckpt1["config"]["training"]  # how the checkpoint was trained travels with it
    assert (training["learning_rate"], training["weight_decay"], training["grad_clip_norm"]) == (1e-4, 0.01, 1.0)
    assert training["max_iterations"] == 3 and training["batch_size"] == 4 and training["amp_dtype"] is None
    assert (root / "external" / "checkpoints" / "best.pt").is_file()

    # stage 2 (internal): default stage1_checkpoint = <output_root>/external/checkpoints/last.pt, in-vivo manifest
    stage2 = make_workflow([TRAIN, FINETUNE], **tiny_overrides(simulated, invivo, root))
    trainer = stage2.parser.get_parsed_content("train#trainer")
    network = stage2.parser.get_parsed_content("network")
    ema = stage2.parser.get_parsed_content("ema")
    assert stage2.parser.get_parsed_content("manifest") == str(invivo)
    seen = {}

    @trainer.on(Events.ITERATION_STARTED(once=1))
    def _snapshot(engine):
        seen["network"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
        seen["ema"] = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
        seen["iteration"] = engine.state.iteration

    finish(stage2)
    assert seen["iteration"] == 1  # a fresh run: iteration counter and optimizer start over
    for key, value in ckpt1["ema"].items():  # default: stage 1's EMA weights
        assert torch.equal(seen["network"][key], value), key
        assert torch.equal(seen["ema"][key], value), key
    ckpt2 = torch.load(root / "internal" / "checkpoints" / "last.pt", weights_only=True)
    # 3 iterations on 6 in-vivo slices (2 batches per pass: the loader restarts within the epoch)
    assert ckpt2["iteration"] == 3 and ckpt2["epoch"] == 1
    assert {int(s["step"]) for s in ckpt2["optimizer"]["state"].values()} == {3}
    assert ckpt2["config"]["data"]["stage"] == "internal"
    assert ckpt2["config"]["data"]["init_checkpoint"] == str(last1)
    assert any(not torch.equal(ckpt1["ema"][k], ckpt2["network"][k]) for k in ckpt2["network"])


def test_stage2_rejects_a_mismatched_checkpoint_unless_non_strict(manifests, tmp_path):
    simulated, invivo = manifests
    other = dict(TINY_NET, unet=dict(TINY_NET["unet"], model_channels=64))
    net = build_network(other)
    path = tmp_path / "other.pt"
    torch.save({"network": net.state_dict(), "ema": None, "config": {"network": net.config}}, path)
    overrides = tiny_overrides(simulated, invivo, tmp_path / "runs", stage1_checkpoint=str(path))
    with pytest.raises(Exception) as err:
        finish(make_workflow([TRAIN, FINETUNE], **overrides))
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, InputError) and "do not fit" in str(x) for x in chain)

    workflow = make_workflow([TRAIN, FINETUNE], **{**overrides, "stage1_strict": False})
    finish(workflow)
    handler = workflow.parser.get_parsed_content("train#handlers")[0]
    assert handler.missing and all(k in net.state_dict() for k in handler.missing)
    # the fusion module has the same shapes in both configs: it was loaded
    fusion_key = next(k for k in net.state_dict() if k.startswith("fusion."))
    assert fusion_key not in handler.missing


def test_non_diffusion_ablation_row_trains(manifests, tmp_path):
    simulated, invivo = manifests
    out = tmp_path / "runs"
    overrides = tiny_overrides(
        simulated, invivo, out, external_iterations=1, epoch_length=1, **{"network_config#variant": "CMUNet"}
    )
    workflow = finish(make_workflow([TRAIN], **overrides))
    network = workflow.parser.get_parsed_content("network")
    assert network.is_diffusion is False
    loss = workflow.parser.get_parsed_content("loss")
    assert set(loss.last_terms) == {"loss", "mse"}  # plain regression to SD, no diffusion terms
    ckpt = torch.load(out / "external" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 1 and ckpt["config"]["network"]["variant"] == "CMUNet"
    assert ckpt["best_metric_epoch"] == 1  # validated with one forward pass per batch


def test_mixed_single_stage_concatenates_two_manifests(manifests, tmp_path):
    simulated, invivo = manifests
    overrides = tiny_overrides(simulated, invivo, tmp_path / "runs", external_iterations=1, internal_iterations=2)
    workflow = make_workflow([TRAIN, MIXED], **overrides)
    items = workflow.parser.get_parsed_content("train#data")
    assert len(items) == 12 + 6  # 2 simulated + 1 in-vivo training subjects × 3 orientations × 2 slices
    assert {i["source"] for i in items} == {0, 1}
    assert {i["subject"] for i in items if i["source"] == 1} == {"viv-01"}
    val = workflow.parser.get_parsed_content("validate#data")
    assert {i["subject"] for i in val} == {"viv-02"}  # validated on the target (in-vivo) domain
    finish(workflow)
    ckpt = torch.load(tmp_path / "runs" / "mixed" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 3  # external + internal iterations
    assert ckpt["config"]["data"]["training_manifests"] == [str(simulated), str(invivo)]
