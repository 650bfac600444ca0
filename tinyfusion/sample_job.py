"""The FID sampling job behind sample_ddp.py: N class-conditional samples -> one ADM `.npz` batch.

How the job stays exact and restartable:
  * Determinism: sample i is a function of (global seed, i) only. Its class label and start noise
    come from a CPU generator seeded from (seed, i) (first randint(0, num_classes), then randn(latent
    shape)); its per-step DDPM/DDIM noise from a second generator seeded from (seed, i) as well.
  * Batches: the indices are cut into fixed chunks of --per-proc-batch-size (chunk b = [bB, (b+1)B)),
    so a batch holds the same samples whatever the number of processes and fp results match bit for
    bit. The chunks still to do are dealt round-robin to the ranks. SiT SDE and MAR draw internal noise
    from the global RNG, which is seeded per chunk from (seed, b): identical across world sizes for
    the same batch size.
  * Resume: each finished chunk is written atomically as `<folder>/parts/{b:06d}.npy` (uint8 NHWC RGB);
    a restart skips them. `parts/settings.json` refuses a restart with other sampling settings.
    At the end rank 0 streams the parts, in order, into the npz (exactly N images, key arr_0).
Test hook: TINYFUSION_SAMPLE_EXIT_AFTER=k hard-exits (code 17) after k chunks of this process.
"""
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError
from .checkpoint import atomic_path
from .cli import create_model, latent_shape_for
from .download import default_checkpoint, resolve
from .families import family_for
from .npz import NpzWriter
from .outputs import check_output_dir, check_output_file
from .sampling import denoiser_precision, per_sample_noise, prepare_denoiser, to_uint8

STREAM_INPUTS, STREAM_STEPS, STREAM_CHUNK = 0, 1, 2
# Flags that only say where and how many images go: a restart may change them.
NOT_CONTENT = ("num_fid_samples", "sample_dir", "out", "save_png", "keep_parts", "device", "channels_last",
               "compile", "cache_dir")


