"""Masked knowledge distillation (TinyFusion eq. 8) for DiT, SiT and MAR: L = a_KD*L_KD + a_Diff*L_Diff + beta*L_Rep.

- L_Diff: the student's ordinary training loss (DDPM MSE+VB for DiT, the transport loss for SiT).
- L_KD: MSE between student and teacher outputs on the same noisy input, t and label drops (all
  output channels, so the learned variance is distilled too). For MAR: the DiffLoss network's
  outputs for the same orders, mask, noisy tokens and t, over the masked tokens.
- L_Rep: each mapped student block's output is aligned with a teacher block's output. Massive
  activations are masked first: per sample, entries of the teacher hidden state further than
  `mask_std` standard deviations from that sample's mean are zeroed in both hidden states.
- beta decays linearly from beta_start to beta_end over training.
The teacher is frozen, in eval mode, outside DDP, and runs under inference mode; with
teacher_dtype=torch.bfloat16 its weights are stored in bf16 (half the memory) and it runs under
bf16 autocast whatever the student's precision.
"""
import contextlib
import json

import torch

from diffusion import mean_flat
from .errors import UserError


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


def masked_rep_loss(student_h, teacher_h, mask_std=2.0):
    """Per-sample MSE of hidden states after zeroing the teacher's outliers (> mask_std std from its mean)."""
    t = teacher_h.float()
    dims = tuple(range(1, t.dim()))
    mean = t.mean(dim=dims, keepdim=True)
    std = t.std(dim=dims, keepdim=True)
    keep = ((t - mean).abs() <= mask_std * std).to(student_h.dtype)
    return mean_flat(((student_h - teacher_h) * keep) ** 2)


def _width(model):
    blocks = [b for name in model.block_lists for b in getattr(model, name)]
    return blocks[0].attn.qkv.in_features


class HiddenStates:
    """Collects the outputs of selected blocks of a model during one forward pass."""

    def __init__(self, model, indices):
        blocks = [b for name in model.block_lists for b in getattr(model, name)]
        self.out = {}
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(indices))]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output
        return hook

    def pop(self):
        out, self.out = self.out, {}
        return out


class MaskedKDObjective:
    def __init__(self, base, student, teacher, layer_map, alpha_kd=0.9, alpha_diff=0.1, beta_start=1e-2,
                 beta_end=0.0, mask_std=2.0, teacher_dtype=None):
        if _width(student) != _width(teacher):
            raise UserError(f"teacher width {_width(teacher)} differs from student width {_width(student)}: "
                            f"depth-pruned students need a teacher of the same width")
        self.mar = getattr(student, "family", "") == "MAR"
        self.base, self.teacher, self.layer_map = base, teacher.eval().requires_grad_(False), layer_map
        self.teacher_dtype = teacher_dtype
        if teacher_dtype is not None:
            teacher.to(teacher_dtype)
        self.alpha_kd, self.alpha_diff, self.beta_range, self.mask_std = alpha_kd, alpha_diff, (beta_start, beta_end), mask_std
        self.student_h = HiddenStates(student, [s for s, _ in layer_map])
        self.teacher_h = HiddenStates(teacher, [t for _, t in layer_map])
        self.beta = beta_start

    def draw(self, n, generator):
        return self.base.draw(n, generator)

    @contextlib.contextmanager
    def teacher_mode(self):
        """Inference mode (no autograd bookkeeping at all), plus autocast when the teacher's weights are bf16."""
        device = next(self.teacher.parameters()).device.type
        low = self.teacher_dtype not in (None, torch.float32)
        with torch.inference_mode(), torch.autocast(device, dtype=self.teacher_dtype, enabled=low):
            yield

    def begin_step(self, step, total):
        start, end = self.beta_range
        self.beta = start + (end - start) * step / max(total - 1, 1)

    def _noisy_input(self, x, draws):
        base = self.base
        if hasattr(base, "diffusion"):
            return base.diffusion.q_sample(x, draws["t"], noise=draws["noise"]), draws["t"]
        t = draws["t"].to(x)
        _, xt, _ = base.transport.path_sampler.plan(t, draws["noise"].to(x), x)
        return xt, t

    def loss(self, model, x, y, draws, step):
        diff_loss, kd, logs = self._mar_terms(model, x, y, draws) if self.mar else self._dit_terms(model, x, y, draws, step)
        hs, ht = self.student_h.pop(), self.teacher_h.pop()
        rep = sum(masked_rep_loss(hs[s], ht[t], self.mask_std) for s, t in self.layer_map) / len(self.layer_map)
        total = self.alpha_kd * kd + self.alpha_diff * diff_loss + self.beta * rep
        return total, {**logs, "kd": kd.mean().detach(), "diff": diff_loss.mean().detach(),
                       "rep": rep.mean().detach(), "beta": torch.tensor(self.beta)}

    def _mar_terms(self, model, x, y, draws):
        """MAR: KD on the DiffLoss network's prediction for the same noisy tokens, over masked tokens."""
        from .mar_objectives import mar_kd_terms, masked_token_mean
        terms = mar_kd_terms(model, self.teacher, x, y, draws, teacher_mode=self.teacher_mode)
        sq = ((terms["student_out"] - terms["teacher_out"].to(terms["student_out"].dtype)) ** 2).mean(-1)
        return terms["student_loss"], masked_token_mean(sq, terms["mask"]), {}

    def _dit_terms(self, model, x, y, draws, step):
        captured = {}

        def student(*args, **kwargs):  # the base loss calls the model once; keep its output for L_KD
            captured["out"] = model(*args, **kwargs)
            return captured["out"]

        diff_loss, logs = self.base.loss(student, x, y, draws, step)
        with torch.no_grad():
            xt, t = self._noisy_input(x, draws)
        with self.teacher_mode():
            teacher_out = self.teacher(xt, t, y, force_drop_ids=draws["drop"])
        kd = mean_flat((captured["out"] - teacher_out.to(captured["out"].dtype)) ** 2)
        return diff_loss, kd, logs
