"""extract_features end to end with a tiny random AutoencoderKL (no download): content, resume, DDP."""
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from tinyfusion.data import open_feature_store, open_image_folder
from tinyfusion.features import extract_features, image_seed
from tinyfusion.runtime import Runtime
from tinyfusion.vae import load_vae, resolve_vae_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses: one thread each (2 shared cores) and never the network.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """3 classes x 5 random-size RGB images, a 4-level (downsample 8) tiny AutoencoderKL folder."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            w, h = rng.integers(24, 90, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"class{c}" / f"{i}.png")
    # The uninterrupted single-process run every other run is compared with.
    kw = dict(image_size=32, vae=str(root / "vae"), batch_size=3, num_workers=0, shard_size=4, global_seed=5)
    extract_features(root / "imgs", root / "ref", runtime=Runtime(), **kw)
    return root, kw


def read_all(path):
    store = open_feature_store(path)
    return (np.stack([np.stack([store[(i, f)][0].numpy() for f in (0, 1)]) for i in range(len(store))]),
            np.array([store[i][1].item() for i in range(len(store))]))


def run_script(args, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "extract_features.py"), *map(str, args)],
                          env={**ENV, **env}, capture_output=True, text=True, timeout=120)


def test_store_content_matches_diffusers_sampling(assets):
    root, kw = assets
    store = open_feature_store(root / "ref")
    assert len(store) == 15 and store.manifest["num_shards"] == 4 and store.latent_shape == (4, 4, 4)
    assert store.num_classes == 3 and store.manifest["scale_factor"] == pytest.approx(0.18215)
    np.testing.assert_array_equal(read_all(root / "ref")[1], np.repeat([0, 1, 2], 5))
    # Independent path: diffusers' own latent_dist.sample with the per-image generator, image then flip.
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    images = open_image_folder(root / "imgs", 32)
    for i in (0, 6, 14):
        x = images[i][0][None]
        g = torch.Generator().manual_seed(image_seed(5, i))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g) * 0.18215
            z_flip = vae.encode(x.flip(-1)).latent_dist.sample(generator=g) * 0.18215
        torch.testing.assert_close(store[(i, 0)][0], z[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(store[(i, 1)][0], z_flip[0], rtol=1e-4, atol=1e-5)


def test_moments_fp16_with_limit(assets, tmp_path):
    root, kw = assets
    extract_features(root / "imgs", tmp_path / "m", runtime=Runtime(), **{**kw, "limit": 4}, store="moments",
                     dtype="fp16")
    store = open_feature_store(tmp_path / "m")
    raw = np.load(tmp_path / "m" / "latents-00000.npy")
    assert raw.dtype == np.float16 and raw.shape == (4, 2, 8, 4, 4) and store.stochastic
    np.testing.assert_array_equal(store.labels(), [0, 0, 1, 2])  # evenly spaced: images 0, 3, 7, 11
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        d = vae.encode(open_image_folder(root / "imgs", 32)[11][0][None].flip(-1)).latent_dist
    np.testing.assert_allclose(raw[3, 1].astype(np.float32), torch.cat([d.mean, d.logvar], 1)[0].numpy(),
                               rtol=2e-3, atol=2e-3)


def test_killed_run_resumes_without_duplicates(assets, tmp_path, capsys):
    root, kw = assets
    out = tmp_path / "killed"
    args = ["--data-path", root / "imgs", "--features-path", out, "--image-size", 32, "--vae", root / "vae",
            "--batch-size", 3, "--num-workers", 0, "--shard-size", 4, "--global-seed", 5]
    # The CLI hard-exits before the second batch of shard 1: shard 0 is complete, shard 1 half-written.
    res = run_script(args, TINYFUSION_EXTRACT_EXIT_AT="1:1")
    assert res.returncode == 17, res.stderr[-2000:]
    files = set(os.listdir(out))
    assert {"shard-00000.done", "latents-00000.npy", ".latents-00001.partial.npy"} <= files
    assert "manifest.json" not in files and "shard-00001.done" not in files
    with pytest.raises(UserError, match="unfinished"):
        open_feature_store(out)
    stat0 = os.stat(out / "latents-00000.npy")
    extract_features(root / "imgs", out, runtime=Runtime(), **kw)  # the restart (in-process: faster)
    assert "1 already done" in capsys.readouterr().out
    assert os.stat(out / "latents-00000.npy").st_mtime_ns == stat0.st_mtime_ns  # finished shard kept
    assert not any(f.endswith(".partial.npy") for f in os.listdir(out))
    lat, lab = read_all(out)
    ref_lat, ref_lab = read_all(root / "ref")
    assert lat.shape == ref_lat.shape == (15, 2, 4, 4, 4)
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_allclose(lat, ref_lat, rtol=1e-5, atol=1e-6)  # same batches; threads may reorder sums
    # A restart with other content settings is refused instead of mixing two stores.
    with pytest.raises(UserError, match="other settings.*global_seed"):
        extract_features(root / "imgs", out, runtime=Runtime(), **{**kw, "global_seed": 6})


def test_two_processes_match_one(assets, tmp_path):
    root, kw = assets
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "extract_features.py"), "--data-path", root / "imgs", "--features-path", tmp_path / "ddp",
           "--image-size", 32, "--vae", root / "vae", "--global-batch-size", 4, "--num-workers", 0,
           "--shard-size", 4, "--global-seed", 5, "--device", "cpu"]
    res = subprocess.run(list(map(str, cmd)), env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    lat, lab = read_all(tmp_path / "ddp")
    ref_lat, ref_lab = read_all(root / "ref")
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_allclose(lat, ref_lat, rtol=1e-5, atol=1e-6)  # other batch splits: float rounding only


def test_pixel_store_with_vae_none(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    for i, p in enumerate(pixels):
        (tmp_path / "digits" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(p, mode="L").save(tmp_path / "digits" / str(i % 2) / f"{i}.png")
    manifest = extract_features(tmp_path / "digits", tmp_path / "px", image_size=8, vae="none", channels=1,
                                batch_size=3, num_workers=0, runtime=Runtime())
    assert manifest["latent_shape"] == [1, 8, 8] and manifest["scale_factor"] == 1.0
    store = open_feature_store(tmp_path / "px")
    # Sorted ImageFolder order: class 0 = images 0, 2; class 1 = images 1, 3.
    for k, i in enumerate([0, 2, 1, 3]):
        expect = pixels[i].astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(store[(k, 0)][0][0].numpy(), expect, atol=1e-6)
        np.testing.assert_allclose(store[(k, 1)][0][0].numpy(), expect[:, ::-1], atol=1e-6)


def test_extraction_errors(assets, tmp_path, monkeypatch, capsys):
    root, kw = assets
    (tmp_path / "empty").mkdir()
    # The script itself (in-process): a UserError becomes one line on stderr and exit code 2.
    monkeypatch.setattr(sys, "argv", ["extract_features.py", "--data-path", str(tmp_path / "empty"),
                                      "--features-path", str(tmp_path / "o"), "--vae", "none", "--image-size", "8"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "extract_features.py"), run_name="__main__")
    assert exit_info.value.code == 2 and "not an ImageFolder" in capsys.readouterr().err
    with pytest.raises(UserError, match="not divisible by 8"):
        extract_features(root / "imgs", tmp_path / "o", **{**kw, "image_size": 36}, runtime=Runtime())
    with pytest.raises(UserError, match="take 3-channel|takes 3-channel"):
        extract_features(root / "imgs", tmp_path / "o", **kw, channels=1, runtime=Runtime())
    assert resolve_vae_name("mse") == "stabilityai/sd-vae-ft-mse" and resolve_vae_name("ema").endswith("-ema")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an id no cache can hold: the offline message, no network
    with pytest.raises(UserError, match="tinyfusion-tests/no-such-vae.*HF_HUB_OFFLINE.*local folder"):
        load_vae("tinyfusion-tests/no-such-vae")
    with pytest.raises(UserError, match="no such folder"):
        load_vae("./no/such/vae")


def test_channels_last_vae_gives_the_same_latents_and_images(assets):
    root, _ = assets
    plain, nhwc = load_vae(str(root / "vae")), load_vae(str(root / "vae"), channels_last=True)
    assert nhwc.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(plain.moments(x), nhwc.moments(x)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert b.is_contiguous()  # callers get the usual NCHW layout back
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(nhwc.decode(z), plain.decode(z), rtol=1e-5, atol=1e-5)
