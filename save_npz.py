"""Pack a folder of sampled images into an ADM sample batch (`arr_0`: uint8 N x H x W x 3).

Files are taken in sorted name order (png/jpg/jpeg), so leftovers from a rounded-up sampling run
(000000..050175.png) are cut at exactly --num. Example:

    python save_npz.py --image_dir samples/DiT-XL-2-size-256-cfg-1.5-seed-0 --num 50000
"""
import argparse

from tinyfusion.errors import run_main
from tinyfusion.npz import MAX_SAVE_IMAGES, image_folder_to_npz


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_dir", required=True, help="folder of equally sized RGB images")
    parser.add_argument("--num", type=int, default=None,
                        help=f"number of images to pack (default: all, at most {MAX_SAVE_IMAGES})")
    parser.add_argument("--out", default=None, help="output npz (default: <image_dir>.npz)")
    parser.add_argument("--bad-images", choices=["stop", "skip"], default="stop",
                        help="a file that is not a readable image: stop (naming it) or skip it with a warning")
    args = parser.parse_args(argv)

    out = args.out or args.image_dir.rstrip("/\\") + ".npz"
    n = image_folder_to_npz(args.image_dir, out, num=args.num, progress=True, bad_images=args.bad_images)
    print(f"Saved .npz file to {out} [shape=({n}, H, W, 3)].")


if __name__ == "__main__":
    run_main(main)
