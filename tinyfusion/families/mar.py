"""MAR: KL-16 latents, the masked-token DiffLoss objective and its distillation terms, AR sampling.

A MAR step is random in the token order, the mask ratio (one per batch), the label drop and the
DiffLoss step t and noise (plus dropout). `MARObjective.draw` makes all of them from the trainer's
per-step generator, for the GLOBAL batch, so a resumed run repeats every step and the draws do not
depend on the number of processes:
  orders (n, L) random permutations, mask (n, L) with the first ceil(L r) positions of each order
  set (r: one truncated-normal ratio for the whole global batch, by inverse CDF, so no numpy RNG),
  drop (n,) label drops, seed (n,) one seed per sample for its DiffLoss t and noise.
The t and noise (diffusion_batch_mul x L rows per sample) are made from the seeds on this rank's
slice only: drawing them for the global batch costs ~0.5 s of CPU per step at MAR's batch of 2048.

The model is always called through its `forward` (so DDP synchronises gradients); forward hooks
give the DiffLoss its t and noise and hand back z and block outputs. MAR's loss is the mean over
masked tokens; every sample has the same number of them, so it equals the mean of per-sample
masked means, and it is returned expanded to (B,) for the trainer's per-sample protocol.

The official recipe differs from DiT's: AdamW betas (0.9, 0.95), weight decay 0.02 except on 1-D
params, biases and the DiffLoss (see `mar_param_groups`), grad clip 3.0 (--grad-clip 3), lr
1e-4 x batch / 256 with a linear warm-up, EMA 0.9999.
"""
import contextlib
import math
import os
import re

import numpy as np
import torch

from core.errors import UserError
from models import MAR, MAR_models
from models.layer_mask import model_blocks
from models.mar import mask_by_order
from ..download import release_of, resolve
from ..vae import PosteriorVAE
from .base import Family, unwrap

VAE_STRIDE, LATENT_CHANNELS = 16, 16  # MAR works on KL-16 latents: 16 channels, image / 16


class MARObjective:
    """MAR's masked-token DiffLoss for latents of `latent_shape` (16, h, w) (patch_size tokens per side)."""

    def __init__(self, latent_shape, label_drop_prob=0.1, mask_ratio_min=0.7, patch_size=1):
        import scipy.stats as stats  # lazy, as models/mar.py: scipy.stats is slow to import
        _, h, w = latent_shape
        self.seq_len = (h // patch_size) * (w // patch_size)
        self.p_drop = label_drop_prob
        # MAR's ratio law: N(1, 0.25^2) truncated to [mask_ratio_min, 1]
        self.ratio_law = stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)

    def draw(self, n, generator):
        ratio = float(self.ratio_law.ppf(torch.rand((), dtype=torch.float64, generator=generator).item()))
        orders = torch.rand((n, self.seq_len), dtype=torch.float64, generator=generator).argsort(dim=1)
        return {"orders": orders, "mask": mask_by_order(math.ceil(self.seq_len * ratio), orders).float(),
                "drop": torch.rand(n, generator=generator) < self.p_drop,
                "seed": torch.randint(0, 2**62, (n,), generator=generator)}

    def loss(self, model, x, y, draws, step):
        out = run_mar(model, x, y, draws)
        return out["loss"].expand(len(x)), {}

    def kd_attach(self, kd, student, teacher):
        kd.attach_hidden_states(student, teacher)

    def kd_loss(self, kd, model, x, y, draws, step):
        """L_KD on the DiffLoss network's prediction for the same noisy tokens, over the masked tokens."""
        terms = mar_kd_terms(model, kd.teacher, x, y, draws, teacher_mode=kd.teacher_mode)
        sq = ((terms["student_out"] - terms["teacher_out"].to(terms["student_out"].dtype)) ** 2).mean(-1)
        return kd.combine(terms["student_loss"], masked_token_mean(sq, terms["mask"]), {})


def diffusion_draws(model, seeds, device):
    """DiffLoss t (R,) and noise (R, C), R = mul * B * L rows in forward_loss's order (the batch tiled
    `mul` times), each sample's rows from its own seed."""
    m = unwrap(model)
    mul, L, C = m.diffusion_batch_mul, m.seq_len, m.token_embed_dim
    steps = m.diffloss.train_diffusion.num_timesteps
    ts, noises = [], []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(int(s))
        ts.append(torch.randint(0, steps, (mul, L), generator=g))
        noises.append(torch.randn((mul, L, C), generator=g))
    t = torch.stack(ts, dim=1).reshape(-1)  # (mul, B, L): row k*B*L + b*L + l, as `repeat` tiles
    return t.to(device), torch.stack(noises, dim=1).reshape(-1, C).to(device)


def _check(model, draws):
    m = unwrap(model)
    if draws["orders"].shape[1] != m.seq_len:
        raise UserError(f"the MAR objective draws {draws['orders'].shape[1]} tokens per image but the model has "
                        f"{m.seq_len}: build the objective with the model's latent shape (16, image/16, image/16)")
    return m


