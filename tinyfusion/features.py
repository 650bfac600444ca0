"""The feature-extraction job behind extract_features.py: ImageFolder -> sharded latent store.

Layout and reader: see tinyfusion/data.py. How the job stays exact and restartable:
  * Work split: every shard is cut into one contiguous slice per rank; all ranks write their slice
    into one shared, memory-mapped `.latents-{k}.partial.npy`, then rank 0 renames it into place,
    writes the labels and a `shard-{k}.done` marker. A killed run leaves at most a partial file,
    which a restart overwrites; finished shards are skipped. manifest.json is written last.
  * Determinism: the VAE noise of store entry i comes from a CPU generator seeded with
    (global_seed, i) (first the image's noise, then the flipped image's), so the store does not
    depend on the world size, the batch size or the GPU. A restart with different content-relevant
    settings (image size, VAE, dtype, shard size, limit, seed, store kind) is refused.
  * The flipped latent is the encoding of the center-cropped image flipped left-right (MAR's
    moments_flip; equal to DiT's crop-then-RandomHorizontalFlip).
Test hook: TINYFUSION_EXTRACT_EXIT_AT="k:b" hard-exits (code 17) before batch b of shard k on any
rank, to simulate a kill.
"""
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError
from .checkpoint import atomic_path
from .data import FORMAT_VERSION, drop_unreadable_images, open_image_folder, unreadable_images
from .outputs import check_output_dir
from .runtime import setup_runtime
from .vae import gaussian_noise, load_vae, sample_moments

DTYPES = {"fp32": np.float32, "fp16": np.float16}


def image_seed(global_seed, index):
    """Seed of the VAE noise for store entry `index` (independent of world size and batch size)."""
    return (int(global_seed) % 2**31) * 2**32 + int(index)


