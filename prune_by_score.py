"""Prune a DiT/SiT/MAR by a per-block importance score (ShortGPT's BI by default).

    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14 --data-path data/imagenet_encoded

Methods (higher importance = keep; the last block is never removed):
  bi             1 - mean cosine similarity between a block's input and output tokens (ShortGPT)
  sensitivity    calibration-loss increase when the block alone is skipped (same t and noise for all)
  output-error   MSE of the model output when the block alone is skipped (DiT/SiT only)
  magnitude      mean |weight| of the block;  random: seeded random scores
Calibration uses --nsamples real latents (a seeded random subset of the feature store at --data-path,
default data/imagenet_encoded as in the README) in batches of --batch-size; --calib-random uses Gaussian
latents instead (smoke tests only). BI on a DiT by default calibrates as the official prune_by_score.py:
clean latents with random horizontal flips, t drawn from [0, 250) and passed as is, the real labels
(--calibration clean). --calibration noised (ours; the only one for SiT/MAR and the other methods) runs
the training loss's forward: noised latents, t over all steps, the same t and noise for every candidate.
"""
import argparse

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate

from core.errors import UserError
from tinyfusion.cli import add_image_args, add_transport_args, latent_shape_for, require_weights
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.outputs import check_output_file
from tinyfusion.pruning import (SCORE_METHODS, bi_importance_clean, check_n_pruned, choose_removed, pruned_summary,
                                score_blocks, write_pruned)
from tinyfusion.runtime import setup_runtime


def calibration_batches(args, latent_shape, device, clean=False):
    """A list of (x, y) batches on `device` (clean: (x, t, y), hflipped at random, t ~ randint(0, 250)):
    a seeded random subset of the feature store, or noise."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.nsamples
    if args.calib_random:
        xs, ys = torch.randn((n, *latent_shape), generator=g), torch.randint(0, args.num_classes, (n,), generator=g)
    else:
        from tinyfusion.data import open_feature_store
        store = open_feature_store(args.data_path)
        store.check_latent_shape(latent_shape, args.model)
        family_for(args.model).check_store(store, args)
        if len(store) < n:
            raise UserError(f"feature store {args.data_path} has {len(store)} latents, fewer than --nsamples {n}: "
                            f"lower it")
        index = torch.randperm(len(store), generator=g)[:n]
        flips = torch.randint(0, 2, (n,), generator=g) if clean and store.has_flips else torch.zeros(n, dtype=torch.long)
        items = [store[(int(i), int(f))] for i, f in zip(index, flips)]
        xs, ys = torch.stack([x for x, _ in items]), default_collate([y for _, y in items])  # labels or text dicts
    batches = [(xs[i:i + args.batch_size].to(device), tree_map(lambda v: v[i:i + args.batch_size].to(device), ys))
               for i in range(0, n, args.batch_size)]
    if clean:  # the official 250-step respacing's indices, passed raw
        batches = [(x, torch.randint(0, 250, (len(x),), generator=g).to(device), y) for x, y in batches]
    return batches


def main(args):
    check_output_file(args.save_model, "--save-model")
    family = family_for(args.model)
    require_weights(args.model, args.ckpt, "--ckpt")
    clean = family.score_inputs(args.model, args.method, args.calibration) == "clean"
    if args.nsamples < 1 or args.batch_size < 1:
        raise UserError("--nsamples and --batch-size must be at least 1")
    latent_shape = latent_shape_for(args)
    kwargs = family.model_kwargs(args.model, latent_shape, args.num_classes)
    with torch.device("meta"):
        meta = family.build(args.model, latent_shape, args.num_classes)
    depth = meta.depth
    check_n_pruned(args.n_pruned, depth)  # every check before the expensive work
    rt = setup_runtime(args.device)
    needs_data = args.method in ("bi", "sensitivity", "output-error")
    batches = calibration_batches(args, latent_shape, rt.device, clean) if needs_data else []

    torch.manual_seed(args.seed)
    model = family.load(args.model, latent_shape, args.num_classes, args.ckpt).to(rt.device).eval()
    objective = family.objective(latent_shape, args, class_dropout_prob=0.0)
    if clean:
        importance = bi_importance_clean(model, batches)
    else:
        importance = score_blocks(model, args.method, batches, objective, seed=args.seed)
    removed = choose_removed(importance, args.n_pruned)
    kept = [i for i in range(depth) if i not in removed]
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}  # the weights just loaded, unchanged
    calibration = None if not needs_data else {
        "data": "gaussian" if args.calib_random else args.data_path, "nsamples": args.nsamples,
        "batch_size": args.batch_size, "inputs": "clean" if clean else "noised"}
    name, record = write_pruned(args.save_model, args.model, args.ckpt, state_dict, model.block_lists, kept,
                                method=args.method, model_kwargs=kwargs, importance=importance,
                                seed=args.seed, calibration=calibration)
    print("importance " + " ".join(f"{i}:{s:.4g}" for i, s in enumerate(importance)))
    print(pruned_summary(name, record, args.save_model))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=str, default="DiT-XL/2")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="weights to prune (required unless --model is a diffusers:<folder> with its weights)")
    parser.add_argument("--save-model", type=str, required=True)
    parser.add_argument("--n-pruned", type=int, required=True, help="number of blocks to remove")
    parser.add_argument("--method", type=str, choices=SCORE_METHODS, default="bi")
    parser.add_argument("--data-path", type=str, default="data/imagenet_encoded",
                        help="feature store (extract_features.py) with the calibration latents")
    parser.add_argument("--calib-random", action="store_true", help="Gaussian latents instead of --data-path")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration latents")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration", choices=["clean", "noised"], default=None,
                        help="BI inputs: clean latents, raw t in [0, 250) (official; DiT default) or noised (ours)")
    parser.add_argument("--seed", type=int, default=0)
    add_image_args(parser)
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    add_transport_args(parser)
    return parser


if __name__ == "__main__":
    run_main(lambda: main(build_parser().parse_args()))
