"""What sample.py and sample_ddp.py share: the sampler flags, denoiser set-up, CFG batching, per-image noise
and uint8 conversion. Each family's sampler and decoder live in its module (tinyfusion/families/).

Random numbers are consumed in the official order (one randn_like per DDPM step, the SiT ODE
deterministic given z), so one seed gives the official samples. `noise_fn` lets sample_ddp draw each
image's per-step noise from that image's own generator instead, which makes every image a function
of (global seed, index) only.
"""
import functools

import torch

from core.errors import UserError

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


def cfg_model_fn(model, z, y, cfg_scale, use_cfg, guide_all):
    """(model function, start noise, kwargs): with CFG, the [cond; null] batch forward_with_cfg expects."""
    if not use_cfg:
        return model.forward, z, dict(y=y)
    y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
    fn = functools.partial(model.forward_with_cfg, guide_all_channels=guide_all)
    return fn, torch.cat([z, z], 0), dict(y=y, cfg_scale=cfg_scale)


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
