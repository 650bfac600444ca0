"""Helpers shared by the benchmark scripts: device choice, timing, peak memory, Markdown tables.

Every benchmark picks per-device defaults (modest ones on CPU so a run takes a minute or two,
paper-like ones on CUDA), excludes warm-up iterations from timing, synchronises CUDA around each
timed region, and reports the median over the timed iterations (robust to a shared, noisy CPU).
"""
import ctypes
import gc
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch

from core.errors import UserError
from tinyfusion.cli import create_model, latent_shape_for
from tinyfusion.families import family_for

def add_common_args(parser):
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: per device)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: per device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, one iteration: checks the script runs")
    return parser


def resolve(args, cpu, cuda, smoke):
    """Fill every option left at None from the preset of the run's kind (smoke, else the device's)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for CUDA but no GPU is visible: use --device cpu")
    preset = dict(smoke) if args.smoke else dict(cuda if device.type == "cuda" else cpu)
    preset.setdefault("warmup", 1)
    preset.setdefault("iters", 1 if args.smoke else 3)
    # smoke runs are tiny ops: a second thread only adds sync latency (badly so on a shared CPU)
    preset.setdefault("threads", 1 if args.smoke else None)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def latent_shape(name, image_size):
    """(C, H, W) model `name` works on for images of `image_size` px (the scripts' own rule)."""
    return latent_shape_for(SimpleNamespace(image_size=image_size, model=name, vae="ema"))


def bench_model(name, image_size, smoke=False, num_classes=1000, **kwargs):
    """Registry model `name` with random weights for images of `image_size` px.

    smoke=True keeps the depth (what pruning changes) but shrinks the width, so the script runs in
    seconds. `kwargs` override constructor keywords (e.g. depth, or MAR's encoder/decoder_depth).
    """
    shape = latent_shape(name, image_size)
    return create_model(name, shape, num_classes, **{**(family_for(name).smoke_kwargs if smoke else {}), **kwargs})


def half_depth(model):
    """Constructor keywords of the same model at half depth (each block list halved)."""
    if len(model.block_lists) == 1:
        return {"depth": model.depth // 2}
    return {f"{name.split('_')[0]}_depth": len(getattr(model, name)) // 2 for name in model.block_lists}


def set_tf32(device, enabled):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup, iters):
    """Median seconds of `fn()` over `iters` calls, after `warmup` untimed calls."""
    return time_interleaved([fn], device, warmup, iters)[0]


def time_interleaved(fns, device, warmup, iters):
    """Median seconds of each of `fns`, called round-robin so that load drifting over the run (a shared
    machine) hits every candidate alike instead of skewing their ratios."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(max(1, iters)):
        for fn, out in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _rss(field):
    """VmRSS / VmHWM of this process in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_memory():
    """Free what the previous configuration left so the next one starts from a clean baseline."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # hand freed heap back to the OS, so the CPU RSS baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the enclosed region, in bytes (`.peak`), None when it cannot be measured.

    CUDA: torch.cuda.max_memory_allocated (tensors only). CPU: the rise of the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) over its RSS at entry: it counts everything the
    region allocates (tensors, allocator slack), so it is approximate.
    """

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = _rss("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            hwm = _rss("VmHWM")
            self.peak = None if hwm is None else max(0, hwm - self.base)
        return False


def fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}x"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def markdown_table(headers, rows):
    """A GitHub Markdown table; cells are converted with str()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def hardware(device):
    """One line naming the machine the numbers come from."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                what = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), what)
        except OSError:
            pass
        what += f", {torch.get_num_threads()} torch threads, {os.cpu_count()} visible cores"
    return f"device: {device} ({what}); torch {torch.__version__}"
