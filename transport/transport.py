"""SiT's interpolant training objective (`Transport`) and its ODE/SDE samplers (`Sampler`).

Facts (eps defaults, intervals, losses, RNG order, last steps) follow willisma/SiT `transport/`.
The model is any callable `model(x, t, **model_kwargs)` with t of shape [B] in [0, 1]; for
classifier-free guidance pass `model.forward_with_cfg` and `y=..., cfg_scale=...` as kwargs.
"""
import math

import torch

from .integrators import ODE_METHODS, SDE_METHODS, integrate_ode, integrate_sde
from .path import DIFFUSION_FORMS, PATHS, TransportError, check_choice, expand_t_like_x

PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def mean_flat(x):
    return x.mean(dim=list(range(1, x.dim())))


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    """The official factory, including its eps rules (see Transport.check_interval for their use)."""
    check_choice("path type", path_type, PATHS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("loss weight", loss_weight, LOSS_WEIGHTS)
    if path_type == "VP" or prediction != "velocity":
        default_train, default_sample = (1e-5, 1e-3) if path_type == "VP" else (1e-3, 1e-3)
        # As in the official code: a user train_eps makes sample_eps verbatim, even when it is None.
        if train_eps is None:
            train_eps, sample_eps = default_train, default_sample
    else:  # a velocity model on Linear/GVP is regular on all of [0, 1]: eps forced to 0
        train_eps, sample_eps = 0, 0
    return Transport(model_type=prediction, path_type=path_type, loss_type=loss_weight,
                     train_eps=train_eps, sample_eps=sample_eps)


class Transport:
    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        self.model_type, self.path_type, self.loss_type = model_type, path_type, loss_type
        self.path_sampler = PATHS[path_type]()
        self.train_eps, self.sample_eps = train_eps, sample_eps

    def __repr__(self):
        return (f"Transport(path={self.path_type}, prediction={self.model_type}, loss_weight={self.loss_type}, "
                f"train_eps={self.train_eps}, sample_eps={self.sample_eps})")

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False,
                       eval=False, last_step_size=0.0):
        """Time interval [t0, t1] that avoids the path's singular ends (official rules)."""
        t0, t1 = 0, 1
        eps = sample_eps if eval else train_eps
        end = 1 - (last_step_size if sde and last_step_size != 0 else eps)
        if self.path_type == "VP":
            t1 = end
        elif self.model_type != "velocity" or sde:
            t0 = eps if (sde and diffusion_form == "SBDM") or self.model_type != "velocity" else 0
            t1 = end
        return (1 - t0, 1 - t1) if reverse else (t0, t1)

    def prior_logp(self, z):
        """log N(z; 0, I) per sample."""
        n = z[0].numel()
        return -n / 2 * math.log(2 * math.pi) - z.flatten(1).pow(2).sum(1) / 2

    def sample(self, x1):
        """(t, x0, x1): x0 = randn_like(x1), then t ~ U[t0, t1] from the CPU generator (official order)."""
        x0 = torch.randn_like(x1)
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        t = torch.rand((x1.shape[0],)) * (t1 - t0) + t0
        return t.to(x1), x0, x1

    def training_losses(self, model, x1, model_kwargs=None, t=None, x0=None):
        """{'loss': per-sample loss [B], 'pred': model output} for one random (x0, t) per sample.

        `t` and `x0` may be given (the training loop draws them per global batch for exact resume).
        """
        if t is None or x0 is None:
            t, x0, x1 = self.sample(x1)
        t, x0 = t.to(x1), x0.to(x1)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        pred = model(xt, t, **(model_kwargs or {}))
        if pred.shape != xt.shape:
            raise TransportError(f"model output shape {tuple(pred.shape)} != input shape {tuple(xt.shape)} "
                                 f"(a SiT with learn_sigma must drop the variance channels)")
        if self.model_type == "velocity":  # the loss weight is ignored, as in the official code
            return {"loss": mean_flat((pred - ut) ** 2), "pred": pred}
        _, g = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(expand_t_like_x(t, xt))
        weight = {None: 1, "velocity": (g / sigma_t) ** 2, "likelihood": g / sigma_t ** 2}[self.loss_type]
        target = pred - x0 if self.model_type == "noise" else pred * sigma_t + x0
        return {"loss": mean_flat(weight * target ** 2), "pred": pred}

    def get_score(self):
        """score_fn(x, t, model, **kw): grad log p_t(x) from whatever the model predicts."""
        path = self.path_sampler
        if self.model_type == "velocity":
            return lambda x, t, model, **kw: path.get_score_from_velocity(model(x, t, **kw), x, t)
        if self.model_type == "noise":
            return lambda x, t, model, **kw: model(x, t, **kw) / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
        return lambda x, t, model, **kw: model(x, t, **kw)

    def get_drift(self):
        """drift_fn(x, t, model, **kw): the probability-flow ODE velocity."""
        score = self.get_score()

        def drift(x, t, model, **kw):
            if self.model_type == "velocity":
                v = model(x, t, **kw)
            else:  # v = -f + g * score
                f, g = self.path_sampler.compute_drift(x, t)
                v = -f + g * score(x, t, model, **kw)
            assert v.shape == x.shape, "the ODE drift must have the shape of its input"
            return v
        return drift


