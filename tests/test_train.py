"""train.py: tiny DiT/SiT learn on synthetic latents; exact resume after SIGKILL; DDP == single process."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from tinyfusion.checkpoint import load_checkpoint
from tinyfusion.synthetic import write_feature_store

TINY = ["--image-size", "32", "--num-classes", "4", "--num-workers", "0", "--vae", "ema"]


def make_store(path, n=64, seed=0):
    """Class-dependent latents (4, 4, 4): each class is a constant offset pattern plus small noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    centers = rng.normal(size=(4, 4, 4, 4)).astype(np.float32)
    latents = centers[labels] + 0.1 * rng.normal(size=(n, 4, 4, 4)).astype(np.float32)
    return write_feature_store(path, latents, labels, num_classes=4, vae="stabilityai/sd-vae-ft-ema", image_size=32)


def run(args, env_extra=None, check=True, nproc=None, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, *args] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, **kw)


def losses(log_file):
    return [float(line.split("loss ")[1].split(",")[0]) for line in open(log_file) if "(step=" in line]


def train_args(store, out, model="DiT-S-D2/2", steps=20, extra=()):
    return [os.path.join(ROOT, "train.py"), "--model", model, "--data-path", store, "--results-dir", out,
            "--prefix", "run", "--max-steps", str(steps), "--global-batch-size", "8", "--lr", "1e-3",
            "--log-every", "1", "--ckpt-every", "1000", *TINY, *extra]


@pytest.mark.parametrize("model", ["DiT-S-D2/2", "SiT-S-D2/2"])
def test_tiny_model_learns(tmp_path, model):
    store = make_store(str(tmp_path / "store"))
    r = run(train_args(store, str(tmp_path / "out"), model, steps=150))
    assert r.returncode == 0, r.stderr[-2000:]
    curve = losses(tmp_path / "out" / "run" / "log.txt")
    assert len(curve) == 150
    assert np.mean(curve[-20:]) < 0.6 * np.mean(curve[:5]), (curve[:5], curve[-20:])


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    store = make_store(str(tmp_path / "store"))
    full = run(train_args(store, str(tmp_path / "a"), steps=12, extra=["--ckpt-every", "4"]))
    assert full.returncode == 0, full.stderr[-2000:]
    # Kill a second run hard once it has written the step-4 checkpoint, then resume it.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *train_args(store, str(tmp_path / "b"), steps=12,
                                                          extra=["--ckpt-every", "4"])], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt4 = tmp_path / "b" / "run" / "checkpoints" / "0000004.pt"
    deadline = time.time() + 120
    while not ckpt4.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for later in ("0000008.pt", "0000012.pt"):  # whatever it got further, restart from step 4
        p = tmp_path / "b" / "run" / "checkpoints" / later
        if p.exists():
            p.unlink()
    resumed = run(train_args(store, str(tmp_path / "b"), steps=12, extra=["--ckpt-every", "4", "--resume", "auto"]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "0000012.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "0000012.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_two_processes_match_one_process(tmp_path):
    store = make_store(str(tmp_path / "store"))
    one = run(train_args(store, str(tmp_path / "one"), steps=4))
    two = run(train_args(store, str(tmp_path / "two"), steps=4), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    np.testing.assert_allclose(losses(tmp_path / "one" / "run" / "log.txt"),
                               losses(tmp_path / "two" / "run" / "log.txt"), rtol=1e-4)


def test_bad_batch_and_shape_errors(tmp_path):
    store = make_store(str(tmp_path / "store"))
    r = run(train_args(store, str(tmp_path / "o"), extra=["--global-batch-size", "7"]), nproc=2)
    assert r.returncode != 0 and "not divisible by the world size" in r.stderr
    r = run(train_args(store, str(tmp_path / "o"), extra=["--image-size", "64"]))
    assert r.returncode == 2 and "error:" in r.stderr and "(4, 8, 8)" in r.stderr


def test_fine_tuning_defaults_are_the_official_recipe(tmp_path):
    """The official train.py clips gradients at 1.0 and trains under fp16 autocast with a grad scaler; on a
    CPU the fp16 default falls back to fp32 and trains exactly as --precision fp32."""
    from tinyfusion.checkpoint import read_weights
    from train import build_parser, main
    store = make_store(str(tmp_path / "store"), n=16)
    argv = ["--model", "DiT-S-D2/2", "--data-path", store, "--results-dir", str(tmp_path / "out"), "--max-steps", "2",
            "--global-batch-size", "8", "--lr", "1e-2", "--device", "cpu", *TINY]
    args = build_parser().parse_args(argv)
    assert (args.grad_clip, args.precision) == (1.0, "fp16")
    for name, extra in (("default", []), ("fp32", ["--precision", "fp32"])):
        main([*argv, "--prefix", name, "--save-model", str(tmp_path / f"{name}.pt"), *extra])
    default, fp32 = read_weights(tmp_path / "default.pt"), read_weights(tmp_path / "fp32.pt")
    assert all(torch.equal(default[k], fp32[k]) for k in fp32)
    assert "fp16 needs CUDA: training in fp32 on cpu" in open(tmp_path / "out" / "default" / "log.txt").read()
