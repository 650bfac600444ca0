"""diffusers transformers as families: DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel.

A model name `diffusers:<folder>` (a transformer folder, or a pipeline folder with transformer/) picks the
family by the folder's config.json `_class_name`; models/diffusers_t2i.py loads, masks, prunes and saves them.
Objectives:
- diffusers DiT and PixArt: DiT's DDPM loss (linear betas, 1000 steps, eps MSE + VB for the learned variance:
  both predict 2 x in_channels), the schedule their pipelines sample with.
- SD3: rectified flow. x_s = (1 - s) x0 + s noise, target noise - x0, model timestep 1000 s. s is drawn as SD3
  trains: u logit-normal (m=0, s=1; the SD3 paper's best rf/lognorm(0,1), the default of diffusers'
  train_dreambooth_sd3.py), then the scheduler's shift s = k u / (1 + (k - 1) u) (FlowMatchEulerDiscreteScheduler,
  k = 3 for SD3), so training sees the noise levels sampling visits. u is drawn continuously instead of from the
  scheduler's 1000-step grid (a difference under 1e-3 in s).
Conditioning dropout (for classifier-free guidance) is drawn per sample with the step's generator: DiT's label
becomes the null class, text embeddings the store's empty-prompt embeddings (`null_cond`).
Masked KD (TinyFusion eq. 8): L_KD on the outputs (DDPM: the project's training_losses_kd terms: eps MSE + VB
against the teacher's posterior), L_Rep on the mapped blocks' outputs (SD3: the image stream).
Sampling goes through the diffusers pipelines (README, "Text-to-image transformers").
"""
import json
import os
import sys

import torch

from core.errors import UserError
from diffusion import create_diffusion, mean_flat
from models import diffusers_t2i as t2i
from ..kd import HiddenStates
from .base import Family

SD3_SHIFT = 3.0  # stabilityai/stable-diffusion-3-medium-diffusers scheduler_config.json


def scheduler_shift(folder, default=SD3_SHIFT):
    """`shift` of the pipeline's scheduler beside a transformer folder, else `default`."""
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return float(json.load(f).get("shift", default))


def drop_conditioning(model, cond, drop, null_cond=None):
    """`cond` with the samples where drop == 1 replaced by the unconditional input."""
    if not bool(drop.any()):
        return cond
    if torch.is_tensor(cond):  # class labels: the null class is the last embedding row
        return torch.where(drop.bool().to(cond.device), t2i.inner(model).config.num_embeds_ada_norm, cond)
    if null_cond is None:
        raise UserError("text conditioning dropout needs the empty prompt's embeddings (the store's null_cond): "
                        "extract features with a text store, or set the dropout probability to 0")
    out = {}
    for k, v in cond.items():
        null = null_cond[k].to(v.device, v.dtype).expand_as(v)
        out[k] = torch.where(drop.bool().to(v.device).view(-1, *[1] * (v.dim() - 1)), null, v)
    return out


class ImageStreams(HiddenStates):
    """Block outputs for L_Rep: the image tokens (SD3 blocks return (text, image))."""

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = t2i.image_stream(output)
        return hook


class _Conditioned:
    """What both objectives share: noise and conditioning-dropout draws, the denoiser, the KD hidden states."""

    def __init__(self, latent_shape, cond_drop_prob, null_cond):
        self.latent_shape, self.p_drop, self.null_cond = tuple(latent_shape), cond_drop_prob, null_cond

    def _draws(self, n, generator):
        return {"noise": torch.randn((n, *self.latent_shape), generator=generator),
                "drop": (torch.rand(n, generator=generator) < self.p_drop).long()}

    def denoiser(self, model, cond, draws, mode=None):
        """model as a function of (x_t, t), with this step's conditioning dropout applied (under `mode()`)."""
        cond = drop_conditioning(model, cond, draws["drop"], self.null_cond)
        if mode is None:
            return lambda x_t, t: t2i.forward(model, x_t, t, cond)

        def run(x_t, t):
            with mode():
                return t2i.forward(model, x_t, t, cond)
        return run

    def kd_attach(self, kd, student, teacher):
        kd.student_h = ImageStreams(student, [s for s, _ in kd.layer_map])
        kd.teacher_h = ImageStreams(teacher, [t for _, t in kd.layer_map])


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

    def kd_loss(self, kd, model, x, cond, draws, step):
        terms = self.diffusion.training_losses_kd(
            self.denoiser(model, cond, draws), self.denoiser(kd.teacher, cond, draws, kd.teacher_mode), x,
            draws["t"].to(x.device), noise=draws["noise"].to(x), alpha_kd=kd.alpha_kd, alpha_diff=kd.alpha_diff,
            kd_channels=kd.kd_channels)
        return kd.combine(terms["gt"], terms["kd_loss"], {})


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

    def kd_loss(self, kd, model, x, cond, draws, step):
        x_s, t, target = self.noisy(x, draws)
        out = self.denoiser(model, cond, draws)(x_s, t)
        teacher_out = self.denoiser(kd.teacher, cond, draws, kd.teacher_mode)(x_s, t).to(out.dtype)
        return kd.combine(mean_flat((out - target) ** 2), mean_flat((out - teacher_out) ** 2), {})


