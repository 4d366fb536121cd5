"""Samplers with an ORACLE denoiser on Gaussian data x0 ~ N(0, s²), against an independent analytic recursion.

For Gaussian data the MMSE denoiser is linear: E[x0|x_t] = √ᾱ s²/(ᾱ s² + 1 − ᾱ)·x_t and
E[ε|x_t] = √(1−ᾱ)/(ᾱ s² + 1 − ᾱ)·x_t. Every sampler step is then x ← a·x + σ·z, so the output variance follows
V ← a²V + σ² exactly; the recursion below is written from the formulas, independently of the package.

What is true (and asserted): at 1000 steps all samplers give std ≈ s. With fewer steps the fixed variances are
biased — fixed_small (= DDIM η=1) and DDIM η=0 shrink the spread (s=0.5 → 0.47 at 100 steps, 0.32/0.36 at 10),
fixed_large inflates it (0.51 at 100, 0.60 at 10) — because the true reverse kernel has variance
β̃_t + coef1²·Var[x0|x_t]. A learned_range output that supplies that variance gives std = s at any step count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2diff_monai.diffusion import GaussianDiffusion, get_named_beta_schedule, respaced, sample, space_timesteps

T = 1000
S = 0.5
SHAPE = (8, 1, 50, 50)  # 20k independent scalar "pixels"
BETAS = get_named_beta_schedule("linear", T)
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


@pytest.fixture(autouse=True)
def single_thread():
    """Small elementwise ops on 2 shared cores: intra-op threads only add synchronisation stalls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def kept_steps(steps: int | None) -> list[int]:
    return list(range(T)) if steps is None else space_timesteps(T, steps)


def oracle(mean_type: str, dtype=torch.float32, learned_var_for_steps: int | None | str = "none"):
    """model_fn(x_t, t_original) for x0 ~ N(0, S²); optionally appends the v channel of the exact reverse variance."""
    ab = torch.tensor(ALPHAS_CUMPROD, dtype=dtype)
    if learned_var_for_steps != "none":
        keep = kept_steps(learned_var_for_steps)
        v_of_t = torch.zeros(T, dtype=dtype)
        for i, step in enumerate(keep):
            a, a_prev = ALPHAS_CUMPROD[step], (ALPHAS_CUMPROD[keep[i - 1]] if i > 0 else 1.0)
            beta = 1 - a / a_prev
            post = beta * (1 - a_prev) / (1 - a)
            coef1 = beta * math.sqrt(a_prev) / (1 - a)
            optimal = post + coef1**2 * S**2 * (1 - a) / (a * S**2 + 1 - a)
            if i == 0:
                continue  # no noise is added at the last step; v is irrelevant there
            frac = (math.log(optimal) - math.log(post)) / (math.log(beta) - math.log(post))  # log-space interpolation
            v_of_t[step] = 2 * frac - 1

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = ab[t].view(-1, 1, 1, 1)
        var = a * S**2 + 1 - a
        out = a.sqrt() * S**2 / var * x if mean_type == "x0" else (1 - a).sqrt() / var * x
        if learned_var_for_steps != "none":
            out = torch.cat([out, v_of_t[t].view(-1, 1, 1, 1).expand_as(x)], dim=1)
        return out

    return model_fn


def analytic_std(steps: int | None, kind: str, eta: float = 0.0, keep: list[int] | None = None) -> float:
    """Exact std of the sampler output for the oracle denoiser (linear chain of Gaussians). ``keep``: the kept
    steps of a truncated chain, which starts from the exact marginal variance ᾱS² + 1 − ᾱ of its first step."""
    if keep is None:
        keep = kept_steps(steps)
        variance = 1.0
    else:
        variance = ALPHAS_CUMPROD[keep[-1]] * S**2 + 1 - ALPHAS_CUMPROD[keep[-1]]
    for i in range(len(keep) - 1, -1, -1):
        a = ALPHAS_CUMPROD[keep[i]]
        a_prev = ALPHAS_CUMPROD[keep[i - 1]] if i > 0 else 1.0
        beta = 1 - a / a_prev
        marginal = a * S**2 + 1 - a
        x0_gain = math.sqrt(a) * S**2 / marginal
        eps_gain = (1 - math.sqrt(a) * x0_gain) / math.sqrt(1 - a)
        coef1 = beta * math.sqrt(a_prev) / (1 - a)
        coef2 = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        if kind == "ddim":
            noise_var = eta**2 * (1 - a_prev) / (1 - a) * beta
            gain = math.sqrt(a_prev) * x0_gain + math.sqrt(1 - a_prev - noise_var) * eps_gain
        else:
            gain = coef1 * x0_gain + coef2
            noise_var = {"fixed_small": beta * (1 - a_prev) / (1 - a), "fixed_large": beta}[kind]
        variance = gain**2 * variance + (noise_var if i > 0 else 0.0)
    return math.sqrt(variance)