class Sampler:
    """ODE/SDE samplers of a Transport. Each `sample_*` returns fn(x, model, **model_kwargs) -> trajectory."""

    def __init__(self, transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    def _interval(self, **kw):
        return self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, eval=True, **kw)

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0,
                   last_step="Mean", last_step_size=0.04, num_steps=250):
        """Euler-Maruyama/Heun on linspace(t0, t1, num_steps), then a last step to t = 1 (num_steps states)."""
        check_choice("SDE sampling method", sampling_method, SDE_METHODS)
        check_choice("diffusion form", diffusion_form, DIFFUSION_FORMS, shown=list(DIFFUSION_FORMS)[:-1])
        check_choice("last step", last_step, LAST_STEPS)
        tr, path = self.transport, self.transport.path_sampler
        if last_step is None:
            last_step_size = 0.0
        t0, t1 = self._interval(diffusion_form=diffusion_form, sde=True, last_step_size=last_step_size)
        if diffusion_form == "SBDM" and t0 == 0 and tr.path_type != "VP":
            raise TransportError(f"diffusion form 'SBDM' is infinite at t=0 for a {tr.path_type}-path velocity "
                                 "model (its sample_eps is forced to 0): use another form, e.g. 'sigma'")

        def diffusion(x, t):
            return path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x, t, model, **kw):  # drift + w * score: two model calls for a velocity model
            return self.drift(x, t, model, **kw) + diffusion(x, t) * self.score(x, t, model, **kw)

        def last(x, t, model, **kw):
            if last_step == "Mean":
                return x + sde_drift(x, t, model, **kw) * last_step_size
            if last_step == "Euler":
                return x + self.drift(x, t, model, **kw) * last_step_size
            if last_step == "Tweedie":
                te = expand_t_like_x(t, x)
                alpha_t, sigma_t = path.compute_alpha_t(te)[0], path.compute_sigma_t(te)[0]
                return x / alpha_t + sigma_t ** 2 / alpha_t * self.score(x, t, model, **kw)
            return x

        def sample(x, model, **model_kwargs):
            xs = integrate_sde(sde_drift, diffusion, x, model, model_kwargs,
                               t0=t0, t1=t1, num_steps=num_steps, method=sampling_method)
            with torch.no_grad():
                xs.append(last(xs[-1], torch.full((x.shape[0],), t1, device=x.device), model, **model_kwargs))
            return xs
        return sample

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False):
        """torchdiffeq.odeint of the probability-flow ODE; reverse=True runs data -> noise."""
        check_choice("ODE sampling method", sampling_method, ODE_METHODS)
        t0, t1 = self._interval(sde=False, reverse=reverse)

        def sample(x, model, **model_kwargs):
            return integrate_ode(self.drift, x, model, model_kwargs, t0=t0, t1=t1, num_steps=num_steps,
                                 method=sampling_method, atol=atol, rtol=rtol)
        return sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3):
        """fn(x, model, **kw) -> (log p(x) in nats per sample, z): data -> noise with a Hutchinson divergence."""
        check_choice("ODE sampling method", sampling_method, ODE_METHODS)
        t0, t1 = self._interval(sde=False)

        def drift_and_divergence(state, s, model, **kw):
            x, _ = state
            eps = torch.randint(2, x.size(), dtype=torch.float, device=x.device) * 2 - 1  # Rademacher probe
            t = 1 - s  # integrate time backwards (data at s = t0)
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.drift(x, t, model, **kw)
                grad = torch.autograd.grad((v * eps).sum(), x)[0]
            return -v.detach(), (grad * eps).flatten(1).sum(1)

        def sample(x, model, **model_kwargs):
            state = (x, torch.zeros(x.shape[0]).to(x))
            zs, delta_logp = integrate_ode(drift_and_divergence, state, model, model_kwargs, t0=t0, t1=t1,
                                           num_steps=num_steps, method=sampling_method, atol=atol, rtol=rtol)
            z = zs[-1]
            return self.transport.prior_logp(z) - delta_logp[-1], z
        return sample
