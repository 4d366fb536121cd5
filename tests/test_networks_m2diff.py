"""IDDPM blocks, the M2Diff network and its ablation variants, and the network factory."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from m2diff_monai.networks import (
    PRESETS,
    VARIANTS,
    AttentionBlock,
    IDDPMUNet,
    ResBlock,
    SingleTaskUNet,
    build_network,
    count_parameters,
    register_network,
    timestep_embedding,
)
from tiny_networks import randomize_zero_params, tiny_m2diff

TINY = tiny_m2diff(32, attention=True)


def _tiny(variant: str, **overrides) -> torch.nn.Module:
    cfg = {**TINY, "variant": variant, **overrides}
    if variant == "V5":
        cfg.setdefault("mri_dropout", 0.1)
    return build_network(cfg)


def _inputs(batch: int = 3, size: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen)
    ld = torch.randn(batch, 1, size, size, generator=gen)
    mri = torch.randn(batch, 1, size, size, generator=gen)
    t = torch.tensor([0, 500, 999, 17, 250, 3, 700, 999])[:batch]
    return x, t, ld, mri


# ---------------------------------------------------------------- blocks


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))


def test_attention_block_matches_iddpm_reference_and_parameter_count():
    torch.manual_seed(0)
    channels, heads = 64, 4
    block = randomize_zero_params(AttentionBlock(channels, heads))
    # IDDPM: GroupNorm (2C) + qkv Conv1d(C, 3C, 1) + proj Conv1d(C, C, 1).
    assert count_parameters(block) == 2 * channels + (3 * channels * channels + 3 * channels) + (channels**2 + channels)
    x = torch.randn(2, channels, 6, 5)
    # Independent reference: IDDPM's legacy head layout [head][q|k|v][ch] with explicit softmax.
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    qkv = torch.nn.functional.conv1d(block.norm(x).reshape(b, c, -1), block.qkv.weight, block.qkv.bias)
    qkv = qkv.reshape(b * heads, 3 * c // heads, -1)
    q, k, v = qkv.split(c // heads, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // heads), dim=-1)
    attn = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    expected = (flat + torch.nn.functional.conv1d(attn, block.proj_out.weight, block.proj_out.bias)).reshape(b, c, h, w)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_resblock_starts_as_identity_and_resamples():
    emb = torch.randn(2, 128)
    x = torch.randn(2, 32, 8, 8)
    same = ResBlock(32, 128, dropout=0.0)
    torch.testing.assert_close(same(x, emb), x)  # zero-initialised last conv: residual branch is 0
    assert ResBlock(32, 128, 0.0, out_channels=64, down=True)(x, emb).shape == (2, 64, 4, 4)
    assert ResBlock(32, 128, 0.0, up=True)(x, emb).shape == (2, 32, 16, 16)


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_shapes_and_gradients_reach_every_parameter(variant, learn_sigma):
    torch.manual_seed(0)
    net = randomize_zero_params(_tiny(variant, learn_sigma=learn_sigma))
    x, t, ld, mri = _inputs()
    out = net(x, t, ld, mri, torch.tensor([1.0, 0.0, 1.0]))
    channels = 2 if learn_sigma else 1
    expected_keys = {"out", "pet", "mri"} if variant in ("V3", "V5", "V6") else {"out", "pet"}
    assert set(out) == expected_keys
    assert set(net.branches) == expected_keys - {"out"}
    for value in out.values():
        assert value.shape == (3, channels, 32, 32)
    sum(v.square().mean() for k, v in out.items() if k != "out").backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().any()]
    assert not missing, f"{variant}: no gradient for {missing[:5]}"


@pytest.mark.parametrize("variant", ["V2", "V4", "V5", "V6"])
def test_mri_free_pet_output_ignores_the_mri(variant):
    torch.manual_seed(0)
    net = randomize_zero_params(_tiny(variant)).eval()
    x, t, ld, mri = _inputs(batch=2)
    flags = torch.tensor([0.0, 1.0])  # sample 0 without MRI, sample 1 with
    with torch.no_grad():
        a = net(x, t, ld, mri, flags)["pet"]
        b = net(x, t, ld, mri + torch.randn_like(mri), flags)["pet"]
        none = net(x, t, ld, None, torch.zeros(2))["pet"]
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert (a[1] - b[1]).abs().max() > 1e-3  # with MRI available the PET output depends on it
    torch.testing.assert_close(none[0], a[0], rtol=1e-5, atol=1e-5)  # mri=None is the same as flag 0


def test_m2diff_without_mri_skips_the_mri_branch_and_rejects_contradictory_flags():
    net = _tiny("V6").eval()
    x, t, ld, _ = _inputs(batch=2)
    with torch.no_grad():
        out = net(x, t, ld)
    assert set(out) == {"pet", "out"}
    with pytest.raises(ValueError, match="mri_available"):
        net(x, t, ld, None, torch.tensor([1.0, 0.0]))


def test_v3_pet_branch_never_sees_the_mri():
    net = randomize_zero_params(_tiny("V3")).eval()
    x, t, ld, mri = _inputs(batch=2)
    with torch.no_grad():
        a = net(x, t, ld, mri)
        b = net(x, t, ld, mri + 1.0)
    torch.testing.assert_close(a["pet"], b["pet"], rtol=0, atol=0)
    assert (a["mri"] - b["mri"]).abs().max() > 1e-3


def test_output_mode_mean_is_the_average_of_both_branches():
    net = randomize_zero_params(_tiny("V6", output_mode="mean")).eval()
    x, t, ld, mri = _inputs()
    with torch.no_grad():
        out = net(x, t, ld, mri)
        flagged = net(x, t, ld, mri, torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(out["out"], 0.5 * (out["pet"] + out["mri"]))
    torch.testing.assert_close(flagged["out"][1], flagged["pet"][1])  # no MRI: PET branch alone
    torch.testing.assert_close(flagged["out"][0], 0.5 * (flagged["pet"][0] + flagged["mri"][0]))
    with pytest.raises(ValueError):
        _tiny("V4", output_mode="mean")


@pytest.mark.parametrize("output_mode", ["pet", "mean"])
def test_for_sampling_skips_only_the_branch_nothing_reads(output_mode):
    net = randomize_zero_params(_tiny("V6", output_mode=output_mode)).eval()
    x, t, ld, mri = _inputs()
    with torch.no_grad():
        full = net(x, t, ld, mri)
        net.for_sampling()
        sampled = net(x, t, ld, mri)
    torch.testing.assert_close(sampled["out"], full["out"], rtol=0, atol=0)
    # "pet": the MRI decoder feeds only the training loss, so sampling does not run it; "mean" reads it
    assert ("mri" in sampled) == (output_mode == "mean")


def test_pet_mode_returns_the_pet_branch():
    net = randomize_zero_params(_tiny("V6")).eval()
    x, t, ld, mri = _inputs()
    with torch.no_grad():
        out = net(x, t, ld, mri)
    assert torch.equal(out["out"], out["pet"]) and not torch.allclose(out["pet"], out["mri"])


def test_variant_structure():
    v3, v6 = _tiny("V3"), _tiny("V6")
    assert v6.config["variant"] == "V6" and v3.config["channel_mult"] == [1, 2]
    assert not v3.hff and v6.hff and v6.has_mri_decoder
    # HFF doubles the skip channels entering each decoder ResBlock.
    assert v6.pet_decoder.blocks[0][0].channels - v3.pet_decoder.blocks[0][0].channels == 64
    assert not any(isinstance(m, AttentionBlock) for m in v6.mri_encoder.modules())
    assert not any(isinstance(m, AttentionBlock) for m in v6.mri_decoder.modules())
    assert any(isinstance(m, AttentionBlock) for m in v6.pet_decoder.modules())
    with_attn = _tiny("V6", mri_attention=True)
    assert any(isinstance(m, AttentionBlock) for m in with_attn.mri_decoder.modules())
    v4 = _tiny("V4")
    assert not hasattr(v4, "mri_decoder") and not hasattr(v4, "mri_middle")
    v5 = _tiny("V5", dropout=0.2, mri_dropout=0.0)
    assert v5.pet_decoder.blocks[0][0].dropout.p == 0.2 and v5.mri_decoder.blocks[0][0].dropout.p == 0.0
    assert isinstance(_tiny("V1"), SingleTaskUNet) and _tiny("V2").unet.encoder.blocks[0][0].in_channels == 3
    with pytest.raises(ValueError, match="V5"):
        _tiny("V5", dropout=0.1, mri_dropout=0.1)


# ---------------------------------------------------------------- paper parameter counts


def _paper(variant: str, preset: str = "paper-256") -> torch.nn.Module:
    with torch.device("meta"):
        return build_network({"name": "m2diff", "preset": preset, "variant": variant})


def test_paper_parameter_counts():
    m2diff = count_parameters(_paper("V6"))
    iddpm = count_parameters(_paper("V1"))
    assert abs(m2diff / 1e6 - 268.99) <= 0.005  # paper Sec. III-F
    assert abs(iddpm / 1e6 - 124.05) <= 0.005
    # Exact: the official BiTaskUNetModel has 268,987,523 including an unused 1,409-parameter IDDPM head
    # (GroupNorm(128) + Conv2d(128→1, 3×3)) that this implementation leaves out.
    assert m2diff == 268_987_523 - (2 * 128 + 128 * 9 + 1)
    assert iddpm == 124_049_793
    assert abs(count_parameters(_paper("V2")) / 1e6 - 124.05) <= 0.005  # "IDDPM PET-MR" in the paper's table
    assert count_parameters(_paper("V6", "paper-128")) < m2diff


def test_official_64_preset_matches_the_benchmarked_official_layout():
    # facts.md §1: the official network at 64², 64 channels, mult (1,2,3,4), attention "16,8": 48.99 M params
    # (including its unused 705-parameter IDDPM head: GroupNorm(64) + Conv2d(64→1, 3×3)).
    net = _paper("V6", "official-64")
    assert net.config["model_channels"] == 64 and net.config["channel_mult"] == [1, 2, 3, 4]
    assert net.config["attention_resolutions"] == [16, 8] and net.config["use_scale_shift_norm"]
    assert abs((count_parameters(net) + 2 * 64 + 64 * 9 + 1) / 1e6 - 48.99) <= 0.005


# ---------------------------------------------------------------- efficiency paths


def test_bf16_autocast_forward_on_cpu():
    net = randomize_zero_params(_tiny("V6")).eval()
    x, t, ld, mri = _inputs()
    with torch.no_grad():
        ref = net(x, t, ld, mri)["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, ld, mri)["out"]
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("variant", ["V1", "V6"])
def test_channels_last_matches_contiguous(variant):
    net = randomize_zero_params(_tiny(variant)).eval()
    x, t, ld, mri = _inputs()
    with torch.no_grad():
        ref = net(x, t, ld, mri)
        net = net.to(memory_format=torch.channels_last)
        cl = [a.contiguous(memory_format=torch.channels_last) for a in (x, ld, mri)]
        out = net(cl[0], t, cl[1], cl[2])
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = randomize_zero_params(_tiny("V6"))
    ckpt = _tiny("V6", use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ld, mri = _inputs()
    for net in (plain, ckpt):
        out = net(x, t, ld, mri)
        (out["pet"].square().mean() + out["mri"].square().mean()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_spatial_size_must_be_divisible():
    net = _tiny("V6")
    x = torch.randn(1, 1, 31, 32)  # tiny config downsamples once: sizes must be even
    with pytest.raises(ValueError, match="divisible"):
        net(x, torch.zeros(1), x, x)


# ---------------------------------------------------------------- IDDPMUNet (MFdiff's ε-UNet)


def test_iddpm_unet_with_condition_channels():
    net = IDDPMUNet(1, 2, 32, (1, 2), 1, (16,), 2, 0.0, 32, cond_channels=3)
    x = torch.randn(2, 1, 32, 32)
    out = net(x, torch.tensor([1, 2]), cond=torch.randn(2, 3, 32, 32))
    assert set(out) == {"out"} and out["out"].shape == (2, 2, 32, 32)
    torch.testing.assert_close(out["out"], torch.zeros_like(out["out"]))  # IDDPM zero-initialised head
    with pytest.raises(ValueError):
        net(x, torch.tensor([1, 2]))


# ---------------------------------------------------------------- factory


@pytest.mark.parametrize("variant", VARIANTS)
def test_factory_round_trip(variant):
    net = _tiny(variant, learn_sigma=True)
    config = net.config
    assert config["variant"] == variant and config["name"] == "m2diff"
    assert json.loads(json.dumps(config)) == config
    buffer = io.BytesIO()
    torch.save({"config": config, "network": net.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    rebuilt = build_network(loaded["config"])
    assert rebuilt.config == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    rebuilt.load_state_dict(loaded["network"])


def test_factory_presets_defaults_and_errors():
    assert set(PRESETS) >= {"paper-256", "paper-128", "demo"}
    with torch.device("meta"):
        demo = build_network({"preset": "demo", "variant": "v6"})
    assert demo.config["model_channels"] == 32 and demo.config["variant"] == "V6"
    assert demo.config["channel_mult"] == [1, 2, 2] and demo.config["image_size"] == 64
    with torch.device("meta"):
        default = build_network({"name": "m2diff"})
    assert default.config["channel_mult"] == [1, 1, 2, 2, 4, 4] and default.config["dropout"] == 0.2
    with pytest.raises(ValueError, match="unknown m2diff config keys"):
        build_network({**TINY, "channels": 3})
    with pytest.raises(ValueError, match="variant"):
        build_network({**TINY, "variant": "V7"})
    with pytest.raises(ValueError, match="unknown network"):
        build_network({"name": "no-such-network"})


def test_register_network():
    def builder(config):
        return torch.nn.Linear(int(config["width"]), 1)

    register_network("test-linear", builder)
    net = build_network({"name": "test-linear", "width": 4})
    assert isinstance(net, torch.nn.Linear) and net.config == {"name": "test-linear", "width": 4}
