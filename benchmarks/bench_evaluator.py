"""Evaluation cost: FID-Inception feature extraction (images/s) and the metric computations.

    python benchmarks/bench_evaluator.py                       # CPU: batch 8, FID on 4,096 x 2048 features
    python benchmarks/bench_evaluator.py --device cuda --batch-size 64 --num-feats 50000

Features come from `tinyfusion.inception.InceptionExtractor` over FIDInception3 with random weights
(the cost does not depend on the weights) on uint8 images of --image-size px, exactly as the
evaluator feeds it (host batch -> device, resize to 299, TF32 off). The metrics run the evaluator's
own functions on random features: FID = two `feature_stats` + `frechet_distance` (the 2048x2048
matrix square root dominates), precision/recall = `precision_recall` (k-NN radii + coverage, its
pairwise distances on --device).
"""
import argparse
import os
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/bench_evaluator.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from benchmarks.common import add_common_args, hardware, markdown_table, resolve, time_calls
from tinyfusion.inception import FIDInception3, InceptionExtractor
from tinyfusion.metrics import feature_stats, frechet_distance, precision_recall, tf32_disabled

PRESETS = dict(cpu=dict(batch_size=8, num_feats=4096, pr_feats=4096, feat_dim=2048, iters=2),
               cuda=dict(batch_size=64, num_feats=50000, pr_feats=50000, feat_dim=2048, warmup=2, iters=5),
               smoke=dict(batch_size=2, num_feats=256, pr_feats=256, feat_dim=64, iters=1))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--image-size", type=int, default=256, help="pixels of the sample images")
    parser.add_argument("--batch-size", type=int, default=None, help="images per Inception batch (ADM: 64)")
    parser.add_argument("--num-feats", type=int, default=None, help="features per batch for the FID statistics")
    parser.add_argument("--pr-feats", type=int, default=None, help="features per batch for precision/recall")
    parser.add_argument("--feat-dim", type=int, default=None, help="feature width (Inception pool_3: 2048)")
    return parser


def random_features(n, dim, seed):
    """Two (n, dim) float32 batches of standard normal features (reference, samples)."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, dim), dtype=np.float32) for _ in range(2))


def timed_once(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    torch.manual_seed(0)
    extractor = InceptionExtractor(FIDInception3(), device)
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    with tf32_disabled():
        seconds = time_calls(lambda: extractor(images), device, args.warmup, args.iters)
    feats = extractor(images)
    ref, sam = random_features(args.num_feats, args.feat_dim, seed=1)
    stats, stats_s = timed_once(lambda: (feature_stats(ref), feature_stats(sam)))
    fid, fid_s = timed_once(lambda: frechet_distance(*stats[1], *stats[0]))
    pr_ref, pr_sam = random_features(args.pr_feats, args.feat_dim, seed=2)
    (precision, recall), pr_s = timed_once(lambda: precision_recall(pr_ref, pr_sam, device=device))

    rows = [{"stage": f"Inception features, batch {args.batch_size} at {args.image_size} px", "seconds": seconds,
             "result": f"{args.batch_size / seconds:.1f} images/s", "images_per_s": args.batch_size / seconds},
            {"stage": f"FID statistics (mean, cov) of 2 x {args.num_feats} x {args.feat_dim}", "seconds": stats_s,
             "result": ""},
            {"stage": f"Frechet distance ({args.feat_dim}-d sqrtm)", "seconds": fid_s, "result": f"FID {fid:.3f}",
             "fid": fid},
            {"stage": f"precision/recall, 2 x {args.pr_feats} x {args.feat_dim}", "seconds": pr_s,
             "result": f"P {precision:.3f}, R {recall:.3f}", "precision": precision, "recall": recall}]
    print(f"\n## Evaluator cost{' (smoke)' if args.smoke else ''}")
    print(hardware(device) + f"; Inception: median of {args.iters} batch(es) after {args.warmup} warm-up; "
          f"metrics: one run each\n")
    print(markdown_table(["stage", "seconds", "result"],
                         [[r["stage"], f"{r['seconds']:.3f}", r["result"]] for r in rows]))
    print("\noutputs per image: " + ", ".join(f"{k} {v.shape[1]}" for k, v in feats.items()))
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
