"""Hand-written LoRA: exact no-op at init, merge == unmerged == the closed form, strip restores the
original weights and names, frozen base weights, and the trainable share on DiT-XL/2."""
import copy
import json
import os

import torch
import torch.nn as nn

from models import DiT, build_model
from models.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, strip_lora
from tinyfusion.mask_learning import prepare_mask_learning
from test_layer_mask import inputs, tiny_model


def _randomize_b(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)


def test_lora_is_an_exact_no_op_at_init_and_freezes_the_base():
    model = tiny_model(DiT, depth=2)
    x, t, y = inputs()
    with torch.no_grad():
        before = model(x, t, y)
    params = apply_lora(model.blocks, rank=4, alpha=8)
    assert len(params) == 2 * 5 * 2  # A and B for qkv, proj, fc1, fc2, adaLN in each of 2 blocks
    with torch.no_grad():
        assert torch.equal(model(x, t, y), before)
    # Inside the blocks only the LoRA factors train (outside them apply_lora changes nothing).
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("blocks.")}
    assert trainable == {n for n in dict(model.named_parameters()) if n.endswith((".lora_A", ".lora_B"))}
    assert model.final_layer.linear.weight.requires_grad
    assert set(lora_state_dict(model)) == trainable


def test_lora_forward_and_merge_match_the_closed_form():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    lora = LoRALinear(linear, rank=2, alpha=6)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 4, 6)
    w = linear.weight.detach().double() + 3.0 * lora.lora_B.detach().double() @ lora.lora_A.detach().double()
    expected = x.double() @ w.T + linear.bias.detach().double()
    assert torch.allclose(lora(x).double(), expected, atol=1e-5)
    assert torch.allclose(lora.merged_weight().double(), w, atol=1e-6)


def test_merge_equals_unmerged_and_strip_restores_the_original():
    model = tiny_model(DiT, depth=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y = inputs()
    apply_lora(model.blocks)
    _randomize_b(model)
    with torch.no_grad():
        unmerged = model(x, t, y)
    merged_model = merge_lora(tiny_model(DiT, depth=2))  # no LoRA inside: merge is the identity
    assert all(torch.equal(merged_model.state_dict()[k], v) for k, v in original.items())

    merged = merge_lora(copy.deepcopy(model))
    assert list(merged.state_dict()) == list(original)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert (merged(x, t, y) - unmerged).abs().max() <= 1e-5
        assert (merged(x, t, y) - model(x, t, y)).abs().max() <= 1e-5

    strip_lora(model)
    assert list(model.state_dict()) == list(original)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert all(type(m.attn.qkv) is nn.Linear for m in model.blocks)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "pos_embed")


def test_optimizer_steps_leave_the_base_weights_untouched():
    model = tiny_model(DiT, depth=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y = inputs()
    params = apply_lora(model, rank=4, alpha=8, targets=("qkv", "fc2"))
    assert len(params) == 2 * 2 * 2
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x, t, y).square().mean().backward()
        opt.step()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".lora_B"))  # B moved
    strip_lora(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_trainable_share_on_dit_xl():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    base = sum(p.numel() for p in model.parameters())
    params = apply_lora(model.blocks, rank=8, alpha=16)
    lora = sum(p.numel() for p in params)
    # Closed form: r*(in+out) per Linear; D=1152: qkv D->3D, proj D->D, fc1 D->4D, fc2 4D->D, adaLN D->6D.
    d, r = 1152, 8
    per_block = r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d) + (d + 6 * d))
    assert lora == 28 * per_block == 5_935_104
    assert base == 675_129_632
    share = lora / (base + lora)
    print(f"DiT-XL/2 LoRA r=8 on all block Linears: {lora:,} of {base + lora:,} parameters = {share:.3%}")
    assert 0.008 < share < 0.010  # the paper: ~0.9%


def test_search_lora_covers_every_linear_by_default_as_the_official_code():
    spec = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "keys", "DiT-XL-2.json")))
    # Closed form from the official DiT-XL/2 keys: r * (in + out) for every Linear weight (2-D; the label
    # embedding table is an nn.Embedding, the patch embedding a Conv2d).
    linears = {k[:-len(".weight")]: shape for k, shape in spec["state_dict"].items()
               if k.endswith(".weight") and len(shape) == 2 and not k.startswith("y_embedder")}
    expected = {scope: sum(8 * (i + o) for name, (o, i) in linears.items() if scope == "all" or name.startswith("blocks."))
                for scope in ("all", "blocks")}
    counts = {}
    for scope in ("all", "blocks"):
        with torch.device("meta"):
            model = build_model("DiT-XL/2")
        kwargs = {} if scope == "all" else {"lora_scope": "blocks"}  # the default must be "all"
        _, groups = prepare_mask_learning(model, [[1, 2]] * 14, lora_rank=8, **kwargs)
        counts[scope] = sum(p.numel() for p in groups[0]["params"])
        lora_on = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert lora_on == {n for n in linears if scope == "all" or n.startswith("blocks.")}
    assert counts == expected
    assert {"t_embedder.mlp.0", "final_layer.linear", "final_layer.adaLN_modulation.1"} <= set(linears)
    share = counts["all"] / spec["num_parameters"]
    print(f"DiT-XL/2 search LoRA r=8: all Linears {counts['all']:,} = {share:.3%} of the model "
          f"({counts['all'] / (spec['num_parameters'] + counts['all']):.3%} of all parameters); "
          f"blocks only {counts['blocks']:,}")
    assert counts["all"] == 6_001_920 and round(100 * share, 2) == 0.89  # the paper / official: about 0.89%
