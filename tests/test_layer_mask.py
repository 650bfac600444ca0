"""N:M layer masks: validation, presets, Gumbel statistics, straight-through gradients, and exactness
against the pruned model rebuilt from a saved checkpoint."""
import copy

import numpy as np
import pytest
import torch
from scipy import stats

from core.errors import UserError
from models import DiT, SiT
from models.layer_mask import (PRESETS, LayerMask, attach_layer_mask, detach_layer_mask, parse_groups,
                               resolve_preset)
from tinyfusion.checkpoint import load_weights
from tinyfusion.pruning import read_record, write_pruned

TINY = dict(input_size=8, patch_size=2, hidden_size=32, num_heads=4, num_classes=10)



def tiny_model(cls=DiT, depth=8, seed=0):
    """A tiny DiT/SiT with every weight random (the official init zeroes adaLN: every block would be identity)."""
    torch.manual_seed(seed)
    model = cls(depth=depth, **TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    return model.eval()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


# ----------------------------------------------------------------------------- groups and presets

def test_parse_groups_forms():
    assert parse_groups([[1, 2]] * 4, 8) == [(1, 2)] * 4
    assert parse_groups("[[2,4],[3,4]]", 8) == [(2, 4), (3, 4)]
    assert parse_groups("1:2", 6) == [(1, 2)] * 3


@pytest.mark.parametrize("spec, depth, needle", [
    ([[1, 2]] * 3, 8, "sum to 8"),
    ([[3, 2], [1, 6]], 8, "1 <= N <= M"),
    ([[0, 2], [1, 6]], 8, "1 <= N <= M"),
    ("[[1,2],", 8, "not a list"),
    ([[1, 2, 3]], 8, "pairs"),
    ("3:4", 6, "does not divide"),
])
def test_parse_groups_errors(spec, depth, needle):
    with pytest.raises(UserError, match=needle) as e:
        parse_groups(spec, depth)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, base, source_depth, kept", [
    ("DiT-XL-1-2", "DiT-XL/2", 28, 14), ("DiT-XL-2-4", "DiT-XL/2", 28, 14), ("DiT-XL-7-14", "DiT-XL/2", 28, 14),
    ("DiT-XL-1-4", "DiT-XL/2", 28, 7), ("DiT-D14-1-2", "DiT-D14/2", 14, 7), ("DiT-D14-2-4", "DiT-D14/2", 14, 7),
    ("SiT_XL_1_2", "SiT-XL/2", 28, 14), ("MAR-L-1-2", "MAR-L", 32, 16),
])
def test_presets(name, base, source_depth, kept):
    got_base, groups = resolve_preset(name)
    assert got_base == base
    assert parse_groups(groups, source_depth) and sum(n for n, _ in groups) == kept


def test_every_preset_is_valid_and_unknown_is_refused():
    depth = {"XL/2": 28, "D14/2": 14, "MAR-B": 24, "MAR-L": 32, "MAR-H": 40}
    for name, (base, groups) in PRESETS.items():
        parse_groups(groups, next(d for k, d in depth.items() if base.endswith(k)))
    with pytest.raises(UserError, match="unknown pruning preset"):
        resolve_preset("DiT-XL-3-2")


def test_options_enumeration_order():
    mask = LayerMask([(2, 4), (1, 2)])
    expected = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert mask.options[0].tolist() == expected
    assert mask.options[1, :2, :2].tolist() == [[1, 0], [0, 1]]
    assert [l.shape[0] for l in mask.logits] == [6, 2] and all(torch.all(l == torch.tensor(0.02)) for l in mask.logits)
    assert mask.decision() == [0, 1, 4]  # equal logits: the first option of each group
    assert mask.choice_for_kept([1, 3, 5]) == [4, 1]
    with pytest.raises(UserError, match="keep exactly 2"):
        mask.choice_for_kept([1, 4])


# ----------------------------------------------------------------------------- sampling

def _group_options(masks, groups):
    """Option index (combinations order) of every sample and group, decoded from (B, depth) masks."""
    import itertools
    out, offset = [], 0
    for n, m in groups:
        combos = [set(c) for c in itertools.combinations(range(m), n)]
        kept = [set(np.flatnonzero(row[offset:offset + m]).tolist()) for row in masks.numpy()]
        out.append(np.array([combos.index(k) for k in kept]))
        offset += m
    return out


