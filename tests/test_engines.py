"""Engines glue: slice loading, manifests, prepare_batch, the multi-task loss, EMA, checkpoint config, DDP filters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.handlers import ValidationHandler

from m2diff_monai.data.datasets import build_dataset, build_loader, load_slice_items
from m2diff_monai.data.transforms import LoadSliced, slice_transforms
from m2diff_monai.diffusion import build_diffusion
from m2diff_monai.engines.ema import build_ema, ema_decay, evaluation_network, load_ema_state
from m2diff_monai.engines.handlers import EMAUpdateHandler, ResumeHandler
from m2diff_monai.engines.losses import DiffusionLoss
from m2diff_monai.engines.prepare_batch import DiffusionPrepareBatch, ValidationPrepareBatch, mri_dropout_flags
from m2diff_monai.engines.workflow import checkpoint_config, handlers_for_rank, loss_output
from m2diff_monai.errors import InputError
from m2diff_monai.networks.factory import build_network
from synthetic_slices import write_synthetic_manifest
from tiny_networks import tiny_m2diff

torch.set_num_threads(1)

TINY_NET = tiny_m2diff()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_synthetic_manifest(root, size=16, slices_per_orientation=2, mri_free_subjects=("sub-02",))


# ----------------------------------------------------------------------------------------------- data
def test_load_slice_items_resolves_paths_filters_orientations_and_keeps_empty_mri(manifest):
    items = load_slice_items(manifest, "training")
    assert len(items) == 2 * 3 * 2
    free = [i for i in items if i["subject"] == "sub-02"]
    assert free and all(i["mri"] == "" and i["mri_available"] == 0 for i in free)
    with_mri = [i for i in items if i["subject"] == "sub-01"]
    assert all(i["mri_available"] == 1 and i["mri"].endswith(".npy") for i in with_mri)
    assert all(np.load(i["ld_pet"]).shape == (1, 16, 16) for i in items)
    axial = load_slice_items(manifest, "training", orientations="axial")
    assert {i["orientation"] for i in axial} == {"axial"} and len(axial) == 4
    two = load_slice_items(manifest, "training", orientations=["axial", "sagittal"], limit=3)
    assert len(two) == 3 and two[0] == load_slice_items(manifest, "training", ["axial", "sagittal"])[0]


def test_missing_manifest_names_the_command_that_creates_it(tmp_path):
    with pytest.raises(InputError, match="m2diff-preprocess demo --out work/demo") as err:
        load_slice_items(tmp_path / "nope.json")
    assert "nope.json" in str(err.value)


def test_manifest_without_split_is_an_input_error(tmp_path):
    from m2diff_monai.data.manifest import provenance, write_manifest

    path = write_manifest(
        tmp_path / "m.json",
        {
            "name": "empty",
            "training": [],
            "validation": [],
            "test": [],
            "volumes": [],
            "provenance": provenance("tests", {}),
        },
    )
    with pytest.raises(InputError, match="no 'training' slice items"):
        load_slice_items(path)
    with pytest.raises(InputError, match="'validation'"):
        load_slice_items(path, "validation")
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(InputError, match="manifest breaks the manifest schema at top level: 'name' is a required"):
        load_slice_items(path)


def test_load_sliced_zero_mri_and_bad_shape(manifest, tmp_path):
    items = load_slice_items(manifest, "training")
    free = next(i for i in items if i["mri_available"] == 0)
    out = LoadSliced()(free)
    assert out["mri"].shape == (1, 16, 16) and float(out["mri"].abs().sum()) == 0.0
    assert out["mri_available"].item() == 0.0
    full = next(i for i in items if i["mri_available"] == 1)
    out = LoadSliced()(full)
    np.testing.assert_array_equal(out["mri"].numpy(), np.load(full["mri"]))
    assert out["ld_pet"].dtype == torch.float32 and out["mri_available"].item() == 1.0
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 16, 16), np.float32))
    with pytest.raises(InputError, match="shape"):
        LoadSliced()({**full, "sd_pet": str(bad)})


def test_slice_transforms_pad_to_spatial_size(manifest):
    item = load_slice_items(manifest, "training")[0]
    out = slice_transforms(spatial_size=24)(item)
    assert out["sd_pet"].shape == (1, 24, 24) and type(out["sd_pet"]) is torch.Tensor
    ref = np.load(item["sd_pet"])[0]
    np.testing.assert_allclose(out["sd_pet"][0, 4:20, 4:20].numpy(), ref)
    assert float(out["sd_pet"][0, :4].abs().sum()) == 0.0


def test_slice_transforms_crops_patches_where_the_uptake_is(tmp_path):
    """Training patches: the same window of every image, ``crops_per_slice`` per slice, centred on SD uptake."""
    sd = np.zeros((1, 32, 32), np.float32)
    sd[0, 20:28, 4:12] = 1.0  # the only uptake: a patch without it would be all zeros
    ld = sd + np.arange(32 * 32, dtype=np.float32).reshape(1, 32, 32) * 1e-3  # position-coded
    item = {"subject": "s", "mri_available": 1}
    for key, array in (("sd_pet", sd), ("ld_pet", ld), ("mri", ld + 5.0)):
        np.save(tmp_path / f"{key}.npy", array)
        item[key] = str(tmp_path / f"{key}.npy")
    patches = slice_transforms(crop_size=8, crops_per_slice=5)(item)
    assert isinstance(patches, list) and len(patches) == 5
    for patch in patches:
        assert patch["sd_pet"].shape == (1, 8, 8) and type(patch["ld_pet"]) is torch.Tensor
        assert float(patch["sd_pet"].sum()) > 0  # centred where the tracer is
        # LD and MRI come from the same window as SD: the position code of LD matches SD's window
        code = ((patch["ld_pet"] - patch["sd_pet"]) * 1e3).round()
        row, col = divmod(int(code[0, 0, 0]), 32)
        np.testing.assert_array_equal(patch["sd_pet"].numpy(), sd[:, row : row + 8, col : col + 8])
        np.testing.assert_allclose(patch["mri"].numpy(), patch["ld_pet"].numpy() + 5.0, atol=1e-5)
    loader = build_loader(build_dataset([item] * 3, slice_transforms(crop_size=8, crops_per_slice=2)), batch_size=3)
    assert next(iter(loader))["sd_pet"].shape == (6, 1, 8, 8)  # B slices × crops_per_slice patches
    with pytest.raises(ValueError, match="crops_per_slice"):
        slice_transforms(crop_size=8, crops_per_slice=0)


def test_head_crop_centres_visit_low_uptake_as_often_as_hot_spots(tmp_path):
    """ "uptake" centres follow the SD uptake (hot spots favoured); "head" centres are uniform over the head."""
    sd = np.zeros((1, 32, 32), np.float32)
    sd[0, 2:6, 2:6] = 20.0  # a hot lesion of 16 voxels
    sd[0, 12:30, 12:30] = 1.0  # 324 voxels of ordinary uptake, far from it
    item = {"subject": "s", "mri_available": 0}
    for key in ("sd_pet", "ld_pet"):
        np.save(tmp_path / f"{key}.npy", sd)
        item[key] = str(tmp_path / f"{key}.npy")
    hot_share = {}
    for centres in ("uptake", "head"):
        transform = slice_transforms(crop_size=4, crops_per_slice=200, crop_centres=centres).set_random_state(0)
        patches = transform(item)
        hot_share[centres] = np.mean([float(p["sd_pet"].max()) == 20.0 for p in patches])
        assert all("crop_weight" not in p for p in patches)
    # expected: 320 / 644 ≈ 0.50 of the weight on the lesion with "uptake", 16 / 340 ≈ 0.05 with "head"
    assert hot_share["uptake"] > 0.35 and hot_share["head"] < 0.15, hot_share
    with pytest.raises(ValueError, match="crop_centres"):
        slice_transforms(crop_size=4, crop_centres="lesions")


def test_dataset_and_loader_batch(manifest):
    data = load_slice_items(manifest, "training")
    for cache in ("memory", "none"):
        loader = build_loader(build_dataset(data, slice_transforms(), cache=cache), batch_size=4, shuffle=False)
        batch = next(iter(loader))
        assert batch["ld_pet"].shape == (4, 1, 16, 16) and batch["mri_available"].shape == (4,)


# ----------------------------------------------------------------------------------------------- prepare_batch
def _batch(b=6, size=8, available=None):
    g = torch.Generator().manual_seed(0)
    avail = torch.ones(b) if available is None else available
    return {
        "ld_pet": torch.rand(b, 1, size, size, generator=g),
        "sd_pet": torch.rand(b, 1, size, size, generator=g),
        "mri": torch.rand(b, 1, size, size, generator=g) + 0.1,
        "mri_available": avail,
    }


def test_prepare_batch_shapes_and_forward_process():
    diffusion = build_diffusion({"timesteps": 100})
    batch = _batch(available=torch.tensor([1.0, 1, 1, 0, 0, 1]))
    prep = DiffusionPrepareBatch(diffusion, mri_drop_prob=0.5, mri_dropout="zero_and_mask", bias_loss="x0_mse")
    x_t, targets, args, kwargs = prep(batch, "cpu")
    assert args == () and set(kwargs) == {"t", "ld", "mri", "mri_available"}
    assert x_t.shape == (6, 1, 8, 8) and kwargs["t"].shape == (6,) and kwargs["t"].dtype == torch.long
    assert int(kwargs["t"].min()) >= 0 and int(kwargs["t"].max()) < 100
    t = targets["t"]
    ab = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * batch["sd_pet"] + (1 - ab).sqrt() * targets["noise"]
    torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets["x_start"], batch["sd_pet"])
    flag = kwargs["mri_available"]
    assert torch.all(flag <= batch["mri_available"])  # never "available" where the data has no MRI
    for i in range(6):
        assert (kwargs["mri"][i].abs().sum() > 0) == bool(flag[i])
    torch.testing.assert_close(targets["mri_available"], flag)
    torch.testing.assert_close(targets["mri_supervised"], flag)  # zero_and_mask: dropped samples lose L_mri


def test_truncated_timestep_range_trains_only_the_steps_a_truncated_sampler_takes():
    diffusion = build_diffusion({"timesteps": 1000})
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(20000, generator=g, max_timestep=200)
    assert int(t.min()) == 0 and int(t.max()) == 200  # both ends reached, nothing above
    counts = torch.bincount(t, minlength=201).float()
    assert counts.std() / counts.mean() < 0.15  # uniform over 0..200 (≈ 100 draws per step)
    assert int(diffusion.sample_timesteps(20000, generator=g).max()) > 900  # the default stays the papers' U{0..T−1}
    prep = DiffusionPrepareBatch(diffusion, bias_loss="x0_mse", max_timestep=50, generator=g)
    for _ in range(20):
        x_t, targets, _, kwargs = prep(_batch(), "cpu")
        assert int(targets["t"].max()) <= 50 and int(kwargs["t"].max()) <= 50
    for bad in (1000, -1, 2.5):
        with pytest.raises(ValueError, match="max_timestep must be an integer in 0..999"):
            DiffusionPrepareBatch(diffusion, max_timestep=bad)


def test_prepare_batch_official_dropout_and_second_pass():
    """Official mode: the real T1 is passed, the flag only goes to the network, L_mri is masked by the DATA's
    availability; the official L_bias's second pass is the batch's second half, at the same t and a fresh ε'."""
    diffusion = build_diffusion({"timesteps": 100})
    batch = _batch(available=torch.tensor([1.0, 1, 1, 0, 0, 1]))
    prep = DiffusionPrepareBatch(diffusion, mri_drop_prob=1.0, generator=torch.Generator().manual_seed(3))
    inputs, targets, _, kwargs = prep(batch, "cpu")
    assert inputs.shape == (12, 1, 8, 8) and kwargs["t"].shape == (12,)
    torch.testing.assert_close(inputs[:6], targets["x_t"])
    torch.testing.assert_close(inputs[6:], targets["bias_x_t"])
    torch.testing.assert_close(kwargs["t"], torch.cat([targets["t"], targets["t"]]))
    t = targets["t"]
    ab = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    second_noise = (targets["bias_x_t"] - ab.sqrt() * batch["sd_pet"]) / (1 - ab).sqrt()
    assert float((second_noise - targets["noise"]).abs().max()) > 0.5  # a separately drawn x_t
    assert float((targets["bias_step_noise"] - second_noise).abs().max()) > 0.5
    torch.testing.assert_close(kwargs["mri"], torch.cat([batch["mri"], batch["mri"]]))  # T1 never zeroed
    assert float(kwargs["mri_available"].sum()) == 0.0  # drop 1.0: every PET decoder runs MRI-free
    torch.testing.assert_close(targets["mri_supervised"], batch["mri_available"])
    single = DiffusionPrepareBatch(diffusion, network=build_network({**TINY_NET, "variant": "V1"}))
    assert single(_batch(size=16), "cpu")[0].shape[0] == 6  # no MRI decoder: no second pass
    with pytest.raises(ValueError, match="mri_dropout"):
        DiffusionPrepareBatch(diffusion, mri_dropout="paper")


