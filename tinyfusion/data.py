"""Training data: pre-extracted latent stores (three layouts, one interface) and image folders.

Feature store format (written by extract_features.py, format_version 1)
-----------------------------------------------------------------------
<features-path>/
  manifest.json           written LAST, only when every shard is complete. Keys: format_version, count,
                          latent_shape [C,H,W], stored_shape (per entry), dtype ("float32"|"float16"),
                          store ("latents"|"moments"), scale_factor, vae, image_size, channels,
                          num_classes, classes (folder names), flips (true), shard_size, num_shards,
                          shards [{"latents", "labels", "count"}], global_seed, limit, label_range [min, max]
                          (stores written before it was recorded get it computed when opened).
  latents-{k:05d}.npy     raw .npy, memory-mapped: (n_k, 2, C', H, W). Entry [i, 0] is the image,
                          [i, 1] the horizontally flipped image. store="latents": C' = C, the VAE
                          posterior sample already x scale_factor (like the reference). store="moments":
                          C' = 2C, [mean | logvar] unscaled; the reader draws mean + std*eps and x scale
                          (MAR style: a fresh sample per epoch).
  labels-{k:05d}.npy      (n_k,) int64 class indices.
  shard-{k:05d}.done      per-shard completion marker (resume); extract.json: the run's settings.
Global index order = the sorted ImageFolder order (classes sorted, files sorted within a class),
optionally thinned by --limit; shard k holds indices [k*shard_size, (k+1)*shard_size).

Also read through the same interface (`open_feature_store` detects the layout):
  * TinyFusion / fast-DiT: <path>/imagenet256_features/{i}.npy (1 or 2, C, H, W) float32, already x 0.18215
    ([1] = flipped when there are 2), + imagenet256_labels/{i}.npy (1,) int. Order = sorted file names,
    as the reference's CustomDataset (lexicographic: 0, 1, 10, 100, ...).
  * MAR cache: <path>/<class>/<file>.npz with 'moments' and 'moments_flip' (2C, H, W); latent = sample x 0.2325.

Text-conditioned stores (format_version 2, extract_features.py --captions ... --pipeline ...): the same
layout without labels; per shard one `<name>-{k:05d}.npy` (n_k, *shape) per conditioning tensor the
pipeline's `encode_prompt` returns (PixArt: prompt_embeds (L, D) + prompt_attention_mask (L,) int8; SD3:
prompt_embeds (77 + L, D) + pooled_prompt_embeds (P,)), listed in shards[k]["cond"]; manifest keys
conditioning "text", cond {name: {shape, dtype}}, text_encoder {pipeline, pipeline_class,
max_sequence_length, dtype}, captions, captions_sha256, shift_factor (SD3's VAE), null_cond {name: file}
(the empty prompt's tensors, `null-<name>.npy`). Captions file: JSONL lines {"image": path relative to
--data-path, "caption": text}; index i = the i-th line.

Keys: `store[i]` = (i, flip 0); `store[(i, flip)]`; `store[(i, flip, seed)]` where the seed fixes the
posterior sample of stochastic (moments) stores. Flips and seeds come from the training sampler so a
resumed run sees exactly the same data. Items are (latent float32 (C,H,W), cond): cond is a 0-d int64
label tensor (class stores) or a dict {name: tensor} (text stores: embeddings float32, masks int64).
"""
import json
import os
from functools import partial

import numpy as np
import torch
from PIL import Image

from core.errors import UserError
from .vae import gaussian_noise, sample_moments, scale_latents

FORMAT_VERSION = 1       # class-labelled stores
TEXT_FORMAT_VERSION = 2  # text-conditioned stores (no labels, per-item conditioning tensors)
MAR_SCALE = 0.2325
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- feature stores

