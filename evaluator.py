"""Evaluate a sample batch against a reference batch with ADM's suite (IS, FID, sFID, Precision, Recall).

A PyTorch port of guided-diffusion's `evaluations/evaluator.py` (TF1): same Inception graph (converted
weights), same resize, features and metric numerics. Example:

    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples/DiT-XL-2.npz \
        --inception-weights pt_inception-2015-12-05-6726825d.pth

The digits demo swaps the feature network, not the metrics: `--feature-net digits` uses the shipped
digit classifier (tinyfusion/digits.py; no sFID) against prepare_digits.py's data/digits_ref.npz.
"""
import argparse
import json
import math

import torch

from core.errors import UserError
from tinyfusion.cli import add_cache_arg
from tinyfusion.errors import run_main
from tinyfusion.inception import WEIGHTS_ENV, WEIGHTS_FILE, InceptionExtractor, load_inception
from tinyfusion.metrics import evaluate, format_report
from tinyfusion.outputs import check_output_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_batch", help="reference batch npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", help="sample batch npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("--inception-weights", default=None,
                        help=f"pytorch-fid Inception weights (.pth); default ${WEIGHTS_ENV}, else {WEIGHTS_FILE} "
                             f"(fetched into the cache when missing)")
    add_cache_arg(parser)
    parser.add_argument("--feature-net", choices=["inception", "digits"], default="inception",
                        help="features for the metrics: ADM's Inception, or the digits demo's classifier")
    parser.add_argument("--digits-classifier", default=None,
                        help="--feature-net digits: classifier weights (default assets/digits_classifier.safetensors)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    check_output_file(args.json, "--json")  # before the feature passes, not after them

    if args.feature_net == "digits":
        from tinyfusion.digits import DigitsExtractor, load_digits_classifier
        extractor = DigitsExtractor(load_digits_classifier(args.digits_classifier), args.device)
    else:
        extractor = InceptionExtractor(load_inception(args.inception_weights), args.device)
    results = evaluate(args.ref_batch, args.sample_batch, extractor, batch_size=args.batch_size,
                       device=args.device, progress=True, log=print)
    bad = [k for k, v in results.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise UserError(f"{', '.join(bad)} came out non-finite ({', '.join(f'{k}={results[k]}' for k in bad)}): "
                        f"check both batches ({args.ref_batch}, {args.sample_batch})")
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)


if __name__ == "__main__":
    run_main(main)
