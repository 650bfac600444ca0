"""DiT: the DDPM objective (MSE on eps + VB for the learned variance), the official masked KD, DDPM/DDIM sampling."""
import torch

from core.errors import UserError
from diffusion import create_diffusion
from diffusion.gaussian_diffusion import store_feature
from models import DiT, DiT_models
from ..kd import FrozenTeacher
from ..sampling import cfg_model_fn
from .base import Family

DIT_SAMPLERS = ("ddpm", "ddim")


class DiffusionObjective:
    """DiT's DDPM loss (MSE on eps + VB for the learned variance), with label dropout for CFG."""

    def __init__(self, latent_shape, class_dropout_prob=0.1, diffusion=None):
        self.diffusion = diffusion or create_diffusion(timestep_respacing="")
        self.latent_shape = tuple(latent_shape)
        self.p_drop = class_dropout_prob

    def draw(self, n, generator):
        return {"t": torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator),
                "noise": torch.randn((n, *self.latent_shape), generator=generator),
                "drop": (torch.rand(n, generator=generator) < self.p_drop).long()}

    def loss(self, model, x, y, draws, step):
        kwargs = dict(y=y, force_drop_ids=draws["drop"])
        out = self.diffusion.training_losses(model, x, draws["t"], kwargs, noise=draws["noise"])
        return out["loss"], {}

    def kd_attach(self, kd, student, teacher):
        """The official set-up: `target_layer` on the student's blocks, `.feature` hooks on both models."""
        for s, t in kd.layer_map:
            student.blocks[s].target_layer = t
            student.blocks[s].register_forward_hook(store_feature)
            teacher.blocks[t].register_forward_hook(store_feature)
        kd.frozen_teacher = FrozenTeacher(teacher, kd.teacher_mode)

    def kd_loss(self, kd, model, x, y, draws, step):
        """Every term by the official `training_losses_kd_rep` (see tinyfusion/kd.py's docstring)."""
        terms = self.diffusion.training_losses_kd_rep(
            model, kd.frozen_teacher, x, draws["t"], dict(y=y, force_drop_ids=draws["drop"]),
            noise=draws["noise"], beta_feat=kd.beta, alpha_kd=kd.alpha_kd, alpha_diff=kd.alpha_diff,
            kd_channels=kd.kd_channels, rep_mask=kd.rep_mask, mask_std=kd.mask_std)
        return terms["loss"], kd.logs(terms["kd_loss"], terms["gt"], terms["feat_loss"])


class DiTSampler:
    def __init__(self, args):
        if args.sampler not in DIT_SAMPLERS:
            raise UserError(f"--sampler {args.sampler} is not a DiT sampler: choose one of {', '.join(DIT_SAMPLERS)}")
        self.ddim = args.sampler == "ddim"
        self.diffusion = create_diffusion(("ddim" if self.ddim else "") + str(args.num_sampling_steps))
        self.guide_all = args.guide_all_channels
        self.name = f"{args.sampler.upper()}-{args.num_sampling_steps}"

    def __call__(self, model, z, y, cfg_scale, use_cfg=True, noise_fn=None, progress=False):
        fn, z, kwargs = cfg_model_fn(model, z, y, cfg_scale, use_cfg, self.guide_all)
        loop = self.diffusion.ddim_sample_loop if self.ddim else self.diffusion.p_sample_loop
        out = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=progress, device=z.device,
                   noise_fn=noise_fn)
        return out.chunk(2)[0] if use_cfg else out


class DiTFamily(Family):
    name, registry, model_classes = "DiT", DiT_models, (DiT,)
    weight_key_prefixes = ("x_embedder.proj.weight",)

    def objective(self, latent_shape, args=None, class_dropout_prob=0.1):
        return DiffusionObjective(latent_shape, class_dropout_prob)

    def score_inputs(self, model_name, method, calibration):
        """BI calibrates as the official prune_by_score.py by default (clean latents, raw t in [0, 250))."""
        return "clean" if method == "bi" and (calibration or "clean") == "clean" else "noised"

    def sampler(self, args):
        if args.mode is not None:
            raise UserError(f"{args.mode} is a SiT sampler; DiT models take --sampler ddpm or ddim")
        return DiTSampler(args)

    def noised_input(self, objective, x0, step, noise):
        t = torch.full((len(x0),), step, dtype=torch.long)
        return objective.diffusion.q_sample(x0, t, noise=noise), t
