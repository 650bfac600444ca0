"""Gate-estimator options of the mask search (issue 14, the 1:4 lead): soft early steps, several mask draws
per sample, the score-function estimator; and the default (official straight-through) search unchanged."""
import itertools
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from models import build_model
from models.layer_mask import LayerMask, attach_layer_mask
from prune_by_learning import main as prune_main
from test_layer_mask import inputs, tiny_model
from test_train import make_store
from tinyfusion.checkpoint import load_checkpoint, save_weights
from core.errors import UserError
from tinyfusion.mask_learning import MaskLearningObjective
from tinyfusion.families.dit import DiffusionObjective

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def default_search_state(root, extra=()):
    """The trainable state (gate logits, LoRA) and EMA gates after 3 steps of a default 1:2 LoRA search of a
    seeded random 4-block DiT. tests/fixtures/gate_estimators_default.safetensors holds this function's
    output computed with the code before the estimator options existed (commit 27cfc44)."""
    torch.manual_seed(0)
    model = build_model("DiT-Tiny-D4/2", input_size=4, num_classes=4)
    save_weights(model.state_dict(), os.path.join(root, "init.pt"))
    store = make_store(os.path.join(root, "store"), n=32)
    prune_main(["--model", "DiT-Tiny-D4/2", "--groups", "1:2", "--load-weight", os.path.join(root, "init.pt"),
                "--data-path", store, "--image-size", "32", "--num-classes", "4", "--num-workers", "0",
                "--global-batch-size", "8", "--max-steps", "3", "--precision", "fp32", "--delta-w", "--lora",
                "--lora-rank", "2", "--log-every", "10", "--lr", "1e-2", "--results-dir", os.path.join(root, "out"),
                *extra])
    ckpt = load_checkpoint(os.path.join(root, "out", "learn_mask-DiT-Tiny-D4-2", "checkpoints", "0000003.pt"))
    state = {k: v for k, v in ckpt["model"].items() if k.startswith("layer_mask.") or "lora" in k}
    state.update({"ema." + k: v for k, v in ckpt["ema"].items() if k.startswith("layer_mask.")})
    return {k: v.contiguous() for k, v in state.items()}


def test_default_search_is_unchanged(tmp_path):
    """No option given: the same gates, LoRA and EMA gates, bit for bit, as the code before the options."""
    golden = load_file(os.path.join(FIXTURES, "gate_estimators_default.safetensors"))
    state = default_search_state(str(tmp_path))
    assert sorted(state) == sorted(golden)
    for k, v in golden.items():
        assert torch.equal(state[k], v), k


def test_options_reach_the_search(tmp_path):
    golden = load_file(os.path.join(FIXTURES, "gate_estimators_default.safetensors"))
    state = default_search_state(str(tmp_path), ["--gate-estimator", "score-function", "--draws-per-sample", "2",
                                                 "--soft-mask-steps", "1"])
    gates = [k for k in golden if "layer_mask" in k]
    assert all(torch.isfinite(state[k]).all() for k in gates)
    assert not all(torch.equal(state[k], golden[k]) for k in gates)


# ----------------------------------------------------------------------------- a hand-built case

class Shift(nn.Module):
    """Residual block x -> x + e_j: with mask m the model's output coordinate j is m_j (input 0)."""

    def __init__(self, j, dim):
        super().__init__()
        self.shift = nn.Parameter(torch.eye(dim)[j], requires_grad=False)

    def forward(self, x):
        return x + self.shift


class Toy(nn.Module):
    block_lists = ("blocks",)

    def __init__(self, dim):
        super().__init__()
        self.blocks = nn.ModuleList(Shift(j, dim) for j in range(dim))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


GROUPS = [(1, 4), (2, 3)]  # blocks 0-3 keep one, blocks 4-6 keep two: 4 x 3 options


def toy_loss(h):
    """Like the digits teacher's block 0 (studies/README.md section 5): keeping block 0 is best (0.47 against 1.0),
    but the loss rises from m0 = 0 before it falls (slope +2 at m0 = 0); the groups interact through h6 * h0."""
    return 0.7 + 2 * h[:, 0] - 2.23 * h[:, 0] ** 2 + 0.3 * h[:, 1:4].sum(1) + (h[:, 4] - h[:, 5]) ** 2 \
        + 0.5 * h[:, 6] * h[:, 0]


