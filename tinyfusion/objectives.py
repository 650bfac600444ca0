"""Training objectives for the one training loop (see trainer.Trainer).

An objective draws all randomness of a step for the *global* batch from a generator the
trainer seeds per step (so results do not depend on the number of processes, and resume
is exact), then computes a per-sample loss on this rank's slice.
"""
import torch

from diffusion import create_diffusion


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


class TransportObjective:
    """SiT's interpolant loss (velocity / noise / score prediction), with label dropout for CFG."""

    def __init__(self, latent_shape, transport, class_dropout_prob=0.1):
        self.transport = transport
        self.latent_shape = tuple(latent_shape)
        self.p_drop = class_dropout_prob
        self.t0, self.t1 = transport.check_interval(transport.train_eps, transport.sample_eps)

    def draw(self, n, generator):
        return {"t": torch.rand(n, generator=generator) * (self.t1 - self.t0) + self.t0,
                "noise": torch.randn((n, *self.latent_shape), generator=generator),
                "drop": (torch.rand(n, generator=generator) < self.p_drop).long()}

    def loss(self, model, x, y, draws, step):
        kwargs = dict(y=y, force_drop_ids=draws["drop"])
        out = self.transport.training_losses(model, x, kwargs, t=draws["t"], x0=draws["noise"])
        return out["loss"], {}


def make_objective(family, latent_shape, args=None, class_dropout_prob=0.1):
    """The default objective of a model family: DDPM for DiT, the SiT transport from args for SiT, MAR's
    masked-token DiffLoss for MAR (latent_shape (16, image/16, image/16))."""
    if family == "DiT":
        return DiffusionObjective(latent_shape, class_dropout_prob)
    if family == "SiT":
        from transport import create_transport
        transport = create_transport(getattr(args, "path_type", "Linear"), getattr(args, "prediction", "velocity"),
                                     getattr(args, "loss_weight", None), getattr(args, "train_eps", None),
                                     getattr(args, "sample_eps", None))
        return TransportObjective(latent_shape, transport, class_dropout_prob)
    if family == "MAR":
        from .mar_objectives import MARObjective
        return MARObjective(latent_shape, label_drop_prob=class_dropout_prob)
    raise ValueError(f"no default objective for model family {family}")


def add_transport_args(parser):
    """SiT's transport flags (same names and defaults as the official scripts)."""
    g = parser.add_argument_group("transport (SiT)")
    g.add_argument("--path-type", type=str, default="Linear", choices=["Linear", "GVP", "VP"])
    g.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"])
    g.add_argument("--loss-weight", type=str, default=None, choices=[None, "velocity", "likelihood"])
    g.add_argument("--sample-eps", type=float)
    g.add_argument("--train-eps", type=float)
    return g
