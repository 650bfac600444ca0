"""Split forward of the layer-mask path: every block runs with autograd only on the samples that keep it,
and the loss and every gradient (weights, LoRA, gates, input, conditioning) equal the official
formulation, where every block runs forward and backward for every sample."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from models import MAR, DiT, SiT, set_grad_checkpointing
from models.dit import DiTBlock
from models.layer_mask import LayerMask, attach_layer_mask
from models.lora import apply_lora
from models.mar import Block as MARBlock
from test_layer_mask import TINY, tiny_model

GROUPS = {"1:2": [(1, 2)] * 4, "2:4": [(2, 4)] * 2, "all-keep group": [(1, 2), (2, 2), (2, 4)]}
MAR_TINY = dict(img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_num_heads=4, decoder_embed_dim=32,
                decoder_num_heads=4, encoder_depth=4, decoder_depth=4, buffer_size=4, diffloss_d=1, diffloss_w=32,
                class_num=10, attn_dropout=0.0, proj_dropout=0.0)
# 8 samples x 8 blocks. Columns: every sample keeps / none keeps / half keep in blocks and in stripes.
# Every split has 0 or >= 4 samples: for 1-3 rows this CPU's sgemm takes another kernel that rounds
# differently by a few ulps, which the gradient of a nearly cancelling gate group can amplify to ~1e-5
# (at float64 any split is exact, see test_float64_any_masks_give_the_official_gradients).
HARD = torch.tensor([[1, 0, 1, 1, 0, 1, 0, 0]] * 4 + [[1, 0, 0, 1, 0, 0, 1, 1]] * 4, dtype=torch.float32)
HARD[::2, 4], HARD[1::2, 5] = 1.0, 0.0


class Stack(nn.Module):
    """Bare masked blocks, (x, *per-sample conditioning) -> x: what a model runs between its stem and head."""
    block_lists = ("blocks",)

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *cond):
        for block in self.blocks:
            x = block(x, *cond)
        return x


def randomize(model, std=0.2):
    """Random weights everywhere (the official inits zero adaLN and LoRA-B: blocks would be exact identities)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed" and not name.startswith("layer_mask."):
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(name) + p.numel()))
    return model


def prepare(model, groups, lora, split):
    attach_layer_mask(model, LayerMask(groups, tau=1.0, scaling=1.0))
    blocks = [b for name in model.block_lists for b in getattr(model, name)]
    if lora:
        apply_lora(blocks, rank=4, alpha=8)
        randomize(model)  # LoRA-B starts at zero: give it a value so the LoRA path matters
    model.layer_mask.split_forward = split
    return model.train()


def gradients(model, inputs, loss):
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input {i}": t.grad for i, t in enumerate(inputs) if t.grad is not None})
    return {"loss": loss.detach(), **grads}


def assert_same(got, ref, rel):
    """Same keys (a None gradient is not a zero one: AdamW and DDP treat them differently), each tensor within
    `rel` of the reference relative to its norm."""
    assert got.keys() == ref.keys(), set(got) ^ set(ref)
    for k, r in ref.items():
        err = float((got[k].double() - r.double()).norm())
        assert err <= rel * float(r.double().norm()), (k, err, float(r.norm()))


