"""Exponential moving average of a model's trainable tensors.

The EMA is a full copy of the model, so its state dict has the official keys and is
what the 'ema' entry of a training checkpoint holds (evaluation uses it). Only tensors
that train are averaged; frozen ones (pos_embed, frozen base weights under LoRA) are
copied once and stay equal to the model's.
"""
import copy

import torch


class EMA:
    def __init__(self, model, decay=0.9999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = [(e, p) for (n, e), p in zip(self.model.named_parameters(), model.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, decay=None, weight=None):
        """ema <- lerp(ema, model, 1 - decay). `weight` (a 0/1 tensor on the device) scales the step, so a
        skipped training step leaves the EMA untouched without reading the flag on the host."""
        d = self.decay if decay is None else decay
        if not self._pairs:
            return
        ema, cur = (list(t) for t in zip(*self._pairs))
        cur = [p.detach() for p in cur]
        if weight is None:
            torch._foreach_lerp_(ema, cur, 1.0 - d)
        else:
            w = weight.to(ema[0].dtype) * (1.0 - d)
            torch._foreach_lerp_(ema, cur, [w] * len(ema))

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict, strict=True)