class ToyObjective:
    def draw(self, n, generator):
        return {}

    def loss(self, model, x, y, draws, step):
        return toy_loss(model(x)), {}


SCALING = 100.0  # the search's default: option probabilities softmax(100 * logits)
LOGITS = [torch.zeros(4), torch.tensor([0.3, -0.2, 0.1]) / SCALING]


def exact_gradient():
    """d/d logits of the expected loss, enumerating all 12 options."""
    logits = [l.clone().requires_grad_(True) for l in LOGITS]
    p = [torch.softmax(SCALING * l, 0) for l in logits]
    expected = 0
    for a in range(4):
        for b, kept in enumerate(itertools.combinations(range(3), 2)):
            h = torch.zeros(1, 7)
            h[0, a] = 1
            h[0, [4 + j for j in kept]] = 1
            expected = expected + p[0][a] * p[1][b] * toy_loss(h)[0]
    expected.backward()
    return torch.cat([l.grad for l in logits])


def estimated_gradients(estimator, chunks=25, n=4000, draws_per_sample=1):
    """One gradient estimate per chunk of n samples (a search step's gate gradient)."""
    model = Toy(7)
    mask = LayerMask(GROUPS)
    attach_layer_mask(model, mask)
    model.train()
    with torch.no_grad():
        for p, l in zip(mask.logits, LOGITS):
            p.copy_(l)
    mask.generator = torch.Generator().manual_seed(0)
    objective = MaskLearningObjective(ToyObjective(), mask, tau_range=(1.0, 1.0), scaling_range=(SCALING, SCALING),
                                      gate_estimator=estimator, draws_per_sample=draws_per_sample)
    objective.begin_step(0, 1)
    out = []
    for _ in range(chunks):
        mask.zero_grad()
        per_sample, _ = objective.loss(model, torch.zeros(n, 7), None, {}, 0)
        per_sample.mean().backward()
        out.append(torch.cat([p.grad for p in mask.logits]))
    return torch.stack(out)


def test_score_function_gradient_is_the_expected_loss_gradient():
    exact = exact_gradient()
    est = estimated_gradients("score-function")
    mean, se = est.mean(0), est.std(0) / len(est) ** 0.5
    assert float(se.max()) < 0.1 * float(exact.abs().max())  # the check below has power
    assert ((mean - exact).abs() <= 4 * se + 1e-4).all(), (mean, exact, se)
    assert exact[0] < 0 and mean[0] < 0  # keeping block 0 lowers the expected loss: its logit should rise
    # ... while the straight-through estimate, the slope at the drawn masks, pushes block 0 down (the 1:4 puzzle)
    assert estimated_gradients("st", chunks=5).mean(0)[0] > 0


def test_score_function_term_is_zero_in_value():
    model = Toy(7)
    mask = LayerMask(GROUPS)
    attach_layer_mask(model, mask)
    model.train()
    objective = MaskLearningObjective(ToyObjective(), mask, gate_estimator="score-function")
    objective.begin_step(0, 10)
    mask.generator = torch.Generator().manual_seed(1)
    per_sample, _ = objective.loss(model, torch.zeros(64, 7), None, {}, 0)
    assert torch.equal(per_sample.detach(), toy_loss(mask.current.detach()))
    assert not mask.current.requires_grad  # hard masks without a straight-through gradient


def test_bad_options_are_one_line_errors():
    mask = LayerMask(GROUPS)
    for kwargs, needle in [({"gate_estimator": "gumbel"}, "gate estimator"), ({"draws_per_sample": 0}, ">= 1"),
                           ({"soft_mask_steps": -1}, ">= 0")]:
        with pytest.raises(UserError, match=needle) as e:
            MaskLearningObjective(ToyObjective(), mask, **kwargs)
        assert "\n" not in str(e.value)
    model = Toy(7)
    attach_layer_mask(model, mask)
    model.train()
    objective = MaskLearningObjective(ToyObjective(), mask, gate_estimator="score-function")
    objective.begin_step(0, 1)
    with pytest.raises(UserError, match="at least 2 samples"):
        objective.loss(model, torch.zeros(1, 7), None, {}, 0)


# ----------------------------------------------------------------------------- soft steps and several draws