def select_indices(total, limit=None):
    """Dataset indices kept by --limit: evenly spaced over the sorted order (so all classes appear)."""
    if not limit or limit >= total:
        return list(range(total))
    return [i * total // limit for i in range(limit)]


def shard_bounds(count, shard_size):
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def rank_slice(start, end, rank, world_size):
    """Contiguous part of [start, end) that `rank` encodes."""
    n = end - start
    return start + n * rank // world_size, start + n * (rank + 1) // world_size


def _names(k):
    return {"latents": f"latents-{k:05d}.npy", "labels": f"labels-{k:05d}.npy",
            "partial": f".latents-{k:05d}.partial.npy", "done": f"shard-{k:05d}.done"}


def _write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


def _shard_done(root, k, start, end, stored_shape):
    """True when shard k is complete on disk: its marker matches and both arrays have the right shape."""
    n = _names(k)
    try:
        with open(os.path.join(root, n["done"])) as f:
            done = json.load(f)
        lat = np.load(os.path.join(root, n["latents"]), mmap_mode="r")
        lab = np.load(os.path.join(root, n["labels"]), mmap_mode="r")
    except (OSError, ValueError):
        return False
    return (done == {"start": start, "count": end - start} and lat.shape == (end - start, 2) + stored_shape
            and lab.shape == (end - start,))


def _check_settings(root, settings):
    """Refuse to resume a store that was started with different content-relevant settings."""
    path = os.path.join(root, "extract.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = [k for k in settings if k != "data_path" and old.get(k) != settings[k]]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r:.40} -> {settings[k]!r:.40}" for k in diff[:4])
        raise UserError(f"{root} holds an extraction with other settings ({shown}): use a new --features-path "
                        f"or rerun with the original flags")


def _scan_split(paths, rt):
    """unreadable_images over all ranks: each scans every world_size-th file, the results are gathered."""
    bad = unreadable_images(paths[rt.rank::rt.world_size])
    if rt.distributed:
        parts = [None] * rt.world_size
        torch.distributed.all_gather_object(parts, bad)
        bad = [b for part in parts for b in part]
    return bad


def _encode_batch(vae, x, positions, global_seed, store):
    """(B, 2, C', h, w) entries for a batch: index 1 is the flipped image."""
    both = torch.cat([x, x.flip(-1)])
    if store == "moments":
        out = torch.cat(vae.moments(both), dim=1)
    elif vae.stochastic:
        mean, logvar = vae.moments(both)
        # Per image: one generator, first the image's noise then the flip's (two draws, as two
        # successive diffusers latent_dist.sample(generator) calls would make).
        gens = [torch.Generator().manual_seed(image_seed(global_seed, p)) for p in positions]
        noise = gaussian_noise(mean.shape, gens + gens, mean.device, mean.dtype)
        out = sample_moments(mean, logvar, noise) * vae.scale
    else:
        out = vae.encode(both)
    b = x.shape[0]
    return torch.stack([out[:b], out[b:]], dim=1).float().cpu().numpy()


def _exit_hook():
    spec = os.environ.get("TINYFUSION_EXTRACT_EXIT_AT")
    return tuple(int(v) for v in spec.split(":")) if spec else None


def extract_features(data_path, features_path, image_size=256, vae="ema", batch_size=32, num_workers=4,
                     global_seed=0, dtype="fp32", store="latents", shard_size=50_000, limit=None, channels=3,
                     runtime=None, channels_last=False, bad_images="stop"):
    """Encode an ImageFolder into a sharded feature store; resumes an interrupted run. Returns the manifest."""
    rt = runtime or setup_runtime()
    if store not in ("latents", "moments"):
        raise UserError(f"--store {store}: use latents or moments")
    if shard_size < 1 or (limit is not None and limit < 1):
        raise UserError(f"--shard-size {shard_size} and --limit {limit} must be >= 1")
    check_output_dir(features_path, "--features-path")
    coder = load_vae(vae, rt.device, channels=channels, channels_last=channels_last)
    if coder.in_channels != channels:
        raise UserError(f"VAE {coder.name} takes {coder.in_channels}-channel images, not --channels {channels}")
    if store == "moments" and not coder.stochastic:
        raise UserError("--store moments needs a VAE (pixels have no posterior): use --store latents with --vae none")
    dataset = open_image_folder(data_path, image_size, coder.downsample, random_flip=False, channels=channels)
    skipped = drop_unreadable_images(dataset, bad_images, log=rt.print, scan=lambda paths: _scan_split(paths, rt))
    if not dataset.samples:
        raise UserError(f"{data_path} holds no readable images")
    indices = select_indices(len(dataset), limit)
    side = image_size // coder.downsample
    latent_shape = (coder.latent_channels, side, side)
    stored_shape = ((2 if store == "moments" else 1) * coder.latent_channels, side, side)
    vae_id = os.path.abspath(vae) if os.path.isdir(os.path.expanduser(vae)) else coder.name
    settings = {"format_version": FORMAT_VERSION, "count": len(indices), "images_in_folder": len(dataset),
                "classes": dataset.classes, "image_size": image_size, "channels": channels, "vae": vae_id,
                "scale_factor": coder.scale, "store": store, "dtype": np.dtype(DTYPES[dtype]).name,
                "shard_size": shard_size, "limit": limit, "global_seed": global_seed,
                "latent_shape": list(latent_shape), "stored_shape": list(stored_shape),
                "data_path": os.path.abspath(data_path)}
    if skipped:  # part of the content: a restart that would skip other files is refused
        settings["skipped_images"] = [os.path.relpath(p, data_path) for p in skipped]
    root = os.path.expanduser(features_path)
    _check_settings(root, settings)
    rt.barrier()
    if rt.is_main:
        os.makedirs(root, exist_ok=True)
        _write_json(os.path.join(root, "extract.json"), settings)
        for f in os.listdir(root):
            if f.endswith(".partial.npy"):
                os.remove(os.path.join(root, f))  # leftovers of a killed run
    rt.barrier()

    shards = shard_bounds(len(indices), shard_size)
    pending = [k for k, (s, e) in enumerate(shards) if not _shard_done(root, k, s, e, stored_shape)]
    rt.print(f"{len(indices):,} images in {len(shards)} shards ({len(shards) - len(pending)} already done), "
             f"{rt.world_size} process(es), VAE {coder.name}, latents {latent_shape} stored as {store}/{dtype}")
    # One batch list per rank, shard after shard, so one DataLoader streams the whole job.
    plan = []
    for k in pending:
        a, b = rank_slice(*shards[k], rt.rank, rt.world_size)
        plan.append((k, [list(range(p, min(p + batch_size, b))) for p in range(a, b, batch_size)]))
    batches = [[indices[p] for p in batch] for _, bs in plan for batch in bs]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=rt.device.type == "cuda")
    stream = iter(loader)
    bar = tqdm(total=sum(shards[k][1] - shards[k][0] for k in pending), disable=not rt.is_main,
               unit="img", dynamic_ncols=True)
    exit_at = _exit_hook()
    for k, shard_batches in plan:
        start, end = shards[k]
        names, t0 = _names(k), time.time()
        partial_path = os.path.join(root, names["partial"])
        if rt.is_main:
            np.lib.format.open_memmap(partial_path, mode="w+", dtype=DTYPES[dtype],
                                      shape=(end - start, 2) + stored_shape).flush()
        rt.barrier()
        out = np.load(partial_path, mmap_mode="r+") if shard_batches else None
        for b, positions in enumerate(shard_batches):
            if exit_at == (k, b):
                os._exit(17)
            x, _ = next(stream)
            entries = _encode_batch(coder, x.to(rt.device, non_blocking=True), positions, global_seed, store)
            out[positions[0] - start: positions[-1] + 1 - start] = entries
            bar.update(len(positions) * rt.world_size)
        if out is not None:
            out.flush()
            del out
        rt.barrier()
        if rt.is_main:
            os.replace(partial_path, os.path.join(root, names["latents"]))
            labels = np.asarray([dataset.targets[i] for i in indices[start:end]], dtype=np.int64)
            with atomic_path(os.path.join(root, names["labels"])) as tmp:
                np.save(tmp, labels)
            _write_json(os.path.join(root, names["done"]), {"start": start, "count": end - start})
            dt = time.time() - t0
            bar.write(f"shard {k + 1}/{len(shards)}: {end - start:,} images in {dt:.1f}s "
                      f"({(end - start) / max(dt, 1e-9):.1f} images/s)")
    bar.close()
    rt.barrier()
    manifest = {key: settings[key] for key in settings if key not in ("images_in_folder", "data_path")}
    kept_labels = [dataset.targets[i] for i in indices]
    manifest.update(num_classes=len(dataset.classes), flips=True, num_shards=len(shards),
                    label_range=[min(kept_labels), max(kept_labels)],
                    shards=[{"latents": _names(k)["latents"], "labels": _names(k)["labels"], "count": e - s}
                            for k, (s, e) in enumerate(shards)])
    if rt.is_main:
        _write_json(os.path.join(root, "manifest.json"), manifest)
        rt.print(f"feature store complete: {root} ({len(indices):,} images, {len(shards)} shards)")
    rt.barrier()
    return manifest
