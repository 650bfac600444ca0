"""Hand-written LoRA for nn.Linear (TinyFusion's "delta-w" during the pruning search).

`LoRALinear` keeps the wrapped layer's `weight` and `bias` under their own names (it does not nest
them as `base.weight`), so a model's official state-dict keys stay valid while LoRA is on, and
`strip_lora` / `merge_lora` give back plain nn.Linear layers with the same names. The base weights
are frozen; only lora_A (rank x in, kaiming-uniform as in the usual LoRA) and lora_B (out x rank,
zeros, so the layer is an exact no-op at init) train. The update is (alpha / rank) * B @ A.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, linear, rank=8, alpha=16):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight, self.bias = linear.weight, linear.bias  # the very same Parameters
        self._base_requires_grad = (linear.weight.requires_grad,
                                    None if linear.bias is None else linear.bias.requires_grad)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self):
        return self.weight + (self.lora_B @ self.lora_A) * self.scale

    def to_linear(self, merge):
        """A plain nn.Linear holding the original (merge=False) or merged (merge=True) weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = nn.Parameter(self.merged_weight().detach()) if merge else self.weight
        linear.weight, linear.bias = weight, self.bias
        linear.weight.requires_grad_(self._base_requires_grad[0])
        if self.bias is not None:
            self.bias.requires_grad_(self._base_requires_grad[1])
        return linear


def _modules(module_or_blocks):
    return [module_or_blocks] if isinstance(module_or_blocks, nn.Module) else list(module_or_blocks)


def _replace(root, cls, make):
    """Replace every submodule of type `cls` under `root` by make(submodule, qualified name)."""
    for parent_name, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is cls:
                setattr(parent, name, make(child, f"{parent_name}.{name}".lstrip(".")))


def apply_lora(module_or_blocks, rank=8, alpha=16, targets=None):
    """Put LoRA on every nn.Linear inside the given module(s); `targets` (name suffixes such as
    ('qkv', 'fc1')) narrows the set. Freezes the base weights; returns the new LoRA parameters."""
    params = []

    def make(linear, name):
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            return linear
        lora = LoRALinear(linear, rank, alpha)
        params.extend([lora.lora_A, lora.lora_B])
        return lora

    for module in _modules(module_or_blocks):
        _replace(module, nn.Linear, make)
    return params


def merge_lora(model):
    """Fold every LoRA update into its base weight and restore plain nn.Linear layers."""
    _replace(model, LoRALinear, lambda lora, _: lora.to_linear(merge=True))
    return model


def strip_lora(model):
    """Discard every LoRA update and restore the original weights (what pruning outputs)."""
    _replace(model, LoRALinear, lambda lora, _: lora.to_linear(merge=False))
    return model


def lora_state_dict(model):
    """Only the LoRA factors, keyed like the model's state dict (e.g. 'blocks.0.attn.qkv.lora_A')."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
