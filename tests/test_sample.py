"""sample.py end to end on tiny models (CPU), and the claim that it draws random numbers in the official order."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import golden_model
from models import build_model
from tinyfusion.checkpoint import save_weights


def tiny_weights(name, path, in_channels, input_size, num_classes=10, seed=0):
    """Random weights for a registry model, with the zero-initialised adaLN / final layers perturbed
    so the model's output (hence every sample) really depends on them. Returns the state dict."""
    torch.manual_seed(seed)
    model = build_model(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    sd = model.state_dict()
    if path is not None:
        save_weights(sd, path)
    return sd


@pytest.fixture
def keep_grad_mode():
    """sample.main disables autograd globally (as the official script); give it back to later tests."""
    mode = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(mode)


@pytest.mark.parametrize("name,extra", [("DiT-Tiny-D2/2", ["--num-sampling-steps", "3"]),
                                        ("SiT-Tiny-D2/2", ["ODE", "--sampling-method", "euler",
                                                           "--num-sampling-steps", "2"])])
def test_sample_writes_grid(tmp_path, keep_grad_mode, name, extra):
    import sample
    ckpt, out = tmp_path / "tiny.pt", tmp_path / "grid.png"
    tiny_weights(name, ckpt, in_channels=3, input_size=8)
    sample.main([*extra, "--model", name, "--ckpt", str(ckpt), "--vae", "none", "--image-size", "8",
                 "--num-classes", "10", "--class-labels", "1", "2", "3", "--nrow", "2", "--out", str(out),
                 "--device", "cpu", "--cfg-scale", "2.0"])
    grid = np.asarray(Image.open(out))
    # torchvision make_grid: 2 columns x 2 rows of 8 px tiles, 2 px padding around and between.
    assert grid.shape == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2, 3)
    tiles = [grid[2:10, 2:10], grid[2:10, 12:20], grid[12:20, 2:10]]
    assert all(t.std() > 1 for t in tiles), "samples are flat: the model output did not reach the images"
    assert not np.array_equal(tiles[0], tiles[1])
    assert not grid[12:20, 12:20].any()  # the empty 4th cell stays black (pad value 0)


def test_dit_sampler_official_rng_order(golden):
    """One randn_like per DDPM step from the global generator, as the official p_sample_loop."""
    from tinyfusion.families.dit import DiTSampler
    model = golden_model(golden)
    sampler = DiTSampler(argparse.Namespace(sampler="ddpm", num_sampling_steps=10, guide_all_channels=False))
    torch.manual_seed(5)
    with torch.no_grad():
        out = sampler(model, golden["sample_z"], golden["sample_y"], 4.0, use_cfg=False)
    ref = golden["dit_p_sample_loop_10_seed5"]
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name,extra", [("DiT-Tiny-D2/2", ["--num-sampling-steps", "3"]),
                                        ("SiT-Tiny-D2/2", ["ODE", "--num-sampling-steps", "3"])])
def test_bf16_and_compiled_denoiser_stay_close_to_fp32(tmp_path, keep_grad_mode, name, extra):
    import sample
    ckpt = tmp_path / "tiny.pt"
    tiny_weights(name, ckpt, in_channels=3, input_size=8)
    variants = {"fp32": [], "bf16": ["--precision", "bf16"]}
    if name.startswith("DiT"):
        variants["compiled"] = ["--compile"]
    grids = {}
    from torch._dynamo.utils import counters
    for key, flags in variants.items():
        graphs = counters["stats"]["unique_graphs"]
        sample.main([*extra, *flags, "--model", name, "--ckpt", str(ckpt), "--vae", "none", "--image-size", "8",
                     "--num-classes", "10", "--class-labels", "1", "2", "--out", str(tmp_path / f"{key}.png"),
                     "--device", "cpu", "--cfg-scale", "2.0", "--seed", "3"])
        grids[key] = np.asarray(Image.open(tmp_path / f"{key}.png")).astype(np.float64)
        if key == "compiled":  # the blocks really went through torch.compile
            assert counters["stats"]["unique_graphs"] > graphs
    assert grids["fp32"].std() > 1
    # bf16 rounds the denoiser's outputs (~3 significant digits): some pixels move, the picture does not
    assert 0 < np.abs(grids["bf16"] - grids["fp32"]).mean() < 4.0
    if "compiled" in grids:  # compiled kernels differ from eager only by float rounding
        assert np.abs(grids["compiled"] - grids["fp32"]).max() <= 2
