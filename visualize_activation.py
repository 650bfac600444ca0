"""Per-block hidden-state magnitudes of a DiT/SiT: the massive activations that masked KD masks out.

    python visualize_activation.py                                  # the shipped digits teacher
    python visualize_activation.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt --image-size 256 \
        --num-classes 1000 --data-path data/imagenet_encoded      # DiT-XL/2 (real latents from a feature store)

For a few samples noised to each of --timesteps, every block's output h (tokens x channels) is
collected and summarised: max |h| over tokens and channels, the median |h|, and the share of
entries further than --mask-std standard deviations from that sample's mean (the entries masked
KD zeroes, tinyfusion/kd.py). Writes a PNG (per-block curves and the |h| map of the block with
the largest activation) and a text summary. Inputs: the digits for the digits teacher, latents
from --data-path otherwise, or Gaussian latents when neither is available (said in the summary).
SiT: a timestep s maps to t = 1 - s/1000 on SiT's path (t = 1 is data).
"""
import argparse
import json
import os

import numpy as np
import torch

from core.errors import UserError
from models.layer_mask import model_blocks
from tinyfusion.cli import add_image_args, create_model, latent_shape_for
from tinyfusion.digits import TEACHER_PATH, load_split
from tinyfusion.errors import run_main
from tinyfusion.families import family_for
from tinyfusion.kd import HiddenStates


def inputs(args, shape, n, generator):
    """(x0, y, source): clean inputs and labels for the model."""
    if args.data_path:
        from tinyfusion.data import open_feature_store
        store = open_feature_store(args.data_path)
        store.check_latent_shape(shape, args.model)
        items = [store[int(i)] for i in torch.randperm(len(store), generator=generator)[:n]]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]), args.data_path
    if os.path.abspath(args.ckpt) == os.path.abspath(TEACHER_PATH):
        x, y, _, _ = load_split()
        idx = torch.randperm(len(x), generator=generator)[:n].numpy()
        return torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), "digits (training split)"
    return (torch.randn((n, *shape), generator=generator), torch.randint(0, args.num_classes, (n,), generator=generator),
            "Gaussian latents (no --data-path)")


def block_stats(h, mask_std):
    """Per sample: max |h|, median |h|, share of entries beyond mask_std std of the sample's mean."""
    h = h.float().flatten(1)
    mean, std = h.mean(1, keepdim=True), h.std(1, keepdim=True)
    return {"max_abs": h.abs().amax(1), "median_abs": h.abs().median(1).values,
            "outlier_share": ((h - mean).abs() > mask_std * std).float().mean(1)}


@torch.no_grad()
def collect(model, family, args, shape):
    g = torch.Generator().manual_seed(args.seed)
    x0, y, source = inputs(args, shape, args.num_samples, g)
    objective = family.objective(shape, args)
    blocks = model_blocks(model)
    hooks = HiddenStates(model, range(len(blocks)))
    stats, maps = {}, {}
    for step in args.timesteps:
        xt, t = family.noised_input(objective, x0, step, torch.randn(x0.shape, generator=g))
        model(xt, t, y)
        out = hooks.pop()
        stats[step] = [{k: v.tolist() for k, v in block_stats(out[i], args.mask_std).items()} for i in range(len(blocks))]
        maps[step] = [out[i][0].abs().float().numpy() for i in range(len(blocks))]  # (tokens, channels), sample 0
    return stats, maps, source


def plot(stats, maps, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(stats)
    depth = len(stats[steps[0]])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for step in steps:
        axes[0].plot(range(depth), [np.mean(b["max_abs"]) for b in stats[step]], "-o", ms=3, label=f"t={step}")
        axes[0].plot(range(depth), [np.mean(b["median_abs"]) for b in stats[step]], ":", color="0.6", lw=1)
        axes[1].plot(range(depth), [100 * np.mean(b["outlier_share"]) for b in stats[step]], "-o", ms=3)
    axes[0].set_yscale("log")
    axes[0].set_title("max |h| (solid) and median |h| (dotted), mean over samples", fontsize=9)
    axes[1].set_title("entries beyond 2 std of the sample mean (%)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("block")
    axes[0].legend(fontsize=7)
    step, block = max(((s, i) for s in steps for i in range(depth)), key=lambda si: maps[si[0]][si[1]].max())
    im = axes[2].imshow(maps[step][block].T, aspect="auto", cmap="magma")
    axes[2].set_title(f"|h| of sample 0, block {block}, t={step} (channels x tokens)", fontsize=9)
    axes[2].set_xlabel("token")
    axes[2].set_ylabel("channel")
    fig.colorbar(im, ax=axes[2])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summarise(stats, source, args):
    lines = [f"{args.model} ({args.ckpt}), {args.num_samples} samples from {source}, timesteps {args.timesteps}",
             "block | max|h| (mean over t, samples) | median|h| | max/median | beyond %g std (%%)" % args.mask_std]
    depth = len(next(iter(stats.values())))
    for i in range(depth):
        mx = np.mean([np.mean(stats[s][i]["max_abs"]) for s in stats])
        md = np.mean([np.mean(stats[s][i]["median_abs"]) for s in stats])
        share = 100 * np.mean([np.mean(stats[s][i]["outlier_share"]) for s in stats])
        lines.append(f"{i:5d} | {mx:10.2f} | {md:8.3f} | {mx / max(md, 1e-12):8.1f} | {share:5.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-Tiny/2")
    parser.add_argument("--ckpt", default=TEACHER_PATH)
    add_image_args(parser)
    parser.set_defaults(image_size=8, vae="none", channels=1, num_classes=10)
    parser.add_argument("--data-path", default=None, help="feature store with real latents (optional)")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 250, 500, 750, 999])
    parser.add_argument("--mask-std", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="activations.png", help="PNG; the summary goes beside it (.txt, .json)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        raise UserError(f"--ckpt {args.ckpt} does not exist: give a DiT/SiT checkpoint")
    bad = [s for s in args.timesteps if not 0 <= s < 1000]
    if bad or args.num_samples < 1:
        raise UserError(f"--timesteps must lie in 0..999 (got {bad}) and --num-samples be at least 1")
    family = family_for(args.model)
    shape = latent_shape_for(args)
    model = create_model(args.model, shape, args.num_classes, args.ckpt).eval()
    stats, maps, source = collect(model, family, args, shape)  # UserError for a family without noised inputs
    plot(stats, maps, args.out, f"{args.model}: hidden-state magnitudes per block ({source})")
    text = summarise(stats, source, args)
    base = os.path.splitext(args.out)[0]
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"source": source, "timesteps": args.timesteps, "stats": {str(k): v for k, v in stats.items()}}, f)
    print(text)
    print(f"wrote {args.out}, {base}.txt, {base}.json")


if __name__ == "__main__":
    run_main(main)
