"""m2diff-export: layout, metadata (verify_metadata offline), model.pt, TorchScript vs eager at other shapes,
the exported inference.json in a fresh process, and bad inputs leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.data import load_net_with_metadata

from badinputs import centred_affine, phantom
from export_source import BUNDLE, REPO, TINY_V6, write_checkpoint
from m2diff_monai.checkpoint import LoadedModel, load_model
from m2diff_monai.export import bundle as export_mod
from m2diff_monai.export.cli import main
from m2diff_monai.export.model_card import load_metrics
from m2diff_monai.export.torchscript import (
    ONNX_MISSING,
    DenoiserForExport,
    ExportError,
    accepts_missing_mri,
    example_inputs,
    onnx_available,
    trace_denoiser,
)
from m2diff_monai.inference import api
from m2diff_monai.networks.factory import build_network
from tiny_networks import randomize_zero_params, save_checkpoint, tiny_mfdiff

torch.set_num_threads(1)

SCHEMA = REPO / "bundles" / "schema" / "meta_schema.json"
TINY_MFDIFF = tiny_mfdiff(attention=True, allow_missing_mri=True)
EXPECTED_FILES = {
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "models/model.pt",
    "models/model.ts",
    "docs/README.md",
    "LICENSE",
} | ({"configs/evaluate.json"} if (BUNDLE / "evaluate.json").is_file() else set())


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_layout_is_complete_and_nothing_else_is_left(exported):
    assert files_under(exported) == EXPECTED_FILES
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]  # no temporary folder left
    assert (exported / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert "Apache License" in (exported / "LICENSE").read_text()
    assert oct(exported.stat().st_mode & 0o777) != oct(0o700)  # not the private mode of a temporary folder


def test_metadata_verifies_offline_and_describes_the_model(exported, source):
    verify_metadata(meta_file=str(exported / "configs/metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((exported / "configs/metadata.json").read_text())
    source_meta = json.loads((BUNDLE / "metadata.json").read_text())
    assert meta["version"] == source_meta["version"]
    assert "exported by m2diff-export from best.pt" in meta["changelog"][meta["version"]]
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == np.__version__
    nd = meta["network_data_format"]
    assert list(nd["inputs"]) == ["x_t", "t", "ld", "mri", "mri_available"]
    assert nd["inputs"]["t"]["value_range"] == [0, 49] and nd["inputs"]["t"]["dtype"] == "int64"
    assert nd["inputs"]["ld"]["spatial_shape"] == ["2*n", "2*n"]  # the tiny net downsamples once
    assert nd["outputs"]["out"]["num_channels"] == 1 and "x0" in nd["outputs"]["out"]["channel_def"]["0"]
    ckpt = torch.load(source["checkpoint"], weights_only=True)
    assert meta["network_config"] == ckpt["config"]["network"]
    assert meta["eval_metrics"] == {
        "m2diff/psnr": 31.25,
        "m2diff/ssim": 0.912,
        "ld_pet/psnr": 25.5,
        "ld_pet/ssim": 0.801,
    }
    assert meta["export"]["weights"] == "ema"


def test_model_card_quotes_data_metrics_and_intended_use(exported):
    card = (exported / "docs/README.md").read_text()
    assert "Trained on the simulated demo cohort" in card
    assert "Not patient data" in card
    assert "31.25" in card and "0.912" in card
    assert "Not for clinical use" in card
    assert "python -m monai.bundle run inference --config_file configs/inference.json" in card
    # the checkpoint records the training manifest's preprocessing itself (engines.workflow.checkpoint_config);
    # the legacy name "paper" it records is exported under its current name
    assert "| normalization | volume | checkpoint |" in card


def test_model_pt_loads_with_weights_only_and_rebuilds_the_network(exported, source):
    ckpt = torch.load(exported / "models/model.pt", map_location="cpu", weights_only=True)
    assert ckpt["ema"] is None and ckpt["export"]["weights"] == "ema"
    assert set(ckpt["config"]) == {"network", "diffusion", "data", "inference_defaults"}
    # frozen from the training manifest's provenance: the bundle does not need the manifest any more
    assert ckpt["config"]["data"]["preprocessing"]["normalization"] == "volume"  # recorded as legacy "paper"
    net = build_network(ckpt["config"]["network"])
    net.load_state_dict(ckpt["network"])
    src = torch.load(source["checkpoint"], weights_only=True)
    for key, value in src["ema"].items():  # the exported weights are the EMA weights
        assert torch.equal(net.state_dict()[key], value)
    model = load_model(exported / "models/model.pt")  # m2diff-infer reads it as any checkpoint
    assert model.network_config == ckpt["config"]["network"]


def test_torchscript_equals_eager_at_other_batch_and_image_sizes(exported):
    ts, meta, extra = load_net_with_metadata(str(exported / "models/model.ts"), more_extra_files=("inference.json",))
    assert meta["network_data_format"]["inputs"]["x_t"]["dtype"] == "float32"
    assert meta["version"] == json.loads((exported / "configs/metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"]) == json.loads((exported / "configs/inference.json").read_text())
    model = load_model(exported / "models/model.pt")
    eager = DenoiserForExport(model.network).eval()
    with torch.no_grad():
        for batch, h, w, flags in [(3, 24, 16, [0.0, 1.0, 0.0]), (1, 32, 48, [1.0]), (5, 16, 16, [1.0] * 5)]:
            args = example_inputs(batch, h, w, flags, num_timesteps=50, seed=batch)
            torch.testing.assert_close(ts(*args), eager(*args), atol=1e-5, rtol=1e-4)
        # MRI-free through the traced per-sample path equals the eager call without MRI
        x_t, t, ld, mri, _ = example_inputs(2, 24, 24, [0.0, 0.0], num_timesteps=50, seed=7)
        traced = ts(x_t, t, ld, torch.zeros_like(mri), torch.zeros(2))
        torch.testing.assert_close(traced, model.network(x_t, t, ld)["out"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["MFdiff", "CMUNet"])
def test_mfdiff_traces_to_the_eager_result_at_other_sizes(variant):
    net = randomize_zero_params(build_network({**TINY_MFDIFF, "variant": variant})).eval()
    ts = trace_denoiser(net, check=False)  # compared here on our own, independently of the export's check
    eager = DenoiserForExport(net).eval()
    with torch.no_grad():
        for batch, h, w, flags in [(3, 24, 16, [1.0, 0.0, 1.0]), (1, 16, 32, [0.0])]:
            args = example_inputs(batch, h, w, flags, seed=batch)
            torch.testing.assert_close(ts(*args), eager(*args), atol=1e-5, rtol=1e-4)


def test_mri_required_mfdiff_traces_with_every_flag_set():
    """MFdiff built with allow_missing_mri=False (the bundle default) refuses flags of 0: the export's example and
    check inputs must all carry the MRI, and the checked trace must equal the eager network."""
    net = randomize_zero_params(build_network({**TINY_MFDIFF, "allow_missing_mri": False})).eval()
    assert not accepts_missing_mri(net) and accepts_missing_mri(build_network(TINY_MFDIFF))
    ts = trace_denoiser(net, check=True)
    eager = DenoiserForExport(net).eval()
    with torch.no_grad():
        args = example_inputs(3, 24, 16, [1.0, 1.0, 1.0], seed=5)
        torch.testing.assert_close(ts(*args), eager(*args), atol=1e-5, rtol=1e-4)


class _BakedWidth(torch.nn.Module):
    """A network whose trace silently bakes the image width in (``float(x.shape[-1])``)."""

    levels = 1

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x_t, t, ld, mri=None, mri_available=None):
        return {"out": self.conv(ld) * float(ld.shape[-1])}


def test_trace_check_catches_a_shape_baked_into_the_trace():
    with pytest.raises(ExportError):
        trace_denoiser(_BakedWidth(), size=8, check=True)


@pytest.mark.slow
def test_exported_inference_runs_in_a_fresh_process_on_a_nifti(exported, tmp_path):
    shape = (18, 20, 16)  # 3 mm voxels: the phantom brain fits the tiny model's 16³ cube
    affine = centred_affine(shape, 3.0)
    ld = tmp_path / "ld.nii.gz"
    nib.save(nib.Nifti1Image(phantom(shape, affine, "pet").astype(np.float32), affine), str(ld))
    pred = tmp_path / "pred.nii.gz"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            "configs/inference.json",
            "--ld_pet",
            str(ld),
            "--output",
            str(pred),
            "--steps",
            "2",
            "--orientations",
            "axial",
            "--png",
            "False",
            "--progress",
            "False",
            "--device",
            "cpu",
        ],
        cwd=exported,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {pred}" in proc.stdout.splitlines()  # a successful run says where the result went
    source_img, pred_img = nib.load(str(ld)), nib.load(str(pred))
    assert pred_img.shape == source_img.shape and np.allclose(pred_img.affine, source_img.affine)
    data = np.asarray(pred_img.dataobj)
    assert data.dtype == np.float32 and np.isfinite(data).all() and data.max() > 0


def test_bundle_root_override_finds_the_model_from_elsewhere(exported):
    parser = ConfigParser()
    parser.read_config(str(exported / "configs/inference.json"))
    parser["bundle_root"] = str(exported)
    assert parser.get_parsed_content("checkpoint") == f"{exported}/models/model.pt"
    model = parser.get_parsed_content("model")
    assert isinstance(model, LoadedModel) and model.weights == "ema" and model.diffusion_config["timesteps"] == 50
    reference = load_model(exported / "models/model.pt")
    for key, value in reference.network.state_dict().items():
        assert torch.equal(model.network.state_dict()[key], value)


def test_options_version_name_raw_weights_and_force(source, exported, tmp_path):
    out = tmp_path / "again"
    (out / "models").mkdir(parents=True)
    (out / "configs").mkdir()
    (out / "configs/metadata.json").write_text("{}")  # an earlier export: the only folder --force replaces
    (out / "stale.txt").write_text("old export")
    result = export_mod.export_bundle(
        BUNDLE, source["checkpoint"], out, weights="raw", name="Tiny M2Diff", version="1.2.3", force=True, check=False
    )
    assert result.weights == "raw" and files_under(out) == EXPECTED_FILES
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["version"] == "1.2.3" and meta["name"] == "Tiny M2Diff"
    assert list(meta["changelog"])[0] == "1.2.3" and "0.1.0" in meta["changelog"]
    ckpt = torch.load(out / "models/model.pt", weights_only=True)
    src = torch.load(source["checkpoint"], weights_only=True)
    assert all(torch.equal(ckpt["network"][k], v) for k, v in src["network"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_set_writes_sampler_defaults_into_the_exported_inference_config(source, tmp_path, capsys):
    out = tmp_path / "with_defaults"
    rc = main(
        [
            "--bundle",
            str(BUNDLE),
            "--checkpoint",
            str(source["checkpoint"]),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "start_step=200",
            "--set",
            "steps=10",
            "--set",
            "sampler=ddim",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "configs/inference.json").read_text())
    assert (config["start_step"], config["steps"], config["sampler"]) == (200, 10, "ddim")
    assert config["inference"]["start_step"] == "@start_step"  # the entry point still reads the top-level key
    assert api.bundle_defaults(out / "configs/inference.json")["start_step"] == 200
    # a source inference.json written before the setting existed still hands it to the entry point
    older = json.loads((BUNDLE / "inference.json").read_text())
    older.pop("start_step")
    older["inference"].pop("start_step")
    loaded = {"config": json.loads(json.dumps(torch.load(source["checkpoint"], weights_only=True)["config"]))}
    rewritten = export_mod.rewrite_inference_config(older, loaded, {"start_step": 200})
    assert rewritten["start_step"] == 200 and rewritten["inference"]["start_step"] == "@start_step"


def test_export_writes_the_stored_sampler_and_the_card_states_it(source, tmp_path):
    """What the training run was evaluated with (``config["inference_defaults"]``) becomes the exported
    ``inference.json``'s sampler; ``--set`` still wins over it."""
    net = randomize_zero_params(build_network(TINY_V6)).eval()
    stored = {"sampler": "ddim", "steps": 7, "eta": 0.0, "start_step": 120}
    data = {"intensity_range": [0, 1], "manifest": str(source["root"] / "demo.json")}
    ckpt = tmp_path / "evaluated.pt"
    save_checkpoint(ckpt, net, {"timesteps": 50}, data, stored)
    out = tmp_path / "exported"
    export_mod.export_bundle(BUNDLE, ckpt, out, check=False)
    config = json.loads((out / "configs/inference.json").read_text())
    assert config["sampling_defaults"]["steps"] == 7 and config["sampling_defaults"]["start_step"] == 120
    assert config["steps"] is None and config["start_step"] is None  # null: the stored values apply
    assert config["inference"]["sampling_defaults"] == "@sampling_defaults"
    model = load_model(out / "models/model.pt")
    assert model.inference_defaults == stored
    assert model.diffusion_config["clip_denoised"] == [-1.0, 1.0]  # the manifest records min-max ("paper") data
    cfg = api.resolve_settings(out / "configs/inference.json", model.inference_defaults)
    assert (cfg.sampler, cfg.steps, cfg.start_step) == ("ddim", 7, 120)
    card = (out / "docs/README.md").read_text()
    assert "ddim, 7 steps" in card and "t = 120" in card and "clipped to [-1, 1]" in card
    over = tmp_path / "exported_set"
    export_mod.export_bundle(BUNDLE, ckpt, over, check=False, sampler_defaults={"steps": 3})
    config = json.loads((over / "configs/inference.json").read_text())
    assert config["steps"] == 3 and config["start_step"] is None
    assert "ddim, 3 steps" in (over / "docs/README.md").read_text()
    # the metadata's LD range: [0, 1] for min–max data, open above for shared data (hot spots stay above 1)
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["ld"]["value_range"] == [0.0, 1.0]
    shared = export_mod.network_data_format(net, {"timesteps": 50}, {"preprocessing": {"normalization": "shared"}})
    assert shared["inputs"]["ld"]["value_range"] == [] and shared["inputs"]["mri"]["value_range"] == [0.0, 1.0]


