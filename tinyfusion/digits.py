"""The digits demo: scikit-learn's handwritten digits as a pixel-space "latent" dataset, and a small
digit classifier that stands in for Inception in the evaluator.

Data: `sklearn.datasets.load_digits()` (1,797 images, 8x8, values 0..16, 10 classes) ships inside
scikit-learn, so nothing is downloaded. Pixels map to [-1, 1] and are the model's input directly
(--vae none, 1 channel, 8x8; DiT-Tiny/2 sees 16 tokens). A fixed, stratified 80/20 split gives a
training feature store (tinyfusion/data.py format) and a held-out ADM reference batch (uint8 NHWC,
gray repeated to 3 channels, quantised with the same rule as generated samples).
Digits are never flipped (a mirrored 2 is not a 2): the store's "flipped" copies are the images
themselves, so flip augmentation is a no-op.

Classifier: a 3-conv CNN on 8x8 gray inputs; its 64-d penultimate activations are the 'pool'
features (FID, precision/recall) and its logits give IS and the class accuracy of samples.
"""
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets")
CLASSIFIER_PATH = os.path.join(ASSETS, "digits_classifier.safetensors")
TEACHER_PATH = os.path.join(ASSETS, "digits_teacher.safetensors")
CLASSIFIER_REBUILD = "python prepare_digits.py --retrain-classifier"
TEACHER_REBUILD = ("python train.py --model DiT-Tiny/2 --data-path data/digits --image-size 8 --vae none "
                   "--num-classes 10 --global-batch-size 32 --max-steps 4000 --lr 2e-3 --lr-schedule cosine "
                   "--lr-min 1e-5 --warmup-steps 100 --grad-clip 1.0 --ema-decay 0.995 --num-workers 0 "
                   "--log-every 200 --ckpt-every 1000 --prefix digits-teacher --device cpu "
                   "--save-model assets/digits_teacher.safetensors")
SIT_TEACHER_PATH = os.path.join(ASSETS, "sit_digits_teacher.safetensors")
SIT_TEACHER_REBUILD = TEACHER_REBUILD.replace("DiT-Tiny/2", "SiT-Tiny/2").replace("digits-teacher", "sit-digits-teacher") \
    .replace("assets/digits_teacher", "assets/sit_digits_teacher")
TEACHER_CFG = 1.5  # guidance used for the teacher's recorded sample quality (all channels, see sample_digits)

NUM_CLASSES = 10
SIZE = 8
LATENT_SHAPE = (1, SIZE, SIZE)
TEACHER_MODEL = "DiT-Tiny/2"
TEACHERS = {"DiT-Tiny/2": (TEACHER_PATH, TEACHER_REBUILD), "SiT-Tiny/2": (SIT_TEACHER_PATH, SIT_TEACHER_REBUILD)}
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


# ----------------------------------------------------------------------------- data

def load_split(seed=SPLIT_SEED, held_out=HELD_OUT_FRACTION):
    """(x_train, y_train, x_test, y_test): x float32 (N, 1, 8, 8) in [-1, 1], y int64.

    Stratified and deterministic: within each class a numpy PCG64 permutation (stable across numpy
    versions) puts round(held_out * n_class) images in the held-out split; both splits stay in
    dataset order.
    """
    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(held_out * len(idx)))]] = True
    return x[~test], y[~test], x[test], y[test]


def to_uint8_gray(x):
    """[-1, 1] (N, 1, H, W) -> uint8 (N, H, W, 3): the samples' clamp(127.5 x + 128) rule, gray repeated."""
    from .sampling import to_uint8
    return np.repeat(to_uint8(torch.as_tensor(x)), 3, axis=-1)


def write_digits_data(store_path, ref_path, seed=SPLIT_SEED):
    """Train split -> feature store at `store_path`; held-out split -> ADM reference batch `ref_path`."""
    from .npz import write_sample_batch
    from .synthetic import write_feature_store
    x_train, y_train, x_test, _ = load_split(seed)
    # flipped = the images themselves: a flipped digit is another (or no) digit
    write_feature_store(store_path, x_train, y_train, flipped=x_train, num_classes=NUM_CLASSES, vae="none",
                        image_size=SIZE)
    write_sample_batch(ref_path, to_uint8_gray(x_test))
    return len(x_train), len(x_test)


# ----------------------------------------------------------------------------- classifier

