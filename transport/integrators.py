"""Solvers behind `Sampler`: fixed-grid SDE steps (Euler-Maruyama, Heun) and a torchdiffeq ODE wrapper.

`drift(x, t, model, **model_kwargs)` and `diffusion(x, t)` take a per-sample time t of shape [B].
"""
import torch
from torchdiffeq import odeint

SDE_METHODS = ("Euler", "Heun")
# torchdiffeq's solvers; 'heun' is our alias for its 2nd-order Heun method.
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint",
               "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams", "heun")
ODE_ALIASES = {"heun": "heun2"}


def time_grid(t0, t1, num_steps, x):
    """linspace(t0, t1, num_steps), built on the CPU as the official code does (fp32, or fp64 for fp64 x)."""
    return torch.linspace(t0, t1, num_steps, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.device)


def batch_time(t, x):
    """A scalar time tensor broadcast to the [B] vector the model expects."""
    return torch.ones(x.shape[0], dtype=t.dtype, device=x.device) * t


def euler_maruyama_step(drift, diffusion, x, t, dt, model, model_kwargs):
    dw = torch.randn(x.size()).to(x) * torch.sqrt(dt)  # CPU generator first, as in the official code
    t = batch_time(t, x)
    mean_x = x + drift(x, t, model, **model_kwargs) * dt
    return mean_x + torch.sqrt(2 * diffusion(x, t)) * dw


def heun_step(drift, diffusion, x, t, dt, model, model_kwargs):
    """Add the noise first, then a deterministic Heun (trapezoid) step from the noised point."""
    dw = torch.randn(x.size()).to(x) * torch.sqrt(dt)
    t = batch_time(t, x)
    xhat = x + torch.sqrt(2 * diffusion(x, t)) * dw
    k1 = drift(xhat, t, model, **model_kwargs)
    k2 = drift(xhat + dt * k1, t + dt, model, **model_kwargs)
    return xhat + 0.5 * dt * (k1 + k2)


SDE_STEPS = {"Euler": euler_maruyama_step, "Heun": heun_step}


def integrate_sde(drift, diffusion, x, model, model_kwargs, *, t0, t1, num_steps, method):
    """num_steps - 1 steps over linspace(t0, t1, num_steps); returns the state after each step."""
    assert t0 < t1, "the SDE sampler runs forward in time (noise -> data)"
    step, ts = SDE_STEPS[method], time_grid(t0, t1, num_steps, x)
    dt, xs = ts[1] - ts[0], []
    with torch.no_grad():
        for t in ts[:-1]:
            x = step(drift, diffusion, x, t, dt, model, model_kwargs)
            xs.append(x)
    return xs


def integrate_ode(drift, x, model, model_kwargs, *, t0, t1, num_steps, method, atol, rtol):
    """torchdiffeq.odeint on linspace(t0, t1, num_steps); x may be a tuple of tensors (batch first)."""
    ref = x[0] if isinstance(x, tuple) else x

    def f(t, state):
        return drift(state, batch_time(t, ref), model, **model_kwargs)

    ts = time_grid(t0, t1, num_steps, ref)
    return odeint(f, x, ts, method=ODE_ALIASES.get(method, method), atol=atol, rtol=rtol)
