"""Data-loading throughput: the sharded feature store vs the one-.npy-per-image reference layout.

    python benchmarks/bench_loader.py                          # 20,000 latents 4x32x32 fp32, cold page cache
    python benchmarks/bench_loader.py --count 5000 --warm      # smaller, page cache left warm

Both layouts hold the same random latents (and their flips) and are read through the trainer's own
DataLoader (`Trainer.loader`: GlobalBatchSampler keys (index, flip, seed), its workers, pinning and
prefetch). Before each timed pass every file of the layout is dropped from the page cache with
posix_fadvise(DONTNEED) ("cold-ish": a virtual disk may still cache below us). The first --warmup
batches (worker start-up) are not timed. Items are checked against the source arrays first.
"""
import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

if __package__ in (None, ""):  # `python benchmarks/bench_loader.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks.common import add_common_args, fmt_ratio, hardware, markdown_table, ratio, resolve, sync
from core.errors import UserError
from tinyfusion.data import open_feature_store
from tinyfusion.runtime import Runtime
from tinyfusion.synthetic import write_feature_store
from tinyfusion.trainer import GlobalBatchSampler, TrainConfig, Trainer

PRESETS = dict(cpu=dict(count=20000, batch_size=256, num_workers=2, warmup=2, iters=1),
               cuda=dict(count=20000, batch_size=256, num_workers=4, warmup=2, iters=1),
               smoke=dict(count=200, batch_size=32, num_workers=0, warmup=1, iters=1))
TARGET = 5.0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)  # here --warmup counts untimed batches, --iters timed passes (median)
    parser.add_argument("--count", type=int, default=None, help="latents in each store (default 20000)")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=[4, 32, 32])
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 256)")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None, help="batches per pass (default: one epoch)")
    parser.add_argument("--root", type=str, default=None, help="keep/reuse the stores here (default: a temp dir)")
    parser.add_argument("--warm", action="store_true", help="do not drop the files from the page cache")
    return parser


def source_arrays(count, shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, *shape), dtype=np.float32), rng.integers(0, 1000, count)


def write_stores(root, latents, labels):
    """root/sharded (extract_features' format) and root/reference/imagenet256_{features,labels}/{i}.npy,
    written only if missing (a matching --root is reused)."""
    sharded, ref = os.path.join(root, "sharded"), os.path.join(root, "reference")
    if not os.path.isfile(os.path.join(sharded, "manifest.json")):
        write_feature_store(sharded, latents, labels, num_classes=1000)
    feats, labs = os.path.join(ref, "imagenet256_features"), os.path.join(ref, "imagenet256_labels")
    if not os.path.isdir(labs) or len(os.listdir(labs)) != len(latents):
        os.makedirs(feats, exist_ok=True)
        os.makedirs(labs, exist_ok=True)
        for i, (x, y) in enumerate(zip(latents, labels)):
            np.save(os.path.join(feats, f"{i}.npy"), np.stack([x, x[..., ::-1]]))  # [image, flipped]
            np.save(os.path.join(labs, f"{i}.npy"), np.array([y]))
    os.sync()  # dirty pages cannot be dropped from the cache
    return sharded, ref


def check_store(store, latents, labels, source_index, keys):
    """Raise unless store[(i, flip)] equals the source latent (flipped along W for flip 1) and label."""
    for i, flip in keys:
        x, y = store[(i, flip)]
        j = source_index(i)
        want = latents[j][..., ::-1] if flip else latents[j]
        if not (np.array_equal(x.numpy(), want) and int(y) == labels[j]):
            raise RuntimeError(f"{store.path}: item {(i, flip)} differs from source latent {j}")


def files_of(path):
    return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".npy")]


def drop_from_cache(files):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_pass(store, args, device, seed):
    """Images/s of one pass of `args.batches` batches, the first `args.warmup` untimed."""
    # The trainer's own DataLoader, on a stand-in that carries just what Trainer.loader reads.
    trainer = SimpleNamespace(dataset=store, step=0, rt=Runtime(device=device),
                              config=TrainConfig(global_batch_size=args.batch_size, global_seed=seed,
                                                 num_workers=args.num_workers))
    loader = Trainer.loader(trainer)
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    start, images = time.perf_counter(), 0
    for _ in range(args.batches - args.warmup):
        x, _ = next(batches)
        images += len(x.to(device, non_blocking=True))
    sync(device)
    seconds = time.perf_counter() - start
    del batches, loader  # stops the workers
    return images / seconds


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    args.batches = args.batches or args.count // args.batch_size
    if args.batches <= args.warmup:
        raise UserError(f"--batches {args.batches} must exceed --warmup {args.warmup}: raise --count or --batches")
    latents, labels = source_arrays(args.count, tuple(args.latent_shape))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        t0 = time.perf_counter()
        sharded_path, ref_path = write_stores(root, latents, labels)
        write_s = time.perf_counter() - t0
        stores = {"sharded (manifest + shards)": open_feature_store(sharded_path),
                  "reference (one .npy per image)": open_feature_store(ref_path)}
        keys = next(iter(GlobalBatchSampler(args.count, args.batch_size, 0, 1, seed=1)))[:8]
        keys = [(i, f) for i, f, _ in keys]
        ref_store = stores["reference (one .npy per image)"]
        check_store(stores["sharded (manifest + shards)"], latents, labels, lambda i: i, keys)
        check_store(ref_store, latents, labels, lambda i: int(ref_store.files[i][:-4]), keys)
        rows = []
        for name, store in stores.items():
            files = files_of(store.path)
            rates = []
            for p in range(args.iters):
                if not args.warm:
                    drop_from_cache(files)
                rates.append(read_pass(store, args, device, seed=p))
            rows.append({"layout": name, "files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
                         "images_per_s": float(np.median(rates))})
    for r in rows:
        r["ratio"] = ratio(r["images_per_s"], rows[1]["images_per_s"])

    item_mb = 4 * int(np.prod(args.latent_shape)) / 2**20
    print(f"\n## Loader throughput: {args.count} latents {'x'.join(map(str, args.latent_shape))} fp32 (+ flips), "
          f"global batch {args.batch_size}, {args.num_workers} worker(s), {'warm' if args.warm else 'cold-ish'} "
          f"page cache{' (smoke)' if args.smoke else ''}")
    print(hardware(device) + f"; {args.batches - args.warmup} timed batches per pass after {args.warmup} warm-up, "
          f"median of {args.iters} pass(es); stores written in {write_s:.1f} s\n")
    print(markdown_table(["layout", "files", "on disk", "images/s", "latent MB/s", "x reference"],
                         [[r["layout"], r["files"], f"{r['bytes'] / 2**20:.0f} MiB", f"{r['images_per_s']:.0f}",
                           f"{r['images_per_s'] * item_mb:.1f}", fmt_ratio(r["ratio"])] for r in rows]))
    verdict = "met" if rows[0]["ratio"] >= TARGET else "NOT met"
    print(f"\nthe sharded store loads {rows[0]['ratio']:.2f}x faster than the reference layout "
          f"(target >= {TARGET}x: {verdict})")
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