def pinned(hard, seed=0):
    """Straight-through masks with the value `hard` and a leaf `soft` that receives dL/dm (the gate gradient)."""
    soft = torch.rand(hard.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    return hard + soft - soft.detach(), soft


# ----------------------------------------------------------------------------- exactness

def stack_run(kind, groups, lora, split, batch=6):
    torch.manual_seed(0)
    blocks = [DiTBlock(16, 4) if kind == "DiT" else MARBlock(16, 4) for _ in range(sum(m for _, m in groups))]
    model = prepare(randomize(Stack(blocks)), groups, lora, split).double()
    g = torch.Generator().manual_seed(1)
    model.layer_mask.generator = g
    inputs = [torch.randn(batch, 5, 16, generator=g, dtype=torch.float64).requires_grad_(True)]
    if kind == "DiT":
        inputs.append(torch.randn(batch, 16, generator=g, dtype=torch.float64).requires_grad_(True))  # c
    loss = model(*inputs).sin().sum()
    loss.backward()
    return gradients(model, inputs, loss), model.layer_mask.current.detach()


@pytest.mark.parametrize("kind", ["DiT", "MAR"])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_float64_any_masks_give_the_official_gradients(kind, groups, lora):
    """Gumbel masks of the real sampler (any number of samples per side, 0 included), float64: identical."""
    ref, masks = stack_run(kind, GROUPS[groups], lora, split=False)
    got, masks_split = stack_run(kind, GROUPS[groups], lora, split=True)
    assert torch.equal(masks, masks_split)
    assert any(0 < c < len(masks) for c in masks.sum(0))  # some block really splits the batch
    assert_same(got, ref, rel=1e-12)
    assert any("lora_B" in k for k in ref) == lora and any("logits" in k for k in ref)


def test_float64_no_sample_and_every_sample_keep_a_block():
    """A saturated group: block 0 kept by every sample, block 1 by none; block 1's weights still get exact zeros."""
    runs = []
    for split in (False, True):
        torch.manual_seed(0)
        model = prepare(randomize(Stack([DiTBlock(16, 4) for _ in range(4)])), [(1, 2), (1, 2)], True, split).double()
        with torch.no_grad():
            model.layer_mask.logits[0].copy_(torch.tensor([50.0, 0.0]))  # option 0 always wins
        model.layer_mask.generator = torch.Generator().manual_seed(1)
        x, c = torch.randn(6, 5, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
        x.requires_grad_(True), c.requires_grad_(True)
        loss = model(x, c).sin().sum()
        loss.backward()
        assert model.layer_mask.current[:, :2].sum(0).tolist() == [6, 0]
        runs.append(gradients(model, [x, c], loss))
    assert_same(runs[1], runs[0], rel=1e-12)
    dropped = [v for k, v in runs[1].items() if k.startswith("blocks.1.")]
    assert dropped and all(torch.equal(v, torch.zeros_like(v)) for v in dropped)


def model_run(family, split, lora, checkpointing=False, hard=HARD):
    torch.manual_seed(0)
    if family == "MAR":
        model = randomize(MAR(**MAR_TINY), std=0.05)
    else:
        model = tiny_model({"DiT": DiT, "SiT": SiT}[family])
        model.y_embedder.dropout_prob = 0.0  # no label dropout: the two runs must see the same labels
    model = prepare(model, [(1, 2)] * 4, lora, split)
    if checkpointing:
        set_grad_checkpointing(model)
    masks, soft = pinned(hard)
    g = torch.Generator().manual_seed(1)
    if family == "MAR":
        imgs, labels = torch.randn(8, 16, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)
        np.random.seed(0)  # MAR's token orders come from numpy
        draws = model.draw_training_randomness(8, "cpu", label_drop=False)
        inputs = [imgs]
        run = lambda: model.forward_features(imgs.requires_grad_(True), labels, draws)["z"]  # noqa: E731
    else:
        x = torch.randn(8, 4, 8, 8, generator=g).requires_grad_(True)
        t, y = torch.randint(0, 1000, (8,), generator=g).float(), torch.randint(0, 10, (8,), generator=g)
        inputs = [x]
        run = lambda: model(x, t, y)  # noqa: E731
    with model.layer_mask.masks(masks):
        loss = run().square().mean()
    loss.backward()
    return {**gradients(model, inputs, loss), "dL/dm": soft.grad}


@pytest.mark.parametrize("family", ["DiT", "SiT", "MAR"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fp32_models_give_the_official_loss_and_gradients(family, lora):
    """Whole models at fp32 (MAR: encoder and decoder blocks), blocks kept by every, no, half the samples."""
    ref = model_run(family, False, lora)
    got = model_run(family, True, lora)
    assert_same(got, ref, rel=1e-6)
    assert float(ref["dL/dm"].abs().min()) > 0  # every (sample, block) gate gradient is really exercised


def test_reference_gives_dropped_samples_no_gradient_through_the_block():
    """The official formulation, independently: for a sample with m = 0 the input gradient is the output
    gradient itself, c gets exactly 0, the weights get what the plain block gives on the kept samples
    alone, and dL/dm is sum((block(x) - x) * dL/dout); the split path gives the same."""
    torch.manual_seed(0)
    plain = randomize(DiTBlock(16, 4)).double()
    x, c = torch.randn(4, 5, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    upstream = torch.randn(4, 5, 16, dtype=torch.float64)
    kept = torch.tensor([0, 2])
    xk, ck = x[kept].clone().requires_grad_(True), c[kept].clone().requires_grad_(True)
    plain(xk, ck).backward(upstream[kept])
    with torch.no_grad():
        delta = plain(x, c) - x
    expected_dm = (delta * upstream).sum((1, 2))
    expected_w = {n: p.grad.clone() for n, p in plain.named_parameters()}
    for split in (False, True):
        model = Stack([randomize(DiTBlock(16, 4))]).double()
        model.load_state_dict({f"blocks.0.{k}": v for k, v in plain.state_dict().items()})
        attach_layer_mask(model, LayerMask([(1, 1)]))
        model.layer_mask.split_forward = split
        masks, soft = pinned(torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64))
        xs, cs = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        with model.layer_mask.masks(masks.float()):
            model(xs, cs).backward(upstream)
        assert torch.equal(xs.grad[1::2], upstream[1::2]) and torch.equal(cs.grad[1::2], torch.zeros(2, 16).double())
        torch.testing.assert_close(xs.grad[kept], xk.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cs.grad[kept], ck.grad, rtol=1e-12, atol=1e-12)
        for n, p in model.blocks[0].named_parameters():
            torch.testing.assert_close(p.grad, expected_w[n], rtol=1e-12, atol=1e-12, msg=n)
        torch.testing.assert_close(soft.grad[:, 0].double(), expected_dm, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- what runs, switches

def test_dropped_samples_run_without_autograd():
    model = prepare(tiny_model(depth=4), [(1, 2), (1, 2)], False, True)
    calls = []
    model.blocks[1].attn.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], torch.is_grad_enabled())))
    masks, _ = pinned(torch.tensor([[1.0, 0, 1, 0]] * 3 + [[0, 1.0, 0, 1]] * 5))
    x, t, y = torch.randn(8, 4, 8, 8), torch.rand(8) * 999, torch.zeros(8, dtype=torch.long)
    with model.layer_mask.masks(masks):
        model(x, t, y)
    assert calls == [(5, True), (3, False)]  # block 1: 5 samples keep it (autograd), 3 drop it (value only)
    calls.clear()
    model.layer_mask.split_forward = False
    with model.layer_mask.masks(masks):
        model(x, t, y)
    assert calls == [(8, True)]  # the official formulation: every sample, with autograd


@pytest.mark.parametrize("family", ["DiT", "MAR"])
def test_grad_checkpointing_with_split(family):
    """Recomputation inside checkpointed blocks splits the same way: the official gradients."""
    assert_same(model_run(family, True, True, checkpointing=True), model_run(family, False, True), rel=1e-6)


def test_bf16_autocast_with_split():
    """bf16 rounds each half on its own, so the match is to bf16 precision, not bit for bit."""
    runs = []
    for split in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs.append(model_run("DiT", split, True))
    assert_same(runs[1], runs[0], rel=2e-2)


def test_prune_by_learning_switch(tmp_path, monkeypatch):
    """Split forward is on by default in prune_by_learning; --no-split-forward runs the official formulation."""
    from prune_by_learning import main as prune_main
    from test_train import make_store
    store = make_store(str(tmp_path / "store"), n=8)
    used = []
    rows = LayerMask.rows
    monkeypatch.setattr(LayerMask, "rows", lambda self, i: used.append(i) or rows(self, i))
    for extra in ([], ["--no-split-forward"]):
        used.clear()
        prune_main(["--model", "DiT-Tiny-D4/2", "--groups", "1:2", "--data-path", store, "--image-size", "32",
                    "--num-classes", "4", "--num-workers", "0", "--global-batch-size", "4", "--max-steps", "1",
                    "--precision", "fp32", "--delta-w", "--lora", "--results-dir", str(tmp_path / f"out{len(extra)}"),
                    *extra])  # each run claims its own run folder
        assert bool(used) == (not extra), extra
