"""Mask-learning (search) step: split forward (ours) against the official formulation, side by side.

    python benchmarks/bench_search_step.py --threads 2        # CPU: DiT-S/2 and DiT-B/2, 256 px, batch 8, fp32
    python benchmarks/bench_search_step.py --models DiT-XL/2 --batch-size 32 --precision bf16   # GPU

For each model and weight update (full weights, LoRA), two Trainers built from the same weights run the
real `Trainer.train_step` of prune_by_learning (1:2 groups, AdamW, grad clip, EMA):
  official   `--no-split-forward`: every block forward and backward for every sample, as the official code
  split      ours: autograd only on the samples that keep a block, the others' output as a value only
Their steps alternate, so load drifting on a shared machine hits both alike, and both draw the same
masks and noise at every step; the largest relative loss difference between them is printed (it is
float rounding, from matmuls over fewer rows). Memory: the bytes autograd saves for the backward pass
during one forward (saved_tensors_hooks, the same masks for both), and on CUDA the peak allocated
during a step.
"""
import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # `python benchmarks/bench_search_step.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import bench_training
from benchmarks.bench_memory import step_saved_bytes
from benchmarks.common import (PeakMemory, add_common_args, fmt_bytes, fmt_ratio, hardware, latent_shape,
                               markdown_table, ratio, release_memory, resolve, set_tf32, time_interleaved)
from tinyfusion.logging import RunLogger
from tinyfusion.runtime import Runtime
from tinyfusion.trainer import Trainer

PRESETS = dict(cpu=dict(models=["DiT-S/2", "DiT-B/2"], image_size=256, batch_size=8, iters=7),
               cuda=dict(models=["DiT-XL/2"], image_size=256, batch_size=32, warmup=3, iters=20),
               smoke=dict(models=["DiT-S/2"], image_size=32, batch_size=4, iters=1))
UPDATES = {"full": "mask+full", "lora": "mask+lora"}  # bench_training's configurations
VARIANTS = ("official", "split")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--models", nargs="+", default=None, help="registry names (CPU DiT-S/2 DiT-B/2, CUDA DiT-XL/2)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--updates", nargs="+", choices=list(UPDATES), default=list(UPDATES))
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="Trainer autocast")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--lora-rank", type=int, default=8)
    return parser


def make_trainer(model_name, update, split, args, device, workdir):
    """A Trainer of prune_by_learning's search step; the same weights for every call (seed 0)."""
    fused = device.type == "cuda"  # the training scripts' default: fused AdamW on CUDA only
    settings = argparse.Namespace(**{**vars(args), "model": model_name, "compile": False, "fused": fused})
    model, objective, groups = bench_training.setup(UPDATES[update], settings, device)
    objective.mask.split_forward = split
    trainer = Trainer(Runtime(device=device), model, objective, range(args.batch_size),
                      bench_training.trainer_args(settings, workdir), param_groups=groups,
                      logger=RunLogger(None, is_main=False))
    objective.ema_mask = trainer.ema.model.layer_mask
    return trainer


def measure(model_name, update, args, device, workdir):
    trainers = {v: make_trainer(model_name, update, v == "split", args, device, workdir) for v in VARIANTS}
    x = torch.randn(args.batch_size, *latent_shape(model_name, args.image_size), device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    row = {"model": model_name, "update": update}
    for v, trainer in trainers.items():  # the same masks (global seed) and draws for both variants
        torch.manual_seed(0)
        row[f"saved_{v}"] = step_saved_bytes(trainer, trainer.objective, x, y)
    losses = {v: [] for v in VARIANTS}
    steps = [lambda v=v: losses[v].append(trainers[v].train_step(x, y)[0]) for v in VARIANTS]
    for v, seconds in zip(VARIANTS, time_interleaved(steps, device, args.warmup, args.iters)):
        row[f"seconds_{v}"] = seconds
    row["loss_rel_diff"] = max(float((a - b).abs() / b.abs()) for a, b in zip(losses["split"], losses["official"]))
    if device.type == "cuda":
        for v in VARIANTS:
            with PeakMemory(device) as mem:
                trainers[v].train_step(x, y)
            row[f"peak_{v}"] = mem.peak
    row["time_ratio"] = ratio(row["seconds_split"], row["seconds_official"])
    row["saved_ratio"] = ratio(row["saved_split"], row["saved_official"])
    row["peak_ratio"] = ratio(row.get("peak_split"), row.get("peak_official"))
    del trainers
    release_memory()
    return row


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    set_tf32(device, True)  # the training scripts' default (--tf32)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [measure(m, u, args, device, workdir) for m in args.models for u in args.updates]
    print(f"\n## Search step, split forward vs official: {args.image_size} px, batch {args.batch_size}, 1:2 groups, "
          f"{args.precision}{', grad checkpointing' if args.grad_checkpointing else ''}"
          f"{' (smoke: tiny widths, numbers meaningless)' if args.smoke else ''}")
    print(hardware(device) + f"; steps interleaved, median of {args.iters} each after {args.warmup} warm-up\n")
    headers = ["model", "update", "official s/step", "split s/step", "time x official", "saved official",
               "saved split", "saved x official"]
    cells = [[r["model"], r["update"], f"{r['seconds_official']:.3f}", f"{r['seconds_split']:.3f}",
              fmt_ratio(r["time_ratio"]), fmt_bytes(r["saved_official"]), fmt_bytes(r["saved_split"]),
              fmt_ratio(r["saved_ratio"])] for r in rows]
    if device.type == "cuda":
        headers += ["peak official", "peak split", "peak x official"]
        for r, c in zip(rows, cells):
            c += [fmt_bytes(r["peak_official"]), fmt_bytes(r["peak_split"]), fmt_ratio(r["peak_ratio"])]
    headers.append("max loss rel. diff")
    for r, c in zip(rows, cells):
        c.append(f"{r['loss_rel_diff']:.1e}")
    print(markdown_table(headers, cells))
    print("\n(saved = bytes autograd keeps from one forward pass for the backward pass; targets on CPU: time <= 0.75x "
          "with full updates, <= 0.8x with LoRA, saved <= 0.6x)")
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