def load_npy(path, mmap_mode=None):
    """np.load of one .npy file (never pickles) with one clear line naming a file that is not a valid array."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = "it holds pickled data or is not a .npy file" if "pickle" in str(e) else str(e).split("\n")[0][:120]
        raise UserError(f"cannot read {path} ({reason}): the file is damaged; re-extract the features, or remove it "
                        f"(with its label file)") from None


class BaseFeatureStore(torch.utils.data.Dataset):
    """Common key handling; subclasses implement `_entry(index, flip) -> (array, label)`."""
    stochastic = False      # entries are (mean | logvar) moments that must be sampled
    has_flips = True
    num_classes = None
    scale_factor = 1.0      # applied by the reader only for stochastic stores (after subtracting shift_factor)
    shift_factor = 0.0
    conditioning = "class"  # or "text": items carry a dict of tensors instead of a label

    def __init__(self, path, latent_shape):
        self.path = os.fspath(path)
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def __getitem__(self, key):
        index, flip, seed = (key, 0, None) if not isinstance(key, (tuple, list)) else (tuple(key) + (None,))[:3]
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        return self.get(int(index), int(flip), generator)

    def get(self, index, flip=0, generator=None):
        """Entry `index` (flip 1 = the flipped image); `generator` drives the sample of moment stores."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} latents")
        if flip and not self.has_flips:
            raise UserError(f"feature store {self.path} holds no flipped latents: turn off flip augmentation")
        array, cond = self._entry(index, flip)
        x = torch.from_numpy(np.array(array, dtype=np.float32))
        if self.stochastic:
            mean, logvar = x.chunk(2, dim=0)
            x = sample_moments(mean, logvar, gaussian_noise(mean.shape, generator))
            x = scale_latents(x, self.scale_factor, self.shift_factor)
        if isinstance(cond, dict):
            return x, cond_tensors(cond)
        return x, torch.tensor(int(cond), dtype=torch.int64)

    def check_latent_shape(self, expected, model_name="the model"):
        """Raise one UserError when the stored latents do not fit what the model takes."""
        expected = tuple(int(s) for s in expected)
        if self.latent_shape != expected:
            raise UserError(f"feature store {self.path} holds latents of shape {self.latent_shape} but {model_name} "
                            f"expects {expected}: check --model/--image-size, or re-extract at the matching image size")

    def check_num_classes(self, num_classes):
        """Refuse labels the model cannot take: label == num_classes would silently train as the classifier-free
        guidance null class, larger or negative ones would crash mid-training."""
        if self.conditioning != "class":
            raise UserError(f"feature store {self.path} holds {self.conditioning} conditioning (captions), not class "
                            f"labels: a class-conditional model cannot train on it; extract without --captions")
        if self.num_classes is not None and self.num_classes > num_classes:
            raise UserError(f"feature store {self.path} has {self.num_classes} classes but the model has "
                            f"--num-classes {num_classes}: raise --num-classes")
        lo, hi = self.label_range()
        if lo < 0 or hi >= num_classes:
            null = f" (label {num_classes} is the unconditional null class)" if lo >= 0 and hi == num_classes else ""
            raise UserError(f"feature store {self.path} holds labels {lo}..{hi}, outside 0..{num_classes - 1} of "
                            f"--num-classes {num_classes}{null}: pass --num-classes {max(hi + 1, 1)} if the labels are "
                            f"right, else re-extract the store")

    def label_range(self):
        """(min, max) label: recorded in the manifest, else computed once from all labels."""
        if getattr(self, "_label_range", None) is None:
            recorded = (getattr(self, "manifest", None) or {}).get("label_range")
            labels = None if recorded else np.asarray(self.labels())
            self._label_range = tuple(int(v) for v in recorded) if recorded else \
                ((int(labels.min()), int(labels.max())) if labels.size else (0, 0))
        return self._label_range


class FeatureStore(BaseFeatureStore):
    """The sharded store written by extract_features.py (see the module docstring)."""

    def __init__(self, path):
        path = os.fspath(path)
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise UserError(f"{path} has no manifest.json: it is not a finished feature store "
                            f"(rerun extract_features.py with the same flags to finish it)")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        m = self.manifest
        if m.get("format_version") not in (FORMAT_VERSION, TEXT_FORMAT_VERSION):
            raise UserError(f"{manifest_path} has format_version {m.get('format_version')}, this code reads "
                            f"{FORMAT_VERSION} and {TEXT_FORMAT_VERSION}: re-extract the features")
        super().__init__(path, m["latent_shape"])
        self.stochastic = m["store"] == "moments"
        self.scale_factor = float(m["scale_factor"])
        self.shift_factor = float(m.get("shift_factor", 0.0))
        self.has_flips = bool(m["flips"])
        self.conditioning = m.get("conditioning", "class")
        self.cond_names = tuple(m.get("cond", {}))
        self.num_classes = int(m["num_classes"]) if self.conditioning == "class" else None
        counts = [s["count"] for s in m["shards"]]
        self._starts = np.cumsum([0] + counts)
        if self._starts[-1] != m["count"]:
            raise UserError(f"{manifest_path} is inconsistent (shards hold {self._starts[-1]} entries, count "
                            f"{m['count']}): re-extract the features")
        self._shards = [None] * len(counts)  # memory maps opened lazily (after DataLoader workers fork)

    def __len__(self):
        return int(self._starts[-1])

    def __getstate__(self):  # DataLoader workers (spawn) reopen the maps instead of copying them
        return {**self.__dict__, "_shards": [None] * len(self._shards)}

    def _shard(self, k):
        """(latents, labels or {name: conditioning array}) of shard k, memory-mapped."""
        if self._shards[k] is None:
            info = self.manifest["shards"][k]
            read = lambda name: load_npy(os.path.join(self.path, name), mmap_mode="r")  # noqa: E731
            cond = {n: read(f) for n, f in info["cond"].items()} if "cond" in info else read(info["labels"])
            self._shards[k] = (read(info["latents"]), cond)
        return self._shards[k]

    def _entry(self, index, flip):
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        latents, cond = self._shard(k)
        i = index - self._starts[k]
        return latents[i, flip], ({n: a[i] for n, a in cond.items()} if isinstance(cond, dict) else cond[i])

    def null_cond(self):
        """The empty prompt's conditioning tensors (no batch dim) of a text store: for caption dropout / CFG."""
        files = self.manifest.get("null_cond")
        if not files:
            raise UserError(f"feature store {self.path} has no null conditioning (it is not a text store)")
        return cond_tensors({n: load_npy(os.path.join(self.path, f)) for n, f in files.items()})

    def labels(self):
        """All labels in index order (int64 array)."""
        if self.conditioning != "class":
            raise UserError(f"feature store {self.path} holds captions' conditioning, not class labels")
        return np.concatenate([np.asarray(self._shard(k)[1]) for k in range(len(self._shards))])


