"""Masked knowledge distillation (TinyFusion eq. 8) for DiT, SiT and MAR: L = a_KD*L_KD + a_Diff*L_Diff + beta*L_Rep.

DiT computes every term with `diffusion.training_losses_kd_rep`, the official API (one implementation
for scripts written against the official code and for train_masked_kd.py). By default, as the official code:
- L_Diff: the student's ordinary loss (MSE + VB); a_Diff = 1 - a_KD unless --alpha-diff is given.
- L_KD: MSE between the student's and teacher's eps channels + vb_kd, the VB term against the teacher's
  p(x_{t-1}|x_t) (trains the learned variance). Ours (--kd-channels all): MSE over all output channels.
- L_Rep: each mapped student block's output is aligned with a teacher block's output after masking
  massive activations: each hidden state is zeroed where it lies 2 std or more from its own per-sample
  mean (--rep-mask both). Ours (--rep-mask teacher): the difference is masked with the teacher's mask only.
SiT (transport loss) and MAR (DiffLoss network outputs over the masked tokens) use L_KD = MSE of the
outputs and the same L_Rep. What differs per family lives in its objective (tinyfusion/families/):
`kd_attach` installs the hooks, `kd_loss` computes the terms (usually ending in `combine`). beta decays linearly from beta_start to beta_end over training.
The teacher is frozen, in eval mode, outside DDP, and runs under inference mode and the student's
autocast (fp16 by default on CUDA, as the official code); with teacher_dtype=torch.bfloat16 its weights
are stored in bf16 (half the memory) and it runs under bf16 autocast whatever the student's precision.
"""
import contextlib
import json

import torch

from core.errors import UserError
from diffusion import REP_MASKS, masked_rep_loss
from models.layer_mask import model_blocks


# The official train_masked_kd.py's fixed tables: student name -> (teacher depth, student blocks, teacher blocks).
OFFICIAL_LAYER_MAPS = {
    "DiT-D14/2": (28, list(range(14)), list(range(1, 28, 2))),
    "DiT-D19/2": (28, [2, 5, 7, 10, 12, 15, 18], [3, 7, 11, 15, 19, 23, 27]),
    "DiT-D7/2": (14, list(range(7)), list(range(1, 14, 2))),  # from DiT-D14/2
}
LAYER_MAP_SOURCES = ("auto", "table", "record")


def choose_layer_map(student_name, student_depth, teacher_depth, spec=None, source="auto", record=None):
    """(pairs, where they came from): --layer-map `spec`, else the official table for the student's name
    (source "auto" when the teacher depth fits it, or "table"), else the pruning record ("record")."""
    if spec:
        return parse_layer_map(spec, student_depth, teacher_depth), "--layer-map"
    if source not in LAYER_MAP_SOURCES:
        raise UserError(f"unknown --layer-map-source {source!r}: choose one of {', '.join(LAYER_MAP_SOURCES)}")
    table = OFFICIAL_LAYER_MAPS.get(student_name)
    if source == "table" and table is None:
        raise UserError(f"no official layer-map table for {student_name} (only {', '.join(OFFICIAL_LAYER_MAPS)}): "
                        f"use --layer-map-source record or --layer-map")
    if source == "table" and table[0] != teacher_depth:
        raise UserError(f"the official layer map of {student_name} is for a depth-{table[0]} teacher, not "
                        f"{teacher_depth}: use --layer-map-source record or --layer-map")
    if source != "record" and table is not None and table[0] == teacher_depth:
        return list(zip(table[1], table[2])), "the official table"
    return layer_map_from_record(record, teacher_depth), "the pruning record"


