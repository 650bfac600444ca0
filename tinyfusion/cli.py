"""Argument groups and builders shared by the top-level scripts (model + data set-up)."""
import argparse
import os

from core.errors import UserError
from .download import CACHE_ENV, DEFAULT_CACHE
from .families import family_for


class _SetCacheDir(argparse.Action):
    """--cache-dir sets $TINYFUSION_CACHE, which every release-name lookup reads (also in child processes)."""

    def __call__(self, parser, namespace, value, option_string=None):
        os.environ[CACHE_ENV] = value
        setattr(namespace, self.dest, value)


def add_cache_arg(parser):
    parser.add_argument("--cache-dir", action=_SetCacheDir, default=None,
                        help=f"where released checkpoints named by --ckpt etc. are fetched to "
                             f"(default ${CACHE_ENV}, else {DEFAULT_CACHE}/)")


def add_image_args(parser, vae="ema"):
    """--image-size, --num-classes, --vae, --channels: what fixes the model's input (latent) shape (and --cache-dir)."""
    g = parser.add_argument_group("images and latents")
    g.add_argument("--image-size", type=int, default=256,
                   help="a multiple of 8 (latent = image / 8); MAR: of 16 (KL-16 latent = image / 16)")
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--vae", type=str, default=vae, help="ema, mse, none (pixel space), a hub id or a local folder; "
                                                       "MAR: a kl16 checkpoint")
    g.add_argument("--channels", type=int, default=3, help="image channels in pixel space (--vae none)")
    add_cache_arg(parser)
    return g


def add_model_args(parser, model="DiT-XL/2", data=True):
    add_image_args(parser)
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", type=str, default=model, help="registry name, e.g. DiT-XL/2, DiT-D14/2, SiT-XL/2")
    g.add_argument("--load-weight", type=str, default=None, help="initial weights: plain, training or pruned ckpt")
    if data:
        g.add_argument("--data-path", type=str, required=True, help="feature store written by extract_features.py")
    return g


def add_transport_args(parser):
    """SiT's transport flags (same names and defaults as the official scripts)."""
    g = parser.add_argument_group("transport (SiT)")
    g.add_argument("--path-type", type=str, default="Linear", choices=["Linear", "GVP", "VP"])
    g.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"])
    g.add_argument("--loss-weight", type=str, default=None, choices=[None, "velocity", "likelihood"])
    g.add_argument("--sample-eps", type=float)
    g.add_argument("--train-eps", type=float)
    return g


def sampling_flags(argv=()):
    """The sampling scripts' sampler and transport flags parsed from `argv` (defaults for the rest), for
    library code that samples without a command line (digits, benchmarks)."""
    from .sampling import add_sampler_args
    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    add_transport_args(parser)
    return parser.parse_args([str(a) for a in argv])


def latent_shape_for(args, store=None, model_name=None):
    """(C, H, W) the model `model_name` (default args.model) works on, from the image flags and the store."""
    return family_for(model_name or args.model).latent_shape(args, store)


def open_training_data(args, model_name):
    """The feature store of --data-path, checked against the model's latent shape and classes."""
    from .data import open_feature_store
    store = open_feature_store(args.data_path)
    shape = latent_shape_for(args, store, model_name)
    store.check_latent_shape(shape, model_name)
    family_for(model_name).check_store(store, args)
    return store, shape


def require_weights(name, weights, flag):
    """One line if model `name` needs a weights file `flag` that was not given (a diffusers:<folder> holds its own)."""
    if not weights and not family_for(name).weights_in_folder:
        raise UserError(f"{flag} is required for {name}: the weights to use (a path or a release name)")


def create_model(name, latent_shape, num_classes, weights=None, **kwargs):
    """Model `name` for latents of `latent_shape`, optionally with strictly loaded weights."""
    return family_for(name).load(name, latent_shape, num_classes, weights, **kwargs)
