"""Interpolation paths x_t = alpha_t * x1 + sigma_t * x0 of willisma/SiT.

t = 0 is noise (x0 ~ N(0, I)) and t = 1 is data (x1). Every `compute_*` returns
(value, time derivative). `compute_drift` gives the (f, g) pair of the score
parametrisation: the probability-flow velocity is v = -f + g * score.
"""
import math

import torch

from core.errors import UserError


class TransportError(UserError, ValueError):
    """A bad transport/sampler option (one line: what is wrong and the valid choices)."""


def check_choice(what, value, choices, shown=None):
    """Raise TransportError unless `value` is one of `choices` (the message lists `shown` or `choices`)."""
    if value not in choices:
        valid = ", ".join(map(str, shown or choices))
        raise TransportError(f"unknown {what} {value!r}: choose one of {valid}")
    return value


def expand_t_like_x(t, x):
    """[B] (or already [B, 1, ...]) time -> [B, 1, ..., 1] broadcastable against x."""
    return t.reshape(t.shape[0], *[1] * (x.dim() - 1))


# Diffusion coefficient w_t of the SDE sampler, with norm n. The official key of the last form is
# misspelt 'inccreasing-decreasing' (so its CLI choice never worked); both spellings are accepted.
DIFFUSION_FORMS = {
    "constant": lambda p, x, t, n: torch.full_like(t, n),  # a tensor, so sqrt(2 w) works (official: float)
    "SBDM": lambda p, x, t, n: n * p.compute_drift(x, t)[1],
    "sigma": lambda p, x, t, n: n * p.compute_sigma_t(t)[0],
    "linear": lambda p, x, t, n: n * (1 - t),
    "decreasing": lambda p, x, t, n: 0.25 * (n * torch.cos(math.pi * t) + 1) ** 2,
    "increasing-decreasing": lambda p, x, t, n: n * torch.sin(math.pi * t) ** 2,
}
DIFFUSION_FORMS["inccreasing-decreasing"] = DIFFUSION_FORMS["increasing-decreasing"]


class LinearPath:
    """alpha = t, sigma = 1 - t (official ICPlan)."""

    def compute_alpha_t(self, t):
        return t, torch.ones_like(t)

    def compute_sigma_t(self, t):
        return 1 - t, -torch.ones_like(t)

    def compute_d_alpha_alpha_ratio_t(self, t):
        return 1 / t

    def compute_drift(self, x, t):
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return -ratio * x, ratio * sigma_t ** 2 - sigma_t * d_sigma_t

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        check_choice("diffusion form", form, DIFFUSION_FORMS, shown=list(DIFFUSION_FORMS)[:-1])
        return DIFFUSION_FORMS[form](self, x, expand_t_like_x(t, x), norm)

    def get_score_from_velocity(self, velocity, x, t):
        """Invert v = a_dot x1 + s_dot x0 given x = a x1 + s x0 and E[x0|x] = -s * score."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        a = alpha_t / d_alpha_t
        return (a * velocity - x) / (sigma_t ** 2 - a * d_sigma_t * sigma_t)

    def plan(self, t, x0, x1):
        """x_t and its conditional velocity u_t = alpha_dot x1 + sigma_dot x0."""
        te = expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = self.compute_alpha_t(te)
        sigma_t, d_sigma_t = self.compute_sigma_t(te)
        return t, alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0


class GVPPath(LinearPath):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2) (official GVPCPlan)."""

    def compute_alpha_t(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def compute_sigma_t(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    """alpha = exp(m(t)), sigma = sqrt(1 - alpha^2), the VP-SDE with linear beta (official VPCPlan)."""

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def log_mean_coeff(self, t):  # m(t)
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_log_mean_coeff(self, t):  # m'(t) = beta_t / 2
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = torch.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        alpha_sq = torch.exp(2 * self.log_mean_coeff(t))
        sigma_t = torch.sqrt(1 - alpha_sq)
        return sigma_t, -alpha_sq * self.d_log_mean_coeff(t) / sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self.d_log_mean_coeff(t)  # exact, no 0/0 near t = 0

    def compute_drift(self, x, t):
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
