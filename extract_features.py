"""
Encode an ImageFolder with the SD VAE into a sharded, memory-mapped feature store for fast training.

    torchrun --nproc_per_node=8 extract_features.py --data-path data/imagenet/train \
        --features-path data/imagenet_encoded --image-size 256 --vae ema
MAR (KL-16 posterior moments, as MAR's main_cache.py):  ... --model MAR-L --features-path data/imagenet_kl16
Text-to-image (PixArt, SD3): images listed in a JSONL captions file ({"image": relpath, "caption": text} per
line), latents from <pipeline>/vae and the prompt embeddings of the pipeline's own encode_prompt:
    ... --data-path data/images --captions data/captions.jsonl --pipeline pretrained/PixArt-XL-2-512x512 \
        --features-path data/pixart_encoded --image-size 512

Each entry holds the latent of the image and of its horizontal flip. Killed runs resume where they
stopped (finished shards are kept), and the result does not depend on the number of processes.
Format: see tinyfusion/data.py. Training scripts read it (and the TinyFusion/fast-DiT and MAR
layouts) with tinyfusion.data.open_feature_store.
"""
import argparse

from core.errors import UserError
from tinyfusion.errors import run_main
from tinyfusion.features import extract_features
from tinyfusion.runtime import setup_runtime


def main(args):
    from tinyfusion.families import family_for
    family = family_for(args.model) if args.model is not None else None  # its encoder (MAR: KL-16)
    rt = setup_runtime(args.device)
    try:
        batch_size = rt.per_rank(args.global_batch_size) if args.global_batch_size else args.batch_size
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be >= 1")
        extract_features(args.data_path, args.features_path, image_size=args.image_size, vae=args.vae,
                         batch_size=batch_size, num_workers=args.num_workers, global_seed=args.global_seed,
                         dtype=args.dtype, store=args.store, shard_size=args.shard_size, limit=args.limit,
                         channels=args.channels, runtime=rt, channels_last=args.channels_last,
                         bad_images=args.bad_images, captions=args.captions, pipeline=args.pipeline,
                         max_sequence_length=args.max_sequence_length, text_dtype=args.text_dtype, family=family)
    finally:
        rt.shutdown()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data-path", type=str, required=True,
                        help="ImageFolder root (one subfolder per class), or with --captions the folder its image paths "
                             "are relative to")
    parser.add_argument("--features-path", "--feature-path", type=str, required=True, help="output store folder")
    parser.add_argument("--model", type=str, default=None,
                        help="the family whose VAE encodes: DiT/SiT (SD VAE, the default) or MAR (KL-16: --vae "
                             "defaults to kl16.ckpt and the store to moments, as MAR's main_cache.py)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", type=str, default=None,
                        help="ema | mse | <hub id> | <local folder> | none; MAR: a KL-16 checkpoint "
                             "(default: <pipeline>/vae with --pipeline; MAR kl16.ckpt; else ema)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--global-batch-size", type=int, default=None, help="split over the processes")
    batch.add_argument("--batch-size", type=int, default=32, help="images per process and step")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--global-seed", type=int, default=0, help="seeds the VAE posterior samples")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="storage precision")
    parser.add_argument("--store", choices=["latents", "moments"], default=None,
                        help="latents: one sample x scale (reference); moments: mean|logvar, resampled per read "
                             "(default: moments for KL-16, as MAR's main_cache.py; latents otherwise)")
    parser.add_argument("--shard-size", type=int, default=50_000, help="images per shard")
    parser.add_argument("--limit", type=int, default=None, help="encode only N images, evenly spaced over the folder")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1 = grayscale (with --vae none)")
    parser.add_argument("--channels-last", action="store_true", help="encode with NHWC convolutions (often faster on GPUs)")
    parser.add_argument("--device", type=str, default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--bad-images", choices=["stop", "skip"], default="stop",
                        help="a file in the folder that is not a readable image: stop before any work, naming it, "
                             "or skip it (one warning line each; the list is recorded in the store)")
    text = parser.add_argument_group("text-to-image (PixArt-alpha/Sigma, SD3)")
    text.add_argument("--captions", type=str, default=None,
                      help='JSONL file, one {"image": <path relative to --data-path>, "caption": <text>} per line')
    text.add_argument("--pipeline", type=str, default=None,
                      help="local diffusers pipeline folder: its tokenizers and text encoders encode the captions "
                           "(model_index.json; the transformer is not loaded)")
    text.add_argument("--max-sequence-length", type=int, default=None,
                      help="text tokens (default: the pipeline's: PixArt-alpha 120, PixArt-Sigma 300, SD3 256)")
    text.add_argument("--text-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                      help="precision the text encoders compute in (storage follows --dtype)")
    return parser


if __name__ == "__main__":
    run_main(lambda: main(build_parser().parse_args()))
