"""transport/: paths, losses, intervals and samplers against closed forms (sit.md) and official golden outputs."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import golden_model
from transport import Sampler, create_transport
from transport.path import PATHS

PATH_NAMES = ("Linear", "GVP", "VP")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---- independent closed forms (sit.md tables), float64 numpy ----
def vp_m(t):
    return -0.25 * (1 - t) ** 2 * 19.9 - 0.5 * (1 - t) * 0.1


def vp_dm(t):
    return 0.5 * (1 - t) * 19.9 + 0.05


def coeffs(path, t):
    """(alpha, sigma, alpha_dot, sigma_dot) from sit.md section 2."""
    if path == "Linear":
        return t, 1 - t, np.ones_like(t), -np.ones_like(t)
    if path == "GVP":
        c, s = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
        return s, c, np.pi / 2 * c, -np.pi / 2 * s
    a = np.exp(vp_m(t))
    sig = np.sqrt(1 - a ** 2)
    return a, sig, a * vp_dm(t), -a ** 2 * vp_dm(t) / sig


class GaussianToy:
    """Data x1 ~ N(mu, diag(s^2)), noise x0 ~ N(0, I): p_t = N(alpha mu, alpha^2 s^2 + sigma^2), all exact."""

    def __init__(self, path, dim=3):
        self.path = path
        self.mu = torch.linspace(-1.0, 2.0, dim, dtype=torch.float64)
        self.s = torch.linspace(0.3, 0.8, dim, dtype=torch.float64)

    def stats(self, t):
        a, sig, da, dsig = (torch.as_tensor(c, dtype=torch.float64) for c in coeffs(self.path, t.double().numpy()))
        a, sig, da, dsig = (c[:, None] for c in (a, sig, da, dsig))
        var = a ** 2 * self.s ** 2 + sig ** 2
        return a, sig, da, var, (a * da * self.s ** 2 + sig * dsig) / var  # last: S'/S

    def velocity(self, x, t):
        a, _, da, _, rate = self.stats(t)
        return da * self.mu + rate * (x - a * self.mu)

    def score(self, x, t):
        a, _, _, var, _ = self.stats(t)
        return -(x - a * self.mu) / var

    def noise(self, x, t):  # E[x0 | x_t] = -sigma * score
        return -self.stats(t)[1] * self.score(x, t)

    def flow_map(self, z, t0, t1):
        """Exact ODE solution: (x - m) scales by S(t1)/S(t0)."""
        (a0, _, _, v0, _), (a1, _, _, v1, _) = (self.stats(torch.tensor([t], dtype=torch.float64)) for t in (t0, t1))
        return a1 * self.mu + (v1 / v0).sqrt() * (z - a0 * self.mu)

    def model(self, prediction):
        """A 'network' with the forward_with_cfg call convention (y, cfg_scale kwargs)."""
        def fn(x, t, y, cfg_scale):
            assert y.shape == (x.shape[0],) and cfg_scale == 4.0 and t.shape == (x.shape[0],)
            return getattr(self, prediction)(x, t)
        return fn


def cfg_kwargs(n):
    return {"y": torch.zeros(n, dtype=torch.long), "cfg_scale": 4.0}


# ---- paths ----
@pytest.mark.parametrize("name", PATH_NAMES)
def test_path_coefficients_and_derivatives(name):
    path, h = PATHS[name](), 1e-6
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    (a, da), (s, ds) = path.compute_alpha_t(t), path.compute_sigma_t(t)
    ref = coeffs(name, t.numpy())
    for got, want in zip((a, s, da, ds), ref):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    fd = lambda f: (f(t + h)[0] - f(t - h)[0]) / (2 * h)
    np.testing.assert_allclose(da.numpy(), fd(path.compute_alpha_t).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.numpy(), fd(path.compute_sigma_t).numpy(), rtol=1e-6)
    np.testing.assert_allclose(path.compute_d_alpha_alpha_ratio_t(t).numpy(), ref[2] / ref[0], rtol=1e-10)


def test_vp_endpoints():
    a0, a1 = PATHS["VP"]().compute_alpha_t(torch.tensor([0.0, 1.0], dtype=torch.float64))[0]
    assert abs(a0.item() - 0.00657) < 1e-5 and a1.item() == 1.0


@pytest.mark.parametrize("name", PATH_NAMES)
def test_compute_drift_formulas_and_probability_flow(name):
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    f, g = PATHS[name]().compute_drift(x, t)
    a, s, da, ds = (torch.from_numpy(c)[:, None] for c in coeffs(name, t.numpy()))
    if name == "VP":
        beta = (0.1 + (1 - t) * 19.9)[:, None]
        f_ref, g_ref = -0.5 * beta * x, beta / 2
    else:
        f_ref, g_ref = -(da / a) * x, (da / a) * s ** 2 - s * ds
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(g, g_ref)
    toy = GaussianToy(name)  # -f + g * score must be the true marginal velocity, and vice versa
    torch.testing.assert_close(-f + g * toy.score(x, t), toy.velocity(x, t))
    torch.testing.assert_close(PATHS[name]().get_score_from_velocity(toy.velocity(x, t), x, t), toy.score(x, t))


def test_diffusion_forms():
    path, n = PATHS["Linear"](), 0.7
    t = torch.tensor([0.2, 0.5], dtype=torch.float64)
    x = torch.zeros(2, 3, dtype=torch.float64)
    want = {"constant": [n, n], "SBDM": n * (1 - t) / t, "sigma": n * (1 - t), "linear": n * (1 - t),
            "decreasing": 0.25 * (n * torch.cos(math.pi * t) + 1) ** 2,
            "increasing-decreasing": n * torch.sin(math.pi * t) ** 2}
    for form, w in want.items():
        got = path.compute_diffusion(x, t, form=form, norm=n).flatten()
        torch.testing.assert_close(got, torch.as_tensor(w, dtype=torch.float64), msg=form)
    torch.testing.assert_close(path.compute_diffusion(x, t, form="inccreasing-decreasing", norm=n).flatten(),
                               want["increasing-decreasing"])


# ---- eps and interval rules ----
def test_eps_rules():
    eps = lambda *a, **k: (lambda tr: (tr.train_eps, tr.sample_eps))(create_transport(*a, **k))
    assert eps("Linear", "velocity", train_eps=0.1, sample_eps=0.1) == (0, 0)
    assert eps("GVP", "velocity") == (0, 0)
    assert eps("VP", "velocity") == (1e-5, 1e-3)
    assert eps("Linear", "noise") == (1e-3, 1e-3)
    assert eps("GVP", "score", "likelihood") == (1e-3, 1e-3)
    assert eps("VP", "velocity", train_eps=0.01) == (0.01, None)  # sample_eps verbatim


def test_check_interval():
    lin, vp, score = create_transport(), create_transport("VP"), create_transport("Linear", "score")
    assert lin.check_interval(0, 0, eval=True) == (0, 1)
    assert vp.check_interval(1e-5, 1e-3, eval=True) == (0, 1 - 1e-3)
    assert vp.check_interval(1e-5, 1e-3) == (0, 1 - 1e-5)
    assert score.check_interval(1e-3, 1e-3, eval=True) == (1e-3, 1 - 1e-3)
    assert lin.check_interval(0, 0, sde=True, diffusion_form="sigma", eval=True, last_step_size=0.04) == (0, 0.96)
    assert score.check_interval(1e-3, 1e-3, sde=True, eval=True, last_step_size=0.04) == (1e-3, 0.96)
    assert lin.check_interval(0.1, 0.2, sde=True, diffusion_form="sigma", eval=True) == (0, 0.8)
    assert lin.check_interval(0.1, 0.2, sde=True, diffusion_form="SBDM", eval=True) == (0.2, 0.8)
    assert np.allclose(score.check_interval(1e-3, 1e-3, eval=True, reverse=True), (1 - 1e-3, 1e-3))


def test_bad_names_raise_one_line_value_errors():
    for call in (lambda: create_transport("Cosine"), lambda: create_transport(prediction="x0"),
                 lambda: create_transport(loss_weight="snr"),
                 lambda: Sampler(create_transport()).sample_ode(sampling_method="foo"),
                 lambda: Sampler(create_transport()).sample_sde(sampling_method="RK4"),
                 lambda: Sampler(create_transport()).sample_sde(diffusion_form="cosine"),
                 lambda: Sampler(create_transport()).sample_sde(diffusion_form="sigma", last_step="Exact")):
        with pytest.raises(ValueError, match="choose one of") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="SBDM"):  # singular at t0 = 0 (official gives inf/NaN)
        Sampler(create_transport()).sample_sde()


# ---- training loss ----
@pytest.mark.parametrize("prediction,weight", [("velocity", None), ("noise", "velocity"), ("score", "likelihood"),
                                               ("noise", None)])
def test_training_loss_matches_hand_computation(prediction, weight):
    x1 = torch.randn(6, 2, 4, 4)
    model = lambda x, t, scale: scale * x * t[:, None, None, None] + 0.1
    tr = create_transport("Linear", prediction, weight)
    torch.manual_seed(3)
    got = tr.training_losses(model, x1, {"scale": 0.5})["loss"]
    torch.manual_seed(3)
    x0 = torch.randn_like(x1)
    lo, hi = (0.0, 1.0) if prediction == "velocity" else (1e-3, 1 - 1e-3)
    t = torch.rand(6) * (hi - lo) + lo
    te = t[:, None, None, None]
    pred = model(te * x1 + (1 - te) * x0, t, 0.5)
    # Linear path: g = (1-t)/t, so (g/sigma)^2 = 1/t^2 and g/sigma^2 = 1/(t(1-t)).
    w = {None: 1.0, "velocity": 1 / te ** 2, "likelihood": 1 / (te * (1 - te))}[weight]
    err = {"velocity": pred - (x1 - x0), "noise": pred - x0, "score": pred * (1 - te) + x0}[prediction]
    torch.testing.assert_close(got, (w * err ** 2).mean(dim=(1, 2, 3)))
    given = tr.training_losses(model, x1, {"scale": 0.5}, t=t, x0=x0)["loss"]  # (t, x0) drawn by the caller
    torch.testing.assert_close(given, got)


# ---- samplers on the exact Gaussian toy ----
@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_ode_lands_on_exact_flow_map(name, prediction):
    toy, tr = GaussianToy(name), create_transport(name, prediction)
    z = torch.randn(4, 3, dtype=torch.float64)
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps, eval=True)
    # rk4 on a fixed grid: torchdiffeq's adaptive steps overshoot t1, where VP's sigma is undefined (t > 1).
    traj = Sampler(tr).sample_ode(sampling_method="rk4", num_steps=100)(z, toy.model(prediction), **cfg_kwargs(4))
    assert traj.shape == (100, 4, 3)
    torch.testing.assert_close(traj[-1], toy.flow_map(z, t0, t1), rtol=1e-6, atol=1e-6)


def test_ode_reverse_and_fixed_step_methods():
    toy, fn = GaussianToy("Linear"), Sampler(create_transport()).sample_ode
    z = torch.randn(4, 3, dtype=torch.float64)
    x = toy.mu + toy.s * z  # the exact image of z
    model, kw = toy.model("velocity"), cfg_kwargs(4)
    back = fn(sampling_method="rk4", num_steps=20, reverse=True)(x, model, **kw)[-1]
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-5)
    for method, tol in (("dopri5", 1e-6), ("euler", 0.05), ("heun", 1e-4), ("midpoint", 1e-6)):
        out = fn(sampling_method=method, num_steps=200, atol=1e-8, rtol=1e-8)(z, model, **kw)[-1]
        torch.testing.assert_close(out, x, rtol=0, atol=tol, msg=method)


@pytest.mark.parametrize("method,form", [("Euler", "sigma"), ("Heun", "linear")])
def test_sde_matches_target_distribution(method, form):
    toy = GaussianToy("Linear")
    fn = Sampler(create_transport()).sample_sde(sampling_method=method, diffusion_form=form, num_steps=60)
    xs = fn(torch.randn(600, 3, dtype=torch.float64), toy.model("velocity"), **cfg_kwargs(600))
    assert len(xs) == 60
    torch.testing.assert_close(xs[-1].mean(0), toy.mu, rtol=0, atol=0.08)
    torch.testing.assert_close(xs[-1].std(0), toy.s, rtol=0.12, atol=0)


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_without_noise_matches_hand_rolled_steps(method):
    toy, z = GaussianToy("Linear"), torch.randn(4, 3, dtype=torch.float64)
    fn = Sampler(create_transport()).sample_sde(sampling_method=method, diffusion_form="linear", diffusion_norm=0.0,
                                                num_steps=30)  # w = 0: plain Euler / Heun steps on [0, 0.96]
    out = fn(z, toy.model("velocity"), **cfg_kwargs(4))[-2]
    x, ts = z, np.linspace(0, 0.96, 30)
    v = lambda x, t: toy.velocity(x, torch.full((4,), t, dtype=torch.float64))
    for t, dt in zip(ts[:-1], np.diff(ts)):
        k1 = v(x, t)
        x = x + dt * k1 if method == "Euler" else x + dt / 2 * (k1 + v(x + dt * k1, t + dt))
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(out, toy.flow_map(z, 0.0, 0.96), rtol=0, atol=0.2 if method == "Euler" else 2e-3)


@pytest.mark.parametrize("last_step", [None, "Mean", "Tweedie", "Euler"])
def test_sde_last_step(last_step):
    toy, h = GaussianToy("GVP"), 0.1
    fn = Sampler(create_transport("GVP")).sample_sde(diffusion_form="sigma", diffusion_norm=0.5,
                                                    last_step=last_step, last_step_size=h, num_steps=3)
    xs = fn(torch.randn(5, 3, dtype=torch.float64), toy.model("velocity"), **cfg_kwargs(5))
    assert len(xs) == 3
    x, t1 = xs[-2], 1 - h if last_step else 1.0
    t = torch.full((5,), t1, dtype=torch.float64)
    a, sig, _, var, _ = toy.stats(t)
    want = {None: x,
            "Mean": x + h * (toy.velocity(x, t) + 0.5 * sig * toy.score(x, t)),  # SDE drift v + w * score
            "Euler": x + h * toy.velocity(x, t),
            "Tweedie": toy.mu + a * toy.s ** 2 / var * (x - a * toy.mu)}[last_step]  # posterior mean E[x1|x_t]
    torch.testing.assert_close(xs[-1], want)


def test_ode_likelihood_matches_gaussian_logpdf():
    toy = GaussianToy("Linear")
    x = torch.randn(4, 3, dtype=torch.float64) * toy.s + toy.mu + 0.3
    fn = Sampler(create_transport()).sample_ode_likelihood(num_steps=2, atol=1e-8, rtol=1e-8)
    logp, z = fn(x, toy.model("velocity"), **cfg_kwargs(4))
    ref = norm.logpdf(x.numpy(), toy.mu.numpy(), toy.s.numpy()).sum(1)
    np.testing.assert_allclose(logp.numpy(), ref, rtol=1e-5)
    torch.testing.assert_close(z, (x - toy.mu) / toy.s)


# ---- golden parity with the official SiT code ----
def test_golden_ode_euler8(golden):
    model = golden_model(golden, "SiT")
    for name in PATH_NAMES:
        fn = Sampler(create_transport(name, "velocity")).sample_ode(sampling_method="euler", num_steps=8)
        with torch.no_grad():
            out = fn(golden["sample_z"], model.forward, y=golden["sample_y"])[-1]
        torch.testing.assert_close(out, golden[f"sit_ode_euler8_{name}"], rtol=1e-4, atol=1e-5, msg=name)
    # CFG convention: doubled batch with null labels through forward_with_cfg; scale 1 is the conditional model.
    z, y = golden["sample_z"], golden["sample_y"]
    with torch.no_grad():
        out = fn(torch.cat([z, z]), model.forward_with_cfg, y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=1.0)
    torch.testing.assert_close(out[-1][:2], golden["sit_ode_euler8_VP"], rtol=1e-4, atol=1e-5)
