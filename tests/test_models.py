"""DiT/SiT zoo: official key sets and parameter counts, golden outputs, diffusers parity, errors."""
import json
import os

import pytest
import torch

from conftest import FIXTURES, golden_model
from core.errors import UserError
from models import DiT_models, SiT_models, build_model, family_of
from models.registry import UnknownModelError


def analytic_params(depth, hidden, patch, input_size=32, in_ch=4, classes=1000, learn_sigma=True):
    """Parameter count of DiT from its layer shapes (independent of the module code)."""
    d, tokens, out = hidden, (input_size // patch) ** 2, in_ch * (2 if learn_sigma else 1)
    embed = in_ch * patch * patch * d + d + tokens * d + (256 * d + d) + (d * d + d) + (classes + 1) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (d * patch * patch * out + patch * patch * out)
    return embed + depth * block + final


SIZES = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152), "Tiny": (12, 96)}


@pytest.mark.parametrize("registry", [DiT_models, SiT_models])
def test_every_registry_name_has_the_official_parameter_count(registry):
    with torch.device("meta"):
        for name in registry:
            fam, rest = name.split("-", 1)
            size, patch = rest.split("/")
            depth, hidden = SIZES[size] if size in SIZES else (int(size[1:]), 1152)
            n = sum(p.numel() for p in registry[name]().parameters())
            assert n == analytic_params(depth, hidden, int(patch)), name


def test_xl2_matches_official_keys_and_count():
    spec = json.load(open(os.path.join(FIXTURES, "keys", "DiT-XL-2.json")))
    for name, keyfile in (("DiT-XL/2", "DiT-XL-2.json"), ("SiT-XL/2", "SiT-XL-2.json")):
        spec = json.load(open(os.path.join(FIXTURES, "keys", keyfile)))
        with torch.device("meta"):
            model = build_model(name)
        sd = model.state_dict()
        assert {k: list(v.shape) for k, v in sd.items()} == spec["state_dict"]
        assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"] == 675_129_632


def test_pruned_names_resolve():
    with torch.device("meta"):
        assert DiT_models["DiT-D14/2"]().depth == 14
        assert DiT_models["DiT-D9/2"]().depth == 9
        small = DiT_models["DiT-S-D6/4"]()
        assert small.depth == 6 and small.patch_size == 4 and small.pos_embed.shape[-1] == 384
        assert SiT_models["SiT-D14/2"]().depth == 14
    assert "DiT-D14/2" in DiT_models and "DiT-XX/2" not in DiT_models
    assert family_of("SiT-S-D3/2") == "SiT"


def test_golden_forward_matches_official(golden):
    dit = golden_model(golden, "DiT")
    with torch.no_grad():
        out = dit(golden["x"], golden["t"], golden["y"])
        cfg = dit.forward_with_cfg(golden["x"], golden["t"], golden["y"], 4.0)
        torch.testing.assert_close(out, golden["dit_forward"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cfg, golden["dit_forward_with_cfg_4"], rtol=1e-5, atol=1e-5)
        all_ch = dit.forward_with_cfg(golden["x"], golden["t"], golden["y"], 4.0, guide_all_channels=True)
        assert not torch.allclose(all_ch[:, 3], cfg[:, 3])  # channel 3 is guided only in the standard form
        torch.testing.assert_close(all_ch[:, :3], cfg[:, :3])
        sit = golden_model(golden, "SiT")
        torch.testing.assert_close(sit(golden["x"], golden["t"] / 1000, golden["y"]), golden["sit_forward"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [28, 5])
def test_diffusers_parity(depth):
    from models.diffusers_export import to_diffusers
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=8, depth=depth, num_classes=10).eval()
    for name, p in model.named_parameters():
        if name != "pos_embed":  # the fixed sin-cos table is recomputed by diffusers, keep ours
            p.data.normal_(0, 0.05)
    ref = to_diffusers(model)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 100, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = ref(x, timestep=t, class_labels=y).sample
    assert ours.abs().max() > 0.5
    assert (ours - theirs).abs().max() <= 1e-4


def test_bad_inputs_give_one_clear_error():
    with pytest.raises(UnknownModelError, match="DiT-XL/2"):
        DiT_models["DiT-XXL/2"]
    with pytest.raises(UserError, match="unknown model"):
        build_model("ViT-B/16")
    with pytest.raises(UserError, match="not divisible by patch_size"):
        DiT_models["DiT-S/2"](input_size=5)
