"""Learnable N:M layer masks (TinyFusion's depth-pruning search), for any model with `block_lists`.

The L blocks (the `block_lists` ModuleLists concatenated in order) are split into consecutive
groups with a pattern N:M (keep N of M). For each group all C(M, N) keep-masks are enumerated
(itertools.combinations order) and a learnable logit vector over them, initialised to the
constant 0.02, defines a categorical distribution. Training draws, per sample, a hard
Gumbel-softmax one-hot over the options from logits*scaling at temperature tau (straight-through:
the forward value is exactly one-hot, the backward pass takes the softmax's gradient), and the
block mask is one-hot @ options. A masked block computes m*block(x) + (1-m)*x, which is exact
for m in {0, 1}, so a fixed mask reproduces the pruned model's output (and, without gradients,
blocks masked out for the whole batch are not even run).

Split forward (`LayerMask.split_forward`, on by default; ours): the official code runs every block
forward and backward for every sample. With a hard mask, nothing flows back into block(x) for the
samples with m = 0 (d out / d block(x) = m = 0 exactly), and the straight-through gate gradient only
needs the value block(x) - x there. So each block runs with autograd on the samples that keep it and
under no_grad on the ones that drop it; the output, the loss and every gradient (weights, LoRA, gates,
input, conditioning) are the same, while the backward pass and the saved activations of a 1:2 search
shrink by about half. A block's tensor arguments whose leading dimension is the batch (DiT's c) are
taken to be per-sample and split with x; with dropout inside the blocks (MAR) the random draws fall
differently across the two halves, so results are then equal in distribution, not bit for bit.
Passes whose masks are not all 0 or 1 (soft masks, pinned fractions) run the official formulation.

Gate estimators (ours, off by default): `soft` masks are the Gumbel-softmax sample itself (continuous,
pathwise gradient); with `straight_through` off the hard masks carry no gate gradient and `log_prob` gives
the drawn options' log-probability for a score-function estimator (tinyfusion.mask_learning).

`attach_layer_mask` keeps every parameter name (blocks are re-classed, not wrapped), so LoRA,
EMA (deepcopy) and DDP work unchanged; the mask itself lives at `model.layer_mask`.
"""
import contextlib
import functools
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion.errors import UserError

# name: (base registry model, groups). The DiT names are the reference's; SiT and MAR mirror them.
_DIT_PATTERNS = {
    "XL-1-2": ("XL/2", [[1, 2]] * 14),   # -> D14
    "XL-2-4": ("XL/2", [[2, 4]] * 7),    # -> D14
    "XL-7-14": ("XL/2", [[7, 14]] * 2),  # -> D14 (3,432 options per group)
    "XL-1-4": ("XL/2", [[1, 4]] * 7),    # -> D7
    "D14-1-2": ("D14/2", [[1, 2]] * 7),  # -> D7
    "D14-2-4": ("D14/2", [[2, 4]] * 3 + [[1, 2]]),  # -> D7 (14 = 3*4 + 2)
}
PRESETS = {f"{fam}-{k}": (f"{fam}-{base}", groups)
           for fam in ("DiT", "SiT") for k, (base, groups) in _DIT_PATTERNS.items()}
# MAR: encoder and decoder blocks concatenated (B 12+12, L 16+16, H 20+20); 1:2 groups never cross the boundary.
PRESETS.update({f"MAR-{s}-1-2": (f"MAR-{s}", [[1, 2]] * n) for s, n in (("B", 12), ("L", 16), ("H", 20))})


def resolve_preset(name):
    """(base model name, groups) of a preset such as 'DiT-XL-1-2' (the reference's 'DiT_XL_1_2' also works)."""
    key = name.replace("_", "-") if isinstance(name, str) else name
    if key not in PRESETS:
        raise UserError(f"unknown pruning preset {name!r}: choose one of {', '.join(PRESETS)}, "
                        f"or give a registry model with explicit groups")
    base, groups = PRESETS[key]
    return base, [list(g) for g in groups]


def is_preset(name):
    return isinstance(name, str) and name.replace("_", "-") in PRESETS


def _group_list(text):
    """'[[2,4],[3,4]]', '[[1,2]]*14' or '[[1,2]]*2+[[2,4]]' as data: JSON lists, repeats and +, never evaluated."""
    import json
    import re
    terms, level, start = [], 0, 0
    for i, ch in enumerate(text):
        level += (ch == "[") - (ch == "]")
        if ch == "+" and level == 0:
            terms.append(text[start:i])
            start = i + 1
    out = []
    for term in terms + [text[start:]]:
        m = re.fullmatch(r"\s*(\[.*\])\s*(?:\*\s*(\d{1,4}))?\s*", term, re.S)
        if not m:
            raise ValueError(term)
        out += json.loads(m.group(1)) * int(m.group(2) or 1)
    return out


