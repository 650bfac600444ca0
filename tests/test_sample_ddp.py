"""sample_ddp.py / tinyfusion.sample_job on tiny models (CPU): world-size independence, resume, format, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from test_sample import tiny_weights
from tinyfusion.checkpoint import save_checkpoint
from tinyfusion.npz import validate_sample_batch

DIT = "DiT-Tiny-D2/2"
# 7 samples in chunks of 2: 4 chunks, the last one short. CFG on (1.5), 3 ancestral DDPM steps.
DIT_FLAGS = ["--model", DIT, "--vae", "none", "--channels", "3", "--image-size", "8", "--num-classes", "10",
             "--num-sampling-steps", "3", "--per-proc-batch-size", "2", "--num-fid-samples", "7",
             "--cfg-scale", "1.5", "--global-seed", "3", "--device", "cpu"]
# One thread everywhere: torchrun would set it for its workers, and the runs must compute identically.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    """A training checkpoint as train.py writes it: sampling must take 'ema' (here 'model' would not even load)."""
    path = tmp_path_factory.mktemp("ckpt") / "0000007.pt"
    sd = tiny_weights(DIT, None, in_channels=3, input_size=8)
    save_checkpoint({"model": {"stale": torch.zeros(1)}, "ema": sd, "opt": {}}, path)
    return str(path)


def run_script(argv, nproc=1, env=None):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "sample_ddp.py"), *argv]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=240)


def only_npz(folder):
    found = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npz")]
    assert len(found) == 1, os.listdir(folder)
    return found[0]


@pytest.fixture(scope="module")
def one_process(dit_ckpt, tmp_path_factory):
    """The reference: one uninterrupted process, with PNGs."""
    d = tmp_path_factory.mktemp("one")
    r = run_script([*DIT_FLAGS, "--ckpt", dit_ckpt, "--sample-dir", str(d), "--save-png"])
    assert r.returncode == 0, r.stderr
    return d, only_npz(d)


def test_npz_format_and_pngs(one_process):
    d, path = one_process
    assert os.path.basename(path) == "DiT-Tiny-D2-2-0000007-size-8-vae-none-cfg-1.5-seed-3-DDPM-3.npz"
    assert validate_sample_batch(path, expected_n=7, size=8) == (7, 8, 8, 3)
    arr = np.load(path)["arr_0"]
    assert list(np.load(path).keys()) == ["arr_0"]
    folder = path[:-len(".npz")]
    assert not os.path.exists(os.path.join(folder, "parts"))  # merged, then removed
    for i in range(7):  # the PNGs are the npz rows, in index order
        assert np.array_equal(np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))), arr[i])
    assert len({arr[i].tobytes() for i in range(7)}) == 7 and arr.std() > 5  # distinct, non-flat samples


def test_killed_run_resumed_by_two_processes_is_byte_identical(one_process, dit_ckpt, tmp_path):
    """Kill after 2 of 4 chunks, finish with torchrun x2 (chunks 2, 3 on ranks 0, 1; rank 0 merges)."""
    argv = [*DIT_FLAGS, "--ckpt", dit_ckpt, "--sample-dir", str(tmp_path)]
    r = run_script(argv, env={"TINYFUSION_SAMPLE_EXIT_AFTER": "2"})
    assert r.returncode == 17
    folder = os.path.join(tmp_path, os.path.basename(one_process[1])[:-len(".npz")])
    assert sorted(os.listdir(os.path.join(folder, "parts"))) == ["000000.npy", "000001.npy", "settings.json"]
    assert not any(f.endswith(".npz") for f in os.listdir(tmp_path))
    r = run_script(argv, nproc=2)
    assert r.returncode == 0, r.stderr
    assert "(2 already done)" in r.stdout
    with open(one_process[1], "rb") as a, open(only_npz(tmp_path), "rb") as b:
        assert a.read() == b.read()


def test_pixel_conversion_formula():
    from tinyfusion.sample_job import to_rgb_uint8
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.99, 1.0, 3.0, -1.0039, 0.996])
    images = x.view(1, 1, 1, -1).repeat(2, 3, 1, 1)
    images[1, 1] = -images[1, 1]
    expected = np.clip(127.5 * images.numpy().astype(np.float64) + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(to_rgb_uint8(images), expected)
    gray = to_rgb_uint8(images[:, :1])  # 1-channel images become RGB by repeating the gray channel
    assert gray.shape == (2, 1, 10, 3) and np.array_equal(gray, np.repeat(expected[..., :1], 3, axis=3))


def main_inproc(argv):
    import sample_ddp
    sample_ddp.main(argv)


def test_dit_ddim_gray_sample_depends_on_index_only(tmp_path):
    """Sample i == the DDIM sample of (label, noise) drawn from its own generator, alone in its batch."""
    from diffusion import create_diffusion
    from tinyfusion.sample_job import derived_seed, STREAM_INPUTS
    ckpt = tmp_path / "gray.pt"
    sd = tiny_weights(DIT, ckpt, in_channels=1, input_size=8)
    out = tmp_path / "gray.npz"
    main_inproc(["--model", DIT, "--ckpt", str(ckpt), "--vae", "none", "--channels", "1", "--image-size", "8",
                 "--num-classes", "10", "--sampler", "ddim", "--num-sampling-steps", "3", "--cfg-scale", "1",
                 "--per-proc-batch-size", "2", "--num-fid-samples", "5", "--global-seed", "11",
                 "--sample-dir", str(tmp_path), "--out", str(out), "--device", "cpu"])
    assert validate_sample_batch(str(out), expected_n=5, size=8) == (5, 8, 8, 3)
    arr = np.load(out)["arr_0"]
    assert (arr == arr[..., :1]).all()  # gray repeated into R, G, B

    from models import build_model
    model = build_model(DIT, input_size=8, in_channels=1, num_classes=10).eval()
    model.load_state_dict(sd)
    for i in (0, 3, 4):
        g = torch.Generator().manual_seed(derived_seed(11, i, STREAM_INPUTS))
        y = torch.randint(0, 10, (1,), generator=g)
        z = torch.randn(1, 1, 8, 8, generator=g)
        with torch.no_grad():
            x = create_diffusion("ddim3").ddim_sample_loop(model.forward, z.shape, z, clip_denoised=False,
                                                           model_kwargs=dict(y=y))
        ref = np.clip(127.5 * x.clamp(-1, 1)[0, 0].double().numpy() + 128, 0, 255).astype(np.uint8)
        assert np.abs(arr[i, :, :, 0].astype(int) - ref.astype(int)).max() <= 1  # batch-of-1 vs 2 rounding


def test_derived_seeds_distinct():
    from tinyfusion.sample_job import derived_seed
    seeds = {derived_seed(s, i, k) for s in (0, 1) for i in range(50) for k in range(3)}
    assert len(seeds) == 300 and all(0 <= v < 2**63 for v in seeds)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    folder = tmp_path_factory.mktemp("vae") / "tinyvae"
    vae.save_pretrained(folder)
    return str(folder)


def test_sit_ode_with_vae_folder(tmp_path, tiny_vae):
    ckpt = tmp_path / "sit.safetensors"
    tiny_weights("SiT-Tiny-D2/2", ckpt, in_channels=4, input_size=4)
    main_inproc(["ODE", "--model", "SiT-Tiny-D2/2", "--ckpt", str(ckpt), "--vae", tiny_vae, "--image-size", "32",
                 "--num-classes", "10", "--sampling-method", "euler", "--num-sampling-steps", "2",
                 "--per-proc-batch-size", "2", "--num-fid-samples", "3", "--sample-dir", str(tmp_path),
                 "--device", "cpu"])
    path = tmp_path / "SiT-Tiny-D2-2-sit-size-32-vae-tinyvae-cfg-1.5-seed-0-ODE-2-euler.npz"
    assert validate_sample_batch(str(path), expected_n=3, size=32) == (3, 32, 32, 3)
    arr = np.load(path)["arr_0"]
    assert arr.std() > 0 and not np.array_equal(arr[0], arr[1])


@pytest.mark.parametrize("argv,needle", [
    (["--cfg-scale", "0.5", "--ckpt", "x.pt"], "--cfg-scale 0.5"),
    (["--ckpt", "x.pt", "--model", "SiT-Tiny-D2/2", "--sampler", "ddim"], "--sampler ddim"),
    (["SDE", "--ckpt", "x.pt"], "SDE is a SiT sampler"),
    ([], "--ckpt is required"),
    (["--ckpt", "missing.pt"], "missing.pt does not exist"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys, tmp_path):
    from tinyfusion.errors import run_main
    flags = ["--model", DIT, "--vae", "none", "--image-size", "8", "--num-classes", "10", "--device", "cpu",
             "--sample-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        run_main(main_inproc, flags + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_restart_with_other_settings_refused(tmp_path, dit_ckpt):
    from core.errors import UserError
    argv = [*DIT_FLAGS, "--ckpt", dit_ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "2",
            "--keep-parts"]
    main_inproc(argv)
    with pytest.raises(UserError, match="other settings.*guide_all_channels"):
        main_inproc(argv + ["--guide-all-channels"])  # same folder name, different samples
