"""Training-step cost of the TinyFusion stages, each relative to a plain step of the unpruned model.

    python benchmarks/bench_training.py                               # CPU: DiT-B/2 at 128 px, batch 2
    python benchmarks/bench_training.py --model DiT-XL/2 --image-size 256 --batch-size 16 --precision bf16

Rows (all through the real `tinyfusion.trainer.Trainer.train_step`: autocast, AdamW, grad clip, EMA):
  plain        ordinary diffusion training of the unpruned model (what train.py runs)
  mask+lora    learnable N:M (1:2) layer masks with LoRA deltas (prune_by_learning --delta-w --lora)
  mask+full    the same with full-weight deltas (--delta-w)
  mask-only    masks alone, weights frozen
  plain-D/2    plain training of the half-depth student (fine-tuning after pruning)
  kd           masked KD of the half-depth student from the unpruned teacher (train_masked_kd.py)
Peak memory covers the whole configuration (weights, EMA copy, optimizer state, activations; the
teacher too for kd): CUDA max_memory_allocated, CPU the rise of peak RSS (approximate).

`--ladder` instead times the chosen configs (default plain and mask+lora) from the plain fp32 eager
path of this code (TF32 off, unfused AdamW) adding one switch at a time: TF32 (CUDA), fused AdamW,
bf16 autocast, torch.compile, then gradient checkpointing (memory for time); ratios are against the
fp32 eager row of the same config.
"""
import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # `python benchmarks/bench_training.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import (PeakMemory, add_common_args, bench_model, fmt_bytes, fmt_ratio, half_depth, hardware,
                               latent_shape, markdown_table, ratio, release_memory, resolve, set_tf32, time_calls)
from models.layer_mask import parse_groups
from tinyfusion.families import family_for
from tinyfusion.logging import RunLogger
from tinyfusion.mask_learning import MaskLearningObjective, prepare_mask_learning
from tinyfusion.runtime import Runtime
from tinyfusion.trainer import TrainConfig, Trainer

try:  # masked KD may be missing from older checkouts; the row is then skipped
    from tinyfusion.kd import MaskedKDObjective, layer_map_from_record
except ImportError:
    MaskedKDObjective = None

CONFIGS = ("plain", "mask+lora", "mask+full", "mask-only", "plain-D/2", "kd")
PRESETS = dict(cpu=dict(model="DiT-B/2", image_size=128, batch_size=2, iters=3),
               cuda=dict(model="DiT-XL/2", image_size=256, batch_size=16, warmup=3, iters=10),
               smoke=dict(model="DiT-B/2", image_size=32, batch_size=2, iters=1))


# (label, settings added on top of the previous row); the first row is the plain fp32 eager path
LADDER = {"eager": ("fp32 eager", dict(tf32=False, fused=False, precision="fp32", compile=False,
                                        grad_checkpointing=False)),
          "tf32": ("+ TF32", dict(tf32=True)), "fused": ("+ fused AdamW", dict(fused=True)),
          "bf16": ("+ bf16 autocast", dict(precision="bf16")), "compile": ("+ torch.compile", dict(compile=True)),
          "checkpointing": ("+ grad checkpointing", dict(grad_checkpointing=True))}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model", type=str, default=None,
                        help="registry name (CPU DiT-B/2, CUDA DiT-XL/2; SiT and MAR work)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="Trainer autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (Trainer --compile)")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: keep matmuls in full fp32")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--no-fused-adamw", dest="fused", action="store_false", help="foreach instead of fused AdamW")
    parser.add_argument("--ladder", action="store_true", help="add the optimisations one at a time (see above)")
    parser.add_argument("--skip", nargs="+", default=[], choices=[k for k in LADDER if k != "eager"],
                        help="ladder rows to leave out (e.g. compile: minutes of compilation on a CPU)")
    parser.add_argument("--lora-rank", type=int, default=8)
    return parser


def trainer_args(args, results_dir):
    """The training loop's defaults (TrainConfig), with the benchmark's batch and switches."""
    return TrainConfig(global_batch_size=args.batch_size, max_steps=10**6, precision=args.precision,
                       compile=args.compile, grad_clip=1.0,  # grad clip 1.0: mask learning and KD use it
                       results_dir=results_dir, num_workers=0, fused_adamw=args.fused,
                       grad_checkpointing=args.grad_checkpointing)


