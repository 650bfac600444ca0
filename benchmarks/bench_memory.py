"""Training-step memory at a batch this machine cannot run: a measured, linear-in-batch estimate.

    python benchmarks/bench_memory.py --threads 1     # DiT-XL/2, 256 px, estimate for batch 32

Does DiT-XL/2 mask learning fit at batch 32 on an 80 GB GPU? Without a GPU we count the bytes that
decide it, for the real `Trainer` objects of each bench_training configuration:
  static     every tensor that lives through the step: weights and buffers, the EMA copy, the KD
             teacher (as allocated), and the gradients and AdamW's two moments of the trainable
             weights (3 x their size, counted rather than allocated, so XL fits in this machine's RAM);
  saved      every tensor autograd keeps from the forward pass for the backward pass, counted by
             storage through `torch.autograd.graph.saved_tensors_hooks` (bf16 weight copies made by
             autocast included), measured at batch 1 and 2; it is exactly linear in the batch
             (per-image activations + a batch-independent part), so the batch-B value is extrapolated.
estimate(B) = static + saved(B). Not counted: transient buffers of single ops, the backward pass's
gradient temporaries, the allocator's rounding and fragmentation (usually 10-20% on CUDA), and with
gradient checkpointing the one block that is recomputed at a time. Mask rows use the official
formulation (every block runs for every sample): an upper bound, as split forward keeps about 0.55x of
the activations of a 1:2 search (bench_search_step.py). On a GPU the peak itself is
what counts: run bench_training.py with --batch-size 32.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # `python benchmarks/bench_memory.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import bench_training
from benchmarks.common import add_common_args, fmt_bytes, hardware, latent_shape, markdown_table, release_memory, resolve
from tinyfusion.logging import RunLogger
from tinyfusion.runtime import Runtime
from tinyfusion.trainer import Trainer

PRESETS = dict(cpu=dict(model="DiT-XL/2", image_size=256), cuda=dict(model="DiT-XL/2", image_size=256),
               smoke=dict(model="DiT-B/2", image_size=32))
# (config, precision, gradient checkpointing)
ROWS = [("plain", "fp32", False), ("plain", "bf16", False), ("mask+lora", "bf16", False), ("mask+lora", "bf16", True),
        ("mask+full", "bf16", False), ("kd", "bf16", False)]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model", type=str, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="the batch to estimate for")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to compare the estimate with")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--check-linearity", action="store_true", help="also measure batch 3 against the line")
    return parser


def storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def static_bytes(trainer, objective):
    """Weights, buffers, EMA copy and teacher as allocated; gradients and AdamW's two moments as what they
    will be (one tensor of the parameter's size each, per trainable parameter), so no step has to run."""
    model = list(trainer.model.parameters()) + list(trainer.model.buffers())
    ema = list(trainer.ema.model.parameters()) + list(trainer.ema.model.buffers())
    teacher = list(objective.teacher.parameters()) if hasattr(objective, "teacher") else []
    trainable = sum(p.numel() * p.element_size() for g in trainer.opt.param_groups for p in g["params"])
    return storage_bytes(model + ema + teacher) + 3 * trainable


def saved_bytes(forward, params=()):
    """Bytes of the distinct storages autograd saves while `forward()` runs (storages of `params` excluded);
    returns (bytes, forward's output)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(saved.values()), out


def step_saved_bytes(trainer, objective, x, y):
    """Saved bytes of one forward pass of the objective, under the trainer's autocast."""
    draws = objective.draw(len(x), torch.Generator().manual_seed(0))

    def forward():
        with torch.autocast(x.device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            return objective.loss(trainer.net, x, y, draws, 0)[0].mean()

    nbytes, loss = saved_bytes(forward, trainer.model.parameters())
    loss.backward()  # frees what was saved
    trainer.opt.zero_grad(set_to_none=True)
    return nbytes


def measure(config, precision, checkpointing, args, device):
    # Reproducible weights and inputs: the KD row's saved bytes move with the values by up to ~1.5% at
    # batch 3 (seen with some global seeds), which the linearity check would report as noise.
    torch.manual_seed(0)
    settings = argparse.Namespace(**{**vars(args), "precision": precision, "grad_checkpointing": checkpointing,
                                     "compile": False, "fused": True, "batch_size": 1})  # the trainer's own step: batch 1
    model, objective, groups = bench_training.setup(config, settings, device)
    if hasattr(objective, "mask"):  # the official formulation: with split forward the saved bytes depend on how
        objective.mask.split_forward = False  # the random masks fall, not linearly on the batch (bench_search_step)
    trainer = Trainer(Runtime(device=device), model, objective, range(2), bench_training.trainer_args(settings, "."),
                      param_groups=groups, logger=RunLogger(None, is_main=False))
    if hasattr(objective, "ema_mask"):
        objective.ema_mask = trainer.ema.model.layer_mask
    shape = latent_shape(args.model, args.image_size)
    batches = (1, 2, 3) if args.check_linearity else (1, 2)
    inputs = {b: (torch.randn(b, *shape, device=device), torch.randint(0, 1000, (b,), device=device)) for b in batches}
    saved = {b: step_saved_bytes(trainer, objective, *inputs[b]) for b in batches}
    per_image, fixed = saved[2] - saved[1], 2 * saved[1] - saved[2]
    static = static_bytes(trainer, objective)
    row = dict(config=config, precision=precision, checkpointing=checkpointing, static=static, per_image=per_image,
               estimate=static + fixed + args.batch_size * per_image)
    if args.check_linearity:  # the batch-3 measurement against the line through batches 1 and 2
        row["linearity_error"] = abs(saved[3] - (fixed + 3 * per_image)) / saved[3]
    del trainer, model, objective
    release_memory()
    return row


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve(args, PRESETS["cpu"], PRESETS["cuda"], PRESETS["smoke"])
    rows = [measure(*row, args, device) for row in ROWS]
    limit = args.gpu_gib * 1e9  # GPU memory is sold in decimal GB
    print(f"\n## Training-step memory estimate: {args.model}, {args.image_size} px, batch {args.batch_size}"
          f"{' (smoke: tiny widths, numbers meaningless)' if args.smoke else ''}")
    print(hardware(device) + "; saved activations measured at batch 1 and 2, extrapolated linearly\n")
    print(markdown_table(
        ["config", "precision", "grad ckpt", "static", "saved / image", f"estimate at batch {args.batch_size}",
         f"fits {args.gpu_gib:g} GB"],
        [[r["config"], r["precision"], "on" if r["checkpointing"] else "off", fmt_bytes(r["static"]),
          fmt_bytes(r["per_image"]), fmt_bytes(r["estimate"]), "yes" if r["estimate"] < limit else "NO"] for r in rows]))
    print("\n(estimate = static + saved activations; transient buffers and allocator slack come on top)")
    return rows


if __name__ == "__main__":
    from tinyfusion.errors import run_main
    run_main(main)
