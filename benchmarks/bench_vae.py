"""SD-VAE encode and decode throughput: NCHW vs channels-last, fp32 vs bf16 autocast.

    python benchmarks/bench_vae.py --threads 1        # CPU: 64 px, batch 2
    python benchmarks/bench_vae.py                    # CUDA: 256 px, batch 32

The VAE is the sd-vae-ft-ema architecture (diffusers AutoencoderKL, 128-256-512-512 channels, two
ResNet blocks per level) with random weights, through the library's own wrapper
(`tinyfusion.vae.SDVAE`), so the timed path is what extract_features.py (encode) and the sampling
scripts (decode) run. Each row is timed round-robin with the others, and its outputs are checked
against the fp32 NCHW row's.
"""
import argparse
import copy
import os
import sys

if __package__ in (None, ""):  # `python benchmarks/bench_vae.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import add_common_args, fmt_ratio, hardware, markdown_table, ratio, resolve, time_interleaved
from tinyfusion.vae import SDVAE

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)  # sd-vae-ft-ema
SMOKE_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
PRESETS = dict(cpu=dict(image_size=64, batch_size=2), cuda=dict(image_size=256, batch_size=32, warmup=2, iters=5),
               smoke=dict(image_size=32, batch_size=1, iters=1))
ROWS = [("NCHW", "fp32"), ("channels-last", "fp32"), ("NCHW", "bf16"), ("channels-last", "bf16")]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--image-size", type=int, default=None, help="pixels (CPU default 64, CUDA 256)")
    parser.add_argument("--batch-size", type=int, default=None)
    return parser


def make_vae(smoke, device):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    cfg = SMOKE_VAE if smoke else SD_VAE
    levels = len(cfg["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         latent_channels=4, **cfg).to(device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    autoencoder = make_vae(args.smoke, device)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    z = torch.randn(args.batch_size, 4, args.image_size // 8, args.image_size // 8, device=device)

    # one copy per layout, so no call pays for converting the weights
    vaes = {"NCHW": SDVAE(autoencoder), "channels-last": SDVAE(copy.deepcopy(autoencoder)).use_channels_last()}

    def call(layout, precision, what):
        vae = vaes[layout]

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return vae.moments(x)[0] if what == "encode" else vae.decode(z)
        return run

    rows = []
    for what in ("encode", "decode"):
        calls = [call(layout, precision, what) for layout, precision in ROWS]
        reference = calls[0]().float()
        errors = [(c().float() - reference).abs().max().item() for c in calls]
        times = time_interleaved(calls, device, args.warmup, args.iters)
        for (layout, precision), seconds, err in zip(ROWS, times, errors):
            rows.append(dict(what=what, layout=layout, precision=precision, seconds=seconds, max_abs_diff=err,
                             images_per_s=args.batch_size / seconds, speedup=ratio(times[0], seconds)))

    print(f"\n## SD-VAE: batch {args.batch_size}, {args.image_size} px"
          f"{' (smoke: tiny widths, numbers meaningless)' if args.smoke else ''}")
    print(hardware(device) + f"; median of {args.iters} round-robin call(s) after {args.warmup} warm-up\n")
    print(markdown_table(["pass", "layout", "precision", "s / batch", "images/s", "speedup x NCHW fp32",
                          "max abs diff x NCHW fp32"],
                         [[r["what"], r["layout"], r["precision"], f"{r['seconds']:.3f}", f"{r['images_per_s']:.2f}",
                           fmt_ratio(r["speedup"]), f"{r['max_abs_diff']:.1e}"] for r in rows]))
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