def test_export_keeps_the_training_record_and_warns_on_an_untrained_start(source, tmp_path):
    """A truncated-timestep model (``train_max_timestep``) keeps its record in ``models/model.pt``, so the exported
    bundle warns like ``m2diff-infer``; exporting a sampler that starts above the trained steps warns too."""
    import warnings

    from m2diff_monai.errors import UserFacingWarning

    net = randomize_zero_params(build_network(TINY_V6)).eval()
    data = {"intensity_range": [0, 1], "manifest": str(source["root"] / "demo.json")}
    ckpt = tmp_path / "truncated.pt"
    save_checkpoint(ckpt, net, {"timesteps": 50}, data, {"sampler": "ddim", "steps": 3, "start_step": 30})
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["training"] = {"train_max_timestep": 30, "batch_size": 4}
    torch.save(saved, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserFacingWarning)  # the stored start (30) is inside the trained steps
        export_mod.export_bundle(BUNDLE, ckpt, tmp_path / "ok", check=False)
    model = load_model(tmp_path / "ok" / "models/model.pt")
    assert model.training == {"train_max_timestep": 30, "batch_size": 4} and model.trained_max_timestep == 30
    with pytest.warns(UserFacingWarning, match=r"trained only on timesteps 0..30 .* starts from t = 40"):
        export_mod.export_bundle(BUNDLE, ckpt, tmp_path / "late", check=False, sampler_defaults={"start_step": 40})


