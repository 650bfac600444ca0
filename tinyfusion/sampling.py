"""Sampling pipelines shared by sample.py and sample_ddp.py: latents for DiT (DDPM/DDIM), SiT (ODE/SDE)
and MAR (autoregressive + DiffLoss), plus decoding to uint8 images.

Random numbers are consumed in the official order (one randn_like per DDPM step, the SiT ODE
deterministic given z), so one seed gives the official samples. `noise_fn` lets sample_ddp draw each
image's per-step noise from that image's own generator instead, which makes every image a function
of (global seed, index) only.
"""
import functools
import os

import numpy as np
import torch

from core.errors import UserError
from .download import release_of, resolve

DIT_SAMPLERS = ("ddpm", "ddim")
SIT_MODES = ("ODE", "SDE")


def add_sampler_args(parser, steps=250):
    g = parser.add_argument_group("sampler")
    g.add_argument("mode", nargs="?", default=None, choices=SIT_MODES, help="SiT only: ODE (default) or SDE")
    g.add_argument("--num-sampling-steps", type=int, default=steps)
    g.add_argument("--sampler", type=str, default="ddpm", help="DiT: ddpm (ancestral) or ddim")
    g.add_argument("--guide-all-channels", action="store_true",
                   help="CFG on all latent channels (diffusers) instead of the official first 3")
    g.add_argument("--sampling-method", type=str, default=None, help="SiT: dopri5/euler/heun3/rk4 (ODE), Euler/Heun (SDE)")
    g.add_argument("--atol", type=float, default=1e-6)
    g.add_argument("--rtol", type=float, default=1e-3)
    g.add_argument("--reverse", action="store_true")
    g.add_argument("--diffusion-form", type=str, default="sigma")
    g.add_argument("--diffusion-norm", type=float, default=1.0)
    g.add_argument("--last-step", type=str, default="Mean")
    g.add_argument("--last-step-size", type=float, default=0.04)
    g.add_argument("--channels-last", action="store_true", help="decode with NHWC convolutions (often faster on GPUs)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the denoiser runs under bf16 autocast (the sampler's own arithmetic stays fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--num-iter", type=int, default=64, help="MAR: autoregressive steps")
    g.add_argument("--cfg-schedule", type=str, default="linear", help="MAR: linear or constant")
    g.add_argument("--temperature", type=float, default=1.0, help="MAR: DiffLoss noise temperature")
    return g


def prepare_denoiser(model, args):
    """Apply --compile to the blocks (every family has `block_lists`); returns the model."""
    if getattr(args, "compile", False):
        for name in model.block_lists:
            for block in getattr(model, name):
                block.compile()
    return model