def run(
    mean_type: str, var_type: str, sampler: str, steps, eta: float = 0.0, seed: int = 0, **model_kwargs
) -> torch.Tensor:
    diffusion = GaussianDiffusion(BETAS, model_mean_type=mean_type, model_var_type=var_type, clip_denoised=False)
    generator = torch.Generator().manual_seed(seed)
    return sample(
        diffusion, oracle(mean_type, **model_kwargs), SHAPE, sampler=sampler, steps=steps, eta=eta, generator=generator
    )


# relative standard error of a std estimated from 20k samples ≈ 1/√(2·20000) = 0.5%
CASES = [
    # mean_type, var_type, sampler, eta
    ("x0", "fixed_small", "ancestral", 0.0),
    ("x0", "fixed_large", "ancestral", 0.0),
    ("x0", "fixed_large", "ddim", 0.0),
    ("x0", "fixed_large", "ddim", 1.0),
    ("eps", "fixed_small", "ancestral", 0.0),
    ("eps", "fixed_large", "ancestral", 0.0),
    ("eps", "fixed_small", "ddim", 0.0),
]


@pytest.mark.parametrize("mean_type,var_type,sampler,eta", CASES)
@pytest.mark.parametrize("steps", [None, 100, 10])
def test_oracle_sample_std_matches_analytic(mean_type, var_type, sampler, eta, steps):
    x = run(mean_type, var_type, sampler, steps, eta)
    assert x.shape == SHAPE and torch.isfinite(x).all()
    kind = "ddim" if sampler == "ddim" else var_type
    expected = analytic_std(steps, kind, eta)
    assert x.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(x.mean().item()) < 0.02
    if steps is None:
        assert x.std().item() == pytest.approx(S, rel=0.02)  # the full chain reproduces the data distribution


def test_analytic_bias_of_fixed_variances_at_short_chains():
    """Documented behaviour (see module docstring): what is and is not within a few % of s."""
    assert analytic_std(None, "fixed_small") == pytest.approx(S, rel=0.01)
    assert analytic_std(None, "fixed_large") == pytest.approx(S, rel=0.01)
    assert analytic_std(None, "ddim", 0.0) == pytest.approx(S, rel=0.01)
    assert analytic_std(100, "fixed_large") == pytest.approx(S, rel=0.03)
    assert analytic_std(100, "ddim", 0.0) == pytest.approx(S, rel=0.03)
    assert 0.9 * S < analytic_std(100, "fixed_small") < 0.95 * S
    assert analytic_std(10, "fixed_small") < 0.7 * S
    assert analytic_std(10, "ddim", 0.0) < 0.75 * S
    assert analytic_std(10, "fixed_large") > 1.15 * S
    assert analytic_std(10, "ddim", 1.0) == pytest.approx(analytic_std(10, "fixed_small"), rel=1e-12)


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
@pytest.mark.parametrize("steps", [10, 100])
def test_learned_range_with_exact_variance_is_unbiased_at_any_step_count(mean_type, steps):
    x = run(mean_type, "learned_range", "ancestral", steps, learned_var_for_steps=steps)
    assert x.std().item() == pytest.approx(S, rel=0.02)


