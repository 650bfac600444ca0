"""MAR's Diffusion Loss (Li et al. 2024): a small AdaLN MLP that denoises one token at a time.

State-dict compatible with LTH14/mar (`diffloss.net.*`). The MLP predicts noise (16 ch) and the
learned-range variance (16 ch) for a single token latent, conditioned on the MAR decoder output z.
Training uses the full 1000-step cosine process; sampling a respaced one (default 100 steps).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffusion import create_diffusion

from .dit import TimestepEmbedder


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift  # tokens are rows here: no sequence axis to broadcast over


class ResBlock(nn.Module):
    """h <- h + gate * MLP(LN(h) * (1 + scale) + shift); the MLP keeps the width (no expansion)."""

    def __init__(self, channels):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """net(x_t (N,C), t (N,), c (N,Z)) -> (N, out_channels): eps in the first C channels, variance after."""

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks, grad_checkpointing=False):
        super().__init__()
        self.in_channels = in_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)  # same keys (mlp.0, mlp.2) and [cos | sin] order
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero modulations and output: every res block starts as the identity and the output at 0.
        for layer in [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                           self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """CFG over rows laid out [cond; uncond]: both halves get eps_u + s (eps_c - eps_u); variance unguided."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps, grad_checkpointing=False):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth, grad_checkpointing)
        self.train_diffusion = create_diffusion(timestep_respacing="", noise_schedule="cosine")
        self.gen_diffusion = create_diffusion(timestep_respacing=num_sampling_steps, noise_schedule="cosine")

    def forward(self, target, z, mask=None, t=None, noise=None):
        """Mean diffusion loss (MSE + VB) over rows; with `mask`, only rows where mask = 1 count.

        `t` / `noise` fix the diffusion step and noise per row (e.g. to compare two models on equal draws).
        """
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        loss = self.train_diffusion.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"]
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0):
        """One token latent per row of z. With cfg != 1, z is [cond; uncond] and both halves share the noise."""
        n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
        # Drawn on the CPU generator and moved, as the official `torch.randn(...).cuda()`: same seeds, same samples.
        noise = torch.randn(n, self.in_channels).to(z.device)
        if cfg != 1.0:
            noise = torch.cat([noise, noise], dim=0)
            fn, kwargs = self.net.forward_with_cfg, dict(c=z, cfg_scale=cfg)
        else:
            fn, kwargs = self.net.forward, dict(c=z)
        return self.gen_diffusion.p_sample_loop(fn, noise.shape, noise, clip_denoised=False, model_kwargs=kwargs,
                                                progress=False, temperature=temperature)