class DiffusersFamily(Family):
    """A diffusers transformer class, loaded from (and pruned into) diffusers folders."""
    class_name = ""
    weights_in_folder = True

    def owns(self, name):
        return t2i.is_diffusers_spec(name) and t2i.transformer_folder(t2i.spec_folder(name))[1] == self.class_name

    @property
    def model_classes(self):
        """The diffusers class, looked up only once diffusers is imported (no model of it can exist before)."""
        diffusers = sys.modules.get("diffusers")
        return (getattr(diffusers, self.class_name),) if diffusers is not None else ()

    def owns_state_dict(self, state_dict):
        return False

    def describe(self):
        return f"{self.name}: diffusers:<folder> holding a {self.class_name}"

    def run_name(self, name):
        """'PixArt-<folder name>' rather than the whole path of `diffusers:<folder>`."""
        return f"{self.name}-{os.path.basename(os.path.normpath(t2i.spec_folder(name))) or 'model'}"

    def config(self, name):
        import diffusers
        folder = t2i.transformer_folder(t2i.spec_folder(name))[0]
        return getattr(diffusers, self.class_name).load_config(folder)

    def latent_shape(self, args, store=None):
        """The store's latent size (else --image-size / 8) with the transformer's in_channels."""
        channels = self.config(args.model)["in_channels"]
        if store is not None:
            return (channels, *tuple(store.latent_shape)[1:])
        return (channels, *super().latent_shape(args)[1:])

    def model_kwargs(self, name, latent_shape, num_classes):
        return None  # no registry: export_pruned checks the pruned weights against the pruned config

    def build(self, name, latent_shape, num_classes, **kwargs):
        import diffusers
        return t2i.prepare(getattr(diffusers, self.class_name).from_config({**self.config(name), **kwargs}))

    def load(self, name, latent_shape, num_classes, weights=None, **kwargs):
        """The folder's model, then `weights` (e.g. a training checkpoint of it) loaded strictly."""
        from ..checkpoint import load_weights
        model = t2i.load_transformer(name)
        if weights:
            load_weights(model, weights, name)
        return model

    def weights_path(self, name, weights=None):
        return weights or t2i.transformer_folder(t2i.spec_folder(name))[0]

    def objective(self, latent_shape, args=None, class_dropout_prob=0.1):
        return DDPMObjective(latent_shape, class_dropout_prob, self.null_cond(args, class_dropout_prob))

    def null_cond(self, args, class_dropout_prob):
        """The empty prompt's embeddings from the text store at args.data_path (needed for dropout only)."""
        path = getattr(args, "data_path", None)
        if not class_dropout_prob or not path or not os.path.isdir(path):
            return None
        from ..data import open_feature_store
        store = open_feature_store(path)
        return store.null_cond() if getattr(store, "conditioning", "class") == "text" else None

    def check_groups(self, model, groups):
        t2i.check_groups(model, groups)

    def check_kept(self, state_dict, kept):
        t2i.check_kept_of(self.class_name, state_dict, kept)

    def pruned_name(self, source_name, counts, path=None):
        return f"{t2i.PREFIX}{path}"

    def export_pruned(self, path, state_dict, record):
        """A save_pretrained folder at `path` (config: the kept blocks' num_layers, SD3's remapped dual-attention
        layers), strictly loaded with the pruned weights first; the JSON record beside it (path + .json)."""
        import diffusers
        from ..pruning import record_path
        from ..checkpoint import atomic_path
        config = self.config(record["source_model"])
        config.update(t2i.pruned_config(config, record["kept"]))
        model = getattr(diffusers, self.class_name).from_config(config)
        model.load_state_dict(state_dict, strict=True)
        text = json.dumps(record, indent=2)
        t2i.save_transformer(model, path)
        with atomic_path(record_path(path)) as tmp, open(tmp, "w") as f:
            f.write(text + "\n")

    def save_trained(self, model, path):
        t2i.save_transformer(t2i.inner(model), path)

    def sampler(self, args):
        raise UserError(f"{self.name} models sample through their diffusers pipeline (README: 'Text-to-image "
                        f"transformers'), not through sample.py")


class DiffusersDiTFamily(DiffusersFamily):
    name, class_name = "diffusers-DiT", "DiTTransformer2DModel"


class TextFamily(DiffusersFamily):
    """A text-conditioned transformer: trains on a text store (extract_features.py --captions) holding `cond_names`:
    what its pipelines' `encode_prompt` returns at `prompt_outputs` (name: position in the returned tuple), called
    with `encode_prompt_args` (tinyfusion/text.py)."""
    pipeline_classes = ()
    prompt_outputs = {}
    encode_prompt_args = {}

    @property
    def cond_names(self):
        return tuple(self.prompt_outputs)

    def check_store(self, store, args):
        names = tuple(getattr(store, "cond_names", ()))
        if getattr(store, "conditioning", "class") != "text" or not set(self.cond_names) <= set(names):
            raise UserError(f"feature store {store.path} holds {', '.join(names) or 'class labels'}, but {self.name} "
                            f"needs {', '.join(self.cond_names)}: extract it with --captions and this model's pipeline "
                            f"(--pipeline)")


class PixArtFamily(TextFamily):
    name, class_name = "PixArt", "PixArtTransformer2DModel"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    prompt_outputs = {"prompt_embeds": 0, "prompt_attention_mask": 1}


class SD3Family(TextFamily):
    name, class_name = "SD3", "SD3Transformer2DModel"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    prompt_outputs = {"prompt_embeds": 0, "pooled_prompt_embeds": 2}
    # prompt_2 / prompt_3 (its second CLIP and T5) None = the same caption, as the pipeline's __call__ does
    encode_prompt_args = {"prompt_2": None, "prompt_3": None}

    def objective(self, latent_shape, args=None, class_dropout_prob=0.1):
        model = getattr(args, "model", None)
        shift = scheduler_shift(t2i.transformer_folder(t2i.spec_folder(model))[0]) if model else SD3_SHIFT
        return RectifiedFlowObjective(latent_shape, shift, class_dropout_prob, self.null_cond(args, class_dropout_prob))
