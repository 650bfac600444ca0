"""TinyFusion's learnable depth pruning as an objective for the one training loop.

The model carries a LayerMask (per-sample hard Gumbel N:M masks, drawn at the start of every
forward) and, optionally, LoRA deltas or fully trainable weights that simulate the fine-tuning to
come ("delta-w"). The loss is the ordinary training loss of the masked model; the gates learn at
10x the weight lr; the decision is the argmax of the EMA copy's gates.

Gate estimators (ours; the default is the official straight-through Gumbel estimator). The straight-through
gradient is the loss's slope in the mask at the drawn 0/1 value; where the loss is not monotone in a block's
mask (the digits teacher's block 0, studies/README.md section 5) that slope can point away from the better
option. Options, combinable:
  - soft_mask_steps K: the first K steps use the soft Gumbel-softmax sample as the mask (continuous masks,
    pathwise gradient; such passes run every block for every sample), hard masks afterwards;
  - draws_per_sample K: every sample is evaluated under K independent mask draws (the batch repeated K times,
    losses averaged over the copies): less variance in the gate gradient, K times the compute;
  - gate_estimator "score-function": the gates learn from whole-option losses, REINFORCE with a
    leave-one-out baseline: grad = mean_i (L_i - mean_{j!=i} L_j) d log p(option_i) / d logits, unbiased for
    the gradient of the expected loss; the weights (LoRA) still get their ordinary gradient through the
    hard masks, and blocks a sample drops are not run for it. During soft-mask steps the gates learn from
    the soft masks' own gradient instead.
"""
import torch

from models.layer_mask import LayerMask, attach_layer_mask, model_blocks
from models.lora import apply_lora
from core.errors import UserError

GATE_ESTIMATORS = ("st", "score-function")


def prepare_mask_learning(model, groups, delta_w=True, lora=True, lora_rank=8, lora_alpha=None, lr=1e-4,
                          gate_lr_mult=10.0, lora_scope="all"):
    """Attach the mask (and LoRA), set requires_grad, and return the optimizer param groups.
    lora_scope "all": LoRA on every nn.Linear of the model, as the official convert_to_lora_model;
    "blocks": only inside the prunable blocks (ours; the embedders and final layer stay frozen)."""
    layer_mask = LayerMask(groups)
    attach_layer_mask(model, layer_mask)
    model.requires_grad_(False)
    weights = []
    if delta_w and lora:
        weights = apply_lora(model if lora_scope == "all" else model_blocks(model), rank=lora_rank,
                             alpha=lora_alpha or 2 * lora_rank)
        # the reference sets alpha = 2 * rank (torchtune LoRALinear)
    elif delta_w:
        weights = [p for n, p in model.named_parameters() if not n.startswith("layer_mask.") and n != "pos_embed"]
    for p in weights:
        p.requires_grad_(True)
    gates = list(layer_mask.parameters())
    for p in gates:
        p.requires_grad_(True)
    groups_out = [{"params": gates, "lr": lr * gate_lr_mult}]
    if weights:
        groups_out.insert(0, {"params": weights, "lr": lr})
    return layer_mask, groups_out


def _repeat_batch(value, n, k):
    """`value` with every per-sample tensor (leading dimension n) repeated k times along it; dicts (draws, text
    conditioning) entry by entry, anything else unchanged."""
    if isinstance(value, dict):
        return {name: _repeat_batch(v, n, k) for name, v in value.items()}
    if torch.is_tensor(value) and value.dim() and value.shape[0] == n:
        return value.repeat(k, *[1] * (value.dim() - 1))
    return value


