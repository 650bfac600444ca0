"""The feature-extraction job behind extract_features.py: ImageFolder (class labels) or captioned images
(prompt embeddings from a diffusers pipeline's text encoders) -> sharded latent store.

Layout and reader: see tinyfusion/data.py. How the job stays exact and restartable:
  * Work split: every shard is cut into one contiguous slice per rank; all ranks write their slice
    into shared, memory-mapped `.latents-{k}.partial.npy` (and `.<cond name>-{k}.partial.npy` for text),
    then rank 0 renames them into place, writes the labels and a `shard-{k}.done` marker. A killed run leaves at most a partial file,
    which a restart overwrites; finished shards are skipped. manifest.json is written last.
  * Determinism: the VAE noise of store entry i comes from a CPU generator seeded with
    (global_seed, i) (first the image's noise, then the flipped image's), so the store does not
    depend on the world size, the batch size or the GPU. A restart with different content-relevant
    settings (image size, VAE, dtype, shard size, limit, seed, store kind; captions file content, text
    encoder, max sequence length) is refused.
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
from .data import (FORMAT_VERSION, TEXT_FORMAT_VERSION, drop_unreadable_images, open_captioned_images,
                   open_image_folder, unreadable_images)
from .download import sha256_of
from .families import Family
from .outputs import check_output_dir
from .runtime import setup_runtime
from .text import load_prompt_encoder
from .vae import gaussian_noise, sample_moments, scale_latents

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


def _names(k, arrays=("latents", "labels")):
    """File names of shard k: one .npy per array (latents, labels or conditioning tensors), its partial, its marker."""
    names = {a: f"{a}-{k:05d}.npy" for a in arrays}
    names.update({f"partial:{a}": f".{a}-{k:05d}.partial.npy" for a in arrays}, done=f"shard-{k:05d}.done")
    return names


def _write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


def _save_npy(path, array):
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _shard_done(root, k, start, end, item_shapes):
    """True when shard k is complete on disk: its marker matches and every array has n_k x its item shape."""
    n = _names(k, item_shapes)
    try:
        with open(os.path.join(root, n["done"])) as f:
            done = json.load(f)
        shapes = {a: np.load(os.path.join(root, n[a]), mmap_mode="r").shape for a in item_shapes}
    except (OSError, ValueError):
        return False
    return done == {"start": start, "count": end - start} and all(
        shapes[a] == (end - start,) + tuple(shape) for a, shape in item_shapes.items())


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
        out = scale_latents(sample_moments(mean, logvar, noise), vae.scale, vae.shift)
    else:
        out = vae.encode(both)
    b = x.shape[0]
    return torch.stack([out[:b], out[b:]], dim=1).float().cpu().numpy()


def _exit_hook():
    spec = os.environ.get("TINYFUSION_EXTRACT_EXIT_AT")
    return tuple(int(v) for v in spec.split(":")) if spec else None


def _open_data(data_path, captions, image_size, coder, channels):
    if captions is None:
        return open_image_folder(data_path, image_size, coder.downsample, random_flip=False, channels=channels)
    return open_captioned_images(data_path, captions, image_size, coder.downsample, channels=channels)


def _text_settings(encoder, captions, device, dtype):
    """The manifest entries of a text store and the empty prompt's tensors (which also fix the shapes)."""
    null = encoder([""], device)
    cond = {name: {"shape": list(t.shape[1:]), "dtype": np.dtype(DTYPES[dtype] if t.is_floating_point() else np.int8).name}
            for name, t in null.items()}
    return {"format_version": TEXT_FORMAT_VERSION, "conditioning": "text", "cond": cond,
            "text_encoder": encoder.info(), "captions": os.path.abspath(captions),
            "captions_sha256": sha256_of(captions)}, {name: t[0] for name, t in null.items()}