class ReferenceFeatureStore(BaseFeatureStore):
    """TinyFusion / fast-DiT layout: one .npy per image in <prefix>_features/ and <prefix>_labels/."""

    def __init__(self, path, features_dir, labels_dir):
        self.features_dir, self.labels_dir = features_dir, labels_dir
        self.files = sorted(f for f in os.listdir(features_dir) if f.endswith(".npy"))
        labels = set(f for f in os.listdir(labels_dir) if f.endswith(".npy"))
        if not self.files:
            raise UserError(f"{features_dir} holds no .npy files: extract the features first")
        missing = [f for f in self.files if f not in labels]
        if missing or len(labels) != len(self.files):
            raise UserError(f"{features_dir} and {labels_dir} do not pair up ({len(self.files)} feature files, "
                            f"{len(labels)} label files, e.g. {(missing or ['?'])[0]} has no label): re-extract")
        first = load_npy(os.path.join(features_dir, self.files[0]), mmap_mode="r")
        if first.ndim != 4 or first.shape[0] not in (1, 2):
            raise UserError(f"{features_dir}/{self.files[0]} has shape {first.shape}, expected (1 or 2, C, H, W)")
        super().__init__(path, first.shape[1:])
        self.has_flips = first.shape[0] == 2
        self.manifest = {"layout": "reference", "count": len(self.files), "latent_shape": list(self.latent_shape),
                         "flips": self.has_flips, "scale_factor": 0.18215}

    def __len__(self):
        return len(self.files)

    def _entry(self, index, flip):
        name = self.files[index]
        path = os.path.join(self.features_dir, name)
        x = load_npy(path)
        if x.shape != (1 + self.has_flips,) + self.latent_shape:
            expected = (1 + self.has_flips,) + self.latent_shape
            raise UserError(f"{path} has shape {x.shape}, but {self.files[0]} fixed the store's entries as "
                            f"{expected}: re-extract it or remove it with its label file")
        return x[flip], self._label(name)

    def _label(self, name):
        path = os.path.join(self.labels_dir, name)
        label = load_npy(path).reshape(-1)
        if label.size != 1 or label.dtype.kind not in "iu":
            raise UserError(f"{path} holds {label.size} value(s) of dtype {label.dtype}, expected one integer class "
                            f"label: re-extract it")
        return label[0]

    def labels(self):
        """All labels in index order. ImageNet has 1.28M label files: np.load costs ~0.1-1 ms each, so files
        whose .npy header is one already seen (all of them, normally) are decoded from their bytes directly."""
        headers, out = {}, np.empty(len(self.files), dtype=np.int64)
        for i, name in enumerate(self.files):
            with open(os.path.join(self.labels_dir, name), "rb") as f:
                data = f.read(4096)
            size = 10 + int.from_bytes(data[8:10], "little") if data[:8] == b"\x93NUMPY\x01\x00" else 0
            dtype = headers.get(data[:size]) if size else None
            if dtype is not None and len(data) - size == dtype.itemsize:
                out[i] = np.frombuffer(data, dtype, count=1, offset=size)[0]
                continue
            out[i] = value = self._label(name)  # a new header, or not a plain .npy: the full, checked path
            if size:
                headers[data[:size]] = value.dtype
        return out