def test_soft_steps_then_hard():
    mask = LayerMask([(1, 2), (2, 4)]).train()
    objective = MaskLearningObjective(ToyObjective(), mask, soft_mask_steps=2)
    for step in range(5):
        objective.begin_step(step, 5)
        m = mask.draw(16)
        binary = bool(((m == 0) | (m == 1)).all())
        assert binary == (step >= 2), step
        assert torch.allclose(m[:, :2].sum(1), torch.ones(16)) and torch.allclose(m[:, 2:].sum(1), 2 * torch.ones(16))
        if step < 2:
            assert ((m > 0) & (m < 1)).any(1).all()  # every sample's mask is continuous, not a one-hot


@pytest.mark.parametrize("soft", [True, False])
def test_split_forward_with_soft_or_fractional_masks(soft):
    """Masks that are not all 0/1 run the official formulation: same outputs and gate gradients with or without
    the split forward (before, a pinned fraction m > 0 was run as m = 1)."""
    results = []
    for split in (True, False):
        model = tiny_model(depth=4)
        mask = LayerMask([(1, 2), (1, 2)])
        attach_layer_mask(model, mask)
        model.train()
        mask.split_forward, mask.soft, mask.generator = split, soft, torch.Generator().manual_seed(0)
        x, t, y = inputs(6)
        if soft:
            out = model(x, t, y)
            out.square().mean().backward()
            results.append((out.detach(), torch.cat([p.grad for p in mask.logits])))
        else:
            with torch.no_grad(), mask.masks(torch.tensor([0.25, 0.0, 1.0, 0.5])):
                results.append((model(x, t, y),))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
    if not soft:
        with torch.no_grad(), mask.masks(torch.tensor([1.0, 0.0, 1.0, 1.0])):
            assert not torch.allclose(model(x, t, y), results[0][0], atol=1e-3)


def test_draws_per_sample_equals_separate_runs_with_those_draws():
    model = tiny_model(depth=4)
    mask = LayerMask([(1, 2), (1, 2)])
    attach_layer_mask(model, mask)
    model.train()
    base = DiffusionObjective((4, 8, 8), class_dropout_prob=0.0)
    k, n = 3, 4
    x, _, y = inputs(n)
    draws = base.draw(n, torch.Generator().manual_seed(0))
    objective = MaskLearningObjective(base, mask, draws_per_sample=k)
    objective.begin_step(0, 10)
    per_sample, _ = objective.loss(model, x, y, draws, 0)
    per_sample.mean().backward()
    grad = model.blocks[1].mlp.fc1.weight.grad.clone()
    masks = mask.current.detach().clone()
    assert per_sample.shape == (n,) and masks.shape == (k * n, 4)
    assert not all(torch.equal(masks[:n], masks[i * n:(i + 1) * n]) for i in range(1, k))  # independent draws
    model.zero_grad()
    separate = []
    for i in range(k):
        with mask.masks(masks[i * n:(i + 1) * n]):
            loss, _ = base.loss(model, x, y, draws, 0)
        (loss.mean() / k).backward()
        separate.append(loss.detach())
    assert torch.allclose(per_sample.detach(), torch.stack(separate).mean(0), atol=1e-6)
    assert torch.allclose(grad, model.blocks[1].mlp.fc1.weight.grad, atol=1e-6)


def test_draws_per_sample_repeats_dict_conditioning():
    """Text families pass a dict of conditioning tensors: each is repeated with the batch, the rest unchanged."""
    seen = {}

    class Recorder:
        def loss(self, model, x, cond, draws, step):
            seen.update(x=x, cond=cond, draws=draws)
            return x.flatten(1).sum(1), {}

    mask = LayerMask([(1, 2)])
    objective = MaskLearningObjective(Recorder(), mask, draws_per_sample=3)
    objective.begin_step(0, 10)
    x = torch.arange(4.0).view(2, 2)
    cond = {"prompt_embeds": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "prompt_attention_mask": torch.tensor([[1, 0], [1, 1]])}
    per_sample, _ = objective.loss(None, x, cond, {"t": torch.tensor([5, 7]), "shift": torch.tensor(3.0)}, 0)
    assert torch.equal(seen["cond"]["prompt_embeds"], cond["prompt_embeds"].repeat(3, 1))
    assert torch.equal(seen["cond"]["prompt_attention_mask"], cond["prompt_attention_mask"].repeat(3, 1))
    assert seen["draws"]["t"].tolist() == [5, 7] * 3 and float(seen["draws"]["shift"]) == 3.0
    assert torch.equal(per_sample, x.sum(1))  # the K copies' losses averaged back to one per sample
