"""Sampling throughput of full vs depth-pruned models (random weights, same sampler, same batch).

    python benchmarks/bench_sampling.py                         # DiT-XL/2 vs DiT-D19/2, D14/2, D7/2
    python benchmarks/bench_sampling.py --family SiT            # SiT-XL/2 vs SiT-D14/2 (fixed-step Euler ODE)
    python benchmarks/bench_sampling.py --family MAR            # MAR-L vs MAR-L-D16 (1 AR iteration per 4 tokens)

Each call runs the real sampler (the family's `sampler`) for --steps steps with
classifier-free guidance, so every step is one denoiser forward on a doubled batch (the dominant
cost of sampling). Speedups are the full model's seconds per call over each model's, measured in
the same run; the paper reports 1.46x (D19), 1.96x (D14) and 3.88x (D7) for DiT.
On a shared CPU pass `--threads 1`: two threads competing for busy cores stall each other.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # `python benchmarks/bench_sampling.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import (add_common_args, bench_model, fmt_ratio, hardware, latent_shape, markdown_table, ratio,
                               resolve, set_tf32, time_interleaved)
from tinyfusion.cli import sampling_flags
from tinyfusion.families import family_for
from tinyfusion.sampling import prepare_denoiser

MODELS = {"DiT": ["DiT-XL/2", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2"],
          "SiT": ["SiT-XL/2", "SiT-D14/2"],
          "MAR": ["MAR-L", "MAR-L-D16"]}
PAPER = {"DiT-D19/2": 1.46, "DiT-D14/2": 1.96, "DiT-D7/2": 3.88}  # TinyFusion's speedups over DiT-XL/2
TARGETS = {"DiT-D14/2": 1.95, "DiT-D7/2": 3.8}
PRESETS = dict(cpu=dict(image_size=128, batch_size=1, steps=2, iters=2),
               cuda=dict(image_size=256, batch_size=32, steps=10, warmup=2, iters=3),
               smoke=dict(image_size=32, batch_size=2, steps=1, iters=1))
# MAR: the unpruned DiffLoss samples every token once per call whatever the number of AR iterations,
# so the speedup depends on iterations per token; keep the paper's 64 iterations for 256 tokens.
MAR_PRESETS = dict(cpu=dict(image_size=64, steps=4, iters=1), cuda=dict(steps=64, iters=2), smoke={})


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--family", choices=sorted(MODELS), default="DiT")
    parser.add_argument("--models", nargs="+", default=None, help="first = the reference (default: per family)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (CPU default 128, CUDA 256)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per call (CFG doubles the batch)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per call (MAR: AR iterations)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: keep matmuls in full fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (sample.py --compile)")
    return parser


def sampler_args(family, steps):
    """The sampling scripts' own flags for `steps` denoiser passes per call, with the family's fixed-step sampler:
    DDPM for DiT, a fixed-step Euler ODE for SiT (dopri5's number of calls would depend on the weights),
    `steps` AR iterations for MAR."""
    return sampling_flags([*family.fixed_step_sampler_argv, "--num-sampling-steps", family.steps_for_passes(steps),
                           "--num-iter", steps])


def prepare(name, sampler, args, device):
    """(info row, zero-argument sampling call) of one model with random weights."""
    torch.manual_seed(0)
    model = prepare_denoiser(bench_model(name, args.image_size, args.smoke).to(device).eval(), args)
    z = torch.randn(args.batch_size, *latent_shape(name, args.image_size), device=device)  # MAR: only B and device
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)

    def call():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            sampler(model, z, y, args.cfg_scale)

    return {"model": name, "depth": model.depth, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}, call


def main(argv=None):
    args = build_parser().parse_args(argv)
    mar = {"MAR": MAR_PRESETS}.get(args.family, {})
    device = resolve(args, *({**PRESETS[k], **mar.get(k, {})} for k in ("cpu", "cuda", "smoke")))
    set_tf32(device, not args.no_tf32)
    names = args.models or MODELS[args.family]
    family = family_for(MODELS[args.family][0])
    sampler = family.sampler(sampler_args(family, args.steps))
    rows, calls = zip(*(prepare(name, sampler, args, device) for name in names))  # all models stay loaded
    times = time_interleaved(calls, device, args.warmup, args.iters)
    for row, seconds in zip(rows, times):
        row.update(seconds=seconds, images_per_s=args.batch_size / seconds, speedup=ratio(times[0], seconds))

    print(f"\n## Sampling throughput: {sampler.name}, batch {args.batch_size} (CFG x2), {args.image_size} px, "
          f"{args.precision}{', compiled' if args.compile else ''}"
          f"{' (smoke: tiny widths, numbers meaningless)' if args.smoke else ''}")
    print(hardware(device) + f"; median of {args.iters} round-robin call(s) after {args.warmup} warm-up\n")
    print(markdown_table(
        ["model", "depth", "params (M)", "s / call", "ms / step", "images/s", f"speedup vs {names[0]}", "paper"],
        [[r["model"], r["depth"], f"{r['params_m']:.1f}", f"{r['seconds']:.3f}",
          f"{1000 * r['seconds'] / args.steps:.1f}", f"{r['images_per_s']:.3f}", fmt_ratio(r["speedup"]),
          fmt_ratio(PAPER.get(r["model"]))] for r in rows]))
    print()
    for r in rows[1:]:
        target = TARGETS.get(r["model"])
        verdict = f"; target >= {target}x: {'met' if r['speedup'] >= target else 'NOT met'}" if target else ""
        print(f"{r['model']} samples {r['speedup']:.2f}x faster than {names[0]} "
              f"(depth {r['depth']}/{rows[0]['depth']} = {rows[0]['depth'] / r['depth']:.2f}x fewer blocks){verdict}")
    return list(rows)


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