@contextlib.contextmanager
def _hooks(model, t, noise, layers=()):
    """Give the DiffLoss call (t, noise); capture z, the DiffLoss net's (x_t, output) and block outputs."""
    m, seen = unwrap(model), {"hidden": {}}

    def diffloss_pre(module, args, kwargs):
        seen["z"] = args[1]
        return args[:3], {**kwargs, "t": t, "noise": noise}  # t / noise replace forward_loss's None

    def net_post(module, args, kwargs, output):
        seen["x_t"], seen["out"] = args[0], output

    def block_post(i):
        return lambda module, args, output: seen["hidden"].__setitem__(i, output)

    blocks = model_blocks(m)
    handles = [m.diffloss.register_forward_pre_hook(diffloss_pre, with_kwargs=True),
               m.diffloss.net.register_forward_hook(net_post, with_kwargs=True)]
    handles += [blocks[i].register_forward_hook(block_post(i)) for i in sorted(set(layers))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _per_sample(rows, mul, batch, seq_len):
    """(mul * B * L, ...) tiled rows -> (B, mul, L, ...)."""
    return rows.unflatten(0, (mul, batch, seq_len)).transpose(0, 1)


def masked_token_mean(values, mask):
    """Per-sample mean over masked tokens: values (B, L) or (B, mul, L), mask (B, L) with 1 = masked -> (B,).
    (The DiffLoss averages over masked tokens only; every sample has the same number of them.)"""
    if values.dim() == 3:
        values = values.mean(dim=1)
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1)


def run_mar(model, x, y, draws, layers=()):
    """One training forward of a (possibly DDP-wrapped) MAR with the fixed randomness `draws` (MARObjective's,
    optionally with explicit tiled 't' and 'noise'). Returns {'loss' scalar, 'z' (B, L, D) DiffLoss
    conditioning, 'x_t', 't', 'out' the DiffLoss net's noisy input, step and output per tiled row,
    'hidden' {global block index: block output} for the blocks in `layers`}."""
    m = _check(model, draws)
    t, noise = (draws["t"], draws["noise"]) if "t" in draws else diffusion_draws(m, draws["seed"], x.device)
    with _hooks(m, t, noise, layers) as seen:
        loss = model(x, y, {k: draws[k] for k in ("orders", "mask", "drop")})
    B, L = len(x), m.seq_len
    return {"loss": loss, "z": seen["z"][:B * L].unflatten(0, (B, L)), "x_t": seen["x_t"], "t": t,
            "out": seen["out"], "hidden": seen["hidden"]}


def mar_kd_terms(student, teacher, x, y, draws, student_layers=(), teacher_layers=(), teacher_mode=torch.no_grad):
    """Run a MAR student (trained; may be DDP-wrapped) and a frozen teacher (eval mode) on identical
    randomness: the same token orders, mask, label drops, and DiffLoss t and noise.

    Returns a dict:
      student_loss (B,)                     the student's DiffLoss (as MARObjective.loss)
      student_z, teacher_z (B, L, D)        DiffLoss conditioning (the decoder output, with gradient for the student)
      student_out, teacher_out (B, mul, L, 2C)  DiffLoss net outputs (eps | variance channels) on the SAME
                                            noisy tokens x_t and steps t, so they can be compared directly
      mask (B, L)                           1 = masked token, the only ones the DiffLoss counts
      student_hidden, teacher_hidden        {global block index: block output} for the requested blocks
                                            (encoder blocks first: (B, buffer + visible, D); decoder: (B, buffer + L, D))
    Reduce token terms with `masked_token_mean`. The teacher runs under `teacher_mode()` (default no_grad)."""
    s = run_mar(student, x, y, draws, student_layers)
    sm, tm = unwrap(student), unwrap(teacher)
    if (tm.seq_len, tm.diffusion_batch_mul, tm.token_embed_dim) != (sm.seq_len, sm.diffusion_batch_mul,
                                                                   sm.token_embed_dim):
        raise UserError("teacher and student MAR differ in tokens per image, diffusion_batch_mul or token channels: "
                        "distill between models built for the same image size and latent")
    B, L, mul = len(x), sm.seq_len, sm.diffusion_batch_mul
    with teacher_mode():
        ft = tm.forward_features(x, y, {k: draws[k] for k in ("orders", "mask", "drop")},
                                 return_hidden=bool(teacher_layers))
        cond = ft["z"].reshape(B * L, -1).repeat(mul, 1)  # tiled like forward_loss
        t_out = tm.diffloss.net(s["x_t"].detach(), s["t"], c=cond)
    hidden = ft.get("hidden") or []
    return {"student_loss": s["loss"].expand(B), "student_z": s["z"], "teacher_z": ft["z"],
            "student_out": _per_sample(s["out"], mul, B, L), "teacher_out": _per_sample(t_out, mul, B, L),
            "mask": draws["mask"], "student_hidden": s["hidden"],
            "teacher_hidden": {i: hidden[i] for i in sorted(set(teacher_layers))}}


