"""Gaussian diffusion core against closed forms computed independently here (numpy / torch.distributions)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from m2diff_monai.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    approx_standard_normal_cdf,
    build_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    normalize_diffusion_config,
    space_timesteps,
)

T = 1000


def linear_alphas_cumprod(num_steps: int = T) -> np.ndarray:
    scale = 1000 / num_steps
    return np.cumprod(1.0 - np.linspace(1e-4 * scale, 0.02 * scale, num_steps))


# ----------------------------------------------------------------------------- schedules
def test_linear_schedule_endpoints_and_scaling():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_alpha_bar_formula():
    betas = get_named_beta_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alphas_cumprod = np.cumprod(1.0 - betas)
    expected = np.array([f(t + 1) / f(0) for t in range(T - 1)])
    np.testing.assert_allclose(alphas_cumprod[: T - 1], expected, rtol=1e-9, atol=1e-12)
    assert betas.max() == pytest.approx(0.999) and betas[-1] == pytest.approx(0.999)


def test_unknown_schedule_or_too_short_linear_raises():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="linear schedule"):
        get_named_beta_schedule("linear", 20)  # β_end = 0.02·1000/20 = 1: x_T would carry no signal and ᾱ = 0


# ----------------------------------------------------------------------------- forward process
def test_q_sample_empirical_moments_match_closed_form():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", T))
    alphas_cumprod = linear_alphas_cumprod()
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.full((4, 1, 200, 200), 0.7, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, noise=noise)
    n = x0[0].numel()
    for i, step in enumerate(t.tolist()):
        mean, var = np.sqrt(alphas_cumprod[step]) * 0.7, 1.0 - alphas_cumprod[step]
        assert x_t[i].mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / n))
        assert x_t[i].var().item() == pytest.approx(var, rel=5 * math.sqrt(2 / n))
    q_mean, q_var, q_logvar = diffusion.q_mean_variance(x0, t)
    np.testing.assert_allclose(q_mean[:, 0, 0, 0].numpy(), np.sqrt(alphas_cumprod[t.numpy()]) * 0.7, rtol=1e-12)
    np.testing.assert_allclose(q_var.flatten().numpy(), 1 - alphas_cumprod[t.numpy()], rtol=1e-12)
    np.testing.assert_allclose(q_logvar.flatten().numpy(), np.log(1 - alphas_cumprod[t.numpy()]), rtol=1e-12)


def test_posterior_matches_gaussian_product_formula():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", T))
    betas = np.linspace(1e-4, 0.02, T)
    alphas_cumprod = np.cumprod(1.0 - betas)
    generator = torch.Generator().manual_seed(1)
    steps = [1, 2, 10, 400, 999]
    x0 = torch.randn(len(steps), 1, 4, 4, generator=generator, dtype=torch.float64)
    x_t = torch.randn(len(steps), 1, 4, 4, generator=generator, dtype=torch.float64)
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, x_t, torch.tensor(steps))
    for i, step in enumerate(steps):
        # prior q(x_{t−1}|x_0) = N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}) times likelihood q(x_t|x_{t−1}) = N(√α_t x_{t−1}, β_t)
        prior_var = 1.0 - alphas_cumprod[step - 1]
        prior_mean = math.sqrt(alphas_cumprod[step - 1]) * x0[i].numpy()
        alpha = 1.0 - betas[step]
        precision = 1.0 / prior_var + alpha / betas[step]
        expected_mean = (prior_mean / prior_var + math.sqrt(alpha) * x_t[i].numpy() / betas[step]) / precision
        np.testing.assert_allclose(mean[i].numpy(), expected_mean, rtol=1e-9, atol=1e-12)
        assert var[i].item() == pytest.approx(1.0 / precision, rel=1e-9)
        assert logvar[i].item() == pytest.approx(math.log(1.0 / precision), rel=1e-9)
    # t = 0: x_{−1} is x_0 itself; variance 0, log variance clipped to log β̃_1.
    mean0, var0, logvar0 = diffusion.q_posterior_mean_variance(x0, x_t, torch.zeros(len(steps), dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert torch.all(var0 == 0)
    assert logvar0.flatten()[0].item() == pytest.approx(
        math.log(betas[1] * (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1]))
    )


def test_buffers_are_cached_per_device_and_dtype():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 50))
    x = torch.zeros(2, 1, 3, 3)
    t = torch.tensor([3, 7])
    diffusion.q_sample(x, t)
    cached = diffusion._tensor_cache[(torch.device("cpu"), torch.float32)]["alphas_cumprod"]
    diffusion.q_sample(x, t)
    diffusion.q_posterior_mean_variance(x, x, t)
    assert len(diffusion._tensor_cache) == 1
    assert diffusion._tensor_cache[(torch.device("cpu"), torch.float32)]["alphas_cumprod"] is cached
    assert diffusion.q_sample(x.double(), t).dtype == torch.float64


def test_buffers_first_built_under_inference_mode_still_serve_training():
    diffusion = GaussianDiffusion(
        get_named_beta_schedule("linear", 100), model_mean_type="eps", model_var_type="learned_range"
    )
    x0 = torch.rand(2, 1, 4, 4)
    t = torch.tensor([0, 50])
    with torch.inference_mode():
        diffusion.p_mean_variance(torch.zeros(2, 2, 4, 4), x0, t)
    output = torch.zeros(2, 2, 4, 4, requires_grad=True)
    noise = torch.randn_like(x0)
    diffusion.loss_terms(output, x0, diffusion.q_sample(x0, t, noise), t, noise)["loss"].sum().backward()
    assert output.grad is not None


# ----------------------------------------------------------------------------- losses (math)
def test_normal_kl_zero_for_equal_and_matches_closed_form():
    mean = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    logvar = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(3, dtype=torch.float64))
    # KL(N(0,1) ‖ N(1,4)) = log 2 + (1 + 1)/(2·4) − 1/2
    known = normal_kl(torch.tensor(0.0), 0.0, torch.tensor(1.0), math.log(4.0))
    assert known.item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)
    mean2 = torch.tensor([1.0, 0.5, -0.5], dtype=torch.float64, requires_grad=True)
    logvar2 = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    ours = normal_kl(mean, logvar, mean2, logvar2)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
        torch.distributions.Normal(mean2, torch.exp(0.5 * logvar2)),
    )
    torch.testing.assert_close(ours, reference)
    ours.sum().backward()
    torch.testing.assert_close(mean2.grad, (mean2 - mean).detach() / torch.exp(logvar2))


def test_approx_cdf_close_to_exact():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max().item() < 3e-4


@pytest.mark.parametrize(
    "mean,log_scale", [(0.0, math.log(0.1)), (0.37, math.log(0.02)), (-0.9, math.log(0.5)), (0.999, -6.0)]
)
def test_discretized_nll_bins_sum_to_one(mean, log_scale):
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(
        levels, means=torch.full_like(levels, mean), log_scales=torch.full_like(levels, log_scale)
    )
    assert torch.all(log_probs <= 0)
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_nll_interior_bin_is_cdf_difference_and_differentiable():
    x = torch.tensor([0.2], dtype=torch.float64)
    means = torch.tensor([0.21], dtype=torch.float64, requires_grad=True)
    log_scales = torch.tensor([math.log(0.05)], dtype=torch.float64)
    log_prob = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    sigma = 0.05
    exact = torch.special.ndtr((x - means + 1 / 255) / sigma) - torch.special.ndtr((x - means - 1 / 255) / sigma)
    assert log_prob.exp().item() == pytest.approx(exact.item(), rel=2e-3)
    log_prob.sum().backward()
    assert means.grad is not None and means.grad.item() < 0  # moving the mean away from x lowers the likelihood


# ----------------------------------------------------------------------------- respacing
def test_space_timesteps_known_iddpm_outputs():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10) == space_timesteps(1000, "10")
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim3") == [0, 334, 668]
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45
    assert [sum(lo <= s < lo + 100 for s in sections) for lo in (0, 100, 200)] == [10, 15, 20]
    assert sections[:2] == [0, 11] and sections[-1] == 299
    for count in ("100", "25", "ddim25", "ddim100", "1000"):
        steps = space_timesteps(1000, count)
        assert len(steps) == int(count.removeprefix("ddim"))
        assert steps[0] == 0 and all(b > a for a, b in itertools.pairwise(steps))
    assert space_timesteps(1000, "100")[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(100, "200")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_alphas_cumprod_equal_original_at_kept_steps(schedule):
    betas = get_named_beta_schedule(schedule, T)
    use = space_timesteps(T, "37")
    spaced = SpacedDiffusion(use, betas=betas)
    original = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(spaced.alphas_cumprod, original[use], rtol=1e-9)
    assert spaced.num_timesteps == 37 and spaced.original_num_timesteps == T
    index = torch.arange(37)
    assert spaced.model_timesteps(index).tolist() == use
    # noising at spaced index i equals noising at the original step
    base = GaussianDiffusion(betas)
    x0 = torch.randn(37, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    torch.testing.assert_close(spaced.q_sample(x0, index, noise), base.q_sample(x0, torch.tensor(use), noise))
    full = SpacedDiffusion(range(T), betas=betas)
    np.testing.assert_allclose(full.betas, betas, rtol=1e-9)


def test_rescale_timesteps_gives_float_on_1000_scale():
    spaced = SpacedDiffusion([0, 50, 99], betas=get_named_beta_schedule("linear", 100), rescale_timesteps=True)
    assert spaced.model_timesteps(torch.tensor([0, 1, 2])).tolist() == pytest.approx([0.0, 500.0, 990.0])


# ----------------------------------------------------------------------------- p_mean_variance
@pytest.mark.parametrize("spacing", [None, "10"])
def test_learned_range_endpoints_are_log_beta_and_log_posterior_variance(spacing):
    betas = get_named_beta_schedule("linear", T)
    kwargs = dict(model_mean_type="x0", model_var_type="learned_range", clip_denoised=False)
    diffusion = (
        GaussianDiffusion(betas, **kwargs)
        if spacing is None
        else SpacedDiffusion(space_timesteps(T, spacing), betas=betas, **kwargs)
    )
    n = diffusion.num_timesteps
    t = torch.tensor([0, 1, n // 2, n - 1])
    x_t = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    x0 = torch.zeros_like(x_t)
    ab = diffusion.alphas_cumprod
    ab_prev = np.append(1.0, ab[:-1])
    step_betas = 1.0 - ab / ab_prev
    post = step_betas * (1 - ab_prev) / (1 - ab)
    log_post_clipped = np.log(np.append(post[1], post[1:]))
    for v, expected in (
        (1.0, np.log(step_betas)),
        (-1.0, log_post_clipped),
        (0.0, 0.5 * (np.log(step_betas) + log_post_clipped)),
    ):
        out = diffusion.p_mean_variance(torch.cat([x0, torch.full_like(x0, v)], dim=1), x_t, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), expected[t.numpy()], rtol=1e-9)
        torch.testing.assert_close(out["variance"], out["log_variance"].exp())


def test_fixed_variances_and_eps_x0_equivalence():
    betas = get_named_beta_schedule("linear", T)
    t = torch.tensor([0, 5, 999])
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    x0_pred = 0.5 * torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    ab = np.cumprod(1 - betas)[t.numpy()]
    eps_pred = (x_t - torch.from_numpy(np.sqrt(ab)).view(-1, 1, 1, 1) * x0_pred) / torch.from_numpy(
        np.sqrt(1 - ab)
    ).view(-1, 1, 1, 1)
    x0_model = GaussianDiffusion(betas, model_mean_type="x0", model_var_type="fixed_large", clip_denoised=False)
    eps_model = GaussianDiffusion(betas, model_mean_type="eps", model_var_type="fixed_small", clip_denoised=False)
    out_x0 = x0_model.p_mean_variance(x0_pred, x_t, t)
    out_eps = eps_model.p_mean_variance(eps_pred, x_t, t)
    torch.testing.assert_close(out_eps["pred_xstart"], x0_pred)
    torch.testing.assert_close(out_eps["mean"], out_x0["mean"])
    large = out_x0["variance"][:, 0, 0, 0].numpy()
    small = out_eps["variance"][:, 0, 0, 0].numpy()
    post1 = betas[1] * (1 - np.cumprod(1 - betas)[0]) / (1 - np.cumprod(1 - betas)[1])
    np.testing.assert_allclose(large, [post1, betas[5], betas[999]], rtol=1e-9)
    assert small[0] == 0 and small[1] < betas[5] and small[2] < betas[999]
    clipped = GaussianDiffusion(betas, clip_denoised=(0.0, 1.0)).p_mean_variance(3 * x0_pred, x_t, t)
    assert clipped["pred_xstart"].min() >= 0 and clipped["pred_xstart"].max() <= 1


# ----------------------------------------------------------------------------- training losses
def test_training_losses_fixed_variance_mse_targets():
    betas = get_named_beta_schedule("linear", T)
    generator = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 1, 8, 8, generator=generator)
    noise = torch.randn(2, 1, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    out = torch.randn(2, 1, 8, 8, generator=generator)
    for mean_type, target in (("x0", x0), ("eps", noise)):
        diffusion = GaussianDiffusion(betas, model_mean_type=mean_type)
        x_t = diffusion.q_sample(x0, t, noise)
        terms = diffusion.training_losses(out, x0, x_t, t, noise)
        torch.testing.assert_close(terms["mse"], ((out - target) ** 2).mean(dim=(1, 2, 3)))
        torch.testing.assert_close(terms["loss"], terms["mse"])
        assert terms["vlb"].shape == (2,) and torch.all(terms["vlb"] == 0)
    assert diffusion.model_output_channels() == 1 and diffusion.model_output_channels(3) == 3


def test_hybrid_loss_vlb_is_stop_gradient_and_matches_manual_terms():
    betas = get_named_beta_schedule("linear", T)
    diffusion = GaussianDiffusion(betas, model_mean_type="x0", model_var_type="learned_range")
    assert diffusion.model_output_channels() == 2
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 10, 700])
    x_t = diffusion.q_sample(x0, t, noise)
    output = (0.1 * torch.randn(3, 2, 8, 8, generator=generator, dtype=torch.float64)).requires_grad_(True)
    terms = diffusion.loss_terms(output, x0, x_t, t, noise)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * T * terms["vlb"])
    # manual bound terms
    out = diffusion.p_mean_variance(output.detach(), x_t, t, clip_denoised=False)
    true_mean, _, true_logvar = diffusion.q_posterior_mean_variance(x0, x_t, t)
    kl = normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(terms["vlb"].detach(), torch.stack([nll[0], kl[1], kl[2]]))
    # stop-gradient: the bound trains only the variance channel
    (terms["loss"] - terms["mse"]).sum().backward()
    assert torch.all(output.grad[:, :1] == 0) and output.grad[:, 1:].abs().sum() > 0


def test_vlb_is_zero_for_exact_posterior():
    """A perfect x0 prediction with σ² = β̃_t (v = −1) reproduces q(x_{t−1}|x_t, x_0): the KL terms vanish."""
    betas = get_named_beta_schedule("cosine", T)
    diffusion = GaussianDiffusion(betas, model_var_type="learned_range", clip_denoised=False)
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([3, 500])
    x_t = diffusion.q_sample(x0, t)
    vlb = diffusion.vb_terms_bpd(torch.cat([x0, -torch.ones_like(x0)], dim=1), x0, x_t, t)["output"]
    torch.testing.assert_close(vlb, torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)


def test_model_output_shape_errors():
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 100), model_var_type="learned_range")
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="2 channels"):
        diffusion.p_mean_variance(torch.zeros(1, 4, 2, 2), x, torch.tensor([1]))
    with pytest.raises(ValueError, match="even number"):
        diffusion.p_mean_variance(torch.zeros(1, 3, 2, 2), x, torch.tensor([1]))


# ----------------------------------------------------------------------------- config factory
def test_build_diffusion_from_config():
    default = build_diffusion({})
    assert type(default) is GaussianDiffusion and default.num_timesteps == 1000
    # "auto" without the training data's normalization: never cut what the data may hold
    assert (default.model_mean_type, default.model_var_type, default.clip_range) == ("x0", "fixed_large", (-1.0, 10.0))
    spaced = build_diffusion(
        {
            "schedule": "cosine",
            "timesteps": 1000,
            "model_mean_type": "eps",
            "model_var_type": "learned_range",
            "clip_denoised": None,
            "respacing": "ddim50",
        }
    )
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 50 and spaced.clip_range is None
    assert spaced.model_timesteps(torch.tensor([49])).item() == 980
    assert build_diffusion({"clip_denoised": True}).clip_range == (-1.0, 1.0)
    assert build_diffusion({"clip_denoised": [0, 1]}).clip_range == (0.0, 1.0)
    cfg = normalize_diffusion_config({"respacing": 100})
    assert cfg["respacing"] == "100" and cfg["clip_denoised"] == "auto" and cfg["auto_clip_max"] == 10.0
    assert normalize_diffusion_config({"clip_denoised": [-1, 1]})["clip_denoised"] == [-1.0, 1.0]  # the official
    assert normalize_diffusion_config({"clip_denoised": False})["clip_denoised"] is None
    for bad in (
        {"shedule": "linear"},
        {"schedule": "quad"},
        {"model_mean_type": "v"},
        {"respacing": "2000"},
        {"clip_denoised": [1, 0]},
        {"clip_denoised": "wide"},
        {"auto_clip_max": 0.5},
    ):
        with pytest.raises(ValueError):
            build_diffusion(bad)


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"preprocessing": {"normalization": "shared"}}, [-1.0, 10.0]),
        ({"preprocessing": {"normalization": "slice"}}, [-1.0, 1.0]),  # per-slice min–max: the official loader
        ({"preprocessing": {"normalization": "volume"}}, [-1.0, 1.0]),
        ({"normalization": "paper"}, [-1.0, 1.0]),  # legacy name, flat key
        ({}, [-1.0, 10.0]),  # unknown: do not cut
    ],
)
def test_auto_clip_resolves_from_the_training_normalization(data, expected):
    from m2diff_monai.diffusion import resolve_clip

    assert resolve_clip({"clip_denoised": "auto"}, data)["clip_denoised"] == expected
    assert resolve_clip({"clip_denoised": "AUTO", "auto_clip_max": 4}, data)["clip_denoised"][1] == (
        1.0 if expected[1] == 1.0 else 4.0
    )
    # explicit ranges and "no clip" are kept whatever the normalization
    assert resolve_clip({"clip_denoised": [-1, 1]}, data)["clip_denoised"] == [-1.0, 1.0]
    assert resolve_clip({"clip_denoised": None}, data)["clip_denoised"] is None


def test_auto_clip_reads_the_training_manifest_provenance(tmp_path):
    from m2diff_monai.diffusion import resolve_clip

    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"provenance": {"parameters": {"normalization": "volume"}}}))
    assert resolve_clip({}, {"manifest": str(manifest)})["clip_denoised"] == [-1.0, 1.0]
    assert resolve_clip({}, {"manifest": str(tmp_path / "missing.json")})["clip_denoised"] == [-1.0, 10.0]
