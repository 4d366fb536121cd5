"""MFdiff fusion module (Restormer + INN) and the MFdiff network with its ablation rows (tiny configs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2diff_monai.networks.factory import build_network
from m2diff_monai.networks.inn import AffineCoupling, DetailBranch, InvertedResidual
from m2diff_monai.networks.mfdiff import PRESETS, VARIANTS, MFdiffNet, resolve_mfdiff_config
from m2diff_monai.networks.mfdiff_fusion import MFdiffFusion, ModalityFeatureExtractor
from m2diff_monai.networks.restormer import ChannelAttention, ChannelLayerNorm
from tiny_networks import TINY_SIZE, randomize_zero_params, tiny_fusion, tiny_mfdiff, tiny_unet

SIZE = TINY_SIZE
TINY_FUSION = tiny_fusion(heads=2)
TINY_UNET = tiny_unet(SIZE, attention=True)


def tiny_net(variant: str = "MFdiff", **kwargs) -> MFdiffNet:
    torch.manual_seed(0)
    kwargs = {"image_size": SIZE, "fusion": TINY_FUSION, "unet": TINY_UNET, **kwargs}
    return MFdiffNet(variant=variant, **kwargs)


def batch(b: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x_t": torch.randn(b, 1, SIZE, SIZE, generator=g),
        "t": torch.randint(0, 1000, (b,), generator=g),
        "ld": torch.rand(b, 1, SIZE, SIZE, generator=g),
        "mri": torch.rand(b, 1, SIZE, SIZE, generator=g),
    }


# ---------------------------------------------------------------- Restormer blocks


def test_channel_layer_norm_matches_reference_formulas():
    x = torch.randn(2, 6, 5, 4)
    ln = ChannelLayerNorm(6, "with_bias")
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, eps=1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)
    bias_free = ChannelLayerNorm(6, "bias_free")
    std = torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(bias_free(x), x / std)  # Restormer's bias-free LN keeps the mean


@pytest.mark.parametrize("depthwise", [True, False])
def test_channel_attention_sdpa_equals_explicit_transposed_attention(depthwise):
    torch.manual_seed(0)
    attn = ChannelAttention(8, heads=2, depthwise_qkv=depthwise)
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([[[0.7]], [[2.5]]]))
    x = torch.randn(3, 8, 5, 6)
    q, k, v = attn.qkv_conv(attn.qkv(x)).chunk(3, dim=1)
    q, k, v = (u.reshape(3, 2, 4, 30) for u in (q, k, v))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    weights = torch.softmax(q @ k.transpose(-1, -2) * attn.temperature, dim=-1)  # (B, heads, C/h, C/h)
    ref = attn.project_out((weights @ v).reshape(3, 8, 5, 6))
    torch.testing.assert_close(attn(x), ref)
    assert attn.qkv_conv.groups == (24 if depthwise else 1)


def _transformer_block_params(d: int, h: int, e: float) -> int:
    hidden = int(d * e)
    ln = 2 * d
    mdta = h + 3 * d * d + 3 * d * 9 + d * d
    gdfn = d * 2 * hidden + 2 * hidden * 9 + hidden * d
    return 2 * ln + mdta + gdfn


def test_modality_extractor_has_cddfuse_layout_parameter_count():
    """Count from the CDDFuse layout (dim 64, 4 blocks, 8 heads, FFN 2, bias-free convs, LN with bias)."""
    d, h = 64, 8
    extractor = ModalityFeatureExtractor(
        1,
        d,
        4,
        h,
        2.0,
        False,
        "with_bias",
        ("global", "detail"),
        global_attention="channel",
        global_ffn_expansion=1.0,
        inn_layers=3,
        coupling="paper",
    )
    patch = 1 * d * 9
    blocks = 4 * _transformer_block_params(d, h, 2.0)
    global_branch = 2 * 2 * d + (h + 3 * d * d + (3 * d) * (3 * d) * 9 + d * d) + (d * 2 * d + 2 * d * 2 * 9 + d * d)
    irb = (d // 2) * d + d * 9 + d * (d // 2)  # expand 2: pw, dw, pw-linear, no bias
    detail_branch = 3 * 2 * irb  # three couplings, ρ and η each
    assert sum(p.numel() for p in extractor.parameters()) == patch + blocks + global_branch + detail_branch


# ---------------------------------------------------------------- INN detail branch


@pytest.mark.parametrize("coupling", ["paper", "cddfuse"])
def test_detail_branch_is_invertible(coupling):
    torch.manual_seed(0)
    branch = DetailBranch(16, num_layers=3, coupling=coupling)
    x = torch.randn(2, 16, 9, 7)
    y = branch(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() > 1e-2  # it does transform its input
    torch.testing.assert_close(branch.inverse(y), x, atol=1e-4, rtol=0)
    branch64, x64 = branch.double(), x.double()
    torch.testing.assert_close(branch64.inverse(branch64(x64)), x64, atol=1e-10, rtol=0)


def test_paper_coupling_is_equation_4():
    torch.manual_seed(0)
    layer = AffineCoupling(4, form="paper")
    f_half, l_half = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    first, second = layer(f_half, l_half)
    torch.testing.assert_close(first, l_half)  # D_l = F_l (handed over as the next coupling's conditioning half)
    torch.testing.assert_close(second, f_half * torch.exp(layer.rho(l_half)) + layer.eta(l_half))


def test_inverted_residual_block_has_no_batchnorm_and_expand_ratio_2():
    block = InvertedResidual(8, 8, expand_ratio=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert block.body[0].out_channels == 16
    assert block.body[3].groups == 16


# ---------------------------------------------------------------- fusion module


def test_fusion_feature_depends_on_mri_and_pet():
    torch.manual_seed(0)
    fusion = MFdiffFusion(**TINY_FUSION).eval()
    b = batch()
    with torch.no_grad():
        base = fusion(b["ld"], b["mri"])
        other_mri = fusion(b["ld"], torch.rand_like(b["mri"]))
        other_pet = fusion(torch.rand_like(b["ld"]), b["mri"])
        masked = fusion(b["ld"], b["mri"], torch.tensor([1.0, 0.0]))
        masked_other_mri = fusion(b["ld"], torch.rand_like(b["mri"]), torch.tensor([1.0, 0.0]))
    assert base.shape == (2, 1, SIZE, SIZE)
    assert (base - other_mri).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (base - other_pet).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    torch.testing.assert_close(masked[0], base[0])  # flag 1: unchanged
    torch.testing.assert_close(masked[1], masked_other_mri[1])  # flag 0: the MRI content is ignored
    assert (masked[1] - base[1]).abs().max() > 1e-4


def test_fusion_spatial_attention_and_wide_output():
    torch.manual_seed(0)
    fusion = MFdiffFusion(
        **{**TINY_FUSION, "out_channels": 8},
        global_attention="spatial",
        coupling="cddfuse",
        output_activation="sigmoid",
    )
    out = fusion(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 8, 8, 8)
    assert out.min() > 0 and out.max() < 1


# ---------------------------------------------------------------- network and ablation rows


@pytest.mark.parametrize("variant", VARIANTS)
def test_ablation_rows_shapes_and_gradients(variant):
    net = tiny_net(variant)
    randomize_zero_params(net, seed=3)
    b = batch()
    if net.is_diffusion:
        result = net(b["x_t"], b["t"], ld=b["ld"], mri=b["mri"])
    else:
        result = net(ld=b["ld"], mri=b["mri"])
        # x_t and t are ignored by the regression rows
        torch.testing.assert_close(net(b["x_t"], b["t"], ld=b["ld"], mri=b["mri"])["out"], result["out"])
    assert result["out"].shape == (2, 1, SIZE, SIZE)
    assert result["pet"] is result["out"] and net.branches == ("pet",)
    assert ("fusion" in result) == (variant in ("GMUNet", "DMUNet", "CMUNet", "MFdiff"))
    result["out"].square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if net.fusion is not None:
        for name, p in net.fusion.named_parameters():
            assert p.grad.abs().sum() > 0, f"no gradient reaches fusion parameter {name}"


def test_variant_structure():
    assert tiny_net("MFdiff").unet.encoder  # the shared IDDPM UNet
    assert tiny_net("MFdiff").unet.cond_channels == 2  # LD + F next to x_t
    assert tiny_net("UNet").unet.cond_channels == 0
    assert tiny_net("MUNet").unet.cond_channels == 1
    assert tiny_net("CMUNet").unet.cond_channels == 1
    assert tiny_net("GMUNet").fusion.branches == ("global", "global")
    assert tiny_net("DMUNet").fusion.branches == ("detail", "detail")
    fusion = tiny_net("MFdiff").fusion
    pet_ptrs = {p.data_ptr() for p in fusion.pet.parameters()}
    assert pet_ptrs.isdisjoint(p.data_ptr() for p in fusion.mri.parameters())  # independent modality encoders
    assert tiny_net("MFdiff").is_diffusion and not tiny_net("CMUNet").is_diffusion
    assert tiny_net("MFdiff", unet={**TINY_UNET, "learn_sigma": True})(**batch())["out"].shape[1] == 2


def test_the_diffusion_output_depends_on_mri_ld_and_x_t():
    net = tiny_net("MFdiff")
    randomize_zero_params(net, seed=3)
    b = batch()
    with torch.no_grad():
        base = net(**b)["out"]
        for key in ("x_t", "ld", "mri"):
            changed = net(**{**b, key: torch.rand_like(b[key])})["out"]
            assert (changed - base).abs().max() > 1e-4, key


def test_mri_is_required_unless_configured():
    b = batch()
    strict = tiny_net("MFdiff")
    with pytest.raises(ValueError, match="allow_missing_mri"):
        strict(b["x_t"], b["t"], ld=b["ld"])
    with pytest.raises(ValueError, match="allow_missing_mri"):
        strict(**b, mri_available=torch.tensor([1.0, 0.0]))
    strict(**b, mri_available=torch.ones(2))  # all available is fine

    lenient = tiny_net("MFdiff", allow_missing_mri=True)
    randomize_zero_params(lenient, seed=3)
    with torch.no_grad():
        without = lenient(b["x_t"], b["t"], ld=b["ld"])["out"]
        flagged = lenient(**b, mri_available=torch.zeros(2))["out"]
        mixed = lenient(**b, mri_available=torch.tensor([1.0, 0.0]))["out"]
        full = lenient(**b)["out"]
    torch.testing.assert_close(without, flagged)
    torch.testing.assert_close(mixed[0], full[0])
    torch.testing.assert_close(mixed[1], without[1])
    assert (full[1] - without[1]).abs().max() > 1e-4

    munet = tiny_net("MUNet", allow_missing_mri=True)
    assert munet(ld=b["ld"])["out"].shape == (2, 1, SIZE, SIZE)
    assert tiny_net("UNet")(ld=b["ld"])["out"].shape == (2, 1, SIZE, SIZE)  # LD only: no MRI needed


def test_bad_calls_fail_clearly():
    b = batch()
    net = tiny_net("MFdiff")
    with pytest.raises(ValueError, match="x_t and t"):
        net(ld=b["ld"], mri=b["mri"])
    with pytest.raises(ValueError, match="mri is None"):
        tiny_net("MFdiff", allow_missing_mri=True)(b["x_t"], b["t"], ld=b["ld"], mri_available=torch.ones(2))
    with pytest.raises(ValueError, match="LD PET"):
        net(b["x_t"], b["t"], mri=b["mri"])
    with pytest.raises(ValueError, match="variant"):
        MFdiffNet(variant="VNet")
    with pytest.raises(ValueError, match="learn_sigma"):
        tiny_net("CMUNet", unet={**TINY_UNET, "learn_sigma": True})


def test_bf16_autocast_runs_on_cpu():
    net = tiny_net("MFdiff")
    randomize_zero_params(net, seed=3)
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = net(**b)
    assert result["out"].dtype == torch.bfloat16
    assert torch.isfinite(result["out"].float()).all() and torch.isfinite(result["fusion"].float()).all()
    result["out"].float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------- factory and presets


def test_factory_builds_presets_and_round_trips_the_config():
    config = tiny_mfdiff(SIZE, "CMUNet", attention=True)
    net = build_network(config)
    assert isinstance(net, MFdiffNet) and net.variant == "CMUNet" and net.config["preset"] == "demo"
    assert net.config["fusion"]["inn_layers"] == PRESETS["demo"]["fusion"]["inn_layers"]
    rebuilt = build_network(net.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    rebuilt.load_state_dict(net.state_dict())


def test_config_resolution():
    paper = resolve_mfdiff_config({"name": "mfdiff"})
    assert paper["image_size"] == 192 and paper["fusion"]["dim"] == 64 and paper["fusion"]["num_blocks"] == 4
    assert paper["fusion"]["heads"] == 8 and paper["fusion"]["decoder_blocks"] == 2
    demo = resolve_mfdiff_config({"preset": "demo", "unet": {"dropout": 0.3}})
    assert demo["unet"]["dropout"] == 0.3
    assert demo["unet"]["model_channels"] == PRESETS["demo"]["unet"]["model_channels"]
    with pytest.raises(ValueError, match="preset"):
        resolve_mfdiff_config({"preset": "huge"})
    with pytest.raises(ValueError, match="unknown"):
        resolve_mfdiff_config({"variants": "MFdiff"})
    with pytest.raises(ValueError, match="branches"):
        MFdiffNet(
            variant="CMUNet", image_size=SIZE, fusion={**TINY_FUSION, "branches": ["global", "global"]}, unet=TINY_UNET
        )