def layer_map_from_record(record, teacher_depth):
    """Student -> teacher block pairs: in each pruning group, the last student block kept from the group
    is aligned with the teacher's last block of that group (the reference's tables follow from this)."""
    if record is None:
        raise UserError("no pruning record (.json beside the --load-weight file) to derive the KD layer map from: "
                        "pass --layer-map '0:1,1:3,...' explicitly")
    source_depth = int(record["source_depth"])
    if source_depth != teacher_depth:
        raise UserError(f"the student was pruned from a depth-{source_depth} model but the teacher has depth "
                        f"{teacher_depth}: use the source model as teacher or pass --layer-map explicitly")
    kept = sorted(int(k) for k in record["kept"])
    groups = record.get("groups")
    if not groups:  # index/score pruning: even local blocks of size depth_t / depth_s
        size = teacher_depth // len(kept) if teacher_depth % len(kept) == 0 else None
        if size is None:
            raise UserError(f"cannot derive a layer map for {len(kept)} of {teacher_depth} blocks without pruning "
                            f"groups: pass --layer-map explicitly")
        groups = [[1, size]] * (teacher_depth // size)
    pairs, start = [], 0
    for _, m in groups:
        in_group = [s for s, k in enumerate(kept) if start <= k < start + m]
        if in_group:
            pairs.append((in_group[-1], start + m - 1))
        start += m
    return pairs


def parse_layer_map(spec, student_depth, teacher_depth):
    """'0:1,1:3' or a JSON list of pairs -> validated [(student, teacher), ...]."""
    try:
        pairs = json.loads(spec) if spec.strip().startswith("[") else \
            [tuple(int(v) for v in item.split(":")) for item in spec.split(",") if item.strip()]
        pairs = [(int(s), int(t)) for s, t in pairs]
    except (ValueError, TypeError):
        raise UserError(f"--layer-map {spec!r} is not a list of student:teacher pairs, e.g. '0:1,1:3'")
    bad = [(s, t) for s, t in pairs if not (0 <= s < student_depth and 0 <= t < teacher_depth)]
    if bad or not pairs:
        raise UserError(f"--layer-map pairs {bad or '(none)'} are out of range: student blocks 0..{student_depth - 1}, "
                        f"teacher blocks 0..{teacher_depth - 1}")
    return pairs


def _width(model):
    """Width of the hidden states: the input features of the first block's attention projection (qkv, or
    diffusers' to_q; a diffusers DiT block's first Linear is its 256-wide timestep embedder)."""
    return next(m.in_features for n, m in model_blocks(model)[0].named_modules() if n.split(".")[-1] in ("qkv", "to_q"))


class HiddenStates:
    """Collects the outputs of selected blocks of a model during one forward pass."""

    def __init__(self, model, indices):
        blocks = model_blocks(model)
        self.out = {}
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(indices))]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output
        return hook

    def pop(self):
        out, self.out = self.out, {}
        return out


class FrozenTeacher:
    """The teacher as `training_losses_kd_rep` calls it: under `mode()`, its blocks behind `.module`."""

    def __init__(self, module, mode):
        self.module, self.mode = module, mode

    def __call__(self, *args, **kwargs):
        with self.mode():
            return self.module(*args, **kwargs)


class MaskedKDObjective:
    def __init__(self, base, student, teacher, layer_map, alpha_kd=0.9, alpha_diff=None, beta_start=1e-2,
                 beta_end=0.0, mask_std=2.0, teacher_dtype=None, rep_mask="both", kd_channels="eps"):
        if _width(student) != _width(teacher):
            raise UserError(f"teacher width {_width(teacher)} differs from student width {_width(student)}: "
                            f"depth-pruned students need a teacher of the same width")
        if rep_mask not in REP_MASKS:
            raise UserError(f"unknown --rep-mask {rep_mask!r}: choose one of {', '.join(REP_MASKS)}")
        self.base, self.teacher, self.layer_map = base, teacher.eval().requires_grad_(False), layer_map
        self.teacher_dtype = teacher_dtype
        if teacher_dtype is not None:
            teacher.to(teacher_dtype)
        self.alpha_kd, self.beta_range, self.mask_std = alpha_kd, (beta_start, beta_end), mask_std
        self.alpha_diff = 1.0 - alpha_kd if alpha_diff is None else alpha_diff
        self.rep_mask, self.kd_channels = rep_mask, kd_channels
        base.kd_attach(self, student, teacher)  # the family's objective installs what its kd_loss needs
        self.beta = beta_start

    def draw(self, n, generator):
        return self.base.draw(n, generator)

    @contextlib.contextmanager
    def teacher_mode(self):
        """Inference mode (no autograd bookkeeping at all) under the student's autocast, or bf16 autocast when
        the teacher's weights are bf16."""
        device = next(self.teacher.parameters()).device.type
        low = self.teacher_dtype not in (None, torch.float32)
        with torch.inference_mode(), (torch.autocast(device, dtype=self.teacher_dtype) if low else
                                      contextlib.nullcontext()):
            yield

    def begin_step(self, step, total):
        start, end = self.beta_range
        self.beta = start + (end - start) * step / max(total - 1, 1)

    def loss(self, model, x, y, draws, step):
        return self.base.kd_loss(self, model, x, y, draws, step)

    def attach_hidden_states(self, student, teacher):
        """Collect the mapped blocks' outputs of both models in every forward (for `combine`)."""
        self.student_h = HiddenStates(student, [s for s, _ in self.layer_map])
        self.teacher_h = HiddenStates(teacher, [t for _, t in self.layer_map])

    def combine(self, diff_loss, kd, logs):
        """(a_KD * kd + a_Diff * diff_loss + beta * L_Rep, logs) per sample, L_Rep from the hidden states of this
        step (attach_hidden_states); diff_loss and kd (B,) are the family's student loss and output KD term."""
        hs, ht = self.student_h.pop(), self.teacher_h.pop()
        rep = sum(masked_rep_loss(hs[s], ht[t], self.mask_std, self.rep_mask)
                  for s, t in self.layer_map) / len(self.layer_map)
        total = self.alpha_kd * kd + self.alpha_diff * diff_loss + self.beta * rep
        return total, {**logs, **self.logs(kd, diff_loss, rep)}

    def logs(self, kd, diff_loss, rep):
        return {"kd": kd.mean().detach(), "diff": diff_loss.mean().detach(), "rep": rep.mean().detach(),
                "beta": torch.tensor(self.beta)}