# ------------------------------------------------------------------------------------------------ bad input
def run_bad(args: list[str], out: Path, capsys) -> str:
    rc = main([*args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("m2diff-export: ")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith((f".tmp.{out.name}.", f".old.{out.name}."))]
    return err[0]


def test_missing_checkpoint(tmp_path, capsys):
    line = run_bad(["--bundle", str(BUNDLE), "--checkpoint", str(tmp_path / "nope.pt")], tmp_path / "out", capsys)
    assert "nope.pt" in line and "does not exist" in line


def test_unreadable_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    line = run_bad(["--bundle", str(BUNDLE), "--checkpoint", str(junk)], tmp_path / "out", capsys)
    assert "junk.pt" in line and "cannot read the checkpoint" in line


def test_checkpoint_without_config(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "noconfig.pt", TINY_V6, with_config=False)
    line = run_bad(["--bundle", str(BUNDLE), "--checkpoint", str(ckpt)], tmp_path / "out", capsys)
    assert "noconfig.pt" in line and "config" in line


def test_bundle_without_inference_json(source, tmp_path, capsys):
    bad_bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bad_bundle)
    (bad_bundle / "inference.json").unlink()
    line = run_bad(["--bundle", str(bad_bundle), "--checkpoint", str(source["checkpoint"])], tmp_path / "out", capsys)
    assert "inference.json" in line and str(bad_bundle) in line