def test_mri_dropout_statistics():
    torch.manual_seed(1)
    n = 20000
    flags = mri_dropout_flags(torch.ones(n), 0.3)
    # Binomial(20000, 0.7): sd = 0.0032, so ±0.015 is > 4.5 sd
    assert abs(float(flags.mean()) - 0.7) < 0.015
    assert set(flags.unique().tolist()) <= {0.0, 1.0}
    assert float(mri_dropout_flags(torch.zeros(n), 0.3).sum()) == 0.0
    assert float(mri_dropout_flags(torch.ones(n), 0.0).mean()) == 1.0
    assert float(mri_dropout_flags(torch.ones(n), 1.0).mean()) == 0.0
    half = torch.tensor([1.0, 0.0]).repeat(n // 2)
    assert abs(float(mri_dropout_flags(half, 0.3).mean()) - 0.35) < 0.015
    # through the prepare_batch: statistics over many batches
    diffusion = build_diffusion({"timesteps": 50})
    prep = DiffusionPrepareBatch(diffusion, mri_drop_prob=0.3)
    rates = [float(prep(_batch(b=64, size=2), "cpu")[3]["mri_available"].mean()) for _ in range(100)]
    assert abs(np.mean(rates) - 0.7) < 0.02


def test_prepare_batch_for_regressors_and_validation():
    class Regressor(torch.nn.Module):
        is_diffusion = False

    diffusion = build_diffusion({"timesteps": 50})
    x_t, targets, _, kwargs = DiffusionPrepareBatch(diffusion, network=Regressor())(_batch(), "cpu")
    assert x_t is None and kwargs["t"] is None and targets["x_t"] is None
    batch = _batch(available=torch.tensor([1.0, 0, 1, 0, 1, 0]))
    ld, sd, args, kwargs = ValidationPrepareBatch()(batch, "cpu")
    torch.testing.assert_close(ld, batch["ld_pet"])
    torch.testing.assert_close(kwargs["mri_available"], batch["mri_available"])
    assert float(kwargs["mri"][1].abs().sum()) == 0 and float(kwargs["mri"][0].abs().sum()) > 0


# ----------------------------------------------------------------------------------------------- loss
def _targets(x0, flag, t=None, diffusion=None):
    b = x0.shape[0]
    t = torch.full((b,), 5, dtype=torch.long) if t is None else t
    noise = torch.zeros_like(x0)
    x_t = x0 if diffusion is None else diffusion.q_sample(x0, t, noise)
    return {"x_start": x0, "x_t": x_t, "t": t, "noise": noise, "mri_available": flag}


def test_multitask_loss_hand_computed():
    diffusion = build_diffusion({"timesteps": 50, "model_mean_type": "x0", "model_var_type": "fixed_large"})
    x0 = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    pet = torch.tensor([[[[0.5, 1.0], [0.5, 0.5]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    mri = torch.tensor([[[[0.0, 0.0], [0.5, 0.5]]], [[[0.0, 1.0], [0.0, 1.0]]]])
    flag = torch.tensor([1.0, 0.0])
    loss_fn = DiffusionLoss(diffusion, lambda_task=0.4, lambda_bias=0.2, bias_loss="x0_mse")
    loss = loss_fn({"pet": pet, "mri": mri, "out": pet}, _targets(x0, flag))
    # sample 0 (MRI): L_pet = 0.25/4, L_mri = 1/4, L_bias = (0.25 + 1)/4
    # sample 1 (no MRI): L_pet = 1/4; L_mri and L_bias excluded
    expected = torch.tensor([0.4 * (0.0625 + 0.25) + 0.2 * 0.3125, 0.4 * 0.25])
    torch.testing.assert_close(loss, expected)
    both = loss_fn({"pet": pet, "mri": mri, "out": pet}, _targets(x0, torch.ones(2)))
    # sample 1 with MRI: L_mri = (1 + 0 + 0 + 1)/4 = 0.5, L_bias = (1 + 1 + 0 + 1)/4 = 0.75
    torch.testing.assert_close(both[1], torch.tensor(0.4 * (0.25 + 0.5) + 0.2 * 0.75))
    assert math.isclose(float(loss_fn.last_terms["mri_rate"]), 1.0)


def test_single_task_and_regressor_losses():
    diffusion = build_diffusion({"timesteps": 50})
    x0 = torch.zeros(2, 1, 2, 2)
    out = torch.full((2, 1, 2, 2), 0.5)
    loss_fn = DiffusionLoss(diffusion)
    torch.testing.assert_close(loss_fn({"pet": out, "out": out}, _targets(x0, torch.ones(2))), torch.full((2,), 0.25))
    regression = {"x_start": x0, "x_t": None, "t": None, "noise": None, "mri_available": torch.ones(2)}
    torch.testing.assert_close(loss_fn({"out": out}, regression), torch.full((2,), 0.25))


def test_eps_and_learned_variance_losses_use_diffusion_terms():
    diffusion = build_diffusion({"timesteps": 40, "model_mean_type": "eps", "model_var_type": "learned_range"})
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g)
    noise = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 7, 39])
    x_t = diffusion.q_sample(x0, t, noise)
    pet, mri = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    flag = torch.tensor([1.0, 0.0, 1.0])
    targets = {"x_start": x0, "x_t": x_t, "t": t, "noise": noise, "mri_available": flag}
    loss_fn = DiffusionLoss(diffusion, vlb_weight=0.001, bias_loss="x0_mse")
    loss = loss_fn({"pet": pet, "mri": mri, "out": pet}, targets)
    lp = diffusion.training_losses(pet, x0, x_t, t, noise, vlb_weight=0.001)
    lm = diffusion.training_losses(mri, x0, x_t, t, noise, vlb_weight=0.001)
    assert float(lp["vlb"].abs().sum()) > 0 and torch.all(lp["loss"] > lp["mse"])  # VLB term is added
    bias = ((lp["pred_xstart"] - lm["pred_xstart"]) ** 2).flatten(1).mean(1)  # x̂0 from ε, not ε itself
    torch.testing.assert_close(loss, 0.4 * (lp["loss"] + flag * lm["loss"]) + 0.2 * flag * bias)


def test_loss_backpropagates_through_tiny_m2diff():
    diffusion = build_diffusion({"timesteps": 50})
    net = build_network(TINY_NET)
    x_t, targets, _, kwargs = DiffusionPrepareBatch(diffusion, mri_drop_prob=0.5)(_batch(b=2, size=16), "cpu")
    loss = DiffusionLoss(diffusion)(net(x_t, **kwargs), targets).mean()
    loss.backward()
    assert all(p.grad is not None for p in net.pet_encoder.parameters())
    assert loss_output({"loss": loss}) is loss and loss_output([{"loss": loss}]) is loss


def _official_bias_by_hand(pet2, mri2, diffusion, t):
    """coef1(t)²·MSE(clamp(x̂0_pet) − clamp(x̂0_mri)), float64, from the schedule's own numpy arrays."""
    coef1 = torch.as_tensor(diffusion.posterior_mean_coef1, dtype=torch.float64)[t].view(-1, 1, 1, 1)
    diff = pet2.double().clamp(-1, 1) - mri2.double().clamp(-1, 1)
    return ((coef1 * diff) ** 2).flatten(1).mean(1)


def test_official_bias_loss_equals_coef1_squared_clamped_x0_mse():
    """The official L_bias (one-step samples of both branches on a second pass, shared noise) on a fixed batch
    equals coef1(t)²·MSE of the clamped x̂0 difference, computed here independently."""
    diffusion = build_diffusion(
        {"timesteps": 50, "model_mean_type": "x0", "model_var_type": "fixed_large", "clip_denoised": [-1, 1]}
    )  # the official code's clip (data in [0, 1])
    g = torch.Generator().manual_seed(7)
    b = 4
    x0 = torch.rand(b, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 4, 30])
    noise, noise2, z = (torch.randn(b, 1, 4, 4, generator=g) for _ in range(3))
    x_t, x_t2 = diffusion.q_sample(x0, t, noise), diffusion.q_sample(x0, t, noise2)
    pet = 1.5 * torch.randn(2 * b, 1, 4, 4, generator=g)  # beyond ±1: the clamp matters
    mri = 1.5 * torch.randn(2 * b, 1, 4, 4, generator=g)
    supervised = torch.tensor([1.0, 1.0, 0.0, 1.0])
    targets = {
        "x_start": x0,
        "x_t": x_t,
        "t": t,
        "noise": noise,
        "mri_available": torch.zeros(b),
        "mri_supervised": supervised,
        "bias_x_t": x_t2,
        "bias_step_noise": z,
    }
    loss_fn = DiffusionLoss(diffusion, lambda_task=0.4, lambda_bias=0.2)
    loss = loss_fn({"pet": pet, "mri": mri, "out": pet}, targets)
    bias = _official_bias_by_hand(pet[b:], mri[b:], diffusion, t)
    assert float(bias.min()) > 0 and bias[0] > 10 * bias[3]  # coef1(0) = 1; coef1(30) is small
    l_pet = ((pet[:b].double() - x0.double()) ** 2).flatten(1).mean(1)
    l_mri = ((mri[:b].double() - x0.double()) ** 2).flatten(1).mean(1)
    expected = 0.4 * (l_pet + supervised.double() * l_mri) + 0.2 * supervised.double() * bias
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_fn.last_terms["bias"].double(), (supervised * bias).mean(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="second forward pass"):
        loss_fn({"pet": pet[:b], "mri": mri[:b], "out": pet[:b]}, {k: v for k, v in targets.items() if "bias" not in k})


def test_official_bias_backpropagates_through_the_second_pass():
    """Only L_bias reads the batch's second half: its gradient there is nonzero (and zero with x0_mse)."""
    diffusion = build_diffusion({"timesteps": 50})
    net = build_network(TINY_NET)
    prep = DiffusionPrepareBatch(diffusion, generator=torch.Generator().manual_seed(0))
    batch = _batch(b=2, size=16)
    for bias_loss, expect_grad in (("official_xprev", True), ("x0_mse", False)):
        inputs, targets, _, kwargs = prep(batch, "cpu")
        inputs = inputs.clone().requires_grad_(True)
        targets["t"] = torch.tensor([0, 3])  # small t: coef1 near 1, the term is not negligible
        kwargs["t"] = torch.cat([targets["t"], targets["t"]])
        DiffusionLoss(diffusion, bias_loss=bias_loss)(net(inputs, **kwargs), targets).sum().backward()
        second_half = float(inputs.grad[2:].abs().sum())
        assert (second_half > 0) == expect_grad


def test_official_dropout_keeps_the_mri_path_and_its_losses():
    """Official MRI dropout: the MRI encoder's input is the same with and without the drop (hooked on the
    encoder); on dropped samples L_mri and L_bias keep their weight, the PET decoder alone goes MRI-free.
    zero_and_mask: the MRI encoder sees zeros and both terms are masked out."""
    diffusion = build_diffusion({"timesteps": 50})
    net = build_network(TINY_NET).eval()
    seen: list[torch.Tensor] = []
    net.mri_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = _batch(b=3, size=16)
    results = {}
    for mode, drop in (("official", 0.0), ("official", 1.0), ("zero_and_mask", 1.0)):
        prep = DiffusionPrepareBatch(
            diffusion, mri_drop_prob=drop, network=net, mri_dropout=mode, generator=torch.Generator().manual_seed(0)
        )
        inputs, targets, _, kwargs = prep(batch, "cpu")
        loss_fn = DiffusionLoss(diffusion)
        with torch.no_grad():
            loss_fn(net(inputs, **kwargs), targets)
        results[(mode, drop)] = (seen[-1], {k: float(v) for k, v in loss_fn.last_terms.items()})
    kept, dropped, zeroed = results[("official", 0.0)], results[("official", 1.0)], results[("zero_and_mask", 1.0)]
    torch.testing.assert_close(dropped[0], kept[0])  # same seed: same x_t; T1 channel identical
    torch.testing.assert_close(dropped[0][:, :1], torch.cat([batch["mri"], batch["mri"]]))
    assert dropped[1]["mri_rate"] == 0.0 and dropped[1]["mri_supervised_rate"] == 1.0
    assert dropped[1]["mri"] > 0 and dropped[1]["bias"] > 0
    assert float(zeroed[0][:, :1].abs().sum()) == 0.0
    assert zeroed[1]["mri"] == 0.0 and zeroed[1]["bias"] == 0.0


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_math_and_restore():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = build_ema(net, decay=0.9)
    handler = EMAUpdateHandler(ema, net)
    expected = None
    for step, value in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        handler(None)
        expected = value if step == 0 else 0.9 * expected + 0.1 * value  # first update copies
        torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    assert math.isclose(expected, 0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 4)
    assert evaluation_network(net, ema) is ema.module and evaluation_network(net, None) is net
    assert build_ema(net, decay=None) is None
    # warm-up: min(decay, (1+n)/(10+n))
    assert ema_decay(0.9999, 0, True) == 0.1 and ema_decay(0.9999, 90, True) == 91 / 100
    assert ema_decay(0.9, 1000, True) == 0.9 and ema_decay(0.9, 0, False) == 0.9
    # restoring keeps the average (AveragedModel would copy the weights on its "first" update)
    fresh = build_ema(net, decay=0.9)
    load_ema_state(fresh, ema.module.state_dict(), num_averaged=3)
    with torch.no_grad():
        net.weight.fill_(0.0)
    fresh.update_parameters(net)
    torch.testing.assert_close(fresh.module.weight, torch.full((1, 2), 0.9 * expected))


# ----------------------------------------------------------------------------------------------- config, ranks
def test_checkpoint_config_carries_the_network_config_and_checks_variance():
    net = build_network(TINY_NET)
    config = checkpoint_config(net, {"timesteps": 50}, {"orientations": ("axial",), "manifest": "m.json"})
    assert config["network"] == net.config and config["diffusion"]["timesteps"] == 50
    assert config["diffusion"]["model_mean_type"] == "x0" and config["data"]["orientations"] == ["axial"]
    rebuilt = build_network(config["network"])
    rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="learn_sigma"):
        checkpoint_config(net, {"model_var_type": "learned_range"})
    json.dumps(config)  # plain JSON types only: loadable with weights_only=True