def parse_groups(spec, depth):
    """Validated [(N, M), ...] from a list of pairs, a string '[[2,4],[3,4]]' or '[[1,2]]*14', or 'N:M'
    (repeated over depth)."""
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text and "[" not in text:
            try:
                n, m = (int(v) for v in text.split(":"))
            except ValueError:
                raise UserError(f"groups {spec!r}: write a pattern as 'N:M' (e.g. 1:2) or a list like '[[2,4],[2,4]]'")
            if m < 1 or depth % m:
                raise UserError(f"groups {spec!r}: M={m} does not divide the depth {depth}; give an explicit list")
            spec = [[n, m]] * (depth // m)
        else:
            try:
                spec = _group_list(text)
            except ValueError:
                raise UserError(f"groups {spec!r} is not a list of [N, M] pairs such as '[[2,4],[2,4],[3,4]]' "
                                f"or '[[1,2]]*14' (terms may be joined with +)")
    if not isinstance(spec, (list, tuple)) or not spec or not all(
            isinstance(g, (list, tuple)) and len(g) == 2 and all(type(v) is int for v in g) for g in spec):
        raise UserError(f"groups {spec!r} must be a non-empty list of [N, M] integer pairs such as [[1,2],[1,2]]")
    groups = [(int(n), int(m)) for n, m in spec]
    for i, (n, m) in enumerate(groups):
        if not 1 <= n <= m:
            raise UserError(f"group {i} is {n}:{m}: each group must keep 1 <= N <= M blocks")
    total = sum(m for _, m in groups)
    if total != depth:
        raise UserError(f"groups cover {total} blocks (sum of M) but the model has depth {depth}: "
                        f"make the M values sum to {depth}")
    return groups


def model_blocks(model):
    """The prunable residual blocks of `model`, concatenated over `model.block_lists` in execution order."""
    return [block for name in model.block_lists for block in getattr(model, name)]


class LayerMask(nn.Module):
    """Categorical distributions over the N:M keep-masks of consecutive block groups."""

    def __init__(self, groups, tau=4.0, scaling=100.0, init=0.02):
        super().__init__()
        self.groups = parse_groups([list(g) for g in groups], sum(int(m) for _, m in groups))
        self.tau, self.scaling = tau, scaling
        combos = [list(itertools.combinations(range(m), n)) for n, m in self.groups]
        self.logits = nn.ParameterList([nn.Parameter(torch.full((len(c),), float(init))) for c in combos])
        self._combos = combos
        # All groups padded to (G, Cmax, Mmax) so a whole batch is sampled in one computation.
        c_max, m_max = max(len(c) for c in combos), max(m for _, m in self.groups)
        options = torch.zeros(len(combos), c_max, m_max)
        for g, cs in enumerate(combos):
            for c, kept in enumerate(cs):
                options[g, c, list(kept)] = 1.0
        layout = [g * m_max + j for g, (_, m) in enumerate(self.groups) for j in range(m)]
        self.register_buffer("options", options, persistent=False)
        self.register_buffer("layout", torch.tensor(layout), persistent=False)
        self.register_buffer("fixed", None, persistent=False)
        self.current = None   # the (B, depth) masks of the forward pass in progress
        self.split_forward = True  # False: the official formulation, every block runs for every sample
        self._rows_of, self._rows = None, {}  # per-block (kept, dropped) sample indices of `current`
        self._pinned = None   # set by the `masks` context
        self.generator = None  # optional torch.Generator for the Gumbel noise drawn in forward passes
        # Gate estimators (ours; the defaults are the official straight-through hard masks):
        self.soft = False  # True: the mask is the soft Gumbel-softmax sample itself (no one-hot)
        self.straight_through = True  # False: hard masks carry no gate gradient (a score-function term does)
        self.drawn = None  # (B, G) option index of every sample and group in the last sampled pass

    def __getstate__(self):
        # deepcopy (EMA copies) must not carry the in-flight masks: they are non-leaf graph tensors.
        return {**super().__getstate__(), "current": None, "generator": None, "_rows_of": None, "_rows": {},
                "drawn": None}

    @property
    def depth(self):
        return sum(m for _, m in self.groups)

    def extra_repr(self):
        return f"groups={self.groups}, tau={self.tau}, scaling={self.scaling}"

    def set_schedule(self, step, total_steps, tau_range=(4.0, 0.1), scaling_range=(100.0, 100.0)):
        """The reference's linear schedules: value = start + (end - start) * step / max(total_steps - 1, 1)."""
        f = step / max(total_steps - 1, 1)
        self.tau = tau_range[0] + (tau_range[1] - tau_range[0]) * f
        self.scaling = scaling_range[0] + (scaling_range[1] - scaling_range[0]) * f

    def _padded_logits(self):
        c_max = self.options.shape[1]
        return torch.stack([F.pad(l.float() * self.scaling, (0, c_max - l.numel()), value=-math.inf)
                            for l in self.logits])

    def _masks_from_onehot(self, onehot):
        """(B, G, Cmax) one-hot (or straight-through) option weights -> (B, depth) block masks."""
        per_group = (onehot.unsqueeze(-1) * self.options).sum(-2)  # (B, G, Mmax); elementwise keeps 0/1 exact
        return per_group.flatten(1)[:, self.layout]

    def choice(self):
        """The argmax option index of each group."""
        return [int(l.argmax()) for l in self.logits]

    def _choice_masks(self, choice):
        onehot = torch.zeros(1, *self.options.shape[:2], device=self.options.device)
        onehot[0, torch.arange(len(choice)), torch.tensor(choice)] = 1.0
        return self._masks_from_onehot(onehot)[0]

    def sample(self, batch_size, generator=None):
        """(batch, depth) hard masks: Gumbel straight-through in training, the argmax option in eval,
        or the pinned one after `fix`."""
        if self.fixed is not None:
            return self.fixed.expand(batch_size, -1)
        if not self.training:
            return self._choice_masks(self.choice()).expand(batch_size, -1)
        logits = self._padded_logits()  # (G, Cmax)
        exp = torch.empty((batch_size, *logits.shape), device=logits.device).exponential_(generator=generator)
        gumbel = -exp.clamp_min(torch.finfo(exp.dtype).tiny).log()
        soft = torch.softmax((logits + gumbel) / self.tau, dim=-1)
        self.drawn = soft.argmax(-1)  # distributed as softmax(logits * scaling) whatever tau is (Gumbel-max)
        if self.soft:
            return self._masks_from_onehot(soft)
        hard = F.one_hot(self.drawn, soft.shape[-1]).to(soft.dtype)
        if not self.straight_through:
            return self._masks_from_onehot(hard)
        # Straight-through: exactly `hard` in value (soft - soft.detach() is exactly 0), softmax gradient.
        return self._masks_from_onehot(hard + (soft - soft.detach()))

    def log_prob(self):
        """(B,) log-probability of the options drawn in the last sampled pass, summed over groups, as a function
        of the logits (for a score-function gradient)."""
        log_p = torch.log_softmax(self._padded_logits(), dim=-1)  # (G, Cmax)
        return log_p.gather(1, self.drawn.t()).sum(0)

    def decision(self):
        """Kept global block indices (argmax option of every group), ascending."""
        kept, offset = [], 0
        for (_, m), cs, c in zip(self.groups, self._combos, self.choice()):
            kept += [offset + j for j in cs[c]]
            offset += m
        return kept

    def probabilities(self):
        return [torch.softmax(l.detach().float() * self.scaling, 0) for l in self.logits]

    def confidence(self):
        """Per-group max softmax probability of logits*scaling (1.0 = converged)."""
        return [float(p.max()) for p in self.probabilities()]

    def summary(self):
        """One log line: the current decision and per-group confidence."""
        return f"decision {self.decision()} confidence [{', '.join(f'{c:.3f}' for c in self.confidence())}]"

    def choice_for_kept(self, kept):
        """Per-group option indices that keep exactly the global indices `kept`."""
        kept, choice, offset = set(int(k) for k in kept), [], 0
        for g, ((n, m), cs) in enumerate(zip(self.groups, self._combos)):
            local = tuple(j for j in range(m) if offset + j in kept)
            if local not in cs:
                raise UserError(f"kept blocks {[offset + j for j in local]} do not fit group {g} ({n}:{m}, "
                                f"blocks {offset}-{offset + m - 1}): keep exactly {n} of them")
            choice.append(cs.index(local))
            offset += m
        return choice

    @torch.no_grad()
    def fix(self, choice):
        """Pin one option per group (list of option indices, see `choice_for_kept`); None unpins."""
        if choice is None:
            self.fixed = None
            return
        if len(choice) != len(self.groups) or any(not 0 <= c < len(cs) for c, cs in zip(choice, self._combos)):
            raise UserError(f"fixed choice {list(choice)} needs one option index per group "
                            f"(group sizes {[len(cs) for cs in self._combos]})")
        self.fixed = self._choice_masks(list(choice))

    @contextlib.contextmanager
    def masks(self, m):
        """Run forward passes with given masks: (depth,) or (B, depth), any 0/1 values (not only N:M ones)."""
        m = torch.as_tensor(m, dtype=torch.float32, device=self.options.device)
        if m.shape[-1] != self.depth:
            raise ValueError(f"masks have {m.shape[-1]} entries, the model has {self.depth} blocks")
        previous, self._pinned = self._pinned, m
        try:
            yield self
        finally:
            self._pinned = previous

    def draw(self, batch_size):
        """Set this pass's masks: the pinned ones, else a fresh sample."""
        self.drawn = None
        self.current = self._pinned.expand(batch_size, -1) if self._pinned is not None else \
            self.sample(batch_size, self.generator)
        return self.current

    def block_mask(self, index, x):
        """Mask of global block `index` for input x, shaped (B, 1, ...); draws the pass's masks on first use."""
        if self.current is None:
            self.draw(x.shape[0])
        m = self.current[:, index].to(x.dtype)
        return m.view(-1, *([1] * (x.dim() - 1)))

    def rows(self, index):
        """(kept, dropped): index tensors of the samples that keep / drop global block `index` in this pass;
        None when this pass's masks are not all 0 or 1 to rounding (soft masks or pinned fractions: the split
        would treat every m > 0 as 1)."""
        if self._rows_of is not self.current:  # one host copy of the masks per pass (one sync on a GPU)
            host = self.current.detach().to("cpu")
            binary = bool(torch.minimum(host.abs(), (host - 1).abs()).max() <= BINARY_TOLERANCE)
            self._rows_of, self._rows = self.current, {"keep": host != 0, "binary": binary}
        if not self._rows["binary"]:
            return None
        if index not in self._rows:
            keep, device = self._rows["keep"][:, index], self.current.device
            self._rows[index] = tuple(torch.nonzero(k).flatten().to(device) for k in (keep, ~keep))
        return self._rows[index]


# A mask within this of 0 or 1 counts as hard for the split forward (masks built as hard + soft - soft.detach()
# can be an ulp off 1, which changes the result only by rounding).
BINARY_TOLERANCE = 1e-6

# Methods that start a pass through the blocks: each one draws fresh masks. MAR routes every pass
# (training, KD features, each sampling step) through `forward_pass`; DiT/SiT through `forward`.
PASS_METHODS = ("forward", "forward_pass")


def _fresh_masks(method):
    @functools.wraps(method)
    def start_pass(self, *args, **kwargs):
        # Draw before any block runs, so the draw never happens inside a checkpointed block (its
        # recomputation would then differ); the masks are kept for activation recomputation.
        self.layer_mask.current = None
        if args and torch.is_tensor(args[0]):
            self.layer_mask.draw(args[0].shape[0])
        return method(self, *args, **kwargs)
    return start_pass


def _samples(value, rows, batch):
    """`value` restricted to the samples `rows` if it is a per-sample tensor (leading dimension = batch)."""
    return value.index_select(0, rows) if torch.is_tensor(value) and value.dim() and value.shape[0] == batch \
        else value


class _SplitMix(torch.autograd.Function):
    """out = m*f + (1-m)*x where the block output f was computed in two parts: `f_kept` (with autograd) on the
    samples `kept` and `f_dropped` (a value) on `dropped`. The backward pass computes exactly what autograd
    computes for that formula over the whole batch, but keeps less: f equals out on the kept samples and x
    equals out on the dropped ones (m is exactly 1 or 0), so beyond `f_dropped` it keeps only `out` (the next
    block's input) and `x_kept` (the input of the block's kept part, which the block keeps anyway)."""

    @staticmethod
    def forward(ctx, m, f_kept, f_dropped, x, x_kept, kept, dropped):
        f = f_kept.new_empty((x.shape[0], *f_kept.shape[1:]))
        f.index_copy_(0, kept, f_kept).index_copy_(0, dropped, f_dropped.to(f.dtype))
        out = m * f + (1 - m) * x
        ctx.save_for_backward(m, out, f_dropped, x_kept, kept, dropped)
        return out

    @staticmethod
    def backward(ctx, grad):
        m, out, f_dropped, x_kept, kept, dropped = ctx.saved_tensors
        f = out.index_copy(0, dropped, f_dropped.to(out.dtype))
        x = out.index_copy(0, kept, x_kept.to(out.dtype))
        # the reductions autograd makes for m*f and (1-m)*x, in the same order: the same rounding
        grad_m = (grad * f).sum_to_size(m.shape) - (grad * x).sum_to_size(m.shape)
        return grad_m, (grad * m).index_select(0, kept), None, grad * (1 - m), None, None, None


class _ZeroGrads(torch.autograd.Function):
    """Identity on `out` that gives `params` an exact zero gradient: what the official formulation gives the
    weights of a block that no sample keeps (not None: AdamW still steps them, and DDP waits for them)."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs])


class _MaskedBlock:
    """Mixin placed in front of a block's class: out = m*block(x) + (1-m)*x with the per-sample mask m."""

    def forward(self, x, *args, **kwargs):
        layer_mask, index = self._layer_mask_slot
        m = layer_mask.block_mask(index, x)
        rows = layer_mask.rows(index) if layer_mask.split_forward else None
        if rows is not None:
            return self._split_forward(rows, m, x, args, kwargs)
        if not m.requires_grad:  # pinned / eval / no_grad: skipping is exact because the block is residual
            if not bool((m != 0).any()):
                return x
            if bool((m == 1).all()):
                return super().forward(x, *args, **kwargs)
        return m * super().forward(x, *args, **kwargs) + (1 - m) * x

    def _split_forward(self, rows, m, x, args, kwargs):
        """The same output and gradients, with autograd only on the samples that keep the block."""
        (kept, dropped), batch = rows, x.shape[0]
        gate_grad = m.requires_grad and torch.is_grad_enabled()

        def run(rows):
            x_rows = x.index_select(0, rows)
            rows_args = [_samples(a, rows, batch) for a in args]
            rows_kwargs = {k: _samples(v, rows, batch) for k, v in kwargs.items()}
            return x_rows, super(_MaskedBlock, self).forward(x_rows, *rows_args, **rows_kwargs)

        if not dropped.numel():  # every sample keeps the block
            out = super().forward(x, *args, **kwargs)
            return m * out + (1 - m) * x if gate_grad else out
        if not gate_grad:  # the dropped samples' output is x itself: they need not run at all
            return x.index_copy(0, kept, run(kept)[1]) if kept.numel() else x
        if not kept.numel():  # no sample keeps the block: its output is needed as a value only
            with torch.no_grad():
                f = super().forward(x, *args, **kwargs)
            return _ZeroGrads.apply(m * f + (1 - m) * x, *[p for p in self.parameters() if p.requires_grad])
        x_kept, f_kept = run(kept)
        with torch.no_grad():  # the gate gradient needs block(x) - x of the dropped samples, as a value only
            f_dropped = run(dropped)[1]
        return _SplitMix.apply(m, f_kept, f_dropped, x, x_kept, kept, dropped)


_CLASS_CACHE = {}


def _masked_class(cls, model):
    """A subclass of `cls` (cached) that masks a block, or that starts a fresh mask draw per pass."""
    if (cls, model) not in _CLASS_CACHE:
        if model:
            bases, ns = (cls,), {n: _fresh_masks(getattr(cls, n)) for n in PASS_METHODS if hasattr(cls, n)}
        else:
            bases, ns = (_MaskedBlock, cls), {}
        _CLASS_CACHE[cls, model] = type(f"Masked{cls.__name__}", bases, {**ns, "_unmasked_class": cls})
    return _CLASS_CACHE[cls, model]


def attach_layer_mask(model, layer_mask):
    """Make every block of `model` masked by `layer_mask` (registered as `model.layer_mask`). Returns model."""
    blocks = model_blocks(model)
    if hasattr(model, "_unmasked_class"):
        raise ValueError("the model already has a layer mask: call detach_layer_mask first")
    if layer_mask.depth != len(blocks):
        raise UserError(f"the pruning groups cover {layer_mask.depth} blocks but the model has {len(blocks)}")
    layer_mask.to(next(model.parameters()).device).train(model.training)
    model.layer_mask = layer_mask
    model.__class__ = _masked_class(type(model), model=True)
    for i, block in enumerate(blocks):
        block.__class__ = _masked_class(type(block), model=False)
        # A plain attribute, not a submodule: parameter names stay official; deepcopy maps it to the copy's mask.
        object.__setattr__(block, "_layer_mask_slot", (layer_mask, i))
    return model


def detach_layer_mask(model):
    """Undo `attach_layer_mask`: plain blocks and model class, no `layer_mask` submodule. Returns the mask."""
    if not hasattr(model, "_unmasked_class"):
        return None
    layer_mask = model.layer_mask
    for block in model_blocks(model):
        block.__class__ = block._unmasked_class
        del block.__dict__["_layer_mask_slot"]
    model.__class__ = model._unmasked_class
    del model.layer_mask
    layer_mask.current = None
    return layer_mask
