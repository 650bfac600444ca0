"""MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization").

State-dict compatible with LTH14/mar: the released mar_{base,large,huge} checkpoints load strictly
into `MAR_models['MAR-B'|'MAR-L'|'MAR-H']()` (their DiffLoss sizes are the registry defaults).
The model works on KL-16 latents (B,16,16,16) already scaled by 0.2325.

Depth pruning sees two block lists, `encoder_blocks` then `decoder_blocks` (32 layers for MAR-L).
Each block is a pre-norm residual ViT block with no conditioning input, so removing one is the
identity. The random draws of a training step (orders, mask, label drop) can be drawn once and
passed to several models, so a KD teacher and student see the very same masking.
"""
import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.errors import UserError

from .diffloss import DiffLoss
from .dit import Mlp as _GeluMlp
from .registry import ModelRegistry

CFG_SCHEDULES = ("linear", "constant")


class MARConfigError(UserError, ValueError):
    """Bad MAR sampling or model settings."""


# ----------------------------------------------------------------------------------------------
# ViT block with timm's parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Mlp(_GeluMlp):
    """fc1 - exact GELU - dropout - fc2 - dropout (timm's Mlp with drop=proj_drop)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__(dim, hidden, approximate="none")
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """x <- x + attn(norm1 x); x <- x + mlp(norm2 x)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------
# Masking schedule helpers (shared by training and sampling; public so tests and tools can check them)
def mask_by_order(mask_len, orders):
    """(B, L) bool mask with the first `mask_len` positions of each row's order set."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :int(mask_len)], True)


def mask_len_at(step, num_iter, seq_len, num_masked):
    """Tokens still masked after `step` (MaskGIT cosine), kept in [1, num_masked - 1]."""
    target = np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
    return int(max(1, min(num_masked - 1, target)))


def cfg_at(mask_len, seq_len, cfg, schedule):
    """Guidance scale of a step that leaves `mask_len` of `seq_len` tokens masked.

    linear (Muse): 1 + (cfg - 1) (seq_len - mask_len) / seq_len; constant: cfg.
    """
    if schedule == "linear":
        # float32 arithmetic, as the official code (its mask_len is a float32 tensor): bit-identical scales
        remaining = seq_len - torch.tensor(float(mask_len), dtype=torch.float32)
        return float(1 + (cfg - 1) * remaining / seq_len)
    _check_schedule(schedule)
    return float(cfg)


def _check_schedule(schedule):
    if schedule not in CFG_SCHEDULES:
        raise MARConfigError(f"unknown cfg schedule {schedule!r}: use one of {', '.join(CFG_SCHEDULES)}")


# ----------------------------------------------------------------------------------------------
class MAR(nn.Module):
    family = "MAR"
    block_lists = ("encoder_blocks", "decoder_blocks")  # prunable residual block lists, in execution order

    def __init__(self, img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=1024, encoder_depth=16,
                 encoder_num_heads=16, decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, mlp_ratio=4.,
                 vae_embed_dim=16, mask_ratio_min=0.7, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
                 proj_dropout=0.1, buffer_size=64, diffloss_d=3, diffloss_w=1024, num_sampling_steps='100',
                 diffusion_batch_mul=4, grad_checkpointing=False):
        super().__init__()
        if img_size % (vae_stride * patch_size):
            raise MARConfigError(f"img_size {img_size} is not a multiple of vae_stride*patch_size "
                                 f"({vae_stride}*{patch_size}): use an image size such as 256")
        for dim, heads in ((encoder_embed_dim, encoder_num_heads), (decoder_embed_dim, decoder_num_heads)):
            if dim % heads:
                raise MARConfigError(f"embed dim {dim} is not divisible by {heads} heads")
        self.vae_embed_dim, self.patch_size = vae_embed_dim, patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.num_classes, self.label_drop_prob = class_num, label_drop_prob
        self.buffer_size, self.diffusion_batch_mul = buffer_size, diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing
        # One mask ratio per batch: a left-truncated Gaussian at 1.0 (std 0.25) cut at mask_ratio_min.
        import scipy.stats as stats  # lazy: scipy.stats costs ~2 s at import in every script
        self.mask_ratio_generator = stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)

        # (the official hard-codes 1000 rows; equal for ImageNet)
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))  # the null class for CFG
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
            for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.initialize_weights()  # before the DiffLoss exists, which keeps its own init (as the official)

        self.diffloss = DiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w,
                                 num_sampling_steps, grad_checkpointing)

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def depth(self):
        return len(self.encoder_blocks) + len(self.decoder_blocks)

    # ----- token layout -----
    def patchify(self, x):
        """(B, C, H, W) -> (B, h*w, C*p*p): row-major tokens, each channel-major."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x):
        B, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(B, self.seq_h, self.seq_w, c, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(B, c, self.seq_h * p, self.seq_w * p)

    # ----- randomness of a step (numpy / CPU torch, in the official order, so seeds carry over) -----
    def sample_orders(self, bsz, device):
        orders = []
        for _ in range(bsz):
            order = np.arange(self.seq_len)
            np.random.shuffle(order)
            orders.append(order)
        return torch.from_numpy(np.stack(orders)).long().to(device)

    def draw_training_randomness(self, bsz, device, label_drop=None):
        """{'orders' (B,L) long, 'mask' (B,L) float (1 = masked), 'drop' (B,) bool or None}.

        label_drop defaults to self.training (the official drops labels in train mode only).
        """
        orders = self.sample_orders(bsz, device)
        num_masked = int(np.ceil(self.seq_len * self.mask_ratio_generator.rvs(1)[0]))
        mask = mask_by_order(num_masked, orders).float()
        drop = None
        if self.training if label_drop is None else label_drop:
            drop = (torch.rand(bsz) < self.label_drop_prob).to(device)
        return {"orders": orders, "mask": mask, "drop": drop}

    # ----- encoder / decoder -----
    def _run_blocks(self, blocks, x, hidden):
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if hidden is not None:
                hidden.append(x)
        return x

    def _keep(self, mask):
        """Positions the encoder sees: the buffer plus the visible tokens, (B, buffer + L) bool."""
        buffer = torch.ones(mask.shape[0], self.buffer_size, dtype=torch.bool, device=mask.device)
        return torch.cat([buffer, ~mask.bool()], dim=1)

    def forward_encoder(self, tokens, mask, class_embedding, drop=None, hidden=None):
        x = self.z_proj(tokens)
        B, _, D = x.shape
        if drop is not None:
            class_embedding = torch.where(drop[:, None], self.fake_latent, class_embedding)
        # Every buffer token carries the class embedding (cast like the official in-place write).
        buffer = class_embedding.to(x.dtype).unsqueeze(1).expand(B, self.buffer_size, D)
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned)
        x = x[self._keep(mask)].reshape(B, -1, D)  # drop masked tokens; kept ones stay in position order
        return self.encoder_norm(self._run_blocks(self.encoder_blocks, x, hidden))

    def forward_decoder(self, x, mask, hidden=None):
        x = self.decoder_embed(x)
        keep = self._keep(mask)
        B, D = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], D).clone()
        full[keep] = x.reshape(-1, D)
        x = self._run_blocks(self.decoder_blocks, full + self.decoder_pos_embed_learned, hidden)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def forward_pass(self, tokens, mask, class_embedding, drop=None, hidden=None):
        """One encoder + decoder pass: (B, L, C) tokens -> DiffLoss conditioning z (B, L, D).

        Every pass (training, KD features, each sampling step) goes through here, so per-pass state
        (e.g. a layer mask's draw) can hook this one method.
        """
        return self.forward_decoder(self.forward_encoder(tokens, mask, class_embedding, drop, hidden), mask, hidden)

    # ----- training -----
    def forward_features(self, imgs, labels, draws=None, return_hidden=False):
        """DiffLoss conditioning of a training step: {'z' (B,L,D), 'target' (B,L,C), 'mask' (B,L), 'draws'}
        and with return_hidden 'hidden', every block's output (encoder blocks, then decoder blocks)."""
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        target = x.clone().detach()
        if draws is None:
            draws = self.draw_training_randomness(x.shape[0], x.device)
        hidden = [] if return_hidden else None
        z = self.forward_pass(x, draws["mask"], class_embedding, draws.get("drop"), hidden)
        out = {"z": z, "target": target, "mask": draws["mask"], "draws": draws}
        if return_hidden:
            out["hidden"] = hidden
        return out

    def forward_loss(self, z, target, mask, t=None, noise=None):
        """DiffLoss on every token, tiled diffusion_batch_mul times (repeat, not interleave); masked mean."""
        mul = self.diffusion_batch_mul
        target = target.reshape(-1, target.shape[-1]).repeat(mul, 1)
        z = z.reshape(-1, z.shape[-1]).repeat(mul, 1)
        return self.diffloss(target, z, mask.reshape(-1).repeat(mul), t=t, noise=noise)

    def forward(self, imgs, labels, draws=None):
        """Training loss of latents imgs (B, 16, h, w) (already x0.2325) with class labels."""
        f = self.forward_features(imgs, labels, draws)
        return self.forward_loss(f["z"], f["target"], f["mask"])

    # ----- sampling -----
    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      progress=False):
        """Generate latents (bsz, 16, h, w) in `num_iter` steps (cosine schedule); labels None = unconditional."""
        _check_schedule(cfg_schedule)
        if not 1 <= num_iter <= self.seq_len:
            raise MARConfigError(f"num_iter {num_iter} must be between 1 and the {self.seq_len} tokens per image")
        was_training = self.training
        self.eval()  # no dropout, no label drop
        try:
            tokens = self._sample_loop(bsz, num_iter, cfg, cfg_schedule, labels, temperature, progress)
        finally:
            self.train(was_training)
        return self.unpatchify(tokens)

    def _sample_loop(self, bsz, num_iter, cfg, cfg_schedule, labels, temperature, progress):
        device = self.fake_latent.device
        mask = torch.ones(bsz, self.seq_len, device=device)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        orders = self.sample_orders(bsz, device)
        class_embedding = self.class_emb(labels) if labels is not None else self.fake_latent.expand(bsz, -1)
        guided = cfg != 1.0
        if guided:
            class_embedding = torch.cat([class_embedding, self.fake_latent.expand(bsz, -1)], dim=0)
        steps = range(num_iter)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps)
        for step in steps:
            x, m = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.forward_pass(x, m, class_embedding)
            mask_len = mask_len_at(step, num_iter, self.seq_len, int(mask[0].sum()))
            mask_next = mask_by_order(mask_len, orders)
            to_pred = mask.bool() if step == num_iter - 1 else mask.bool() ^ mask_next
            mask = mask_next.float()
            rows = torch.cat([to_pred, to_pred]) if guided else to_pred
            sampled = self.diffloss.sample(z[rows], temperature, cfg_at(mask_len, self.seq_len, cfg, cfg_schedule))
            if guided:
                sampled = sampled.chunk(2, dim=0)[0]  # keep the conditional half
            tokens = tokens.clone()
            tokens[to_pred] = sampled.to(tokens.dtype)
        return tokens


