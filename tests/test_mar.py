"""MAR and DiffLoss: official key table and sizes, training-step semantics, sampler schedule, pruning view."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from models import MAR_models, build_model, family_of
from models.mar import MAR, cfg_at
from models.registry import UnknownModelError

KEYS = Path(__file__).parent / "fixtures" / "keys"
BLOCK_PARAMS = lambda d: 12 * d * d + 13 * d  # one ViT block (mar.md section 2)



def tiny_mar(**kw):
    """4x4 = 16 tokens of 16 channels, width 32, 2 + 2 blocks, a 2-block DiffLoss, 5 sampling steps."""
    cfg = dict(img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
               decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, buffer_size=4, diffloss_d=2,
               diffloss_w=32, num_sampling_steps="5", class_num=10)
    cfg.update(kw)
    return MAR(**cfg)


# ---------------------------------------------------------------------------------------------- sizes and keys
@pytest.mark.parametrize("name", ["MAR-B", "MAR-L", "MAR-H"])
def test_official_keys_shapes_and_counts(name):
    ref = json.loads((KEYS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = build_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(ref["state_dict"])  # same keys, same order
    assert got == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert model.depth == {"MAR-B": 24, "MAR-L": 32, "MAR-H": 40}[name]


def test_released_param_counts():
    expected = {"MAR-B": 207_924_768, "MAR-L": 478_326_304, "MAR-H": 942_403_104}
    for name, n in expected.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in MAR_models[name]().parameters()) == n


def test_pruned_names_and_counts():
    with torch.device("meta"):
        d16 = MAR_models["MAR-L-D16"]()
        e10d6 = build_model("MAR-L-E10D6")
        small = MAR_models["MAR-B-D4"](diffloss_d=3)
    assert (len(d16.encoder_blocks), len(d16.decoder_blocks)) == (8, 8)
    assert (len(e10d6.encoder_blocks), len(e10d6.decoder_blocks)) == (10, 6)
    assert (len(small.encoder_blocks), len(small.decoder_blocks), len(small.diffloss.net.res_blocks)) == (2, 2, 3)
    assert sum(p.numel() for p in d16.parameters()) == 478_326_304 - 16 * BLOCK_PARAMS(1024)
    keys = {k.split(".")[1] for k in d16.state_dict() if k.startswith("decoder_blocks.")}
    assert keys == {str(i) for i in range(8)}  # renumbered contiguously
    assert family_of("MAR-L-E8D8") == "MAR" and family_of("MAR-D16") == "MAR"


@pytest.mark.parametrize("bad", ["MAR-XL", "MAR-L-D15", "MAR-L-E0D0", "MAR-L-D16/2", "mar_large"])
def test_unknown_names(bad):
    assert bad not in MAR_models
    with pytest.raises(UnknownModelError) as e:
        MAR_models[bad]
    assert "MAR-B" in str(e.value) and "MAR-L-D16" in str(e.value)


# ---------------------------------------------------------------------------------------------- randomness
def test_mask_ratio_distribution():
    torch.manual_seed(0)
    np.random.seed(0)
    model = tiny_mar(img_size=256)  # 256 tokens, as the real model
    a, b = (0.7 - 1) / 0.25, 0.0
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1 + 0.25 * (phi(a) - phi(b)) / (Phi(b) - Phi(a))  # closed-form truncated-normal mean
    assert abs(mean - 0.867) < 1e-3
    fracs = []
    for i in range(2000):
        d = model.draw_training_randomness(2, torch.device("cpu"), label_drop=False)
        counts = d["mask"].sum(1)
        assert counts[0] == counts[1]  # one ratio per batch
        n = int(counts[0])
        if i < 20:  # the masked tokens are the first n of each order
            for row in range(2):
                assert set(torch.nonzero(d["mask"][row]).flatten().tolist()) == set(d["orders"][row, :n].tolist())
        fracs.append(n / 256)
    fracs = np.array(fracs)
    assert fracs.min() >= math.ceil(0.7 * 256) / 256 and fracs.max() <= 1.0
    assert abs(fracs.mean() - (mean + 0.5 / 256)) < 0.006  # ceil adds ~half a token


def test_label_drop_rate():
    model = tiny_mar(label_drop_prob=0.3).train()
    torch.manual_seed(0)
    drops = model.draw_training_randomness(20000, torch.device("cpu"))["drop"]
    assert abs(drops.float().mean().item() - 0.3) < 0.015
    assert model.eval().draw_training_randomness(4, torch.device("cpu"))["drop"] is None


# ---------------------------------------------------------------------------------------------- training step
def test_patchify_layout():
    model = tiny_mar(patch_size=2, img_size=128)  # 4x4 tokens of 16*2*2 channels
    x = torch.randn(2, 16, 8, 8)
    tok = model.patchify(x)
    assert tok.shape == (2, 16, 64)
    for h, w, c, i, j in [(0, 0, 0, 0, 0), (1, 3, 5, 1, 0), (3, 2, 15, 1, 1)]:  # row-major tokens, (c, p, p) inside
        assert tok[1, h * 4 + w, c * 4 + i * 2 + j] == x[1, c, 2 * h + i, 2 * w + j]
    assert torch.equal(model.unpatchify(tok), x)


def test_masked_tokens_are_invisible_and_only_masked_tokens_count():
    torch.manual_seed(0)
    model = tiny_mar().eval()
    x, y = torch.randn(3, 16, 4, 4), torch.tensor([1, 2, 3])
    draws = model.draw_training_randomness(3, x.device)
    mask = draws["mask"].reshape(3, 1, 4, 4)
    f1 = model.forward_features(x, y, draws)
    f2 = model.forward_features(x + 5 * mask * torch.randn_like(x), y, draws)  # change masked tokens only
    assert torch.allclose(f1["z"], f2["z"], atol=1e-6)
    t = torch.randint(0, 1000, (3 * 16 * 4,))
    noise = torch.randn(3 * 16 * 4, 16)
    for p in model.diffloss.net.final_layer.parameters():  # a non-trivial DiffLoss output
        torch.nn.init.normal_(p, std=0.1)
    loss1 = model.forward_loss(f1["z"], f1["target"], f1["mask"], t, noise)
    loss2 = model.forward_loss(f1["z"], f1["target"] + (1 - f1["mask"])[..., None], f1["mask"], t, noise)
    assert torch.allclose(loss1, loss2)
    # Reference: tile by concatenation (repeat, not interleave) and take the masked mean by hand.
    rows = lambda a: torch.cat([a.reshape(48, -1)] * 4)
    per_row = model.diffloss.train_diffusion.training_losses(model.diffloss.net, rows(f1["target"]), t,
                                                             dict(c=rows(f1["z"])), noise=noise)["loss"]
    m = rows(f1["mask"]).flatten()
    assert torch.allclose(loss1, (per_row * m).sum() / m.sum(), rtol=1e-5)


def test_shared_draws_and_hidden_states():
    torch.manual_seed(0)
    student = tiny_mar().train()
    teacher = copy.deepcopy(student).eval()
    x, y = torch.randn(2, 16, 4, 4), torch.tensor([0, 9])
    draws = student.draw_training_randomness(2, x.device)
    draws["drop"] = torch.tensor([True, False])
    ft = teacher.forward_features(x, y, draws, return_hidden=True)
    # The same weights without dropout but with the drawn label drop reproduce the teacher exactly.
    student.eval()
    fs = student.forward_features(x, y, draws, return_hidden=True)
    assert torch.equal(fs["z"], ft["z"])
    visible = 16 - int(draws["mask"][0].sum())
    assert [tuple(h.shape) for h in ft["hidden"]] == [(2, 4 + visible, 32)] * 2 + [(2, 4 + 16, 32)] * 2
    # The dropped sample used fake_latent: with no drop, only sample 1 stays the same.
    f0 = teacher.forward_features(x, y, {**draws, "drop": None})
    assert not torch.allclose(f0["z"][0], ft["z"][0]) and torch.allclose(f0["z"][1], ft["z"][1])


def test_tiny_mar_learns_a_fixed_batch():
    torch.manual_seed(0)
    np.random.seed(0)
    model = tiny_mar(attn_dropout=0.0, proj_dropout=0.0).train()
    x, y = torch.randn(8, 16, 4, 4), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15])


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    model = tiny_mar(attn_dropout=0.0, proj_dropout=0.0)
    ckpt = copy.deepcopy(model)
    ckpt.grad_checkpointing = ckpt.diffloss.net.grad_checkpointing = True
    x, y = torch.randn(2, 16, 4, 4), torch.tensor([1, 2])
    draws = model.draw_training_randomness(2, x.device)
    t, noise = torch.randint(0, 1000, (128,)), torch.randn(128, 16)
    grads = []
    for m in (model, ckpt):
        f = m.forward_features(x, y, draws)
        m.forward_loss(f["z"], f["target"], f["mask"], t, noise).backward()
        grads.append(m.z_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------- pruning view
def test_removing_a_block_equals_zeroing_its_residual_branches():
    torch.manual_seed(0)
    full = tiny_mar().eval()
    zeroed = copy.deepcopy(full)
    for block in (zeroed.encoder_blocks[1], zeroed.decoder_blocks[0]):
        for layer in (block.attn.proj, block.mlp.fc2):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    pruned = tiny_mar(encoder_depth=1, decoder_depth=1).eval()
    sd = {k: v for k, v in full.state_dict().items()
          if not k.startswith(("encoder_blocks.1.", "decoder_blocks.0."))}
    sd = {k.replace("decoder_blocks.1.", "decoder_blocks.0."): v for k, v in sd.items()}
    pruned.load_state_dict(sd, strict=True)
    x, y = torch.randn(2, 16, 4, 4), torch.tensor([3, 4])
    draws = full.draw_training_randomness(2, x.device)
    za, zb = zeroed.forward_features(x, y, draws)["z"], pruned.forward_features(x, y, draws)["z"]
    assert torch.allclose(za, zb, atol=1e-5)
    assert not torch.allclose(za, full.forward_features(x, y, draws)["z"], atol=1e-3)
    assert MAR.block_lists == ("encoder_blocks", "decoder_blocks") and pruned.depth == 2


# ---------------------------------------------------------------------------------------------- DiffLoss
def test_diffloss_cfg_combines_halves():
    torch.manual_seed(0)
    net = tiny_mar().diffloss.net
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, c = torch.randn(3, 16), torch.tensor([5, 500, 999]), torch.randn(6, 32)
    out = net.forward_with_cfg(torch.cat([x, torch.randn(3, 16)]), torch.cat([t, t]), c, 2.5)
    cond, uncond = net(x, t, c[:3]), net(x, t, c[3:])
    eps = uncond[:, :16] + 2.5 * (cond[:, :16] - uncond[:, :16])
    assert torch.allclose(out[:3, :16], eps, atol=1e-5) and torch.allclose(out[3:, :16], eps, atol=1e-5)
    assert torch.allclose(out[:3, 16:], cond[:, 16:], atol=1e-5)
    assert torch.allclose(out[3:, 16:], uncond[:, 16:], atol=1e-5)


def test_diffloss_init_and_respacing():
    dl = tiny_mar(num_sampling_steps="100").diffloss
    assert dl.gen_diffusion.timestep_map == [round(i * 999 / 99) for i in range(100)]
    assert torch.count_nonzero(dl.net(torch.randn(4, 16), torch.arange(4), torch.randn(4, 32))) == 0  # zero output


# ---------------------------------------------------------------------------------------------- sampling
def test_cfg_schedule_values():
    assert cfg_at(64, 256, 3.0, "linear") == pytest.approx(1 + 2.0 * 192 / 256)
    assert cfg_at(255, 256, 2.9, "linear") == pytest.approx(1 + 1.9 / 256)
    assert cfg_at(1, 256, 3.2, "constant") == 3.2
    with pytest.raises(ValueError, match="linear, constant"):
        cfg_at(1, 256, 3.0, "cosine")


def _expected_steps(seq_len, num_iter):
    """(tokens predicted, tokens left masked) per step, from mar.md section 4."""
    left, out = seq_len, []
    for s in range(num_iter):
        nxt = max(1, min(left - 1, math.floor(seq_len * math.cos(math.pi / 2 * (s + 1) / num_iter))))
        out.append((left if s == num_iter - 1 else left - nxt, nxt))
        left = nxt
    return out


@pytest.mark.parametrize("num_iter,cfg", [(1, 1.0), (4, 1.0), (4, 3.0), (16, 1.0)])
def test_sampler_steps_and_shapes(num_iter, cfg):
    torch.manual_seed(0)
    model = tiny_mar().train()
    calls, orig = [], model.diffloss.sample
    model.diffloss.sample = lambda z, temp, scale: calls.append((z.shape[0], scale)) or orig(z, temp, scale)
    enc_lens = []
    model.encoder_blocks[0].register_forward_hook(lambda m, i, o: enc_lens.append(i[0].shape[1]))
    labels = torch.tensor([1, 2, 3]) if cfg != 1.0 else None
    out = model.sample_tokens(3, num_iter=num_iter, cfg=cfg, labels=labels)
    assert out.shape == (3, 16, 4, 4) and torch.isfinite(out).all() and (out != 0).all()
    assert model.training  # mode restored
    expected = _expected_steps(16, num_iter)
    mul = 2 if cfg != 1.0 else 1
    assert [n for n, _ in calls] == [3 * mul * k for k, _ in expected]
    assert enc_lens[0] == 4  # step 0: the encoder sees only the buffer
    for (_, scale), (_, left) in zip(calls, expected):
        assert scale == pytest.approx(1 + (cfg - 1) * (16 - left) / 16, rel=1e-6)
    if num_iter == 16:
        assert all(k == 1 for k, _ in expected)  # one token per step


def test_sampler_errors():
    model = tiny_mar()
    with pytest.raises(ValueError, match="linear, constant"):
        model.sample_tokens(1, num_iter=2, cfg=2.0, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="num_iter 17"):
        model.sample_tokens(1, num_iter=17)
    with pytest.raises(UserError):
        model.sample_tokens(1, num_iter=0)
