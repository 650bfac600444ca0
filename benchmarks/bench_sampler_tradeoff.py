"""Speed vs sample quality of fewer-step DiT samplers, on the shipped digits teacher.

    python benchmarks/bench_sampler_tradeoff.py --threads 1            # DDPM 250/100/50/25, DDIM 50/25/10, 200 digits
    python benchmarks/bench_sampler_tradeoff.py --rows ddpm-250 ddim-25 --num-samples 1000

Every row samples the same --num-samples digits (classes 0..9 in turn, the same per-image seeds) from
assets/digits_teacher.safetensors (DiT-Tiny/2, 1x8x8 pixels) with `tinyfusion.digits.sample_digits`,
CFG 1.5 on all channels, as `evaluate_teacher` does. The samples are scored with the digits classifier
against the held-out digits (data/digits_ref.npz, written by `python prepare_digits.py`) by the
evaluator's own `metrics.evaluate`: class accuracy, feature FID, precision and recall. Timed: the whole
`sample_digits` call (every denoiser pass on the CFG-doubled batch, the per-image noise, uint8 output).
"""
import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # `python benchmarks/bench_sampler_tradeoff.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks.common import add_common_args, fmt_ratio, hardware, markdown_table, ratio, resolve, time_interleaved
from core.errors import UserError
from tinyfusion.digits import (NUM_CLASSES, TEACHER_CFG, DigitsExtractor, class_accuracy, load_digits_classifier,
                               load_digits_teacher, sample_digits, write_digits_data)
from tinyfusion.metrics import evaluate
from tinyfusion.npz import write_sample_batch

ROWS = ["ddpm-250", "ddpm-100", "ddpm-50", "ddpm-25", "ddim-50", "ddim-25", "ddim-10"]
# 200 digits: ~5 min on one CPU thread (500 took 12 min, DDPM-250 alone 6). FID's bias depends on N,
# so CPU and CUDA use the same N and their tables stay comparable.
PRESETS = dict(cpu=dict(num_samples=200, iters=1), cuda=dict(num_samples=200, iters=1),
               smoke=dict(num_samples=20, rows=["ddpm-10", "ddim-5"], iters=1))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--rows", nargs="+", default=None, metavar="SAMPLER-STEPS",
                        help=f"first = the reference (default: {' '.join(ROWS)})")
    parser.add_argument("--num-samples", type=int, default=None, help="digits per row (default 200)")
    parser.add_argument("--cfg-scale", type=float, default=TEACHER_CFG)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-batch", default="data/digits_ref.npz",
                        help="held-out digits (built into a temp dir when missing)")
    return parser


def parse_row(text):
    sampler, _, steps = text.lower().partition("-")
    if sampler not in ("ddpm", "ddim") or not steps.isdigit() or int(steps) < 1:
        raise UserError(f"--rows {text}: expected SAMPLER-STEPS with SAMPLER ddpm or ddim, e.g. ddim-25")
    return sampler, int(steps)


def reference_batch(path, tmp):
    """`path`, or when it is missing the same held-out split prepare_digits.py writes (no download), built in `tmp`."""
    if os.path.isfile(path):
        return path
    write_digits_data(os.path.join(tmp, "digits"), os.path.join(tmp, "digits_ref.npz"))
    print(f"{path} is missing: built the held-out digits into a temp dir (`python prepare_digits.py` writes it)")
    return os.path.join(tmp, "digits_ref.npz")


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, *PRESETS.values())
    rows = [dict(zip(("sampler", "steps"), parse_row(r))) for r in args.rows or ROWS]
    if args.num_samples <= 3:  # precision/recall's k=3 neighbourhoods
        raise UserError(f"--num-samples {args.num_samples}: need at least 4 samples")
    teacher = load_digits_teacher(device=device)
    extractor = DigitsExtractor(load_digits_classifier(), device)
    labels = np.arange(args.num_samples) % NUM_CLASSES  # classes 0..9 in turn, as evaluate_teacher

    def call(row):  # keeps the images of its last call for scoring (every call gives the same ones)
        def fn():
            row["images"] = sample_digits(teacher, labels, row["steps"], args.cfg_scale, args.seed, row["sampler"],
                                          device)
        return fn

    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_batch(args.ref_batch, tmp)  # before the long sampling, so a failure comes first
        for _ in range(args.warmup):  # untimed: first-call costs at the timed batch size, 2 steps per sampler
            for sampler in sorted({r["sampler"] for r in rows}):
                sample_digits(teacher, labels, 2, args.cfg_scale, args.seed, sampler, device)
        times = time_interleaved([call(r) for r in rows], device, 0, args.iters)
        for row, seconds in zip(rows, times):
            path = os.path.join(tmp, "samples.npz")
            write_sample_batch(path, row["images"])
            metrics = evaluate(ref, path, extractor, device=device)
            row.update(seconds=seconds, images_per_s=args.num_samples / seconds, speedup=ratio(times[0], seconds),
                       accuracy=class_accuracy(extractor, row.pop("images"), labels), fid=metrics["FID"],
                       precision=metrics["precision"], recall=metrics["recall"])

    name = f"{rows[0]['sampler'].upper()}-{rows[0]['steps']}"
    print(f"\n## Sampler speed vs quality: digits teacher (DiT-Tiny/2, 8x8), {args.num_samples} samples, "
          f"CFG {args.cfg_scale} on all channels, seed {args.seed}"
          f"{' (smoke: too few samples for the numbers to mean anything)' if args.smoke else ''}")
    print(hardware(device) + f"; median of {args.iters} round-robin call(s) after {args.warmup} warm-up\n")
    print(markdown_table(
        ["sampler", "steps", f"s / {args.num_samples}", "images/s", f"speedup vs {name}", "class accuracy",
         "feature FID", "precision", "recall"],
        [[r["sampler"].upper(), r["steps"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.1f}", fmt_ratio(r["speedup"]),
          f"{r['accuracy']:.3f}", f"{r['fid']:.2f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"] for r in rows]))
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