# ----------------------------------------------------------------------------------------------
# Registry. size: (width, blocks per stack, heads, released DiffLoss depth, width)
SIZES = {"B": (768, 12, 12, 6, 1024), "L": (1024, 16, 16, 8, 1280), "H": (1280, 20, 16, 12, 1536)}


def _constructor(size, encoder_depth=None, decoder_depth=None):
    width, depth, heads, diff_d, diff_w = SIZES[size]

    def build(**kwargs):
        kwargs.setdefault("encoder_depth", depth if encoder_depth is None else encoder_depth)
        kwargs.setdefault("decoder_depth", depth if decoder_depth is None else decoder_depth)
        kwargs.setdefault("diffloss_d", diff_d)
        kwargs.setdefault("diffloss_w", diff_w)
        # keywords override the named size (as in the DiT registry), so benchmarks and tests can shrink it
        return MAR(**{"encoder_embed_dim": width, "encoder_num_heads": heads, "decoder_embed_dim": width,
                      "decoder_num_heads": heads, **kwargs})

    build.__name__ = f"mar_{size}"
    return build


class MARRegistry(ModelRegistry):
    """'MAR-B|L|H', and pruned 'MAR-L-D16' (even depth split evenly: 8 encoder + 8 decoder blocks)
    or 'MAR-L-E10D6' (explicit encoder/decoder depths). The size defaults to L ('MAR-D16')."""

    def __init__(self, fixed):
        super().__init__("MAR", MAR, fixed, "'MAR-L-D16' (an even depth, split evenly) or 'MAR-L-E10D6'")
        self.pattern = re.compile(r"^MAR-(?:(B|L|H)-)?(?:D(\d+)|E(\d+)D(\d+))$")

    def _resolve(self, name):
        m = self.pattern.match(name) if isinstance(name, str) else None
        if not m:
            return None
        if m.group(2) is not None:
            k = int(m.group(2))
            if k < 2 or k % 2:
                return None
            enc = dec = k // 2
        else:
            enc, dec = int(m.group(3)), int(m.group(4))
            if enc + dec < 1:
                return None
        return _constructor(m.group(1) or "L", enc, dec)


MAR_models = MARRegistry({"MAR-B": _constructor("B"), "MAR-L": _constructor("L"), "MAR-H": _constructor("H"),
                          "MAR-L-D16": _constructor("L", 8, 8)})
