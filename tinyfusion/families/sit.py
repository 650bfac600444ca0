"""SiT: the interpolant (transport) objective, masked KD on the model output, ODE/SDE sampling."""
import torch

from core.errors import UserError
from diffusion import mean_flat
from models import SiT, SiT_models
from ..sampling import cfg_model_fn
from .base import Family


def transport_from(args):
    """The transport of the flags above (their defaults where args lacks them, e.g. args=None)."""
    from transport import create_transport
    return create_transport(getattr(args, "path_type", "Linear"), getattr(args, "prediction", "velocity"),
                            getattr(args, "loss_weight", None), getattr(args, "train_eps", None),
                            getattr(args, "sample_eps", None))


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

    def kd_attach(self, kd, student, teacher):
        kd.attach_hidden_states(student, teacher)

    def kd_loss(self, kd, model, x, y, draws, step):
        """L_KD: MSE between the student's and the teacher's outputs on the same x_t."""
        captured = {}

        def student(*args, **kwargs):  # the base loss calls the model once; keep its output for L_KD
            captured["out"] = model(*args, **kwargs)
            return captured["out"]

        diff_loss, logs = self.loss(student, x, y, draws, step)
        with torch.no_grad():
            t = draws["t"].to(x)
            _, xt, _ = self.transport.path_sampler.plan(t, draws["noise"].to(x), x)
        with kd.teacher_mode():
            teacher_out = kd.teacher(xt, t, y, force_drop_ids=draws["drop"])
        out_kd = mean_flat((captured["out"] - teacher_out.to(captured["out"].dtype)) ** 2)
        return kd.combine(diff_loss, out_kd, logs)


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
        fn, z, kwargs = cfg_model_fn(model, z, y, cfg_scale, use_cfg, self.guide_all)
        with torch.no_grad():
            out = self.fn(z, fn, **kwargs)[-1]
        return out.chunk(2)[0] if use_cfg else out


class SiTFamily(Family):
    name, registry, model_classes = "SiT", SiT_models, (SiT,)
    weight_key_prefixes = ("x_embedder.proj.weight",)
    kd_beta = 2e-4  # paper Table 6
    fixed_step_sampler_argv = ("ODE", "--sampling-method", "euler")

    def objective(self, latent_shape, args=None, class_dropout_prob=0.1):
        return TransportObjective(latent_shape, transport_from(args), class_dropout_prob)

    def sampler(self, args):
        if args.sampler not in ("ddpm",):  # only the default may be left in place
            raise UserError(f"--sampler {args.sampler} is a DiT sampler; SiT models take ODE or SDE")
        return SiTSampler(args)

    def steps_for_passes(self, passes):
        return passes + 1  # the Euler ODE's --num-sampling-steps counts grid points: one more than model calls

    def noised_input(self, objective, x0, step, noise):
        t = torch.full((len(x0),), 1 - step / 1000.0)  # DDPM step s <-> SiT time 1 - s/1000
        _, xt, _ = objective.transport.path_sampler.plan(t, noise, x0)
        return xt, t
