"""diffusion/: schedules, respacing, sampler steps and losses against closed forms, plus golden
outputs of the official DiT code (tests/fixtures/official_tiny.safetensors)."""
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import norm

from core.errors import UserError
from diffusion import create_diffusion, discretized_gaussian_log_likelihood, space_timesteps

GOLDEN = Path(__file__).parent / "fixtures" / "official_tiny.safetensors"


def linear_betas(T):
    s = 1000 / T
    return np.array([s * 1e-4 + (s * 0.02 - s * 1e-4) * i / (T - 1) for i in range(T)])


def cosine_alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cumprod(betas):
    out, p = [], 1.0
    for b in betas:
        p *= 1.0 - b
        out.append(p)
    return np.array(out)


def bayes_posterior(betas, t, x0, xt):
    """q(x_{t-1} | x_t, x_0) by Gaussian conditioning: prior N(sqrt(ab') x0, 1-ab'), likelihood N(sqrt(a) x, b)."""
    ab = cumprod(betas)
    ab_prev = 1.0 if t == 0 else ab[t - 1]
    beta, alpha = betas[t], 1.0 - betas[t]
    var = 1.0 / (1.0 / (1.0 - ab_prev) + alpha / beta) if t > 0 else 0.0
    mean = var * (math.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + math.sqrt(alpha) * xt / beta) if t > 0 else x0
    return mean, var


def gauss_kl(m1, v1, m2, v2):
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


