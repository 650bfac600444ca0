"""Fetch released checkpoints into the cache folder (default pretrained_models/, or $TINYFUSION_CACHE).

    python download.py                        # every release
    python download.py DiT-XL-2-256x256.pt MAR-L --cache-dir /scratch/weights

Scripts fetch a release themselves when its name is passed where a checkpoint path goes
(e.g. --ckpt DiT-XL-2-256x256.pt); this script is for machines where the jobs have no network.
"""
import argparse
import os

from tinyfusion.checkpoint import load_checkpoint, read_weights
from tinyfusion.cli import add_cache_arg
from tinyfusion.download import RELEASES, fetch, sha256_of
from tinyfusion.errors import run_main


def find_model(name_or_path):
    """State dict of a release name (downloaded when missing) or of a local checkpoint (its EMA when it has one)."""
    return read_weights(name_or_path)


def download_model(name):
    """Download release `name` into the cache folder if it is not there; returns the loaded checkpoint."""
    return load_checkpoint(fetch(name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(RELEASES)}")
    add_cache_arg(parser)
    args = parser.parse_args(argv)
    for name in args.names or RELEASES:
        path = fetch(name)
        # printed so the size and checksum can be recorded in tinyfusion/download.py's table
        print(f"{name}: {path} ({os.path.getsize(path)} bytes, sha256 {sha256_of(path)})")


if __name__ == "__main__":
    run_main(main)