def mar_param_groups(model, weight_decay=0.02, betas=(0.9, 0.95)):
    """MAR's AdamW groups (main_mar.py): no weight decay on 1-D params, biases or the DiffLoss; betas (0.9, 0.95).
    Pass as Trainer(param_groups=...): per-group weight_decay and betas override the trainer's defaults."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim == 1 or name.endswith(".bias") or "diffloss" in name
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "betas": tuple(betas)},
            {"params": no_decay, "weight_decay": 0.0, "betas": tuple(betas)}]


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
        if vae != "":
            check_kl16(vae, "decodes (and its 16-channel latents only become images)")
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


class MARFamily(Family):
    name, registry, model_classes = "MAR", MAR_models, (MAR,)
    weight_key_prefixes = ("encoder_blocks.",)
    smoke_kwargs = dict(encoder_embed_dim=64, encoder_num_heads=4, decoder_embed_dim=64, decoder_num_heads=4,
                        buffer_size=4, diffloss_d=1, diffloss_w=64, num_sampling_steps="2")

    def latent_shape(self, args, store=None):
        """16 x image/16 x image/16 (KL-16 latents)."""
        if args.image_size % VAE_STRIDE:
            raise UserError(f"--image-size {args.image_size} is not a multiple of 16 (MAR's KL-16 stride): use e.g. "
                            f"{max(16, args.image_size // 16 * 16)}")
        side = args.image_size // VAE_STRIDE
        return (LATENT_CHANNELS, side, side)

    def model_kwargs(self, name, latent_shape, num_classes):
        """MAR's own keywords: image size in pixels (latent side x stride) and class_num."""
        return dict(img_size=latent_shape[-1] * VAE_STRIDE, vae_stride=VAE_STRIDE, class_num=num_classes)

    def objective(self, latent_shape, args=None, class_dropout_prob=0.1):
        return MARObjective(latent_shape, label_drop_prob=class_dropout_prob)

    def param_groups(self, model, args):
        return mar_param_groups(model, args.weight_decay)

    def score_inputs(self, model_name, method, calibration):
        if method == "output-error":  # MAR's forward returns its loss, not an output
            raise UserError(f"--method output-error is for DiT/SiT; for {model_name} use bi, sensitivity, magnitude "
                            f"or random")
        return super().score_inputs(model_name, method, calibration)

    def pruned_name(self, source_name, counts, path=None):
        """MAR-L + 8 encoder / 8 decoder blocks -> 'MAR-L-D16', uneven -> 'MAR-L-E10D6' (models/mar.py's MARRegistry)."""
        m = re.match(r"^MAR-(?:(B|L|H)-?)?(?:D\d+|E\d+D\d+)?$", source_name)
        if not m or len(counts) != 2:
            raise UserError(f"cannot name a depth-pruned {source_name!r}: expected a MAR registry name such as MAR-L")
        size, (enc, dec) = m.group(1) or "L", counts
        return f"MAR-{size}-D{enc + dec}" if enc == dec else f"MAR-{size}-E{enc}D{dec}"

    def sampler(self, args):
        return MARSampler(args)

    def encoder(self, vae, device, channels=3, channels_last=False):
        """MAR's KL-16: a checkpoint path, or the release kl16.ckpt (fetched; the default, as main_cache.py)."""
        if vae == "none":
            return super().encoder(vae, device, channels, channels_last)
        vae = "kl16.ckpt" if vae is None else os.path.expanduser(os.fspath(vae))
        check_kl16(vae, "encodes")
        from models.kl16 import load_kl16
        path = resolve(vae)
        kl16 = KL16VAE(load_kl16(path), name=os.path.abspath(path)).to(device)
        return kl16.use_channels_last() if channels_last else kl16

    def decoder(self, vae, device, channels_last=False):
        """KL-16 (a checkpoint path or the release kl16.ckpt, fetched), or none."""
        if vae in (None, "none"):
            return super().decoder(vae, device, channels_last)
        return self.encoder(vae, device, channels_last=channels_last).decode


def check_kl16(vae, what):
    """--vae must name MAR's KL-16 checkpoint: an existing file or the release kl16.ckpt."""
    if not os.path.isfile(str(vae)) and not release_of(str(vae)):
        raise UserError(f"--vae {vae} is not a file: MAR {what} with its own KL-16 VAE; pass --vae <path to MAR's "
                        f"kl16.ckpt> (or --vae kl16.ckpt: fetched)")


class KL16VAE(PosteriorVAE):
    """MAR's KL-16 (models/kl16.py) behind tinyfusion/vae.py's interface: 16 channels, stride 16, latent = sample
    x 0.2325. Feature stores default to the posterior moments of the image and its flip, as MAR's main_cache.py."""
    default_store = "moments"

    def __init__(self, autoencoder, name="kl16"):
        from models.kl16 import MAR_LATENT_SCALE
        self.vae = autoencoder.eval().requires_grad_(False)
        self.name, self.scale = name, MAR_LATENT_SCALE
        self.downsample, self.latent_channels = autoencoder.stride, autoencoder.embed_dim
        self.in_channels = autoencoder.encoder.conv_in.in_channels

    @torch.no_grad()
    def moments(self, x):
        posterior = self.vae.encode(self._input(x))
        return posterior.mean.contiguous(), posterior.logvar.contiguous()

    def _decode(self, z):
        return self.vae.decode(z)