def test_gumbel_frequencies_follow_softmax():
    groups = [(2, 4), (1, 2)]
    mask = LayerMask(groups, tau=0.05, scaling=100.0).train()
    target = [torch.tensor([0.0, 0.01, 0.02, -0.01, 0.005, 0.015]), torch.tensor([0.004, -0.004])]
    with torch.no_grad():
        for l, v in zip(mask.logits, target):
            l.copy_(v)
    n = 20000
    masks = mask.sample(n, generator=torch.Generator().manual_seed(0)).detach()
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    for g, (choice, v) in enumerate(zip(_group_options(masks, groups), target)):
        expected = torch.softmax(v.double() * 100, 0).numpy() * n
        observed = np.bincount(choice, minlength=len(v))
        assert stats.chisquare(observed, expected).pvalue > 1e-3, (g, observed, expected)


def test_sample_structure_and_eval_determinism():
    groups = [(2, 4), (1, 2), (3, 6)]
    mask = LayerMask(groups, tau=1.0, scaling=1.0).train()
    masks = mask.sample(64)
    assert masks.shape == (64, 12)
    assert masks[:, :4].sum(1).eq(2).all() and masks[:, 4:6].sum(1).eq(1).all() and masks[:, 6:].sum(1).eq(3).all()
    assert masks.requires_grad
    with torch.no_grad():
        mask.logits[2][4] = 1.0  # option 4 of 3:6 in combinations order is (0, 2, 3)
    mask.eval()
    kept = [0, 1, 4, 6, 8, 9]
    assert mask.decision() == kept
    expected = torch.zeros(12)
    expected[kept] = 1
    assert torch.equal(mask.sample(5), expected.expand(5, -1))


def test_straight_through_gradient_prefers_the_cheaper_option():
    cost = torch.tensor([3.0, 1.0, 2.0, 4.0])  # option j of 1:4 keeps block j; option 1 is cheapest
    mask = LayerMask([(1, 4)], tau=1.0, scaling=1.0).train()
    loss = (mask.sample(256, generator=torch.Generator().manual_seed(0)) * cost).sum(1).mean()
    loss.backward()
    grad = mask.logits[0].grad
    assert grad[1] < 0 and grad[3] > 0 and abs(float(grad.sum())) < 1e-5  # softmax gradients sum to 0
    opt = torch.optim.SGD(mask.parameters(), lr=0.5)
    for step in range(100):
        opt.zero_grad()
        (mask.sample(64) * cost).sum(1).mean().backward()
        opt.step()
    assert mask.decision() == [1] and mask.confidence()[0] > 0.9


# ----------------------------------------------------------------------------- masked models

@pytest.mark.parametrize("cls", [DiT, SiT])
def test_fixed_mask_equals_pruned_checkpoint(tmp_path, cls):
    model = tiny_model(cls)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y = inputs()
    mask = LayerMask([(2, 4), (1, 2), (1, 2)])
    kept = [1, 3, 4, 7]
    attach_layer_mask(model, mask)
    mask.fix(mask.choice_for_kept(kept))
    with torch.no_grad():
        masked = model(x, t, y)
    path = tmp_path / "pruned.pt"
    write_pruned(path, f"{cls.family}-S/2", "src.pt", reference, cls.block_lists, kept, "test")
    pruned = load_weights(cls(depth=len(kept), **TINY), path).eval()
    with torch.no_grad():
        expected = pruned(x, t, y)
    assert (masked - expected).abs().max() <= 1e-5
    assert read_record(path)["kept"] == kept


def test_per_sample_training_masks_match_each_pruned_model():
    model = tiny_model(DiT, depth=4)
    base = copy.deepcopy(model)
    x, t, y = inputs(4)
    mask = LayerMask([(1, 2), (1, 2)], tau=1.0, scaling=1.0)
    attach_layer_mask(model, mask)
    model.train()
    model.y_embedder.dropout_prob = 0.0  # no label dropout, so train mode differs only in the masks
    out = model(x, t, y)
    drawn = mask.current.detach()
    for b in range(len(x)):
        kept = torch.nonzero(drawn[b]).flatten().tolist()
        ref = copy.deepcopy(base)
        ref.blocks = torch.nn.ModuleList(ref.blocks[i] for i in kept)
        with torch.no_grad():
            assert (out[b] - ref(x[b:b + 1], t[b:b + 1], y[b:b + 1])[0]).abs().max() <= 1e-5
    out.square().mean().backward()
    assert all(l.grad is not None and l.grad.abs().sum() > 0 for l in mask.logits)


