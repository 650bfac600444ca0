"""Latent autoencoders behind one small interface: the SD VAE (diffusers AutoencoderKL) or none.

Every object returned by `load_vae` has
  `.encode(x, generator=None)` images in [-1, 1] (B,3,H,W) -> scaled latent *samples* (B,C,H/d,W/d),
  `.moments(x)`                 -> (mean, logvar) of the posterior, unscaled (what MAR caches),
  `.decode(z)`                  scaled latents -> images in [-1, 1],
  `.scale`, `.shift`, `.downsample` (d), `.latent_channels`, `.in_channels`, `.name`, `.stochastic`,
  `.default_store` (what extract_features.py writes by default: "latents" or "moments").
DiT/SiT use the SD VAE: latent = posterior sample x 0.18215 (a sample, not the mean), decode after
dividing by it (SD3's VAE also subtracts its shift_factor first). MAR's KL-16 (families/mar.py's
KL16VAE, the same interface): latent = sample x 0.2325. `IdentityVAE` (`--vae none`) treats pixels
as the latent (scale 1, d = 1), for the tiny pixel-space demo. Loading never needs the network when the weights are in the HF cache or in a
local folder; offline misses become one UserError that says how to fix them.
"""
import os

import torch

from core.errors import UserError

VAE_SHORTCUTS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SD_SCALE = 0.18215  # sd-vae-ft-{ema,mse}; a local folder's config.scaling_factor wins if it has one


def sample_moments(mean, logvar, noise):
    """Posterior sample mean + std * noise, with the logvar clamp of LDM/diffusers ([-30, 20])."""
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def scale_latents(z, scale, shift=0.0):
    """VAE latent -> what the model sees: (z - shift) x scale (shift is 0 except for SD3's VAE)."""
    return (z - shift) * scale if shift else z * scale


def unscale_latents(z, scale, shift=0.0):
    """The inverse of scale_latents: what the VAE decoder takes."""
    return z / scale + shift if shift else z / scale


