"""The FID Inception-v3 (TF graph "inception-2015-12-05") in PyTorch, as ADM's evaluator sees it.

Module names follow torchvision's `Inception3`, so the converted weights released by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`) and torch-fidelity load unchanged. The TF graph differs from
torchvision in three places, all reproduced here:
  * pool branches of Mixed_5b..5d, 6b..6e and 7b average without counting the zero padding;
  * the pool branch of Mixed_7c is a *max* pool (a quirk of the TF graph);
  * the input is resized with TF1's legacy bilinear kernel (no half-pixel centres) and scaled
    (x - 128) / 128, not 2x - 1.
Outputs are the three tensors ADM reads: pool_3 (FID, P/R), mixed_6/conv[..., :7] flattened in NHWC
order (sFID) and the unbiased softmax logits pool_3 @ W (Inception Score).
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from core.errors import UserError
from tinyfusion.checkpoint import load_checkpoint
from tinyfusion.download import RELEASES, resolve

WEIGHTS_ENV = "TINYFUSION_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = RELEASES[WEIGHTS_FILE].url
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17*17*7 = 2023 sFID features


def tf1_resize_bilinear(x, size):
    """Resize NCHW float images like TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`.

    Source coordinate of output index d is d * (in / out) (no +0.5 shift), with the float32 arithmetic
    TF uses; rows are interpolated along W first, then along H, in the same order as TF's kernel.
    """
    def along(t, dim, out):
        n = t.shape[dim]
        scale = torch.tensor(n, dtype=torch.float32) / out
        src = torch.arange(out, dtype=torch.float32, device=t.device) * scale.to(t.device)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = (src - lo.float()).to(t.dtype)
        shape = [1] * t.dim()
        shape[dim] = out
        a, b = t.index_select(dim, lo), t.index_select(dim, hi)
        return a + (b - a) * frac.view(shape)

    h, w = (size, size) if isinstance(size, int) else size
    if x.shape[-1] != w:
        x = along(x, 3, w)
    if x.shape[-2] != h:
        x = along(x, 2, h)
    return x


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_no_pad(x):
    # TF's average pool ignores the padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(InceptionA):
    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_no_pad(x)),
        ], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5),
            self.branch_pool(_avg_pool_no_pad(x)),
        ], 1)


class FIDInceptionE(InceptionE):
    """Mixed_7b uses a padding-free average pool, Mixed_7c a max pool (`pool` picks which)."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(self.pool(x)),
        ], 1)


class FIDInception3(nn.Module):
    """Inception-v3 trunk + 1008-way fc; `forward` returns dict(pool, spatial, logits)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, _avg_pool_no_pad)
        self.Mixed_7c = FIDInceptionE(2048, _max_pool_same)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        """images: NCHW, RGB values in 0..255 (uint8 or float), any spatial size."""
        x = tf1_resize_bilinear(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                   self.Mixed_6c, self.Mixed_6d)
        # Channels 0..191 of Mixed_6d are its branch1x1 output (TF's mixed_6/conv); ADM flattens NHWC.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = _chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        pool = x.mean(dim=(2, 3))
        # ADM's IS reads the MatMul before the bias add: softmax(pool_3 @ W), no bias
        logits = pool @ self.fc.weight.t()
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_inception(path=None, device="cpu"):
    """The FID Inception with converted TF weights from `path`, a local file or the release name.

    `path` defaults to $TINYFUSION_INCEPTION_WEIGHTS, else to the release (fetched into the cache when
    missing, as ADM's evaluator fetches its graph). Accepts the pytorch-fid / torch-fidelity state
    dict (torchvision names, e.g. `Mixed_5b.branch1x1.conv.weight`, `fc.weight`).
    """
    path = resolve(path or os.environ.get(WEIGHTS_ENV) or WEIGHTS_FILE)
    if not os.path.exists(path):
        raise UserError(f"Inception weights {path!r} do not exist: pass --inception-weights PATH (or {WEIGHTS_FILE}, "
                        f"fetched from {WEIGHTS_URL}) or set the {WEIGHTS_ENV} environment variable")
    state = load_checkpoint(path)  # one clear line for an empty, truncated or foreign file
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = FIDInception3()
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict: expected {WEIGHTS_FILE} from "
                        f"{WEIGHTS_URL}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # right names, wrong shapes
        raise UserError(f"{path} does not fit the FID Inception ({str(e).strip().splitlines()[-1].strip()[:160]}): "
                        f"expected {WEIGHTS_FILE} from {WEIGHTS_URL}") from None
    # Files converted with old torch lack BN's `num_batches_tracked` counters, which are unused in eval.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(f"{path} is not an FID Inception state dict ({len(missing)} missing keys, e.g. "
                        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); "
                        f"expected {WEIGHTS_FILE} from {WEIGHTS_URL}")
    return model.to(device).eval().requires_grad_(False)


class InceptionExtractor:
    """A `metrics.FeatureExtractor`: uint8 NHWC numpy batch -> float32 pool/spatial/logits arrays."""

    def __init__(self, model, device="cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        return {k: v.float().cpu().numpy() for k, v in self.model(x).items()}
