"""Sample N images for FID with one process or torchrun, into one ADM .npz batch (arr_0, uint8 NHWC).

    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --model DiT-D14/2 \
        --ckpt outputs/D14-Learned-Finetuning/checkpoints/0500000.pt
    torchrun --nproc_per_node=8 sample_ddp.py ODE --model SiT-XL/2 --ckpt SiT-XL-2-256x256.pt --sampling-method heun2

Every sample depends only on (--global-seed, its index), not on the number of processes, and an
interrupted run resumes where it stopped (finished batches are kept in <sample-dir>/<name>/parts/).
Guidance is applied only when --cfg-scale > 1. Then: python evaluator.py <ref batch> <this npz>.
"""
import argparse

from tinyfusion.cli import add_image_args, add_transport_args
from tinyfusion.errors import run_main
from tinyfusion.runtime import setup_runtime
from tinyfusion.sample_job import check_args, sample_fid_batch
from tinyfusion.sampling import add_sampler_args, check_cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=str, default="DiT-XL/2")
    parser.add_argument("--ckpt", type=str, default=None, help="official, training, pruned or .safetensors weights, "
                        "or a release name (default for DiT-XL/2, SiT-XL/2: the official release, fetched)")
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    add_image_args(parser, vae="ema")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs (faster, slightly different numbers)")
    parser.add_argument("--out", type=str, default=None, help="npz path (default <sample-dir>/<name>.npz)")
    parser.add_argument("--save-png", action="store_true", help="also write <sample-dir>/<name>/{index:06d}.png")
    parser.add_argument("--keep-parts", action="store_true", help="keep the per-batch parts after the npz is written")
    parser.add_argument("--device", type=str, default=None, help="default: cuda:LOCAL_RANK if there is a GPU, else cpu")
    add_sampler_args(parser)
    add_transport_args(parser)
    args = parser.parse_args(argv)
    check_cfg(args.cfg_scale)
    check_args(args)  # before joining the process group: bad flags fail fast on every rank
    rt = setup_runtime(args.device, tf32=args.tf32)
    try:
        sample_fid_batch(args, rt)
    finally:
        rt.shutdown()


if __name__ == "__main__":
    run_main(main)
