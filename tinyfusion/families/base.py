"""What a model family is: everything that differs between DiT, SiT, MAR (and the next family) in one class.

Scripts and the training loop get a family from `family_for(model_name)` (tinyfusion/families/__init__.py)
and call its methods; they never compare family names. The defaults here are the behaviour most
families share (SD-VAE latents, DiT-style constructor keywords and pruned names, strict weight
loading); each family module overrides what differs. Every model a family builds has `block_lists`
(the names of its prunable nn.ModuleLists, in execution order) and `depth` (their total length).

The objective a family makes (`Family.objective`) is used by the one training loop (trainer.py):
  draw(n, generator) -> {name: tensor with first dim n}   all randomness of a step, for the global batch
  loss(model, x, cond, draws, step) -> (loss (B,), logs)  on this rank's slice; cond: labels or a dict
  kd_attach(kd, student, teacher)                         masked KD set-up (kd: tinyfusion.kd.MaskedKDObjective)
  kd_loss(kd, model, x, cond, draws, step) -> (loss (B,), logs)   usually ends in kd.combine(diff, out_kd, logs)
and optionally begin_step(step, total), state_dict() / load_state_dict(), log_line().
"""
import re

from core.errors import UserError


def unwrap(model):
    """The model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if inner is None:
            return model
        model = inner


class Family:
    name = ""                    # shown in messages and records
    registry = None              # models' name -> constructor table (models/registry.py), for registry families
    model_classes = ()           # the nn.Module classes this family builds (family_of_model)
    kd_beta = 1e-2               # masked KD's default initial L_Rep weight (paper Table 6)
    fixed_step_sampler_argv = ()  # sampling-script flags for a sampler with exactly --num-sampling-steps steps
    smoke_kwargs = dict(hidden_size=64, num_heads=4)  # constructor keywords: same depth, tiny width (smoke runs)
    weight_key_prefixes = ()     # state-dict keys that mark this family's weights (a clear error for a wrong --model)
    weights_in_folder = False    # True: a model name is a folder that holds its weights (diffusers), --ckpt optional

    # ------------------------------------------------------------------ names and models

    def owns(self, name):
        """Does this family build model `name` (a registry name; presets are resolved by family_for)?"""
        return self.registry is not None and name in self.registry

    def owns_state_dict(self, state_dict):
        return any(k.startswith(p) for k in state_dict for p in self.weight_key_prefixes)

    def run_name(self, name):
        """`name` as part of a run folder's name (no path separators)."""
        return name.replace("/", "-")

    def describe(self):
        """A few valid model names, for the unknown-model message."""
        return f"{self.name}: {', '.join(list(self.registry)[:6])}, ..."

    def latent_shape(self, args, store=None):
        """(C, H, W) the model works on: the store's shape when it is pixel space, else 4 x image/8 (SD VAE)."""
        if args.image_size % 8:
            raise UserError(f"--image-size {args.image_size} is not a multiple of 8: use e.g. {args.image_size // 8 * 8 or 8}")
        store_vae = (getattr(store, "manifest", {}) or {}).get("vae") if store is not None else None
        if store_vae == "none":
            return tuple(store.latent_shape)  # pixel-space store (e.g. the digits demo): no VAE in between
        if store_vae is None and getattr(args, "vae", None) == "none":  # no store, or one that does not record
            return (getattr(args, "channels", 3), args.image_size, args.image_size)  # its VAE (reference layout)
        return (4, args.image_size // 8, args.image_size // 8)

    def check_store(self, store, args):
        """UserError if the feature store's conditioning does not fit the model (here: labels in --num-classes)."""
        store.check_num_classes(args.num_classes)

    def model_kwargs(self, name, latent_shape, num_classes):
        """Constructor keywords of model `name` for latents of `latent_shape` (C, H, W)."""
        return dict(input_size=latent_shape[-1], in_channels=latent_shape[0], num_classes=num_classes)

    def build(self, name, latent_shape, num_classes, **kwargs):
        """Model `name` with random weights (also under torch.device('meta')); kwargs override model_kwargs."""
        return self.registry[name](**{**self.model_kwargs(name, latent_shape, num_classes), **kwargs})

    def load(self, name, latent_shape, num_classes, weights=None, **kwargs):
        """build(), then the weights file (path or release name) loaded strictly, with a clear error on a mismatch."""
        from ..checkpoint import load_weights
        model = self.build(name, latent_shape, num_classes, **kwargs)
        if weights:
            load_weights(model, weights, name)
        return model

    # ------------------------------------------------------------------ training

    def objective(self, latent_shape, args=None, class_dropout_prob=0.1):
        """The family's training loss (the objective protocol: draw, loss, kd_attach, kd_loss)."""
        raise NotImplementedError

    def param_groups(self, model, args):
        """Optimizer parameter groups, or None for the trainer's single default group."""
        return None

    # ------------------------------------------------------------------ pruning

    def score_inputs(self, model_name, method, calibration):
        """prune_by_score.py: 'clean' (the official DiT BI calibration) or 'noised' inputs for `method` and
        --calibration (None = the family's default); UserError for what this family cannot score."""
        if method == "bi" and calibration == "clean":
            raise UserError(f"--calibration clean is the official DiT calibration (raw DDPM steps); for {model_name} "
                            f"use --calibration noised")
        return "noised"

    def weights_path(self, name, weights=None):
        """The file (or folder) that holds model `name`'s weights: `weights`, or the model's folder."""
        return weights

    def check_groups(self, model, groups):
        """UserError if N:M `groups` could drop a block the model cannot lose (none here)."""

    def check_kept(self, state_dict, kept):
        """UserError if the kept global blocks miss one the model cannot lose (none here)."""

    def pruned_name(self, source_name, counts, path=None):
        """Registry name of the depth-pruned model with counts[i] blocks kept in block list i:
        DiT-XL/2 + [14] -> 'DiT-D14/2'; DiT-S/2 + [6] -> 'DiT-S-D6/2' (models/registry.py's names);
        `path` is where it will be written (a family whose models are folders names it by that)."""
        m = re.match(rf"^{self.name}-(?:(S|B|L|XL|Tiny)|(?:(S|B|L|XL|Tiny)-)?D\d+)/(\d+)$", source_name)
        if not m or len(counts) != 1:
            raise UserError(f"cannot name a depth-pruned {source_name!r}: expected a {self.name} registry name such "
                            f"as {self.name}-XL/2 or {self.name}-S/2")
        size = m.group(1) or m.group(2) or "XL"
        return f"{self.name}-{'' if size == 'XL' else size + '-'}D{sum(counts)}/{m.group(3)}"

    def save_trained(self, model, path):
        """Write a trained model (train_masked_kd.py --save-model): its plain state dict."""
        from ..checkpoint import save_weights
        save_weights(model.state_dict(), path)

    def export_pruned(self, path, state_dict, record):
        """Write a pruned model: the plain state dict (.pt / .safetensors) and its JSON record beside it."""
        from ..pruning import save_pruned
        save_pruned(path, state_dict, record)

    # ------------------------------------------------------------------ sampling

    def sampler(self, args):
        """A callable sampler(model, z, cond, cfg_scale, use_cfg=True, noise_fn=None, progress=False) -> latents,
        with `.name`, from the sampling scripts' flags; UserError for another family's sampler flags."""
        raise NotImplementedError

    def steps_for_passes(self, passes):
        """--num-sampling-steps of the fixed-step sampler (fixed_step_sampler_argv) for `passes` denoiser calls."""
        return passes

    def encoder(self, vae, device, channels=3, channels_last=False):
        """Images -> latents for extract_features.py (tinyfusion/vae.py's interface: encode, moments, decode,
        scale, default_store, ...): the SD VAE --vae (ema/mse/hub id/folder; None = ema), or none (pixel space)."""
        from ..vae import load_vae
        return load_vae("ema" if vae is None else vae, device, channels=channels, channels_last=channels_last)

    def decoder(self, vae, device, channels_last=False):
        """Latents -> images in [-1, 1]: the SD VAE --vae (ema/mse/hub id/folder), or none (pixel space)."""
        from ..vae import load_vae
        return load_vae(vae, device, channels_last=channels_last).decode

    def noised_input(self, objective, x0, step, noise):
        """(x_t, model time input) at DDPM step `step` in 0..999 (visualize_activation.py)."""
        raise UserError(f"{self.name} models have no noised input at a DDPM step: visualize_activation.py is for "
                        f"DiT and SiT models")