def test_handlers_for_rank_keeps_only_all_rank_handlers_off_rank_zero():
    net = torch.nn.Linear(1, 1)
    ema_handler, resume = EMAUpdateHandler(None, net), ResumeHandler(None, net)
    other = object()
    handlers = [resume, ema_handler, other]
    assert handlers_for_rank(handlers, rank=0) == handlers
    assert handlers_for_rank(handlers, rank=1) == [resume, ema_handler]
    validation = ValidationHandler(interval=1, validator=None)
    assert handlers_for_rank([validation, other], rank=1) == [validation]
    assert handlers_for_rank(None, rank=1) == []


def test_autocast_inferer_runs_bf16_on_cpu_and_scaler_only_for_fp16():
    from m2diff_monai.engines.amp import AutocastInferer, needs_grad_scaler

    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    assert AutocastInferer("bfloat16")(x, conv).dtype == torch.bfloat16
    assert AutocastInferer(None)(x, conv).dtype == torch.float32
    assert needs_grad_scaler("float16") and not needs_grad_scaler("bfloat16") and not needs_grad_scaler(None)
    with pytest.raises(ValueError, match="amp dtype"):
        AutocastInferer("float8")


def test_checkpoint_config_records_the_manifest_preprocessing(tmp_path):
    import json

    from m2diff_monai.networks.factory import build_network

    manifest = tmp_path / "m.json"
    params = {"size": 64, "normalization": "shared", "transform": "SyN", "space": "pet"}
    manifest.write_text(json.dumps({"provenance": {"parameters": params}, "training": []}))
    net = build_network(tiny_m2diff(32, "V1"))
    config = checkpoint_config(net, {"timesteps": 50}, {"manifest": str(manifest)})
    assert config["data"]["preprocessing"] == params