class FixedOutput:
    """A stand-in model that returns a fixed output and records the timesteps it was called with."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def __call__(self, x, t, **kw):
        self.seen.append(t.tolist())
        return self.out


# ---------------- schedules ----------------
@pytest.mark.parametrize("T", [1000, 250])
def test_linear_schedule_and_posterior(T):
    d = create_diffusion("", diffusion_steps=T)
    betas = linear_betas(T)
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod, cumprod(betas), rtol=1e-10)
    post = [bayes_posterior(betas, t, 0.0, 0.0)[1] for t in range(T)]
    np.testing.assert_allclose(d.posterior_variance, post, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([post[1]] + post[1:]), rtol=1e-9)


def test_cosine_schedule():
    T = 1000
    d = create_diffusion("", noise_schedule="cosine", diffusion_steps=T)
    f = [cosine_alpha_bar(i / T) for i in range(T + 1)]
    betas = np.minimum([1 - f[i + 1] / f[i] for i in range(T)], 0.999)
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12)
    assert d.betas[-1] == 0.999  # capped at the end
    # The uncapped ratios telescope: alpha_bar_t = f(t+1) / f(0).
    np.testing.assert_allclose(d.alphas_cumprod[:-1], np.array(f[1:T]) / f[0], rtol=1e-9)
    post = [bayes_posterior(betas, t, 0.0, 0.0)[1] for t in range(T)]
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([post[1]] + post[1:]), rtol=1e-9)


def test_q_sample_and_posterior_mean():
    d = create_diffusion("")
    ab = cumprod(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    ref = [math.sqrt(ab[k]) * x0[i].double() + math.sqrt(1 - ab[k]) * noise[i].double() for i, k in enumerate(t)]
    torch.testing.assert_close(d.q_sample(x0, t, noise=noise).double(), torch.stack(ref), rtol=1e-5, atol=1e-6)
    xt = d.q_sample(x0, t, noise=noise)
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
    for i, k in enumerate(t.tolist()):
        m_ref, v_ref = bayes_posterior(linear_betas(1000), k, x0[i].double().numpy(), xt[i].double().numpy())
        np.testing.assert_allclose(mean[i].numpy(), m_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[i].numpy(), v_ref, rtol=1e-5, atol=1e-12)


# ---------------- respacing ----------------
def official_spacing(T, counts):
    """The IDDPM rule: equal sections (the first T % len ones a step longer), each strided with both ends kept.
    Positions are running float sums of the stride, rounded half to even."""
    size_per, extra = divmod(T, len(counts))
    start, steps = 0, []
    for i, n in enumerate(counts):
        size = size_per + (i < extra)
        stride = 1.0 if n == 1 else (size - 1) / (n - 1)
        steps += [start + round(float(p)) for p in np.cumsum([0.0] + [stride] * (n - 1))]
        start += size
    return sorted(set(steps))


@pytest.mark.parametrize("spec,counts", [("250", [250]), ("100", [100]), ("10", [10]), ("10,10,10", [10, 10, 10]),
                                         ([25, 5], [25, 5])])
def test_space_timesteps(spec, counts):
    assert space_timesteps(1000, spec) == official_spacing(1000, counts)


def test_space_timesteps_known_values():
    assert space_timesteps(1000, "100")[:4] == [0, 10, 20, 30] and space_timesteps(1000, "100")[-2:] == [989, 999]
    # 12 * 499/24 is exactly 249.5, but the official running float sum lands just below it: 249, not 250.
    assert 249 in space_timesteps(1000, [25, 5]) and round(12 * Fraction(499, 24)) == 250
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    for bad in ("abc", "ddim7x", "2000", "ddim999"):
        with pytest.raises(UserError):
            space_timesteps(1000, bad)


def test_respaced_process_keeps_alpha_bar_and_maps_timesteps():
    base = create_diffusion("")
    d = create_diffusion("ddim10")
    assert d.timestep_map == list(range(0, 1000, 100))
    np.testing.assert_allclose(d.alphas_cumprod, cumprod(linear_betas(1000))[::100], rtol=1e-10)
    assert create_diffusion([1000]).timestep_map == base.timestep_map == list(range(1000))
    model = FixedOutput(torch.zeros(2, 8))
    d.ddim_sample_loop(model, (2, 4), noise=torch.zeros(2, 4), clip_denoised=False)
    assert model.seen == [[k, k] for k in range(900, -1, -100)]  # original indices, not rescaled


# ---------------- samplers ----------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("step", [0, 37, 99])
def test_p_sample_step_matches_formula(step, temperature):
    # MAR's usage: cosine schedule, 100 respaced steps, token rows (N, C).
    d = create_diffusion("100", noise_schedule="cosine")
    orig = round(step * 999 / 99)
    ab_all = np.cumprod(1 - np.minimum([1 - cosine_alpha_bar((i + 1) / 1000) / cosine_alpha_bar(i / 1000)
                                        for i in range(1000)], 0.999))
    kept = [round(i * 999 / 99) for i in range(100)]
    ab = ab_all[kept]
    betas = 1 - ab / np.append(1.0, ab[:-1])
    g = torch.Generator().manual_seed(1)
    x, eps, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) * 2 - 1
    model = FixedOutput(torch.cat([eps, v], 1))
    torch.manual_seed(123)
    noise = torch.randn_like(x)
    torch.manual_seed(123)
    out = d.p_sample(model, x, torch.full((3,), step), clip_denoised=False, temperature=temperature)
    assert model.seen == [[orig] * 3]

    xd, ed, vd = (a.double().numpy() for a in (x, eps, v))
    x0 = (xd - math.sqrt(1 - ab[step]) * ed) / math.sqrt(ab[step])
    mean, post_var = bayes_posterior(betas, step, x0, xd)
    post_var_clipped = bayes_posterior(betas, max(step, 1), 0.0, 0.0)[1]
    frac = (vd + 1) / 2
    std = np.exp(0.5 * (frac * np.log(betas[step]) + (1 - frac) * np.log(post_var_clipped)))
    ref = mean + (step != 0) * std * noise.double().numpy() * temperature
    np.testing.assert_allclose(out["pred_xstart"].numpy(), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["sample"].numpy(), ref, rtol=1e-4, atol=1e-4)


def test_p_sample_draws_one_normal_per_step_even_at_t0():
    d = create_diffusion("10")
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    d.p_sample(FixedOutput(torch.zeros(2, 6)), x, torch.zeros(2, dtype=torch.long))
    after = torch.randn(5)
    torch.manual_seed(0)
    torch.randn_like(x)
    torch.testing.assert_close(after, torch.randn(5), rtol=0, atol=0)


def test_ddim_step_with_eta_matches_formula():
    d = create_diffusion("ddim10")
    ab = cumprod(linear_betas(1000))[::100]
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    torch.manual_seed(7)
    noise = torch.randn_like(x)
    torch.manual_seed(7)
    out = d.ddim_sample(FixedOutput(torch.cat([eps, torch.zeros_like(eps)], 1)), x, torch.full((2,), 4),
                        clip_denoised=False, eta=0.5)
    a, a_prev = ab[4], ab[3]
    sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x0 = (x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
    ref = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps.double() + sigma * noise.double()
    torch.testing.assert_close(out["sample"].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma_small", [True, False])
def test_fixed_variances(sigma_small):
    d = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
    betas = linear_betas(1000)
    t = torch.tensor([0, 1, 500])
    out = d.p_mean_variance(FixedOutput(torch.zeros(3, 2)), torch.zeros(3, 2), t)
    post = [bayes_posterior(betas, k, 0.0, 0.0)[1] for k in (0, 1, 500)]
    if sigma_small:  # the posterior variance (0 at t=0); its log is clipped to the t=1 value
        ref, ref_log = post, np.log([post[1], post[1], post[2]])
    else:  # beta_t, with the t=1 posterior variance at t=0 (better decoder likelihood)
        ref = [post[1], betas[1], betas[500]]
        ref_log = np.log(ref)
    np.testing.assert_allclose(out["variance"][:, 0].numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(out["log_variance"][:, 0].numpy(), ref_log, rtol=1e-5)


# ---------------- losses ----------------
def test_vb_is_gaussian_kl_in_bits_and_trains_only_the_variance():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    t = torch.tensor([5, 700])
    eps = torch.randn(2, 3, generator=g).requires_grad_()
    v = (torch.rand(2, 3, generator=g) * 2 - 1).requires_grad_()
    losses = d.training_losses(lambda x, t: torch.cat([eps, v], 1), x0, t, noise=noise)

    betas = linear_betas(1000)
    ab = cumprod(betas)
    ref_kl, ref_mse = [], []
    for i, k in enumerate(t.tolist()):
        xt = math.sqrt(ab[k]) * x0[i].double().numpy() + math.sqrt(1 - ab[k]) * noise[i].double().numpy()
        e = eps[i].detach().double().numpy()
        m_true, v_true = bayes_posterior(betas, k, x0[i].double().numpy(), xt)
        m_model, _ = bayes_posterior(betas, k, (xt - math.sqrt(1 - ab[k]) * e) / math.sqrt(ab[k]), xt)
        frac = (v[i].detach().double().numpy() + 1) / 2
        v_model = np.exp(frac * np.log(betas[k]) + (1 - frac) * np.log(v_true))
        ref_kl.append(gauss_kl(m_true, v_true, m_model, v_model).mean() / math.log(2))
        ref_mse.append(((e - noise[i].double().numpy()) ** 2).mean())
    np.testing.assert_allclose(losses["vb"].detach().numpy(), ref_kl, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(losses["mse"].detach().numpy(), ref_mse, rtol=1e-5)
    np.testing.assert_allclose(losses["loss"].detach().numpy(), np.add(ref_kl, ref_mse), rtol=1e-3)

    losses["vb"].sum().backward()
    assert (eps.grad is None or not eps.grad.any()) and v.grad.abs().sum() > 0  # stop-gradient on the mean

    kl_only = create_diffusion("", use_kl=True).training_losses(lambda x, t: torch.cat([eps, v], 1).detach(),
                                                                x0, t, noise=noise)
    np.testing.assert_allclose(kl_only["loss"].numpy(), np.array(ref_kl) * 1000, rtol=1e-3)


def test_discretized_gaussian_log_likelihood_against_exact_cdf():
    x = torch.tensor([-1.0, 1.0, 0.3, -0.2])
    means = torch.tensor([-0.9, 0.8, 0.31, 0.0])
    log_scales = torch.log(torch.tensor([0.1, 0.2, 0.05, 0.5]))
    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).numpy()
    xd, m, s = x.double().numpy(), means.double().numpy(), log_scales.exp().double().numpy()
    hi, lo = norm.cdf((xd + 1 / 255 - m) / s), norm.cdf((xd - 1 / 255 - m) / s)
    ref = np.log([hi[0], 1 - lo[1], hi[2] - lo[2], hi[3] - lo[3]])  # edge bins are open-ended
    np.testing.assert_allclose(got, ref, rtol=2e-2)


# ---------------- golden parity with the official code ----------------
@pytest.fixture(scope="module")
def golden():
    from models.dit import DiT

    g = load_file(str(GOLDEN))
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10,
                learn_sigma=True).eval()
    model.load_state_dict({k[len("dit."):]: v for k, v in g.items() if k.startswith("dit.")})
    return model, g


def assert_rel_close(a, b, tol):
    assert ((a - b).abs().max() / b.abs().max()).item() < tol


def test_golden_training_losses(golden):
    model, g = golden
    with torch.no_grad():
        out = create_diffusion("").training_losses(model, g["x"], g["t"], dict(y=g["y"]), noise=g["noise"])
    for k in ("loss", "mse", "vb"):
        torch.testing.assert_close(out[k], g[f"dit_training_losses_{k}"], rtol=1e-5, atol=1e-6)


def test_golden_p_sample_loop(golden):
    model, g = golden
    torch.manual_seed(5)
    z = g["sample_z"]
    out = create_diffusion("10").p_sample_loop(model.forward, z.shape, noise=z, clip_denoised=False,
                                               model_kwargs=dict(y=g["sample_y"]))
    assert_rel_close(out, g["dit_p_sample_loop_10_seed5"], 1e-4)


def test_golden_ddim_sample_loop(golden):
    model, g = golden
    z = g["sample_z"]
    out = create_diffusion("ddim10").ddim_sample_loop(model.forward, z.shape, noise=z, clip_denoised=False,
                                                      model_kwargs=dict(y=g["sample_y"]))
    assert_rel_close(out, g["dit_ddim_sample_loop_ddim10"], 1e-4)
