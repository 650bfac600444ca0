"""Write a feature store from in-memory arrays (tests, the digits demo), in extract_features' format."""
import json
import os

import numpy as np

from .checkpoint import atomic_path
from .data import FORMAT_VERSION


def write_feature_store(path, latents, labels, flipped=None, num_classes=None, vae="none", image_size=None,
                        scale_factor=1.0, classes=None):
    """latents (N, C, H, W) (+ optional flipped copies, default: flipped along W) and labels (N,) -> one shard."""
    latents = np.asarray(latents, dtype=np.float32)
    flipped = latents[..., ::-1] if flipped is None else np.asarray(flipped, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n, c, h, w = latents.shape
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "latents-00000.npy"), np.stack([latents, flipped], axis=1))
    np.save(os.path.join(path, "labels-00000.npy"), labels)
    num_classes = int(num_classes or labels.max() + 1)
    manifest = {"format_version": FORMAT_VERSION, "count": n, "latent_shape": [c, h, w], "stored_shape": [c, h, w],
                "dtype": "float32", "store": "latents", "scale_factor": scale_factor, "vae": vae,
                "image_size": image_size or h * (1 if vae == "none" else 8), "channels": c,
                "num_classes": num_classes, "classes": classes or [str(i) for i in range(num_classes)],
                "flips": True, "shard_size": n, "num_shards": 1, "label_range": [int(labels.min()), int(labels.max())],
                "shards": [{"latents": "latents-00000.npy", "labels": "labels-00000.npy", "count": n}]}
    with atomic_path(os.path.join(path, "manifest.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
    return path