def denoiser_precision(args, device):
    """The autocast context the sampler runs in (--precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=getattr(args, "precision", "fp32") == "bf16")


def check_cfg(cfg_scale):
    if cfg_scale < 1.0:
        raise UserError(f"--cfg-scale {cfg_scale} < 1: use 1.0 for no guidance or a value > 1 (paper FID: 1.5)")


def _model_fn(model, z, y, cfg_scale, use_cfg, guide_all):
    """(model function, start noise, kwargs): with CFG, the [cond; null] batch forward_with_cfg expects."""
    if not use_cfg:
        return model.forward, z, dict(y=y)
    y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
    fn = functools.partial(model.forward_with_cfg, guide_all_channels=guide_all)
    return fn, torch.cat([z, z], 0), dict(y=y, cfg_scale=cfg_scale)


class DiTSampler:
    def __init__(self, args):
        if args.sampler not in DIT_SAMPLERS:
            raise UserError(f"--sampler {args.sampler} is not a DiT sampler: choose one of {', '.join(DIT_SAMPLERS)}")
        from diffusion import create_diffusion
        self.ddim = args.sampler == "ddim"
        self.diffusion = create_diffusion(("ddim" if self.ddim else "") + str(args.num_sampling_steps))
        self.guide_all = args.guide_all_channels
        self.name = f"{args.sampler.upper()}-{args.num_sampling_steps}"

    def __call__(self, model, z, y, cfg_scale, use_cfg=True, noise_fn=None, progress=False):
        fn, z, kwargs = _model_fn(model, z, y, cfg_scale, use_cfg, self.guide_all)
        loop = self.diffusion.ddim_sample_loop if self.ddim else self.diffusion.p_sample_loop
        out = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=progress, device=z.device,
                   noise_fn=noise_fn)
        return out.chunk(2)[0] if use_cfg else out


class SiTSampler:
    def __init__(self, args):
        from transport import Sampler, create_transport
        mode = args.mode or "ODE"
        transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps)
        sampler = Sampler(transport)
        try:
            if mode == "ODE":
                method = args.sampling_method or "dopri5"
                self.fn = sampler.sample_ode(sampling_method=method, num_steps=args.num_sampling_steps,
                                             atol=args.atol, rtol=args.rtol, reverse=args.reverse)
            else:
                method = args.sampling_method or "Euler"
                self.fn = sampler.sample_sde(sampling_method=method, diffusion_form=args.diffusion_form,
                                             diffusion_norm=args.diffusion_norm, last_step=args.last_step,
                                             last_step_size=args.last_step_size, num_steps=args.num_sampling_steps)
        except ValueError as e:  # unknown method/form names: one line listing the valid ones
            raise UserError(str(e))
        self.guide_all = args.guide_all_channels
        self.name = f"{mode}-{args.num_sampling_steps}-{method}"
        self.stochastic = mode == "SDE"

    def __call__(self, model, z, y, cfg_scale, use_cfg=True, noise_fn=None, progress=False):
        fn, z, kwargs = _model_fn(model, z, y, cfg_scale, use_cfg, self.guide_all)
        with torch.no_grad():
            out = self.fn(z, fn, **kwargs)[-1]
        return out.chunk(2)[0] if use_cfg else out


class MARSampler:
    """MAR's autoregressive sampler: `num_iter` steps of the cosine schedule, DiffLoss per token, KL-16 latents out."""

    def __init__(self, args):
        from models.mar import CFG_SCHEDULES
        self.num_iter, self.schedule, self.temperature = args.num_iter, args.cfg_schedule, args.temperature
        if args.cfg_schedule not in CFG_SCHEDULES:
            raise UserError(f"--cfg-schedule {args.cfg_schedule!r} is not a MAR schedule: use one of "
                            f"{', '.join(CFG_SCHEDULES)}")
        if args.num_iter < 1:
            raise UserError(f"--num-iter {args.num_iter} must be at least 1 (MAR's default is 64; 256 for the paper FID)")
        vae = getattr(args, "vae", "")  # checked here, before any model is loaded
        if vae != "" and not os.path.isfile(str(vae)) and not release_of(str(vae)):
            raise UserError(f"--vae {vae} is not a file: MAR decodes (and its 16-channel latents only become images) "
                            f"with its own KL-16 VAE; pass --vae <path to MAR's kl16.ckpt> (or --vae kl16.ckpt: fetched)")
        self.name = f"iter{args.num_iter}-{args.cfg_schedule}-temp{args.temperature}"

    def __call__(self, model, z, y, cfg_scale, use_cfg=True, noise_fn=None, progress=False):
        # MAR draws its orders from numpy's global RNG and its DiffLoss noise from torch's. Seeding numpy from
        # torch's global RNG (which the scripts seed per run, sample_ddp per chunk) makes the samples a function
        # of the torch seed alone. z only fixes the batch size (MAR starts from empty tokens, not noise).
        np.random.seed(int(torch.randint(0, 2**32, ()).item()))
        with torch.no_grad():
            return model.sample_tokens(len(y), num_iter=self.num_iter, cfg=cfg_scale if use_cfg else 1.0,
                                       cfg_schedule=self.schedule, labels=y, temperature=self.temperature,
                                       progress=progress)


def make_sampler(family, args):
    if family == "DiT":
        if args.mode is not None:
            raise UserError(f"{args.mode} is a SiT sampler; DiT models take --sampler ddpm or ddim")
        return DiTSampler(args)
    if family == "SiT":
        if args.sampler not in ("ddpm",):  # only the default may be left in place
            raise UserError(f"--sampler {args.sampler} is a DiT sampler; SiT models take ODE or SDE")
        return SiTSampler(args)
    return MARSampler(args)


def per_sample_noise(seeds, device):
    """noise_fn drawing row i's noise from its own generator (rows beyond len(seeds) repeat: the CFG null half)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise_fn(x):
        rows = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        reps = x.shape[0] // len(gens)
        return rows.repeat(reps, *([1] * (x.ndim - 1))).to(device=x.device, dtype=x.dtype)
    return noise_fn


def to_uint8(images):
    """[-1, 1] NCHW -> uint8 NHWC, the reference's clamp(127.5 x + 128) then truncation."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def load_decoder(family, vae, device, channels_last=False):
    """Latents -> images in [-1, 1]: SD VAE (ema/mse/id/folder), KL-16 for MAR (a checkpoint path), or none."""
    if family == "MAR" and vae not in (None, "none"):
        from models.kl16 import MAR_LATENT_SCALE, load_kl16
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        kl16 = load_kl16(resolve(vae)).to(device, memory_format=fmt)  # resolve: the release kl16.ckpt is fetched first
        return lambda z: kl16.decode((z / MAR_LATENT_SCALE).contiguous(memory_format=fmt)).clamp(-1, 1).contiguous()
    from .vae import load_vae
    return load_vae(vae, device, channels_last=channels_last).decode
