"""Depth pruning outputs and importance-score baselines.

A pruned checkpoint is the ORIGINAL weights of the kept blocks, renumbered 0..K-1 in each block
list (`model.block_lists`), everything else unchanged: a plain state dict with official keys that
the registry model of depth K (`DiT-D14/2`, `DiT-S-D6/2`, `MAR-L-D16`, ...) loads strictly. Beside
it, `<path without extension>.json` records how it was made (source, kept/removed blocks,
pattern, method, scores, command line).

Score baselines (paper section 4): BI / ShortGPT (input-output cosine similarity of each block),
sensitivity (calibration-loss change when one block is skipped), output error (MSE of the final
output when one block is skipped), weight magnitude and random. Every importance is "higher =
keep"; the lowest-scored blocks are removed, never the last one.
"""
import json
import os
import re
import shlex
import sys

import torch
import torch.nn.functional as F

from core.errors import UserError
from models.layer_mask import LayerMask, attach_layer_mask, block_io, detach_layer_mask, model_blocks
from .checkpoint import atomic_path, check_state_dict, save_weights

# BK-SDM "oracle" for XL -> D14 (the README once had 14 instead of 15; this is the fixed list).
ORACLE_KEPT = {28: [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]}
SCORE_METHODS = ("bi", "sensitivity", "output-error", "magnitude", "random")


# ----------------------------------------------------------------------------- kept blocks -> weights

def parse_kept_indices(spec, depth):
    """Sorted, validated kept global block indices from '[0, 2, 4]', '0,2,4' or a list."""
    if isinstance(spec, str):
        text = spec.strip()
        try:
            spec = json.loads(text if text.startswith("[") else f"[{text}]")
        except ValueError:
            raise UserError(f"kept indices {text!r} are not a list of integers such as \"[0, 2, 4]\"")
    if not isinstance(spec, (list, tuple)) or not all(type(i) is int for i in spec):
        raise UserError(f"kept indices {spec!r} must be a list of integers such as [0, 2, 4]")
    if not spec:
        raise UserError("kept indices are empty: keep at least one block")
    bad = [i for i in spec if not 0 <= i < depth]
    if bad:
        raise UserError(f"kept indices {bad} are out of range: the model has blocks 0..{depth - 1}")
    dups = sorted({i for i in spec if spec.count(i) > 1})
    if dups:
        raise UserError(f"kept indices {dups} appear more than once: list each block once")
    return sorted(spec)


def block_depths(state_dict, block_lists):
    """Number of blocks in each block list of a state dict (indices must run 0..n-1)."""
    depths = []
    for name in block_lists:
        found = {int(m.group(1)) for k in state_dict for m in [re.match(rf"^{re.escape(name)}\.(\d+)\.", k)] if m}
        if found != set(range(len(found))):
            raise UserError(f"the state dict's {name} indices {sorted(found)} are not contiguous from 0")
        depths.append(len(found))
    return depths


def split_kept(kept, depths):
    """Global kept indices -> local kept indices of each block list."""
    out, offset = [], 0
    for d in depths:
        out.append([i - offset for i in kept if offset <= i < offset + d])
        offset += d
    return out


def kept_state_dict(state_dict, block_lists, kept):
    """Keep the listed global blocks (over the concatenated lists), renumber each list from 0."""
    depths = block_depths(state_dict, block_lists)
    kept = parse_kept_indices(list(kept), sum(depths))
    renumber = {name: {old: new for new, old in enumerate(local)}
                for name, local in zip(block_lists, split_kept(kept, depths))}
    pattern = re.compile(rf"^({'|'.join(re.escape(n) for n in block_lists)})\.(\d+)\.(.*)$")
    out = {}
    for key, value in state_dict.items():
        m = pattern.match(key)
        if m is None:
            out[key] = value
        elif int(m.group(2)) in renumber[m.group(1)]:
            out[f"{m.group(1)}.{renumber[m.group(1)][int(m.group(2))]}.{m.group(3)}"] = value
    return out


def pruned_model_name(source_name, kept, depths):
    """Name of the pruned model: DiT-XL/2 + 14 kept -> 'DiT-D14/2'; MAR-L + 8 enc / 8 dec -> 'MAR-L-D16'
    (each family's pruned_name)."""
    from .families import family_for
    return family_for(source_name).pruned_name(source_name, [len(local) for local in split_kept(kept, depths)])


# ----------------------------------------------------------------------------- records and files

def record_path(weights_path):
    return os.path.splitext(os.fspath(weights_path))[0] + ".json"


def make_record(source_model, source_checkpoint, pruned_model, kept, source_depth, method, **extra):
    """The JSON record written beside a pruned checkpoint (extra: groups, scores, confidence, ...)."""
    return {"source_model": source_model,
            "source_checkpoint": os.fspath(source_checkpoint) if source_checkpoint else None,
            "pruned_model": pruned_model, "source_depth": source_depth, "depth": len(kept), "kept": list(kept),
            "removed": [i for i in range(source_depth) if i not in kept], "method": method, **extra,
            "command": shlex.join([sys.executable] + sys.argv)}


def save_pruned(path, state_dict, record):
    """Write the plain state dict (.pt, or .safetensors with the record as metadata) and the JSON record."""
    path = os.fspath(path)
    if path.endswith(".json"):
        raise UserError(f"--save-model {path}: give a weights path (.pt or .safetensors); "
                        f"the .json record is written beside it")
    text = json.dumps(record, indent=2)  # fails before anything is written if the record is not JSON
    save_weights(state_dict, path, metadata={"tinyfusion_pruning": json.dumps(record)})
    with atomic_path(record_path(path)) as tmp, open(tmp, "w") as f:
        f.write(text + "\n")