class MaskLearningObjective:
    """Wraps a base objective; schedules tau/scaling and records the EMA decision over time."""

    def __init__(self, base, layer_mask, tau_range=(4.0, 0.1), scaling_range=(100.0, 100.0), soft_mask_steps=0,
                 draws_per_sample=1, gate_estimator="st"):
        if gate_estimator not in GATE_ESTIMATORS:
            raise UserError(f"gate estimator {gate_estimator!r}: choose one of {', '.join(GATE_ESTIMATORS)}")
        if draws_per_sample < 1 or soft_mask_steps < 0:
            raise UserError(f"draws per sample must be >= 1 (got {draws_per_sample}) and soft-mask steps >= 0 "
                            f"(got {soft_mask_steps})")
        self.base, self.mask = base, layer_mask
        self.tau_range, self.scaling_range = tuple(tau_range), tuple(scaling_range)
        self.soft_mask_steps, self.draws_per_sample = soft_mask_steps, draws_per_sample
        self.score_function = gate_estimator == "score-function"
        layer_mask.straight_through = not self.score_function
        self.ema_mask = layer_mask  # replaced by the EMA copy's mask once the trainer exists
        self.history = []  # (step, kept-mask over all blocks, confidences) at every log point

    def draw(self, n, generator):
        return self.base.draw(n, generator)

    def begin_step(self, step, total):
        self.mask.set_schedule(step, total, self.tau_range, self.scaling_range)
        self.ema_mask.tau, self.ema_mask.scaling = self.mask.tau, self.mask.scaling
        self.mask.soft = step < self.soft_mask_steps
        self.step = step

    def loss(self, model, x, y, draws, step):
        k, n = self.draws_per_sample, x.shape[0]
        if k > 1:  # K copies of the batch in one pass: the layer mask draws each copy's masks independently
            x, y, draws = _repeat_batch(x, n, k), _repeat_batch(y, n, k), _repeat_batch(draws, n, k)
        per_sample, logs = self.base.loss(model, x, y, draws, step)
        if self.score_function and not self.mask.soft:
            per_sample = per_sample + self.score_function_term(per_sample)
        if k > 1:
            per_sample = per_sample.view(k, n).mean(0)
        return per_sample, {**logs, "tau": torch.tensor(self.mask.tau)}

    def score_function_term(self, per_sample):
        """Exactly 0 in value; its gradient is the score-function estimate with a leave-one-out baseline:
        d/d logits of mean_i (L_i - b_i) log p(option_i), b_i = mean of the other samples' losses."""
        n = per_sample.shape[0]
        if self.mask.drawn is None or self.mask.drawn.shape[0] != n:
            raise UserError("the score-function gate estimator needs one sampled mask draw per sample in the loss's "
                            "forward pass (a pinned or fixed mask, or an objective with several passes, has none)")
        if n < 2:
            raise UserError("the score-function gate estimator needs at least 2 samples per process for its "
                            "leave-one-out baseline: raise --global-batch-size")
        loss = per_sample.detach().float()
        advantage = loss - (loss.sum() - loss) / (n - 1)
        log_p = self.mask.log_prob()
        return (advantage * (log_p - log_p.detach())).to(per_sample.dtype)

    def log_line(self):
        kept = set(self.ema_mask.decision())
        self.history.append((self.step + 1, [int(i in kept) for i in range(self.ema_mask.depth)],
                             self.ema_mask.confidence()))
        return f"tau {self.mask.tau:.3f} | " + self.ema_mask.summary()

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))


def plot_decisions(history, path, title="TinyFusion decision dynamics"):
    """Layers x logged steps image: dark = kept, light = removed (like the paper's decision figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    if not history:
        return None
    steps = [h[0] for h in history]
    grid = np.array([h[1] for h in history]).T  # (layers, logs)
    fig, ax = plt.subplots(figsize=(max(4, min(12, len(steps) / 4)), max(2.5, grid.shape[0] / 4)))
    ax.imshow(grid, aspect="auto", cmap="Blues", vmin=-0.2, vmax=1, interpolation="nearest",
              extent=(steps[0] - 0.5, steps[-1] + 0.5, grid.shape[0] - 0.5, -0.5))
    ax.set_xlabel("training step")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
