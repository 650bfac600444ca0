"""Sample a grid of class-conditional images from a DiT, SiT or MAR checkpoint.

    python sample.py --model DiT-D14/2 --ckpt pretrained/TinyDiT-D14-MaskedKD-500K.pt --seed 5464
    python sample.py --image-size 512      # DiT-XL/2: fetches DiT-XL-2-512x512.pt, as the official script
    python sample.py ODE --model SiT-XL/2 --ckpt SiT-XL-2-256x256.pt --cfg-scale 4.0

Random numbers are drawn in the official scripts' order, so the same seed gives the official samples.
"""
import argparse

import torch
from torchvision.utils import save_image

from core.errors import UserError
from tinyfusion.cli import add_image_args, add_transport_args, create_model, latent_shape_for
from tinyfusion.download import default_checkpoint, resolve
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.outputs import check_output_file
from tinyfusion.runtime import seed_everything, setup_runtime
from tinyfusion.sampling import (add_sampler_args, check_cfg, denoiser_precision,
                                 prepare_denoiser)

CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=str, default="DiT-XL/2")
    parser.add_argument("--ckpt", type=str, default=None, help="official, training, pruned or .safetensors weights, "
                        "or a release name (default for DiT-XL/2, SiT-XL/2: the official release, fetched)")
    add_image_args(parser, vae="mse")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", type=int, nargs="+", default=CLASS_LABELS)
    parser.add_argument("--nrow", type=int, default=4)
    parser.add_argument("--out", type=str, default="sample.png")
    parser.add_argument("--device", type=str, default=None)
    add_sampler_args(parser)
    add_transport_args(parser)
    args = parser.parse_args(argv)
    check_cfg(args.cfg_scale)
    check_output_file(args.out, "--out")
    family = family_for(args.model)
    sampler = family.sampler(args)  # bad sampler flags (or a family sampled elsewhere) fail before any fetch
    ckpt = resolve(args.ckpt or default_checkpoint(args.model, args.image_size, args.num_classes))  # fetched first
    if max(args.class_labels) >= args.num_classes or min(args.class_labels) < 0:
        raise UserError(f"--class-labels must lie in [0, {args.num_classes}) for --num-classes {args.num_classes}")

    rt = setup_runtime(args.device)
    seed_everything(args.seed)  # before the model, as the official scripts do (its init draws numbers)
    shape = latent_shape_for(args)
    model = prepare_denoiser(create_model(args.model, shape, args.num_classes, ckpt).to(rt.device).eval(), args)
    decode = family.decoder(args.vae, rt.device, args.channels_last)
    y = torch.tensor(args.class_labels, device=rt.device)
    z = torch.randn(len(y), *shape, device=rt.device)
    with denoiser_precision(args, rt.device):
        latents = sampler(model, z, y, args.cfg_scale, use_cfg=True, progress=True)
    images = decode(latents.float())
    save_image(images, args.out, nrow=args.nrow, normalize=True, value_range=(-1, 1))
    print(f"saved {len(images)} samples ({sampler.name}, cfg {args.cfg_scale}) to {args.out}")


if __name__ == "__main__":
    run_main(main)
