"""KL-16 tokenizer: official key table and sizes, shapes of a tiny round trip, posterior, attention, loading."""
import json
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from models.kl16 import MAR_LATENT_SCALE, AttnBlock, AutoencoderKL, DiagonalGaussian, load_kl16

KEYS = Path(__file__).parent / "fixtures" / "keys"
TINY = dict(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)


def test_official_keys_shapes_and_counts():
    ref = json.loads((KEYS / "KL-16-VAE.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL()
    got = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert got == ref["state_dict"] and len(got) == 312
    assert sum(p.numel() for p in vae.parameters()) == ref["num_parameters"] == 66_456_019
    assert sum(p.numel() for p in vae.encoder.parameters()) == 28_265_760  # mar.md section 5
    assert sum(p.numel() for p in vae.decoder.parameters()) == 38_188_931
    assert vae.stride == 16 and MAR_LATENT_SCALE == 0.2325


def test_tiny_round_trip_shapes():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY).eval()
    assert [k for k in vae.state_dict() if ".attn." in k and k.startswith("encoder.down")][0].startswith(
        "encoder.down.1.attn.0.")  # attention sits at resolution 16 = level 1 of a 32-pixel input
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 4, 16, 16)
    z = post.sample()
    assert z.shape == (2, 4, 16, 16) and torch.equal(post.mode(), post.mean)
    assert vae.decode(z).shape == (2, 3, 32, 32)


def test_posterior_clamp_and_sample():
    moments = torch.cat([torch.randn(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    moments[:, 4:, 0, 0] = -100.0
    post = DiagonalGaussian(moments)
    assert post.logvar.max() == 20.0 and post.logvar.min() == -30.0
    torch.manual_seed(3)
    expected = moments[:, :4] + torch.exp(0.5 * post.logvar) * torch.randn(1, 4, 2, 2)  # LDM: mean + std * N(0, I)
    torch.manual_seed(3)
    assert torch.allclose(post.sample(), expected)


def test_attention_matches_bmm_reference():
    torch.manual_seed(0)
    block = AttnBlock(32)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 4, 5)
    h = block.norm(x)
    q, k, v = (conv(h).reshape(2, 32, 20) for conv in (block.q, block.k, block.v))
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 32 ** -0.5, dim=2)  # LDM's formulation
    ref = x + block.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 32, 4, 5))
    assert torch.allclose(block(x), ref, atol=1e-5)


def test_load_kl16_drops_loss_keys(tmp_path):
    torch.manual_seed(0)
    src = AutoencoderKL(**TINY)
    sd = dict(src.state_dict())
    torch.save({"model": {**sd, "loss.discriminator.main.0.weight": torch.zeros(3)}}, tmp_path / "kl16.ckpt")
    vae = load_kl16(tmp_path / "kl16.ckpt", **TINY)
    assert all(torch.equal(v, sd[k]) for k, v in vae.state_dict().items())
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    torch.save({"model": {**sd, "encoder.extra.weight": torch.zeros(3)}}, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="encoder.extra.weight"):
        load_kl16(tmp_path / "bad.ckpt", **TINY)
