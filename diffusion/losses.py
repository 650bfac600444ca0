"""Gaussian log-likelihood helpers for the variational bound (IDDPM, Nichol & Dhariwal 2021).

The formulas (including the tanh approximation of the normal CDF) follow the official
code exactly, because the golden VB values of the reference depend on them.
"""
import math

import torch


def mean_flat(x):
    """Mean over every dimension except the batch one."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise; floats broadcast."""
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of data in [-1, 1] quantised to 256 bins of width 2/255.

    The two edge bins extend to -inf / +inf, as for 8-bit images.
    """
    assert x.shape == means.shape == log_scales.shape
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


REP_MASKS = ("both", "teacher")


def masked_rep_loss(student_h, teacher_h, mask_std=2.0, mask="both"):
    """Per-sample MSE of two hidden states with massive activations masked (TinyFusion's L_Rep).

    mask="both" (the official code): each state is zeroed where it lies `mask_std` or more standard
    deviations from its own per-sample mean (unbiased variance over tokens and channels, strict <),
    then mean((m_s * h_s - m_t * h_t)^2). mask="teacher" (ours): the difference is masked with the
    teacher's mask only (<=). Statistics in fp32: squared massive activations overflow fp16.
    """
    def keep(h, strict):
        dims = tuple(range(1, h.dim()))
        dev = (h - h.mean(dim=dims, keepdim=True)).abs()
        bound = mask_std * h.var(dim=dims, keepdim=True).sqrt()
        return (dev < bound if strict else dev <= bound).float()

    s, t = student_h.float(), teacher_h.float()
    if mask == "both":
        return mean_flat((keep(s, True) * s - keep(t, True) * t) ** 2)
    if mask == "teacher":
        return mean_flat(((s - t) * keep(t, False)) ** 2)
    raise ValueError(f"unknown rep mask {mask!r}: choose one of {', '.join(REP_MASKS)}")