def setup(config, args, device):
    """(model, objective, optimizer param groups or None) of one configuration, random weights."""
    torch.manual_seed(0)
    with torch.device("meta"):  # the unpruned model's shape, without allocating it
        full = bench_model(args.model, args.image_size, args.smoke)
    depth, half = full.depth, config in ("plain-D/2", "kd")
    model = bench_model(args.model, args.image_size, args.smoke, **(half_depth(full) if half else {}))
    objective, groups = family_for(args.model).objective(latent_shape(args.model, args.image_size)), None
    if config.startswith("mask"):
        mask, groups = prepare_mask_learning(model, parse_groups("1:2", depth), delta_w=config != "mask-only",
                                             lora=config == "mask+lora", lora_rank=args.lora_rank)
        objective = MaskLearningObjective(objective, mask)
    elif config == "kd":
        teacher = bench_model(args.model, args.image_size, args.smoke).to(device)
        # the layer map the KD script derives for a 1:2 pruning that kept every second block
        record = {"source_depth": depth, "kept": list(range(1, depth, 2)), "groups": [[1, 2]] * (depth // 2)}
        objective = MaskedKDObjective(objective, model, teacher, layer_map_from_record(record, depth))
    return model, objective, groups


def measure(config, args, device, workdir):
    with PeakMemory(device) as mem:
        model, objective, groups = setup(config, args, device)
        trainer = Trainer(Runtime(device=device), model, objective, range(args.batch_size), trainer_args(args, workdir),
                          param_groups=groups, logger=RunLogger(None, is_main=False))
        if isinstance(objective, MaskLearningObjective):
            objective.ema_mask = trainer.ema.model.layer_mask
        x = torch.randn(args.batch_size, *latent_shape(args.model, args.image_size), device=device)
        y = torch.randint(0, 1000, (args.batch_size,), device=device)
        seconds = time_calls(lambda: trainer.train_step(x, y), device, args.warmup, args.iters)
        trainable = sum(p.numel() for g in trainer.opt.param_groups for p in g["params"])
        total = sum(p.numel() for p in model.parameters())
    row = {"config": config, "depth": model.depth, "trainable_pct": 100 * trainable / total, "seconds": seconds,
           "steps_per_s": 1 / seconds, "images_per_s": args.batch_size / seconds, "peak_bytes": mem.peak}
    del trainer, model, objective
    release_memory()
    return row


def ladder_rows(args, device, workdir):
    rows = []
    for config in args.configs:
        settings = {}
        for key, (label, change) in LADDER.items():
            if key in args.skip or (key == "tf32" and device.type != "cuda"):  # TF32 is a CUDA setting
                continue
            settings.update(change)
            set_tf32(device, settings["tf32"])
            row = measure(config, argparse.Namespace(**{**vars(args), **settings}), device, workdir)
            rows.append({**row, "label": label})
    return rows


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    set_tf32(device, not args.no_tf32)
    if args.ladder and args.configs == list(CONFIGS):
        args.configs = ["plain", "mask+lora"]
    configs = [c for c in args.configs if c != "kd" or MaskedKDObjective is not None]
    with tempfile.TemporaryDirectory() as workdir:
        # Prime one-time costs (lazy library init, allocator pools, the OS handing the process its memory)
        # with one untimed full-size step, so they do not land on the first row: without it the first
        # configuration timed ran at half speed (DiT-XL/2 on CPU).
        measure(configs[0], argparse.Namespace(**{**vars(args), "warmup": 0, "iters": 1, "compile": False}), device,
                workdir)
        rows = ladder_rows(args, device, workdir) if args.ladder else [measure(c, args, device, workdir) for c in configs]
    for r in rows:  # ladder: against the first row of the same config; else against plain
        base = next((b for b in rows if b["config"] == r["config"]), r) if args.ladder else \
            next((b for b in rows if b["config"] == "plain"), rows[0])
        r["time_ratio"] = ratio(r["seconds"], base["seconds"])
        r["memory_ratio"] = ratio(r["peak_bytes"], base["peak_bytes"])
        r["speedup"] = ratio(base["seconds"], r["seconds"])

    what = "optimisation ladder" if args.ladder else "Training step"
    switches = "" if args.ladder else f", {args.precision}{', compiled' if args.compile else ''}" + \
        (", grad checkpointing" if args.grad_checkpointing else "") + ("" if args.fused else ", unfused AdamW")
    print(f"\n## {what}: {args.model}, batch {args.batch_size}, {args.image_size} px{switches}"
          f"{' (smoke: tiny widths, numbers meaningless)' if args.smoke else ''}")
    print(hardware(device) + f"; median of {args.iters} step(s) after {args.warmup} warm-up\n")
    if args.ladder:
        print(markdown_table(
            ["config", "settings", "steps/s", "images/s", "peak memory", "speedup x fp32 eager", "memory x fp32 eager"],
            [[r["config"], r["label"], f"{r['steps_per_s']:.3f}", f"{r['images_per_s']:.2f}", fmt_bytes(r["peak_bytes"]),
              fmt_ratio(r["speedup"]), fmt_ratio(r["memory_ratio"])] for r in rows]))
        print("\n(each row adds its switch to the rows above it; target on GPU: the optimised step >= 1.5x fp32 eager)")
        return rows
    base = rows[0]["config"] if not any(r["config"] == "plain" for r in rows) else "plain"
    print(markdown_table(
        ["config", "depth", "trainable %", "steps/s", "images/s", "peak memory", f"time x {base}",
         f"memory x {base}"],
        [[r["config"], r["depth"], f"{r['trainable_pct']:.3g}", f"{r['steps_per_s']:.3f}", f"{r['images_per_s']:.2f}",
          fmt_bytes(r["peak_bytes"]), fmt_ratio(r["time_ratio"]), fmt_ratio(r["memory_ratio"])] for r in rows]))
    if MaskedKDObjective is None and "kd" in args.configs:
        print("\n(kd skipped: tinyfusion.kd is not available in this checkout)")
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