class DigitClassifier(nn.Module):
    """8x8 gray digit -> (64-d penultimate features, 10 logits)."""

    def __init__(self, width=32, feature_dim=64, num_classes=NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(), nn.Linear(2 * width * (SIZE // 2) ** 2, feature_dim),
            nn.GELU(),  # smooth: no dead units, so the features' covariance stays full rank for FID
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        features = self.body(x)
        return features, self.head(features)


def images_to_input(images):
    """uint8 (N, 8, 8, 3) -> float (N, 1, 8, 8) in [-1, 1] (channel mean; digits are gray)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3) or images.dtype != np.uint8:
        raise UserError(f"the digits feature network takes uint8 (N, 8, 8, 3) images, got {images.dtype}"
                        f"{images.shape}: use --feature-net digits only for the digits demo")
    x = torch.from_numpy(images.astype(np.float32)).mean(-1, keepdim=True).permute(0, 3, 1, 2)
    return (x - 127.5) / 127.5


def train_classifier(images, labels, epochs=40, batch_size=64, lr=2e-3, seed=0, log=print):
    """AdamW on uint8 digit images (the evaluator's exact input). One CPU thread: the float sums then
    run in one fixed order, so a seed gives the same bytes on every run (and it is fast enough)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(images, labels, epochs, batch_size, lr, seed, log)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(images, labels, epochs, batch_size, lr, seed, log):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = images_to_input(images), torch.as_tensor(labels)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    return model.eval()


class DigitsExtractor:
    """A `metrics.FeatureExtractor`: uint8 (N, 8, 8, 3) -> {'pool': (N, 64), 'logits': (N, 10)} float32."""

    def __init__(self, model, device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images):
        features, logits = self.model(images_to_input(images).to(self.device))
        return {"pool": features.float().cpu().numpy(), "logits": logits.float().cpu().numpy()}


def class_accuracy(extractor, images, labels, batch_size=256):
    """Fraction of `images` whose argmax logit equals `labels` (class-conditional sample accuracy)."""
    labels = np.asarray(labels)
    preds = [extractor(images[i:i + batch_size])["logits"].argmax(1) for i in range(0, len(images), batch_size)]
    return float((np.concatenate(preds) == labels).mean())


def _asset(path, default, rebuild):
    path = path or default
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: rebuild it with {rebuild} (see assets/README.md)")
    return path


def load_digits_classifier(path=None, device="cpu"):
    """The shipped classifier (assets/digits_classifier.safetensors unless `path` is given)."""
    from .checkpoint import load_weights
    model = DigitClassifier()
    load_weights(model, _asset(path, CLASSIFIER_PATH, CLASSIFIER_REBUILD), "DigitClassifier")
    return model.to(device).eval()


# ----------------------------------------------------------------------------- teacher

def load_digits_teacher(path=None, device="cpu", model=TEACHER_MODEL):
    """A shipped teacher (DiT-Tiny/2 or SiT-Tiny/2: 12 blocks, 1 x 8 x 8 inputs, 10 classes), strictly loaded."""
    from .cli import create_model
    path = _asset(path, *TEACHERS[model])
    return create_model(model, LATENT_SHAPE, NUM_CLASSES, path).to(device).eval()


def sample_digits(model, labels, num_steps=50, cfg_scale=1.0, seed=0, sampler="ddpm", device="cpu"):
    """Class-conditional samples as uint8 (N, 8, 8, 3) with the family's fixed-step sampler (DiT: --sampler DDPM/DDIM;
    SiT: Euler ODE, the transport defaults the SiT teacher was trained with). Image i's noise comes from its own
    generator (seed * 2**20 + i), so results do not depend on the batch or the global RNG.

    Guidance covers all channels: DiT's official "first 3 channels" rule would, for a 1-channel
    model with learned sigma, also guide the variance output.
    """
    from .cli import sampling_flags
    from .families import family_of_model
    from .sampling import per_sample_noise
    family = family_of_model(model)
    run = family.sampler(sampling_flags([*family.fixed_step_sampler_argv, "--sampler", sampler,
                                         "--num-sampling-steps", num_steps, "--guide-all-channels"]))
    seeds = [seed * 2**20 + i for i in range(len(labels))]
    noise_fn = per_sample_noise(seeds, device)
    z = noise_fn(torch.empty(len(labels), model.in_channels, model.input_size, model.input_size))
    y = torch.as_tensor(np.asarray(labels), device=device)
    with torch.no_grad():
        x = run(model, z, y, cfg_scale, use_cfg=cfg_scale > 1.0, noise_fn=noise_fn)
    return to_uint8_gray(x.clamp(-1, 1).cpu())


def evaluate_teacher(ref_batch, n=200, num_steps=25, cfg_scale=TEACHER_CFG, teacher=None, classifier=None, log=print,
                     model=TEACHER_MODEL):
    """Class accuracy and digit-feature FID/IS/P/R of `n` teacher samples (classes 0..9 in turn) against the
    held-out reference batch, next to the FID of uniform-noise images (the scale of 'not digits at all')."""
    import tempfile
    from .metrics import evaluate
    from .npz import write_sample_batch
    extractor = DigitsExtractor(load_digits_classifier(classifier))
    labels = np.arange(n) % NUM_CLASSES
    images = sample_digits(load_digits_teacher(teacher, model=model), labels, num_steps=num_steps, cfg_scale=cfg_scale,
                           seed=0)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    out = {"model": model, "samples": n, "sampling_steps": num_steps, "cfg_scale": cfg_scale,
           "class_accuracy": class_accuracy(extractor, images, labels),
           "noise_class_accuracy": class_accuracy(extractor, noise, labels)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch in (("teacher", images), ("noise", noise)):
            path = os.path.join(tmp, f"{name}.npz")
            write_sample_batch(path, batch)
            metrics = evaluate(ref_batch, path, extractor)
            out.update({f"{name}_{k}": v for k, v in metrics.items() if v is not None})
    log(json.dumps(out, indent=1))
    return out
