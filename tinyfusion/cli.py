"""Argument groups and builders shared by the top-level scripts (model + data set-up)."""
import argparse
import os

from models import build_model, family_of
from core.errors import UserError
from .checkpoint import load_weights
from .download import CACHE_ENV, DEFAULT_CACHE


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


MAR_VAE_STRIDE, MAR_LATENT_CHANNELS = 16, 16  # MAR works on KL-16 latents: 16 channels, image / 16


def model_family(name):
    """'DiT', 'SiT' or 'MAR' of a registry name or a pruning preset (MAR-L-1-2 -> MAR)."""
    from models.layer_mask import is_preset, resolve_preset
    return family_of(resolve_preset(name)[0] if is_preset(name) else name)


def _is_mar(name):
    try:
        return model_family(name) == "MAR"
    except UserError:  # unknown names are reported by whoever builds the model
        return False


def latent_shape_for(args, store=None, model_name=None):
    """(C, H, W) the model works on: MAR 16 x image/16 (KL-16); else the store's shape when it is pixel
    space, else 4 x image/8 (SD VAE). `model_name` defaults to args.model."""
    if _is_mar(model_name or args.model):
        if args.image_size % MAR_VAE_STRIDE:
            raise UserError(f"--image-size {args.image_size} is not a multiple of 16 (MAR's KL-16 stride): use e.g. "
                            f"{max(16, args.image_size // 16 * 16)}")
        side = args.image_size // MAR_VAE_STRIDE
        return (MAR_LATENT_CHANNELS, side, side)
    if args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} is not a multiple of 8: use e.g. {args.image_size // 8 * 8 or 8}")
    store_vae = (getattr(store, "manifest", {}) or {}).get("vae") if store is not None else None
    if store_vae == "none":
        return tuple(store.latent_shape)  # pixel-space store (e.g. the digits demo): no VAE in between
    if store_vae is None and getattr(args, "vae", None) == "none":  # no store, or one that does not record
        return (getattr(args, "channels", 3), args.image_size, args.image_size)  # its VAE (reference layout)
    return (4, args.image_size // 8, args.image_size // 8)


def open_training_data(args, model_name):
    """The feature store of --data-path, checked against the model's latent shape and classes."""
    from .data import open_feature_store
    store = open_feature_store(args.data_path)
    shape = latent_shape_for(args, store, model_name)
    store.check_latent_shape(shape, model_name)
    store.check_num_classes(args.num_classes)
    return store, shape


def model_kwargs(name, latent_shape, num_classes):
    """Constructor keywords of registry model `name` for latents of `latent_shape` (C, H, W)."""
    if family_of(name) == "MAR":  # MAR's own keywords: image size in pixels (latent side x stride) and class_num
        return dict(img_size=latent_shape[-1] * MAR_VAE_STRIDE, vae_stride=MAR_VAE_STRIDE, class_num=num_classes)
    return dict(input_size=latent_shape[-1], in_channels=latent_shape[0], num_classes=num_classes)


def create_model(name, latent_shape, num_classes, weights=None, **kwargs):
    """A registry model for latents of `latent_shape`, optionally with strictly loaded weights."""
    model = build_model(name, **{**model_kwargs(name, latent_shape, num_classes), **kwargs})
    if weights:
        load_weights(model, weights, name)
    return model