def read_record(weights_path):
    """The JSON record beside a pruned checkpoint, or None."""
    path = record_path(weights_path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_pruned(path, source_model, source_checkpoint, state_dict, block_lists, kept, method,
                 model_kwargs=None, **extra):
    """Everything a pruning script does after choosing `kept`: slice + renumber the original weights,
    name the result, check it against that registry model (built on the meta device, when
    `model_kwargs` is given), and write weights + record. Returns (pruned model name, record)."""
    from .families import family_for
    family = family_for(source_model)
    depths = block_depths(state_dict, block_lists)
    kept = parse_kept_indices(list(kept), sum(depths))
    family.check_kept(state_dict, kept)
    pruned = kept_state_dict(state_dict, block_lists, kept)
    name = family.pruned_name(source_model, [len(local) for local in split_kept(kept, depths)], path)
    if model_kwargs is not None:
        with torch.device("meta"):
            check_state_dict(family.registry[name](**model_kwargs), pruned, name, path)
    record = make_record(source_model, source_checkpoint, name, kept, sum(depths), method, **extra)
    family.export_pruned(path, pruned, record)
    return name, record


def pruned_summary(name, record, path):
    """What a pruning script prints at the end: kept/removed blocks and how to load the result."""
    return (f"kept {record['kept']}\nremoved {record['removed']}\nsaved {name} ({record['depth']} of "
            f"{record['source_depth']} blocks) to {path}; load it with --model {name}")


# ----------------------------------------------------------------------------- score baselines

def check_n_pruned(n_pruned, depth):
    if not 1 <= n_pruned < depth:
        raise UserError(f"--n-pruned {n_pruned} is not possible for a model of depth {depth}: "
                        f"remove between 1 and {depth - 1} blocks")


def choose_removed(importance, n_pruned):
    """The n least important blocks (ties: lower index first), never the last block."""
    check_n_pruned(n_pruned, len(importance))
    order = sorted(range(len(importance) - 1), key=lambda i: (importance[i], i))
    return sorted(order[:n_pruned])


def _calibration_pass(model, objective, x, y, draws):
    """(mean loss, model output) of one calibration forward with fixed randomness `draws`."""
    captured = []
    handle = model.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        loss, _ = objective.loss(model, x, y, draws, 0)
    finally:
        handle.remove()
    return loss.float().mean(), getattr(captured[0], "sample", captured[0]).float()  # diffusers: .sample


def _bi_batch(blocks, run):
    """Mean cosine similarity between each block's input and output tokens, for one batch."""
    sims = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i):
        def record(module, args, kwargs, output):
            x, out = block_io(module, args, kwargs, output)
            sims[i] += F.cosine_similarity(x.float(), out.float(), dim=-1).mean().item()
        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return 1.0 - sims  # ShortGPT's BI: low = the block barely changes its input


@torch.no_grad()
def bi_importance_clean(model, batches):
    """BI as the official prune_by_score.py computes it: the model in eval mode on clean latents, `batches`
    of (x, t, y) with t passed to the model as is (the official draws t from [0, 250)); importance = 1 - the
    mean over batches of cosine_similarity(block output, block input, dim=-1).mean()."""
    blocks, was_training = model_blocks(model), model.training
    model.eval()
    try:
        total = sum(_bi_batch(blocks, lambda: model(x, t, y)) for x, t, y in batches)
    finally:
        model.train(was_training)
    return (total / len(batches)).tolist()


def _skip_batch(model, depth, run, method):
    """Per-block loss increase (sensitivity) or output MSE (output error) when that block is skipped."""
    mask = LayerMask([(depth, depth)])  # a single all-keep option; `masks` pins the skips
    attach_layer_mask(model, mask)
    try:
        base_loss, base_out = run()
        scores = torch.zeros(depth, dtype=torch.float64)
        for i in range(depth):
            with mask.masks(torch.arange(depth) != i):
                loss, out = run()
            scores[i] = (loss - base_loss).item() if method == "sensitivity" else F.mse_loss(out, base_out).item()
    finally:
        detach_layer_mask(model)
    return scores


@torch.no_grad()
def score_blocks(model, method, batches=(), objective=None, seed=0):
    """Importance per global block (higher = keep). `batches` yields (x, y) on the model's device;
    `objective` (the family's, tinyfusion/families/) gives the calibration loss; its randomness (t, noise) is drawn
    once per batch from `seed`, so every candidate sees the same t and noise."""
    if method not in SCORE_METHODS:
        raise UserError(f"unknown scoring method {method!r}: choose one of {', '.join(SCORE_METHODS)}")
    blocks = model_blocks(model)
    if method == "magnitude":
        return [torch.cat([p.detach().abs().flatten().float() for p in b.parameters()]).mean().item() for b in blocks]
    if method == "random":
        return torch.rand(len(blocks), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    was_training = model.training
    model.eval()
    total, count = torch.zeros(len(blocks), dtype=torch.float64), 0
    try:
        for b, (x, y) in enumerate(batches):
            draws = objective.draw(len(x), torch.Generator().manual_seed(seed * 100_003 + b))
            draws = {k: v.to(x.device) for k, v in draws.items()}
            run = lambda: _calibration_pass(model, objective, x, y, draws)  # noqa: E731
            total += _bi_batch(blocks, run) if method == "bi" else _skip_batch(model, len(blocks), run, method)
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError("no calibration batches: check --data-path, --nsamples and --batch-size")
    return (total / count).tolist()
