"""Prune a DiT/SiT/MAR to a given list of kept blocks (e.g. the BK-SDM "oracle" scheme).

    python prune_by_index.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --kept-indices "[0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]" --save-model outputs/pruned/DiT-D14-Oracle.pt

Writes the original weights of the kept blocks, renumbered (loadable by the printed model name,
here DiT-D14/2), and a .json record beside them. The checkpoint is checked strictly against
--model on the meta device, so no full-size model is ever allocated.
"""
import argparse

import torch

from core.errors import UserError
from tinyfusion.checkpoint import check_state_dict, read_weights
from tinyfusion.cli import add_image_args, latent_shape_for, require_weights
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.outputs import check_output_file
from tinyfusion.pruning import ORACLE_KEPT, parse_kept_indices, pruned_summary, write_pruned


def source_weights(family, args, shape):
    """The weights to prune: --ckpt, or those in the model's own folder (diffusers)."""
    require_weights(args.model, args.ckpt, "--ckpt")
    if args.ckpt:
        return read_weights(args.ckpt)
    return family.load(args.model, shape, args.num_classes).state_dict()


def main(args):
    check_output_file(args.save_model, "--save-model")
    family, shape = family_for(args.model), latent_shape_for(args)
    kwargs = family.model_kwargs(args.model, shape, args.num_classes)
    with torch.device("meta"):
        model = family.build(args.model, shape, args.num_classes)
    depth = model.depth
    if (args.kept_indices is None) == (args.preset is None):
        raise UserError("give exactly one of --kept-indices \"[...]\" and --preset oracle")
    if args.preset is not None:
        if depth not in ORACLE_KEPT:
            raise UserError(f"--preset oracle is defined for depth {', '.join(map(str, ORACLE_KEPT))} "
                            f"(DiT/SiT-XL -> D14), not for {args.model} with depth {depth}")
        kept = ORACLE_KEPT[depth]
    else:
        kept = parse_kept_indices(args.kept_indices, depth)
    state_dict = source_weights(family, args, shape)
    check_state_dict(model, state_dict, args.model, args.ckpt)  # what load_weights checks, without allocating
    name, record = write_pruned(args.save_model, args.model, args.ckpt, state_dict, model.block_lists, kept,
                                method=args.preset or "index", model_kwargs=kwargs)
    print(pruned_summary(name, record, args.save_model))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=str, default="DiT-XL/2")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="weights to prune (required unless --model is a diffusers:<folder> with its weights)")
    parser.add_argument("--kept-indices", type=str, default=None, help='e.g. "[0, 2, 4, 6]"')
    parser.add_argument("--preset", type=str, choices=["oracle"], default=None,
                        help="oracle: BK-SDM's XL->D14 list [0,2,4,...,12,15,17,...,27]")
    parser.add_argument("--save-model", type=str, required=True)
    add_image_args(parser)
    return parser


if __name__ == "__main__":
    run_main(lambda: main(build_parser().parse_args()))