def extract_features(data_path, features_path, image_size=256, vae=None, batch_size=32, num_workers=4,
                     global_seed=0, dtype="fp32", store=None, shard_size=50_000, limit=None, channels=3,
                     runtime=None, channels_last=False, bad_images="stop", captions=None, pipeline=None,
                     max_sequence_length=None, text_dtype="fp32", family=None):
    """Encode an ImageFolder (or the images of a captions file, with their prompt embeddings from the text encoders
    of `pipeline`) into a sharded feature store; resumes an interrupted run. Returns the manifest.

    vae: None = the pipeline's vae/ with `pipeline`, else the family's default; a name, folder or checkpoint
    (`family.encoder`; no family: the SD VAE's load_vae), or an already loaded VAE object.
    store: None = the VAE's default (MAR's KL-16: "moments", as MAR's main_cache.py)."""
    rt = runtime or setup_runtime()
    if (captions is None) != (pipeline is None):
        raise UserError("--captions and --pipeline go together: the captions are encoded with the pipeline's text "
                        "encoders (pass both, or neither for an ImageFolder of classes)")
    if store not in (None, "latents", "moments"):
        raise UserError(f"--store {store}: use latents or moments")
    if shard_size < 1 or (limit is not None and limit < 1):
        raise UserError(f"--shard-size {shard_size} and --limit {limit} must be >= 1")
    check_output_dir(features_path, "--features-path")
    encoder = load_prompt_encoder(pipeline, rt.device, text_dtype, max_sequence_length) if pipeline else None
    if vae is None and pipeline:
        vae = os.path.join(os.path.expanduser(pipeline), "vae")
    coder = vae if hasattr(vae, "moments") else (family or Family()).encoder(vae, rt.device, channels, channels_last)
    store = store or coder.default_store
    if coder.in_channels != channels:
        raise UserError(f"VAE {coder.name} takes {coder.in_channels}-channel images, not --channels {channels}")
    if store == "moments" and not coder.stochastic:
        raise UserError("--store moments needs a VAE (pixels have no posterior): use --store latents with --vae none")
    dataset = _open_data(data_path, captions, image_size, coder, channels)
    skipped = drop_unreadable_images(dataset, bad_images, log=rt.print, scan=lambda paths: _scan_split(paths, rt))
    if not dataset.samples:
        raise UserError(f"{data_path} holds no readable images")
    indices = select_indices(len(dataset), limit)
    side = image_size // coder.downsample
    latent_shape = (coder.latent_channels, side, side)
    stored_shape = ((2 if store == "moments" else 1) * coder.latent_channels, side, side)
    local = isinstance(vae, (str, os.PathLike)) and os.path.exists(os.path.expanduser(vae))
    vae_id = os.path.abspath(os.path.expanduser(vae)) if local else coder.name
    settings = {"format_version": FORMAT_VERSION, "count": len(indices), "images_in_folder": len(dataset),
                "classes": getattr(dataset, "classes", None), "image_size": image_size, "channels": channels,
                "vae": vae_id, "scale_factor": coder.scale, "store": store, "dtype": np.dtype(DTYPES[dtype]).name,
                "shard_size": shard_size, "limit": limit, "global_seed": global_seed,
                "latent_shape": list(latent_shape), "stored_shape": list(stored_shape),
                "data_path": os.path.abspath(data_path)}
    null = None
    if encoder is not None:
        del settings["classes"]
        text, null = _text_settings(encoder, captions, rt.device, dtype)
        settings.update(text)
    if coder.shift:  # SD3's VAE; left out otherwise so that stores and restarts of older runs stay unchanged
        settings["shift_factor"] = coder.shift
    if skipped:  # part of the content: a restart that would skip other files is refused
        settings["skipped_images"] = [os.path.relpath(p, data_path) for p in skipped]
    # Per-item shape and dtype of every array a shard holds ("labels" only in class stores).
    arrays = {"latents": ((2,) + stored_shape, DTYPES[dtype])}
    arrays.update({n: (tuple(c["shape"]), np.dtype(c["dtype"])) for n, c in settings.get("cond", {}).items()})
    item_shapes = {a: shape for a, (shape, _) in arrays.items()}
    if encoder is None:
        item_shapes["labels"] = ()
    root = os.path.expanduser(features_path)
    _check_settings(root, settings)
    rt.barrier()
    if rt.is_main:
        os.makedirs(root, exist_ok=True)
        _write_json(os.path.join(root, "extract.json"), settings)
        for f in os.listdir(root):
            if f.endswith(".partial.npy"):
                os.remove(os.path.join(root, f))  # leftovers of a killed run
        for name, t in (null or {}).items():
            _save_npy(os.path.join(root, f"null-{name}.npy"), t.float().numpy().astype(arrays[name][1]))
    rt.barrier()

    shards = shard_bounds(len(indices), shard_size)
    pending = [k for k, (s, e) in enumerate(shards) if not _shard_done(root, k, s, e, item_shapes)]
    rt.print(f"{len(indices):,} images in {len(shards)} shards ({len(shards) - len(pending)} already done), "
             f"{rt.world_size} process(es), VAE {coder.name}, latents {latent_shape} stored as {store}/{dtype}"
             + (f", prompts through {encoder.class_name}.encode_prompt" if encoder else ""))
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
        names, t0 = _names(k, item_shapes), time.time()
        partials = {a: os.path.join(root, names[f"partial:{a}"]) for a in arrays}
        if rt.is_main:
            for a, (shape, np_dtype) in arrays.items():
                np.lib.format.open_memmap(partials[a], mode="w+", dtype=np_dtype, shape=(end - start,) + shape).flush()
        rt.barrier()
        out = {a: np.load(path, mmap_mode="r+") for a, path in partials.items()} if shard_batches else {}
        for b, positions in enumerate(shard_batches):
            if exit_at == (k, b):
                os._exit(17)
            x, targets = next(stream)
            rows = slice(positions[0] - start, positions[-1] + 1 - start)
            out["latents"][rows] = _encode_batch(coder, x.to(rt.device, non_blocking=True), positions, global_seed,
                                                 store)
            for name, t in (encoder(targets, rt.device) if encoder else {}).items():
                out[name][rows] = t.float().numpy() if t.is_floating_point() else t.numpy()
            bar.update(len(positions) * rt.world_size)
        for array in out.values():
            array.flush()
        del out
        rt.barrier()
        if rt.is_main:
            for a in arrays:
                os.replace(partials[a], os.path.join(root, names[a]))
            if encoder is None:
                _save_npy(os.path.join(root, names["labels"]),
                          np.asarray([dataset.targets[i] for i in indices[start:end]], dtype=np.int64))
            _write_json(os.path.join(root, names["done"]), {"start": start, "count": end - start})
            dt = time.time() - t0
            bar.write(f"shard {k + 1}/{len(shards)}: {end - start:,} images in {dt:.1f}s "
                      f"({(end - start) / max(dt, 1e-9):.1f} images/s)")
    bar.close()
    rt.barrier()
    manifest = _manifest(settings, shards, dataset, indices, item_shapes, encoder is not None)
    if rt.is_main:
        _write_json(os.path.join(root, "manifest.json"), manifest)
        rt.print(f"feature store complete: {root} ({len(indices):,} images, {len(shards)} shards)")
    rt.barrier()
    return manifest


def _manifest(settings, shards, dataset, indices, item_shapes, text):
    """manifest.json: the settings plus the shard list (and the label summary of class stores)."""
    manifest = {key: settings[key] for key in settings if key not in ("images_in_folder", "data_path")}
    manifest.update(flips=True, num_shards=len(shards))
    if text:
        names = [a for a in item_shapes if a != "latents"]
        manifest["null_cond"] = {n: f"null-{n}.npy" for n in names}
        manifest["shards"] = [{"latents": _names(k)["latents"], "count": e - s,
                               "cond": {n: f for n, f in _names(k, names).items() if n in names}}
                              for k, (s, e) in enumerate(shards)]
        return manifest
    kept_labels = [dataset.targets[i] for i in indices]
    manifest.update(num_classes=len(dataset.classes), label_range=[min(kept_labels), max(kept_labels)],
                    shards=[{"latents": _names(k)["latents"], "labels": _names(k)["labels"], "count": e - s}
                            for k, (s, e) in enumerate(shards)])
    return manifest
