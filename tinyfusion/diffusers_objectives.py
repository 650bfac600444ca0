"""Training and masked-KD objectives for diffusers transformers (models/diffusers_t2i.py).

- DiTTransformer2DModel and PixArtTransformer2DModel: DiT's DDPM loss (linear betas, 1000 steps, eps
  MSE + VB for the learned variance: both predict 2 x in_channels), the schedule their pipelines sample with.
- SD3Transformer2DModel: rectified flow. x_s = (1 - s) x0 + s noise, target noise - x0, model timestep
  1000 s. s is drawn as SD3 trains: u logit-normal (m=0, s=1; the SD3 paper's best rf/lognorm(0,1), the
  default of diffusers' train_dreambooth_sd3.py), then the scheduler's shift s = k u / (1 + (k - 1) u)
  (FlowMatchEulerDiscreteScheduler; k = 3 for SD3), so training sees the noise levels sampling visits.
  We draw u continuously instead of from the scheduler's 1000-step grid (a difference under 1e-3 in s).
Conditioning dropout (for classifier-free guidance) is drawn per sample with the step's generator:
DiT's label becomes the null class; text embeddings become `null_cond` (the empty prompt's embeddings).
Masked KD (TinyFusion eq. 8): L = a_KD L_KD + a_Diff L_Diff + beta L_Rep, with L_Rep on the mapped blocks'
outputs (SD3: the image stream).
"""
import json
import os

import torch

from diffusion import REP_MASKS, create_diffusion, masked_rep_loss, mean_flat
from models.diffusers_t2i import class_name, forward, image_stream, inner
from .errors import UserError
from .kd import HiddenStates

SD3_SHIFT = 3.0  # stabilityai/stable-diffusion-3-medium-diffusers scheduler_config.json


def scheduler_shift(transformer_folder, default=SD3_SHIFT):
    """`shift` of the pipeline's scheduler beside the transformer folder, else `default`."""
    path = os.path.join(os.path.dirname(os.path.abspath(transformer_folder)), "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return float(json.load(f).get("shift", default))


def drop_conditioning(model, cond, drop, null_cond=None):
    """`cond` with the samples where drop == 1 replaced by the unconditional input."""
    if not bool(drop.any()):
        return cond
    if torch.is_tensor(cond):  # class labels: the null class is the last embedding row
        return torch.where(drop.bool().to(cond.device), inner(model).config.num_embeds_ada_norm, cond)
    if null_cond is None:
        raise UserError("text conditioning dropout needs the empty prompt's embeddings (null_cond); "
                        "set the dropout probability to 0 or extract the empty prompt too")
    out = {}
    for k, v in cond.items():
        null = null_cond[k].to(v.device, v.dtype).expand_as(v)
        out[k] = torch.where(drop.bool().to(v.device).view(-1, *[1] * (v.dim() - 1)), null, v)
    return out


class _Conditioned:
    """Draws shared by both objectives: noise and conditioning dropout."""

    def __init__(self, latent_shape, cond_drop_prob, null_cond):
        self.latent_shape, self.p_drop, self.null_cond = tuple(latent_shape), cond_drop_prob, null_cond

    def _draws(self, n, generator):
        return {"noise": torch.randn((n, *self.latent_shape), generator=generator),
                "drop": (torch.rand(n, generator=generator) < self.p_drop).long()}

    def denoiser(self, model, cond, draws):
        """model as a function of (x_t, t), with this step's conditioning dropout applied."""
        cond = drop_conditioning(model, cond, draws["drop"], self.null_cond)
        return lambda x_t, t: forward(model, x_t, t, cond)


class DDPMObjective(_Conditioned):
    """DiT's DDPM loss for DiTTransformer2DModel / PixArtTransformer2DModel (learned sigma)."""

    def __init__(self, latent_shape, cond_drop_prob=0.1, null_cond=None):
        super().__init__(latent_shape, cond_drop_prob, null_cond)
        self.diffusion = create_diffusion(timestep_respacing="")

    def draw(self, n, generator):
        return {"t": torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator),
                **self._draws(n, generator)}

    def loss(self, model, x, cond, draws, step):
        out = self.diffusion.training_losses(self.denoiser(model, cond, draws), x, draws["t"].to(x.device),
                                             noise=draws["noise"].to(x))
        return out["loss"], {}