def derived_seed(global_seed, index, stream):
    """63-bit torch seed of one random stream of sample (or chunk) `index`; streams never collide."""
    state = np.random.SeedSequence([int(global_seed), int(stream), int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def draw_inputs(global_seed, indices, latent_shape, num_classes):
    """(labels, start noise) of the given sample indices: per sample, randint then randn from its generator."""
    ys, zs = [], []
    for i in indices:
        g = torch.Generator().manual_seed(derived_seed(global_seed, i, STREAM_INPUTS))
        ys.append(torch.randint(0, num_classes, (1,), generator=g))
        zs.append(torch.randn(latent_shape, generator=g))
    return torch.cat(ys), torch.stack(zs)


def chunk_range(b, batch_size, total):
    return range(b * batch_size, min((b + 1) * batch_size, total))


def to_rgb_uint8(images):
    """[-1, 1] NCHW -> uint8 NHWC with 3 channels (a gray image repeats its channel, as ADM needs RGB)."""
    arr = to_uint8(images)
    return np.repeat(arr, 3, axis=3) if arr.shape[3] == 1 else arr


def folder_name(args, sampler_name):
    """The official DiT name, `{model}-{ckpt}-size-{S}-vae-{vae}-cfg-{cfg}-seed-{seed}`, plus the sampler."""
    ckpt = os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else "pretrained"  # official name
    vae = os.path.basename(os.path.normpath(args.vae)) if args.vae else "none"
    return (f"{args.model.replace('/', '-')}-{ckpt}-size-{args.image_size}-vae-{vae}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{sampler_name}")


class PartStore:
    """Finished chunks on disk: `parts/{b:06d}.npy`, each written atomically."""

    def __init__(self, folder):
        self.root = os.path.join(folder, "parts")

    def path(self, b):
        return os.path.join(self.root, f"{b:06d}.npy")

    def done(self, b, count):
        try:
            arr = np.load(self.path(b), mmap_mode="r")
        except (OSError, ValueError):
            return False
        return arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == count and arr.shape[3] == 3

    def save(self, b, arr):
        with atomic_path(self.path(b)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)

    def check_settings(self, settings, write):
        """Refuse parts made with other settings; rank 0 (`write`) records them on a fresh start."""
        path = os.path.join(self.root, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            shown = settings_diff(old, settings)
            if shown:
                raise UserError(f"{self.root} holds samples made with other settings ({shown}): rerun with the "
                                f"original flags, pass another --sample-dir, or delete {self.root}")
        elif write:
            with atomic_path(path) as tmp:
                with open(tmp, "w") as f:
                    json.dump(settings, f, indent=1)


def settings_diff(old, new):
    """'key: old -> new, ...' for the first keys that differ, '' when the settings are the same."""
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r:.40} -> {new.get(k)!r:.40}" for k in diff[:4])


def settings_path(out_path):
    """Where the settings of a finished batch are recorded: x.npz -> x.settings.json (the npz stays pure ADM)."""
    return os.path.splitext(out_path)[0] + ".settings.json"


def finished_batch(out_path, record):
    """True when `out_path` is a finished batch made with exactly `record`; refuses any other existing file,
    so a finished result is never overwritten."""
    if not os.path.exists(out_path):
        return False
    try:
        with open(settings_path(out_path)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{out_path} already exists and has no readable record of how it was made "
                        f"({settings_path(out_path)}): pass another --out (or --sample-dir), or delete it to sample "
                        f"again") from None
    shown = settings_diff(old, record)
    if shown:
        raise UserError(f"{out_path} is a finished batch made with other settings ({shown}): pass another --out "
                        f"(or --sample-dir) for this one, or delete it to replace it")
    return True


def _exit_after():
    spec = os.environ.get("TINYFUSION_SAMPLE_EXIT_AFTER")
    return int(spec) if spec else None


def _save_pngs(folder, start, arr):
    from PIL import Image
    for k, row in enumerate(arr):
        Image.fromarray(row).save(os.path.join(folder, f"{start + k:06d}.png"))


def merge_parts(store, num_chunks, batch_size, total, out_path):
    """Stream the parts, in chunk order, into an ADM npz of exactly `total` images; returns its shape."""
    for b in range(num_chunks):
        if not store.done(b, len(chunk_range(b, batch_size, total))):
            raise UserError(f"{store.path(b)} is missing or incomplete: rerun the same command to finish it")
    row_shape = np.load(store.path(0), mmap_mode="r").shape[1:]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with NpzWriter(out_path, total, row_shape) as writer:
        for b in range(num_chunks):
            writer.write(np.load(store.path(b)))
    return (total, *row_shape)


def check_args(args):
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1:
        raise UserError(f"--num-fid-samples {args.num_fid_samples} and --per-proc-batch-size "
                        f"{args.per_proc_batch_size} must be >= 1")
    if args.global_seed < 0:
        raise UserError(f"--global-seed {args.global_seed} must be >= 0")
    if not args.ckpt:
        default_checkpoint(args.model, args.image_size, args.num_classes)  # raises where there is no release


def sample_fid_batch(args, rt):
    """Run the whole job on runtime `rt`; returns the npz path on rank 0 (None elsewhere)."""
    family = family_for(args.model)
    sampler = family.sampler(args)  # bad sampler flags (or a family sampled elsewhere) fail before anything is loaded
    check_args(args)
    shape = latent_shape_for(args)
    folder = os.path.join(args.sample_dir, folder_name(args, sampler.name))
    out_path = args.out or f"{folder}.npz"
    total, bs = args.num_fid_samples, args.per_proc_batch_size
    num_chunks = math.ceil(total / bs)
    store = PartStore(folder)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONTENT}
    record = json.loads(json.dumps({**settings, "num_fid_samples": total}))  # as it reads back from the record
    if finished_batch(out_path, record):
        rt.print(f"{out_path} is already finished ({total:,} samples with these settings): nothing to do")
        return out_path if rt.is_main else None
    check_output_file(out_path, "--out")
    check_output_dir(folder, "--sample-dir")

    ckpt = resolve(args.ckpt or default_checkpoint(args.model, args.image_size, args.num_classes))  # fetched first
    model = prepare_denoiser(create_model(args.model, shape, args.num_classes, ckpt).to(rt.device).eval(), args)
    decode = family.decoder(args.vae, rt.device, args.channels_last)
    if rt.is_main:
        os.makedirs(store.root, exist_ok=True)
        store.check_settings(settings, write=True)
    rt.barrier()
    store.check_settings(settings, write=False)
    # Every rank scans before anyone writes (barrier below), so all agree on the plan.
    todo = [b for b in range(num_chunks) if not store.done(b, len(chunk_range(b, bs, total)))]
    rt.barrier()
    mine = todo[rt.rank::rt.world_size]
    use_cfg = args.cfg_scale > 1.0  # as the official sample_ddp: plain forward at cfg 1
    rt.print(f"{total:,} samples in {num_chunks} chunks of {bs} ({num_chunks - len(todo)} already done), "
             f"{rt.world_size} process(es), {sampler.name}, cfg {args.cfg_scale}{'' if use_cfg else ' (off)'}")

    exit_after, t0, made = _exit_after(), time.time(), 0
    for n, b in enumerate(tqdm(mine, disable=not rt.is_main, unit="batch", dynamic_ncols=True)):
        if exit_after is not None and n >= exit_after:
            os._exit(17)
        idx = chunk_range(b, bs, total)
        y, z = draw_inputs(args.global_seed, idx, shape, args.num_classes)
        torch.manual_seed(derived_seed(args.global_seed, b, STREAM_CHUNK))  # SiT SDE / MAR internal noise
        noise_fn = per_sample_noise([derived_seed(args.global_seed, i, STREAM_STEPS) for i in idx], rt.device)
        with torch.no_grad():
            with denoiser_precision(args, rt.device):
                latents = sampler(model, z.to(rt.device), y.to(rt.device), args.cfg_scale, use_cfg=use_cfg,
                                  noise_fn=noise_fn)
            arr = to_rgb_uint8(decode(latents.float()))
        if args.save_png:
            _save_pngs(folder, idx.start, arr)
        store.save(b, arr)
        made += len(idx)
    elapsed = time.time() - t0
    made = int(rt.all_reduce_mean(torch.tensor([float(made)], device=rt.device)).item() * rt.world_size + 0.5)
    rt.print(f"sampled {made:,} images in {elapsed:.1f}s ({made / max(elapsed, 1e-9):.2f} images/s)")
    rt.barrier()
    if not rt.is_main:
        return None
    with atomic_path(settings_path(out_path)) as tmp:  # first: an npz is never left without its record
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
    npz_shape = merge_parts(store, num_chunks, bs, total, out_path)
    if not args.keep_parts:  # the npz holds them all now; keeping both would double the disk use
        shutil.rmtree(store.root)
        if not os.listdir(folder):
            os.rmdir(folder)
    print(f"saved .npz file to {out_path} [shape={npz_shape}]")
    return out_path