class MarCacheStore(BaseFeatureStore):
    """MAR's cache: class folders of .npz files with 'moments' and 'moments_flip' (mean | logvar)."""
    stochastic = True
    scale_factor = MAR_SCALE

    def __init__(self, path, classes):
        self.classes = classes
        self.samples = []
        for label, name in enumerate(classes):
            for root, _, files in sorted(os.walk(os.path.join(path, name), followlinks=True)):
                self.samples += [(os.path.join(root, f), label) for f in sorted(files) if f.endswith(".npz")]
        with np.load(self.samples[0][0]) as first:
            shape = first["moments"].shape
        super().__init__(path, (shape[0] // 2,) + tuple(shape[1:]))
        self.num_classes = len(classes)
        self.manifest = {"layout": "mar", "count": len(self.samples), "latent_shape": list(self.latent_shape),
                         "flips": True, "scale_factor": MAR_SCALE, "store": "moments"}

    def __len__(self):
        return len(self.samples)

    def labels(self):
        return np.asarray([label for _, label in self.samples], dtype=np.int64)

    def _entry(self, index, flip):
        file, label = self.samples[index]
        with np.load(file) as data:
            return data["moments_flip" if flip else "moments"], label


def cond_tensors(arrays):
    """Stored conditioning arrays -> tensors as the pipelines make them: floats as float32, masks as int64."""
    return {n: torch.from_numpy(np.array(a, dtype=np.float32 if a.dtype.kind == "f" else np.int64))
            for n, a in arrays.items()}


def _reference_dirs(path):
    """(features_dir, labels_dir) of a reference layout at `path` (or `path` = the features dir), else None."""
    labels = path.rstrip(os.sep)[: -len("_features")] + "_labels"
    if path.rstrip(os.sep).endswith("_features") and os.path.isdir(labels):
        return path, labels
    pairs = [(os.path.join(path, d), os.path.join(path, d[: -len("_features")] + "_labels"))
             for d in sorted(os.listdir(path)) if d.endswith("_features")]
    pairs = [p for p in pairs if os.path.isdir(p[0]) and os.path.isdir(p[1])]
    if len(pairs) > 1:
        raise UserError(f"{path} holds several feature folders ({', '.join(os.path.basename(p[0]) for p in pairs)}): "
                        f"pass the one you mean, e.g. {pairs[0][0]}")
    return pairs[0] if pairs else None


def _mar_classes(path):
    """Sorted class folders that contain .npz files (MAR layout), or []."""
    classes = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir() and any(n.endswith(".npz") for _, _, files in os.walk(entry.path) for n in files):
            classes.append(entry.name)
    return classes


def open_feature_store(path):
    """Open a feature store of any supported layout (sharded, TinyFusion/fast-DiT, MAR cache)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise UserError(f"feature path {path} does not exist: run extract_features.py --features-path {path} first")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return FeatureStore(path)
    if os.path.isfile(os.path.join(path, "extract.json")):
        raise UserError(f"{path} holds an unfinished extraction (no manifest.json): rerun extract_features.py "
                        f"with the same flags; it resumes where it stopped")
    if not os.listdir(path):
        raise UserError(f"feature path {path} is empty: run extract_features.py --features-path {path} first")
    ref = _reference_dirs(path)
    if ref:
        return ReferenceFeatureStore(path, *ref)
    classes = _mar_classes(path)
    if classes:
        return MarCacheStore(path, classes)
    raise UserError(f"{path} is not a feature store: expected manifest.json (extract_features.py), "
                    f"imagenet256_features/ + imagenet256_labels/ (TinyFusion/fast-DiT), or class folders of .npz (MAR)")


# ----------------------------------------------------------------------------- images

def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with BOX while the short side is >= 2x the target, BICUBIC-resize the
    short side to `image_size`, then cut the central square (offsets rounded down)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def image_transform(image_size, random_flip=False, channels=3):
    """PIL -> float tensor in [-1, 1] (C,H,W): ADM crop, optional random flip, Normalize(0.5, 0.5)."""
    from torchvision import transforms
    steps = [transforms.Lambda(partial(center_crop_arr, image_size=image_size))]
    steps += [transforms.RandomHorizontalFlip()] if random_flip else []
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return transforms.Compose(steps)


BAD_IMAGES = ("stop", "skip")


def _load_image(path, mode):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise UserError(f"cannot read image {path} ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}): "
                        f"remove or replace it, or pass --bad-images skip") from None


def unreadable_images(paths):
    """[(path, reason)] of files PIL cannot identify (reads each header only, not the pixels)."""
    bad = []
    for p in paths:
        try:
            with Image.open(p):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            bad.append((p, type(e).__name__))
    return bad


def drop_unreadable_images(dataset, bad_images="stop", log=print, scan=unreadable_images):
    """Check every file of an ImageFolder before any work: stop at the first unreadable one (naming it and how
    many there are), or with bad_images='skip' drop them, one warning line each. Returns the dropped paths.
    `scan` maps paths to [(path, reason)] (e.g. split over processes: ~0.1-0.4 ms per file on one core)."""
    if bad_images not in BAD_IMAGES:
        raise UserError(f"--bad-images {bad_images}: use stop or skip")
    bad = sorted(scan([p for p, _ in dataset.samples]))
    if bad and bad_images == "stop":
        raise UserError(f"{bad[0][0]} is not a readable image ({bad[0][1]}; {len(bad)} such file(s) in the folder): "
                        f"remove them, or pass --bad-images skip to leave them out")
    for p, why in bad:
        log(f"warning: skipping {p}: not a readable image ({why})")
    dropped = {p for p, _ in bad}
    dataset.samples = dataset.imgs = [s for s in dataset.samples if s[0] not in dropped]
    dataset.targets = [t for _, t in dataset.samples]
    return sorted(dropped)


def _check_image_args(image_size, downsample, channels):
    if image_size % downsample:
        raise UserError(f"--image-size {image_size} is not divisible by {downsample} (the VAE's downsampling): "
                        f"use a multiple of {downsample}, e.g. {max(downsample, image_size // downsample * downsample)}")
    if channels not in (1, 3):
        raise UserError(f"--channels {channels}: use 3 (RGB) or 1 (grayscale)")


def open_image_folder(path, image_size, downsample=8, random_flip=False, channels=3):
    """torchvision ImageFolder (sorted classes, sorted files) with the ADM transform and clear errors."""
    from torchvision.datasets import ImageFolder
    path = os.path.expanduser(os.fspath(path))
    _check_image_args(image_size, downsample, channels)
    if not os.path.isdir(path):
        raise UserError(f"image folder {path} does not exist: pass --data-path <folder with one subfolder per class>")
    try:
        return ImageFolder(path, transform=image_transform(image_size, random_flip, channels),
                           loader=partial(_load_image, mode="RGB" if channels == 3 else "L"),
                           is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    except FileNotFoundError as e:
        raise UserError(f"{path} is not an ImageFolder ({str(e).splitlines()[0][:120]}): it needs one subfolder "
                        f"per class holding the images (e.g. train/n01440764/x.JPEG)")


CAPTION_FIELDS = ("image", "caption")


def read_captions(path):
    """[(image path relative to the data folder, caption)] of a JSONL captions file: one object per line,
    {"image": "cats/1.jpg", "caption": "a cat on the grass"} (other keys ignored, blank lines skipped)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise UserError(f"captions file {path} does not exist: pass --captions <file.jsonl> with one "
                        f'{{"image": ..., "caption": ...}} object per line')
    captions = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not JSON ({e.msg}): each line must be one object "
                                    f'{{"image": ..., "caption": ...}}') from None
                missing = [k for k in CAPTION_FIELDS if not isinstance(item, dict) or not isinstance(item.get(k), str)]
                if missing:
                    raise UserError(f"{path} line {n} has no text field {missing[0]!r}: each line needs "
                                    f'{{"image": <path relative to --data-path>, "caption": <text>}}')
                captions.append((item["image"], item["caption"]))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8 JSONL") from None
    if not captions:
        raise UserError(f"captions file {path} holds no lines: add one JSON object per image")
    return captions


class CaptionedImages(torch.utils.data.Dataset):
    """The images a captions file lists, in its order, with the ADM transform: items (image, caption)."""

    def __init__(self, root, captions, transform, loader):
        self.samples = [(os.path.join(root, rel), text) for rel, text in captions]
        self.targets = [text for _, text in self.samples]
        self.transform, self.loader = transform, loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, caption = self.samples[index]
        return self.transform(self.loader(path)), caption


def open_captioned_images(path, captions_file, image_size, downsample=8, channels=3):
    """The (image, caption) pairs of `captions_file`, image paths relative to folder `path`."""
    path = os.path.expanduser(os.fspath(path))
    _check_image_args(image_size, downsample, channels)
    if not os.path.isdir(path):
        raise UserError(f"image folder {path} does not exist: pass --data-path <the folder the captions file's "
                        f"image paths are relative to>")
    return CaptionedImages(path, read_captions(captions_file), image_transform(image_size, False, channels),
                           partial(_load_image, mode="RGB" if channels == 3 else "L"))