def test_network_sees_original_timesteps_and_callback_runs():
    seen: list[list[int]] = []
    calls: list[int] = []

    def model_fn(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    diffusion = GaussianDiffusion(BETAS)
    sample(diffusion, model_fn, (3, 1, 4, 4), steps=10, callback=lambda i, t, x, x0: calls.append(i))
    assert [s[0] for s in seen] == space_timesteps(T, 10)[::-1]
    assert all(len(set(s)) == 1 and len(s) == 3 for s in seen)
    assert calls == list(range(9, -1, -1))
    assert respaced(diffusion, 10) is respaced(diffusion, 10)  # respaced chain is cached
    assert respaced(diffusion, T) is diffusion


def test_shared_noise_gives_identical_samples_across_batch():
    diffusion = GaussianDiffusion(BETAS, model_var_type="fixed_large", clip_denoised=False)
    x = sample(
        diffusion, oracle("x0"), (4, 1, 16, 16), steps=20, shared_noise=True, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(x, x[:1].expand_as(x))
    assert x.std().item() > 0.1
    y = sample(diffusion, oracle("x0"), (4, 1, 16, 16), steps=20, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(y[0], y[1])


def test_reproducible_with_generator_and_deterministic_ddim_from_noise():
    diffusion = GaussianDiffusion(BETAS, model_mean_type="eps")
    fn = oracle("eps")
    a = sample(diffusion, fn, (2, 1, 8, 8), steps=25, generator=torch.Generator().manual_seed(7))
    b = sample(diffusion, fn, (2, 1, 8, 8), steps=25, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    noise = torch.randn(2, 1, 8, 8)
    c = sample(
        diffusion, fn, noise.shape, sampler="ddim", steps=25, noise=noise, generator=torch.Generator().manual_seed(1)
    )
    d = sample(
        diffusion, fn, noise.shape, sampler="ddim", steps=25, noise=noise, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_output_is_clamped_and_dtype_respected():
    diffusion = GaussianDiffusion(BETAS, clip_denoised=(0.0, 1.0))
    x = sample(diffusion, lambda x, t: 5 * torch.ones_like(x), (2, 1, 4, 4), steps=5, dtype=torch.float64)
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="sampler"):
        sample(diffusion, lambda x, t: x, (1, 1, 2, 2), sampler="euler")
    with pytest.raises(ValueError, match="noise shape"):
        sample(diffusion, lambda x, t: x, (1, 1, 2, 2), noise=torch.zeros(2, 1, 2, 2))


@pytest.mark.parametrize("sampler,var_type", [("ancestral", "fixed_large"), ("ddim", "fixed_small")])
@pytest.mark.parametrize("start_step,steps", [(300, None), (300, 30), (600, 10)])
def test_truncated_start_from_a_data_sample_keeps_the_data_distribution(sampler, var_type, start_step, steps):
    """x_{t0} = q_sample(start, t0) with start ~ N(0, S²) has the true marginal at t0, so the chain over [0, t0]
    behaves exactly like the analytic recursion started there (and gives std S on the full sub-chain)."""
    diffusion = GaussianDiffusion(BETAS, model_mean_type="eps", model_var_type=var_type, clip_denoised=False)
    generator = torch.Generator().manual_seed(3)
    start = S * torch.randn(SHAPE, generator=generator)
    x = sample(
        diffusion,
        oracle("eps"),
        SHAPE,
        sampler=sampler,
        steps=steps,
        generator=generator,
        start=start,
        start_step=start_step,
    )
    keep = list(range(start_step + 1)) if steps is None else space_timesteps(start_step + 1, steps)
    kind = "ddim" if sampler == "ddim" else var_type
    assert x.std().item() == pytest.approx(analytic_std(None, kind, keep=keep), rel=0.02)
    if steps is None:
        assert x.std().item() == pytest.approx(S, rel=0.02)


def test_truncated_start_is_q_sample_at_t0_and_calls_only_timesteps_up_to_t0():
    target = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    start = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    ab = torch.tensor(ALPHAS_CUMPROD, dtype=torch.float32)
    seen: list[int] = []
    first_x: list[torch.Tensor] = []

    def eps_oracle(x, t):  # knows the target: ε = (x_t − √ᾱ·x0)/√(1−ᾱ)
        seen.append(int(t[0]))
        if not first_x:
            first_x.append(x.clone())
        a = ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    diffusion = GaussianDiffusion(BETAS, model_mean_type="eps")
    out = sample(
        diffusion, eps_oracle, target.shape, sampler="ddim", steps=10, noise=noise, start=start, start_step=400
    )
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    assert seen == space_timesteps(401, 10)[::-1] and seen[0] == 400 and seen[-1] == 0
    expected_first = ab[400].sqrt() * start + (1 - ab[400]).sqrt() * noise
    torch.testing.assert_close(first_x[0], expected_first, atol=1e-6, rtol=0)
    assert respaced(diffusion, 10, start_step=400) is respaced(diffusion, 10, start_step=400)
    assert respaced(diffusion, 10, start_step=400) is not respaced(diffusion, 10)


def test_truncated_start_rejects_incomplete_or_impossible_requests():
    diffusion = GaussianDiffusion(BETAS)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="both start"):
        sample(diffusion, lambda x, t: x, x.shape, start=x)
    with pytest.raises(ValueError, match="both start"):
        sample(diffusion, lambda x, t: x, x.shape, start_step=10)
    with pytest.raises(ValueError, match="start_step"):
        respaced(diffusion, 10, start_step=T)
    with pytest.raises(ValueError, match="cannot divide"):
        sample(diffusion, lambda x, t: x, x.shape, steps=50, start=x, start_step=20)
    with pytest.raises(ValueError, match="start shape"):
        sample(diffusion, lambda x, t: x, x.shape, steps=5, start=torch.zeros(2, 1, 2, 2), start_step=20)