def test_ema_asked_for_but_absent_and_bad_version(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "noema.pt", TINY_V6, ema=False)
    line = run_bad(["--bundle", str(BUNDLE), "--checkpoint", str(ckpt), "--weights", "ema"], tmp_path / "out", capsys)
    assert "no EMA" in line
    line = run_bad(["--bundle", str(BUNDLE), "--checkpoint", str(ckpt), "--version", "one"], tmp_path / "out", capsys)
    assert "X.Y.Z" in line


@pytest.mark.parametrize(
    "setting,expected",
    [("stpes=10", "unknown inference settings"), ("start_step=0", "start step"), ("start_step", "KEY=VALUE")],
)
def test_bad_set_is_one_line_and_writes_nothing(source, tmp_path, capsys, setting, expected):
    line = run_bad(
        ["--bundle", str(BUNDLE), "--checkpoint", str(source["checkpoint"]), "--set", setting], tmp_path / "out", capsys
    )
    assert expected in line


def test_existing_output_is_kept_without_force(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["--bundle", str(BUNDLE), "--checkpoint", str(source["checkpoint"]), "--out", str(out), "--no-progress"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert files_under(out) == {"keep.txt"}


def test_failure_mid_export_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ExportError("traced module differs from the network")

    monkeypatch.setattr(export_mod, "trace_denoiser", broken)
    out = tmp_path / "out"
    rc = main(["--bundle", str(BUNDLE), "--checkpoint", str(source["checkpoint"]), "--out", str(out), "--no-progress"])
    assert rc == 1 and "traced module differs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_onnx_option(source, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--bundle", str(BUNDLE), "--checkpoint", str(source["checkpoint"]), "--onnx"]
    if not onnx_available():  # this environment has no onnx: one clear line, exit non-zero, nothing written
        assert run_bad(args, out, capsys) == f"m2diff-export: error: {ONNX_MISSING}"
        return
    import onnx

    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    model = onnx.load(str(out / "models/model.onnx"))
    assert [i.name for i in model.graph.input][:5] == ["x_t", "t", "ld", "mri", "mri_available"]


def test_metrics_json_is_flattened(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"metrics": {"psnr": {"mean": 30.5, "std": 1.5}, "ssim": 0.9, "note": "x"}}))
    rows, flat = load_metrics(path)
    assert flat == {"psnr/mean": 30.5, "psnr/std": 1.5, "ssim": 0.9}
    assert {"metric": "ssim", "value": 0.9} in rows


