"""Gaussian diffusion (DDPM / IDDPM) as used by DiT and by MAR's DiffLoss.

Numerically this follows openai/improved-diffusion as vendored by facebookresearch/DiT:
schedules and coefficients in float64 numpy, gathered per timestep and cast to float32;
the same operation order and the same random-number draws, so seeded runs reproduce
the official samples. Paths unreachable from `create_diffusion` (x_{t-1} prediction,
unconstrained learned variance, bpd loops) are left out.
"""
import enum
import math

import numpy as np
import torch

from core.errors import UserError

from .losses import discretized_gaussian_log_likelihood, masked_rep_loss, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # extra output channels v in [-1, 1] interpolate log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE (+ VB for the variance when it is learned)
    RESCALED_MSE = enum.auto()  # same, VB scaled by T/1000
    KL = enum.auto()  # the variational bound only
    RESCALED_KL = enum.auto()  # VB x T, an estimate of the full bound


def get_named_beta_schedule(name, num_diffusion_timesteps):
    if name == "linear":
        # Ho et al.'s 1e-4 .. 0.02, scaled so that other step counts stay comparable.
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):  # MAR's and DiT's names for the same schedule
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise UserError(f"unknown noise schedule {name!r}; use 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that discretise a continuous alpha_bar(s), s in [0, 1]; capped to avoid beta = 1 at the end."""
    T = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


def _extract(arr, t, shape):
    """arr[t] (float64 numpy -> float32 torch), broadcast to `shape` (batch first)."""
    res = torch.from_numpy(arr).to(t.device)[t].float()
    return res.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


class GaussianDiffusion:
    """Training losses and samplers for a fixed beta schedule.

    `timestep_map` (set by SpacedDiffusion) translates this process's step indices into the
    indices the model was trained with before every model or cond_fn call.
    """

    timestep_map = None

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be 1-D in (0, 1]"
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)
        self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)

        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped to the t = 1 value.
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        pv = self.posterior_variance
        # A 1-step process has no t = 1; there the clipped log-variance falls back to log beta (never used for noise).
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)

    # ----- model calls -----
    def _call(self, fn, x, t, model_kwargs):
        if self.timestep_map is not None:
            t = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]  # indices only, no rescaling
        return fn(x, t, **(model_kwargs or {}))

    # ----- forward process -----
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        return mean, _extract(1.0 - self.alphas_cumprod, t, x_start.shape), _extract(
            self.log_one_minus_alphas_cumprod, t, x_start.shape)

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return mean, _extract(self.posterior_variance, t, x_t.shape), _extract(
            self.posterior_log_variance_clipped, t, x_t.shape)

    # ----- reverse process -----
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model and return p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart."""
        B, C = x.shape[:2]
        assert t.shape == (B,)
        out = self._call(model, x, t, model_kwargs)
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            assert out.shape == (B, C * 2, *x.shape[2:])
            out, var_values = torch.split(out, C, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2  # v = -1 -> posterior variance, v = 1 -> beta_t
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, except at t = 0 where the posterior variance gives a better decoder likelihood.
                var = np.append(self.posterior_variance[1], self.betas[1:])
                log_var = np.log(var)
            else:
                var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
            variance, log_variance = _extract(var, t, x.shape), _extract(log_var, t, x.shape)

        pred_xstart = out if self.model_mean_type == ModelMeanType.START_X else self._predict_xstart_from_eps(x, t, out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015)."""
        gradient = self._call(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Condition the implied score instead of the mean (Song et al. 2020); used by DDIM."""
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._call(cond_fn, x, t, model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 temperature=1.0, noise_fn=None):
        """One ancestral step x_t -> x_{t-1}. `temperature` scales the added noise (MAR).

        `noise_fn(x)` replaces `torch.randn_like(x)`, e.g. to draw each sample's noise from its own
        generator so a sample does not depend on the batch it is in (sample_ddp).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn_like(x) if noise_fn is None else noise_fn(x)  # drawn at every step, even t = 0 where it is masked: keeps the official RNG order
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        # (x * 1.0 is exact, so the default temperature reproduces the official samples bit for bit)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, noise_fn=None):
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived, so x_0 models work too
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x) if noise_fn is None else noise_fn(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Yield step(...) outputs from t = T-1 down to 0, starting at `noise` (or fresh N(0, I))."""
        assert isinstance(shape, (tuple, list))
        if device is None:
            device = noise.device if noise is not None else _module_device(model)
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                  model_kwargs=None, device=None, progress=False, temperature=1.0,
                                  noise_fn=None):
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
                              temperature=temperature, noise_fn=noise_fn)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, temperature=1.0, noise_fn=None):
        """Ancestral sampling; returns the final x_0 (no gradients)."""
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                  model_kwargs, device, progress, temperature, noise_fn):
            pass
        return out["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                                     noise_fn=None):
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta,
                              noise_fn=noise_fn)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, noise_fn=None):
        """DDIM sampling; returns the final x_0 (no gradients)."""
        for out in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                     model_kwargs, device, progress, eta, noise_fn):
            pass
        return out["sample"]

    # ----- training -----
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None, target=None):
        """One term of the variational bound in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the
        decoder NLL of x_0 at t = 0. `target` = (mean, log-variance) replaces q (a KD teacher's p).
        Returns {"output": (N,), "pred_xstart": ...}."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        if target is not None:
            true_mean, true_log_var = target
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses at steps t: dict with "loss" and, for MSE losses, "mse" (and "vb" if sigma is learned)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            loss = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            return {"loss": loss * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else loss}

        terms = {}
        out = self._call(model, x_t, t, model_kwargs)
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            C = x_t.shape[1]
            assert out.shape == (x_t.shape[0], C * 2, *x_t.shape[2:])
            out, var_values = torch.split(out, C, dim=1)
            # The VB trains only the variance: the mean it sees is detached from the graph.
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_, **__: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)  # as the initial implementation
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        assert out.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


    # ----- masked knowledge distillation (TinyFusion; the official API) -----
    def training_losses_kd(self, model, teacher, x_start, t, model_kwargs=None, noise=None, alpha_kd=0.9, *,
                           alpha_diff=None, kd_channels="eps"):
        """L = alpha_kd * kd_loss + (1 - alpha_kd) * gt, per sample, as the official TinyFusion code.

        gt = mse + vb (the ordinary loss); kd_loss = MSE between the student's and the teacher's eps
        channels + vb_kd, where vb_kd is the VB term with the teacher's p(x_{t-1}|x_t) in place of the true
        posterior (student mean detached, so it trains the variance; decoder NLL at t = 0).
        Ours: kd_channels="all" is the MSE over all output channels (variance channels included) and
        leaves vb_kd out of kd_loss; alpha_diff replaces the 1 - alpha_kd weight of gt.
        The teacher runs without gradients on the same x_t, t and model_kwargs (label drops included).
        """
        terms, _, _ = self._kd_terms(model, teacher, x_start, t, model_kwargs, noise, kd_channels)
        return self._kd_total(terms, alpha_kd, alpha_diff)

    def training_losses_kd_rep(self, model, teacher, x_start, t, model_kwargs=None, noise=None, beta_feat=1e-2,
                               alpha_kd=0.9, *, layer_map=None, alpha_diff=None, kd_channels="eps",
                               rep_mask="both", mask_std=2.0):
        """training_losses_kd + beta_feat * feat_loss: the masked MSE (losses.masked_rep_loss) between mapped
        student and teacher block outputs, averaged over the pairs.

        Pairs: `layer_map=[(student_block, teacher_block), ...]`; without it, as the official
        train_masked_kd.py sets up, every student block with a `target_layer` attribute and the `.feature`
        its forward hook stored, against `teacher.blocks[target_layer].feature`. `model` may be wrapped
        (DDP `.module`, torch.compile `._orig_mod`).
        """
        pairs = _mapped_blocks(model, teacher, layer_map)
        hooked = list({id(b): b for pair in pairs for b in pair}.values()) if layer_map is not None else []
        hooks = [b.register_forward_hook(store_feature) for b in hooked]
        try:
            terms, _, _ = self._kd_terms(model, teacher, x_start, t, model_kwargs, noise, kd_channels)
            losses = [masked_rep_loss(s.feature, t_.feature, mask_std, rep_mask) for s, t_ in pairs]
        finally:
            for h in hooks:
                h.remove()
            for b in hooked:  # our hooks' features would otherwise keep the graph alive
                b.__dict__.pop("feature", None)
        terms["feat_loss"] = sum(losses) / len(losses)
        return self._kd_total(terms, alpha_kd, alpha_diff, beta_feat)

    def _kd_total(self, terms, alpha_kd, alpha_diff, beta_feat=0.0):
        alpha_diff = 1.0 - alpha_kd if alpha_diff is None else alpha_diff
        terms["loss"] = alpha_kd * terms["kd_loss"] + alpha_diff * terms["gt"]
        if "feat_loss" in terms:
            terms["loss"] = terms["loss"] + beta_feat * terms["feat_loss"]
        return terms

    def _kd_terms(self, model, teacher, x_start, t, model_kwargs, noise, kd_channels):
        if kd_channels not in ("eps", "all"):
            raise UserError(f"unknown KD output channels {kd_channels!r}: choose 'eps' (official) or 'all'")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        out = self._call(model, x_t, t, model_kwargs)
        with torch.no_grad():
            teacher_out = self._call(teacher, x_t, t, model_kwargs)
        teacher_out = teacher_out.to(out.dtype)
        terms, eps, teacher_eps = {}, out, teacher_out
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            C = x_t.shape[1]
            eps, var_values = torch.split(out, C, dim=1)
            teacher_eps = teacher_out[:, :C]
            frozen = torch.cat([eps.detach(), var_values], dim=1)  # the VB terms train only the variance
            fixed = lambda *_, **__: frozen  # noqa: E731
            teacher_p = self.p_mean_variance(lambda *_, **__: teacher_out, x_t, t, clip_denoised=False)
            terms["vb"] = self._vb_terms_bpd(fixed, x_start, x_t, t, clip_denoised=False)["output"]
            terms["vb_kd"] = self._vb_terms_bpd(fixed, x_start, x_t, t, clip_denoised=False,
                                                target=(teacher_p["mean"], teacher_p["log_variance"]))["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"], terms["vb_kd"] = (v * (self.num_timesteps / 1000.0) for v in (terms["vb"], terms["vb_kd"]))
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        terms["mse"] = mean_flat((target - eps) ** 2)
        terms["gt"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        if kd_channels == "all":
            terms["kd_loss"] = mean_flat((teacher_out - out) ** 2)
        else:
            terms["kd_loss"] = mean_flat((teacher_eps - eps) ** 2) + terms.get("vb_kd", 0.0)
        return terms, out, teacher_out


def _unwrap(model):
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _mapped_blocks(model, teacher, layer_map):
    """[(student block, teacher block)] of `layer_map`, or of the students' `target_layer` attributes."""
    student_blocks, teacher_blocks = _unwrap(model).blocks, _unwrap(teacher).blocks
    if layer_map is None:
        layer_map = [(i, b.target_layer) for i, b in enumerate(student_blocks) if hasattr(b, "target_layer")]
        if not layer_map:
            raise UserError("no student block has a `target_layer` (and its feature hook): pass "
                            "layer_map=[(student_block, teacher_block), ...]")
    for s, t in layer_map:
        if not (0 <= s < len(student_blocks) and 0 <= t < len(teacher_blocks)):
            raise UserError(f"the KD layer map pair {s}:{t} names a block the models lack: the student has blocks "
                            f"0..{len(student_blocks) - 1}, the teacher 0..{len(teacher_blocks) - 1}")
    return [(student_blocks[s], teacher_blocks[t]) for s, t in layer_map]


def store_feature(module, args, output):
    """Forward hook of the official train_masked_kd.py: keep the block's output as `.feature`."""
    module.feature = output


def _module_device(model):
    """Device of a module's (or a bound method's module's) parameters; CPU when it has none."""
    module = getattr(model, "__self__", model)
    param = next(module.parameters(), None) if hasattr(module, "parameters") else None
    return param.device if param is not None else torch.device("cpu")