def test_pinned_masks_skip_blocks_and_detach_restores_the_model():
    model = tiny_model(DiT, depth=4)
    keys = list(model.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        full = model(x, t, y)
    mask = LayerMask([(1, 2), (1, 2)])
    attach_layer_mask(model, mask)
    assert [k for k in model.state_dict() if not k.startswith("layer_mask.")] == keys
    calls = []
    model.blocks[2].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad(), mask.masks([1, 1, 0, 1]):
        skipped = model(x, t, y)
    assert calls == []  # a block masked out for the whole batch never runs
    ema = copy.deepcopy(model)
    assert ema.blocks[0]._layer_mask_slot[0] is ema.layer_mask is not mask
    detach_layer_mask(model)
    assert type(model) is DiT and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x, t, y), full)
        model.blocks = torch.nn.ModuleList(model.blocks[i] for i in (0, 1, 3))
        assert (model(x, t, y) - skipped).abs().max() <= 1e-5


def test_reclassing_keeps_names_and_isinstance():
    """What models/layer_mask.py's docstring promises: blocks and model are re-classed, not wrapped."""
    from models.dit import DiTBlock
    from tinyfusion.families import family_of_model
    model = tiny_model(SiT, depth=4)
    names = [n for n, _ in model.named_parameters()]
    attach_layer_mask(model, LayerMask([(1, 2), (1, 2)]))
    assert [n for n, _ in model.named_parameters() if not n.startswith("layer_mask.")] == names
    assert type(model).__name__ == "MaskedSiT" and type(model) is not SiT and isinstance(model, SiT)
    assert all(isinstance(b, DiTBlock) and type(b).__name__ == "MaskedDiTBlock" for b in model.blocks)
    assert not any(n.startswith("blocks.") and "layer_mask" in n for n, _ in model.named_parameters())
    assert family_of_model(model).name == "SiT"  # the most derived family class decides
    detach_layer_mask(model)
    assert type(model) is SiT and all(type(b) is DiTBlock for b in model.blocks)


def test_attach_refuses_a_mask_of_the_wrong_depth():
    with pytest.raises(UserError, match="cover 6 blocks but the model has 8"):
        attach_layer_mask(tiny_model(), LayerMask([(1, 2)] * 3))


def test_mar_masks_span_encoder_and_decoder(tmp_path):
    """MAR's two block lists are one index space; a fixed mask equals the MAR rebuilt from the pruned checkpoint."""
    from models.mar import MAR
    cfg = dict(img_size=32, vae_stride=16, encoder_embed_dim=32, encoder_num_heads=4, decoder_embed_dim=32,
               decoder_num_heads=4, buffer_size=4, diffloss_d=1, diffloss_w=32, class_num=10)
    torch.manual_seed(0)
    model = MAR(encoder_depth=2, decoder_depth=2, **cfg).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    imgs, labels = torch.randn(3, 16, 2, 2), torch.tensor([1, 2, 3])
    draws = model.draw_training_randomness(3, "cpu", label_drop=False)
    mask = LayerMask([(1, 2), (1, 2)])
    attach_layer_mask(model, mask)
    mask.fix(mask.choice_for_kept([1, 2]))  # encoder block 1, decoder block 0
    with torch.no_grad():
        masked = model.forward_features(imgs, labels, draws)["z"]
    path = tmp_path / "mar.pt"
    name, _ = write_pruned(path, "MAR-B", "src.pt", reference, MAR.block_lists, [1, 2], "test")
    assert name == "MAR-B-D2"
    pruned = load_weights(MAR(encoder_depth=1, decoder_depth=1, **cfg), path).eval()
    with torch.no_grad():
        assert (pruned.forward_features(imgs, labels, draws)["z"] - masked).abs().max() <= 1e-5