def gaussian_noise(shape, generator=None, device="cpu", dtype=torch.float32):
    """N(0, I) of `shape`; `generator` may be one torch.Generator or a list with one per batch row.

    Noise is drawn on the generator's device (CPU generators give the same numbers on any
    accelerator) and then moved, so stored latents do not depend on the GPU model.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        noise = torch.stack([r.to(device) for r in rows])
    else:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


class PosteriorVAE:
    """What the SD VAE and MAR's KL-16 (tinyfusion/families/mar.py) share: a Gaussian posterior, latent =
    (sample - shift) x scale. Subclasses set vae, name, scale, downsample, channels; define moments and _decode."""
    stochastic = True
    shift = 0.0
    default_store = "latents"
    memory_format = torch.contiguous_format

    def to(self, device):
        self.vae.to(device)
        return self

    def use_channels_last(self, enabled=True):
        """NHWC convolutions (faster cuDNN / oneDNN kernels); inputs are converted, outputs are returned NCHW."""
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        self.vae.to(memory_format=self.memory_format)
        return self

    @property
    def device(self):
        return next(self.vae.parameters()).device

    def _input(self, x):
        return x.to(self.device).contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def encode(self, x, generator=None):
        mean, logvar = self.moments(x)
        noise = gaussian_noise(mean.shape, generator, mean.device, mean.dtype)
        return scale_latents(sample_moments(mean, logvar, noise), self.scale, self.shift)

    @torch.no_grad()
    def decode(self, z):
        return self._decode(unscale_latents(self._input(z), self.scale, self.shift)).clamp(-1, 1).contiguous()


class SDVAE(PosteriorVAE):
    """A diffusers AutoencoderKL with the latent scale (and SD3's shift) applied on encode and undone on decode."""

    def __init__(self, autoencoder, name="AutoencoderKL"):
        self.vae = autoencoder.eval().requires_grad_(False)
        cfg = autoencoder.config
        self.name = name
        self.scale = float(getattr(cfg, "scaling_factor", None) or SD_SCALE)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.in_channels = int(cfg.in_channels)

    @torch.no_grad()
    def moments(self, x):
        dist = self.vae.encode(self._input(x)).latent_dist
        return dist.mean.contiguous(), dist.logvar.contiguous()

    def _decode(self, z):
        return self.vae.decode(z).sample


class IdentityVAE:
    """`--vae none`: the images themselves are the 'latents' (pixel-space datasets, the digits demo)."""
    stochastic = False
    scale, shift = 1.0, 0.0
    default_store = "latents"
    downsample = 1
    name = "none"

    def __init__(self, channels=3):
        self.latent_channels = self.in_channels = channels

    def to(self, device):
        return self

    def use_channels_last(self, enabled=True):
        return self

    def moments(self, x):
        raise NotImplementedError("pixels have no posterior: IdentityVAE has no moments")

    def encode(self, x, generator=None):
        return x

    def decode(self, z):
        return z.clamp(-1, 1)


def _offline():
    """True when the user asked Hugging Face tools not to touch the network."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))


def resolve_vae_name(name):
    """'ema'/'mse' -> the hub id; anything else is returned as given."""
    return VAE_SHORTCUTS.get(name, name)


def load_vae(name_or_path="ema", device="cpu", channels=3, channels_last=False):
    """Load a VAE by shortcut ('ema', 'mse', 'none'), hub id or local diffusers folder, on `device`
    (NHWC convolutions with `channels_last`).

    Tries the local HF cache first (local_files_only) and only goes online when HF_HUB_OFFLINE and
    friends are unset, so a cached or local VAE never triggers a download.
    """
    vae = _load_vae(name_or_path, device, channels)
    return vae.use_channels_last() if channels_last else vae


def _load_vae(name_or_path, device, channels):
    if name_or_path in (None, "none"):
        return IdentityVAE(channels)
    if os.path.isfile(os.path.expanduser(os.fspath(name_or_path))):
        raise UserError(f"--vae {name_or_path} is a file, not a diffusers AutoencoderKL folder: for MAR's KL-16 "
                        f"checkpoint pass a MAR --model (e.g. --model MAR-L)")
    from diffusers.models import AutoencoderKL
    repo = resolve_vae_name(os.fspath(name_or_path))
    if os.path.isdir(os.path.expanduser(repo)):
        folder = os.path.expanduser(repo)
        try:
            return SDVAE(AutoencoderKL.from_pretrained(folder), name=folder).to(device)
        except (OSError, ValueError) as e:
            raise UserError(f"--vae {folder} is not a diffusers AutoencoderKL folder (needs config.json and "
                            f"diffusion_pytorch_model.safetensors): {str(e).splitlines()[0][:160]}")
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise UserError(f"--vae {name_or_path}: no such folder and not a hub id (owner/name); pass ema, mse, none, "
                        f"a hub id, or a local AutoencoderKL folder")
    try:
        return SDVAE(AutoencoderKL.from_pretrained(repo, local_files_only=True), name=repo).to(device)
    except (OSError, ValueError):
        pass
    hint = (f"download it where there is network (huggingface-cli download {repo} --local-dir vae/) "
            f"and pass --vae vae/ (a local folder)")
    if _offline():
        raise UserError(f"VAE {repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    try:
        return SDVAE(AutoencoderKL.from_pretrained(repo), name=repo).to(device)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load VAE {repo} (no network or no cached copy: {str(e).splitlines()[0][:120]}): {hint}")


def _as_vae(vae):
    """Accept our wrappers or a bare diffusers AutoencoderKL."""
    return vae if hasattr(vae, "downsample") else SDVAE(vae)


def encode_images(vae, x, generator=None):
    """Images in [-1, 1] -> scaled latent samples (x 0.18215 for the SD VAE)."""
    return _as_vae(vae).encode(x, generator)


def decode_latents(vae, z):
    """Scaled latents -> images in [-1, 1]."""
    return _as_vae(vae).decode(z)