def test_model_card_names_the_sampler_that_produced_the_metrics(tmp_path):
    from m2diff_monai.export.model_card import evaluated_samplers, render_model_card

    report, pred = tmp_path / "report", tmp_path / "pred"
    report.mkdir()
    pred.mkdir()
    (report / "summary.csv").write_text(
        "method,subjects,psnr_mean,psnr_std,psnr_n,ssim_2d_axial_mean\nM2Diff,2,34.02,1.5,2,0.9\nGauss,2,30.1,,2,0.8\n"
    )
    (report / "run.json").write_text(
        json.dumps({"tool": "m2diff-evaluate", "predictions": {"M2Diff": str(pred), "Gauss": str(tmp_path / "gone")}})
    )
    (pred / "predictions.json").write_text(
        json.dumps(
            {
                "tool": "m2diff-infer",
                "checkpoint": "runs/x/best.pt",
                "weights": "ema",
                "settings": {"sampler": "ddim", "steps": 10, "eta": 0.0, "start_step": None},
            }
        )
    )
    rows = evaluated_samplers(report / "summary.csv")
    assert rows == [
        {
            "method": "M2Diff",
            "sampler": "ddim",
            "steps": 10,
            "eta": 0.0,
            "start_step": "none",
            "weights": "ema",
            "checkpoint": "runs/x/best.pt",
        }
    ]
    assert evaluated_samplers(report / "run.json") == rows
    assert evaluated_samplers(tmp_path / "elsewhere" / "summary.csv") == []

    metrics_rows, _ = load_metrics(report / "summary.csv")
    card = render_model_card(
        {"name": "t", "network_config": {}},
        {"sampler_defaults": {"sampler": "ddim", "steps": 50}},
        "data",
        {},
        metrics_rows,
        "summary.csv",
        rows,
    )
    evaluation = card.split("## Evaluation", 1)[1].split("## Intended use", 1)[0]
    assert "| M2Diff | ddim | 10 |" in evaluation
    assert "| method | subjects | PSNR (dB) |" in evaluation and "| M2Diff | 2 | 34.02 ± 1.5 |" in evaluation
    assert "| Gauss | 2 | 30.1 |" in evaluation and "ssim_2d_axial" not in evaluation
    assert "other settings than the exported default (ddim, 50 steps)" in evaluation
    same = render_model_card(
        {"name": "t", "network_config": {}},
        {"sampler_defaults": {"sampler": "ddim", "steps": 10}},
        "data",
        {},
        metrics_rows,
        "summary.csv",
        rows,
    )
    assert "other settings than the exported default" not in same