class RectifiedFlowObjective(_Conditioned):
    """SD3's rectified-flow loss (velocity target noise - x0), logit-normal times with the scheduler's shift."""

    def __init__(self, latent_shape, shift=SD3_SHIFT, cond_drop_prob=0.1, null_cond=None):
        super().__init__(latent_shape, cond_drop_prob, null_cond)
        self.shift = shift

    def draw(self, n, generator):
        u = torch.sigmoid(torch.randn(n, generator=generator))
        return {"s": self.shift * u / (1 + (self.shift - 1) * u), **self._draws(n, generator)}

    def noisy(self, x, draws):
        """(x_s, model timestep, velocity target) of this step."""
        s, noise = draws["s"].to(x), draws["noise"].to(x)
        s_ = s.view(-1, *[1] * (x.dim() - 1))
        return (1 - s_) * x + s_ * noise, 1000 * s, noise - x

    def loss(self, model, x, cond, draws, step):
        x_s, t, target = self.noisy(x, draws)
        return mean_flat((self.denoiser(model, cond, draws)(x_s, t) - target) ** 2), {}


def make_objective(model, latent_shape, transformer_folder=None, cond_drop_prob=0.1, null_cond=None):
    """The training objective of a diffusers transformer."""
    if class_name(model) == "SD3Transformer2DModel":
        shift = scheduler_shift(transformer_folder) if transformer_folder else SD3_SHIFT
        return RectifiedFlowObjective(latent_shape, shift, cond_drop_prob, null_cond)
    return DDPMObjective(latent_shape, cond_drop_prob, null_cond)


class MaskedKDObjective:
    """TinyFusion's masked KD for a (pruned or masked) diffusers student and its frozen teacher.
    DDPM: the project's `training_losses_kd` terms (eps MSE + VB against the teacher's posterior);
    rectified flow: L_KD = MSE of the velocities. L_Rep: masked MSE of the mapped block outputs."""

    def __init__(self, base, student, teacher, layer_map, alpha_kd=0.9, alpha_diff=None, beta_start=1e-2,
                 beta_end=0.0, mask_std=2.0, rep_mask="both", kd_channels="eps"):
        if rep_mask not in REP_MASKS:
            raise UserError(f"unknown --rep-mask {rep_mask!r}: choose one of {', '.join(REP_MASKS)}")
        self.base, self.teacher, self.layer_map = base, teacher.eval().requires_grad_(False), list(layer_map)
        self.alpha_kd, self.beta_range, self.mask_std = alpha_kd, (beta_start, beta_end), mask_std
        self.alpha_diff = 1.0 - alpha_kd if alpha_diff is None else alpha_diff
        self.rep_mask, self.kd_channels, self.beta = rep_mask, kd_channels, beta_start
        self.student_h = HiddenStates(student, [s for s, _ in self.layer_map])
        self.teacher_h = HiddenStates(teacher, [t for _, t in self.layer_map])

    def draw(self, n, generator):
        return self.base.draw(n, generator)

    def begin_step(self, step, total):
        start, end = self.beta_range
        self.beta = start + (end - start) * step / max(total - 1, 1)

    def loss(self, model, x, cond, draws, step):
        student, teacher = self.base.denoiser(model, cond, draws), self.base.denoiser(self.teacher, cond, draws)
        if isinstance(self.base, DDPMObjective):
            terms = self.base.diffusion.training_losses_kd(
                student, teacher, x, draws["t"].to(x.device), noise=draws["noise"].to(x), alpha_kd=self.alpha_kd,
                alpha_diff=self.alpha_diff, kd_channels=self.kd_channels)
            kd, diff_loss = terms["kd_loss"], terms["gt"]
        else:
            x_s, t, target = self.base.noisy(x, draws)
            out = student(x_s, t)
            with torch.no_grad():
                teacher_out = teacher(x_s, t)
            diff_loss, kd = mean_flat((out - target) ** 2), mean_flat((out - teacher_out) ** 2)
        hs, ht = self.student_h.pop(), self.teacher_h.pop()
        rep = sum(masked_rep_loss(image_stream(hs[s]), image_stream(ht[t]), self.mask_std, self.rep_mask)
                  for s, t in self.layer_map) / len(self.layer_map)
        total = self.alpha_kd * kd + self.alpha_diff * diff_loss + self.beta * rep
        logs = {"kd": kd.mean().detach(), "diff": diff_loss.mean().detach(), "rep": rep.mean().detach(),
                "beta": torch.tensor(self.beta)}
        return total, logs
