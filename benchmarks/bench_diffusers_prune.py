"""Forward speed of a PixArt-shaped diffusers transformer, full vs depth-pruned (random weights).

    python benchmarks/bench_diffusers_prune.py --threads 1      # PixArt-XL/2 at 256 px: 28 -> 14 blocks

The full model is PixArtTransformer2DModel with PixArt-XL-2-256x256's config (28 blocks, width 1152,
16 heads, 32x32 latents = 256 tokens, 120 T5 tokens of width 4096); the pruned one keeps every other
block through `prune_transformer` (the model `save_pretrained` would write). One call is one denoiser
forward with classifier-free guidance's doubled batch. The speedup is measured in one run, calls
interleaved (time_interleaved); the blocks are ~95% of the work, so it stays a little under 2x.
"""
import argparse
import copy
import os
import sys

if __package__ in (None, ""):  # `python benchmarks/bench_diffusers_prune.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import add_common_args, fmt_ratio, hardware, markdown_table, ratio, resolve, time_interleaved
from models.diffusers_t2i import forward, prepare, prune_transformer

PIXART_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  cross_attention_dim=1152, sample_size=32, patch_size=2, caption_channels=4096)
SMOKE_SHAPE = dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=32)
TEXT_TOKENS = 120  # PixArt-alpha's max_sequence_length
TARGET = 1.9
PRESETS = dict(cpu=dict(batch_size=1, iters=3), cuda=dict(batch_size=16, warmup=2, iters=10),
               smoke=dict(batch_size=1, iters=1))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per call (CFG doubles the batch)")
    parser.add_argument("--keep", type=int, default=14, help="blocks the pruned model keeps (every k-th)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    config = {**PIXART_256, **(SMOKE_SHAPE if args.smoke else {})}
    full = prepare(PixArtTransformer2DModel(**config)).to(device).eval()
    step = config["num_layers"] / args.keep
    kept = sorted({int(i * step) for i in range(args.keep)})
    pruned = prune_transformer(copy.deepcopy(full), kept)
    batch = 2 * args.batch_size
    x = torch.randn(batch, 4, 32, 32, device=device)
    t = torch.full((batch,), 500, device=device)
    cond = {"prompt_embeds": torch.randn(batch, TEXT_TOKENS, config["caption_channels"], device=device),
            "prompt_attention_mask": torch.ones(batch, TEXT_TOKENS, device=device)}
    models = [("PixArt-XL/2 (28 blocks)", full), (f"pruned ({len(kept)} blocks)", pruned)]

    def call(model):
        def run():
            with torch.no_grad():
                forward(model, x, t, cond)
        return run

    times = time_interleaved([call(m) for _, m in models], device, args.warmup, args.iters)
    rows = [{"model": name, "depth": len(m.transformer_blocks), "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
             "seconds": s, "speedup": ratio(times[0], s)} for (name, m), s in zip(models, times)]
    print(f"\n## PixArt-shaped diffusers transformer, 256 px (32x32 latents), batch {args.batch_size} x2 (CFG)"
          f"{' (smoke: tiny widths, numbers meaningless)' if args.smoke else ''}")
    print(hardware(device) + f"; median of {args.iters} round-robin call(s) after {args.warmup} warm-up\n")
    print(markdown_table(["model", "depth", "params (M)", "s / forward", "speedup"],
                         [[r["model"], r["depth"], f"{r['params_m']:.1f}", f"{r['seconds']:.3f}",
                           fmt_ratio(r["speedup"])] for r in rows]))
    s = rows[1]["speedup"]
    print(f"\nforward speedup {s:.2f}x with {rows[1]['depth']}/{rows[0]['depth']} blocks; "
          f"target >= {TARGET}x: {'met' if s >= TARGET else 'NOT met'}")
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
