"""Issue 13: no silent loss, no silent mixing, one clear line for every bad input (one test per item).

Everything runs in this process (scripts' main(argv)) on a 2-block Tiny DiT over 8x8 pixel "latents".
"""
import contextlib
import json
import os
import resource
import signal
import threading
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluator
import sample_ddp
import save_npz
import train
from test_sample import tiny_weights
from core.errors import UserError
from tinyfusion import metrics
from tinyfusion.checkpoint import atomic_path, load_checkpoint, save_checkpoint, save_weights
from tinyfusion.cli import latent_shape_for
from tinyfusion.data import open_feature_store
from tinyfusion.digits import DigitsExtractor, load_digits_classifier
from tinyfusion.features import extract_features
from tinyfusion.inception import load_inception
from tinyfusion.npz import write_sample_batch
from tinyfusion.runtime import Runtime
from tinyfusion.synthetic import write_feature_store
from tinyfusion.trainer import experiment_dir

MODEL = "DiT-Tiny-D2/2"


def make_store(path, labels=(0, 1, 2, 3) * 2, num_classes=4, fill=None):
    """Pixel-space store (vae none) of 8x8 RGB 'latents'; `fill` replaces every value (e.g. NaN)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(labels), 3, 8, 8)).astype(np.float32)
    if fill is not None:
        x[:] = fill
    return write_feature_store(str(path), x, np.asarray(labels), num_classes=num_classes, vae="none", image_size=8)


def train_argv(store, out, *extra, steps=2):
    return ["--model", MODEL, "--data-path", str(store), "--results-dir", str(out), "--image-size", "8",
            "--num-classes", "4", "--vae", "none", "--num-workers", "0", "--global-batch-size", "4",
            "--max-steps", str(steps), "--log-every", "1", "--ckpt-every", str(steps), "--device", "cpu",
            *map(str, extra)]


def files_of(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


# 1. run folders -------------------------------------------------------------------------------

def test_reused_prefix_without_resume_is_refused(tmp_path):
    store = make_store(tmp_path / "store")
    argv = train_argv(store, tmp_path / "out", "--prefix", "run")
    train.main(argv)
    before = files_of(tmp_path / "out" / "run" / "checkpoints")
    assert list(before) == ["0000002.pt"]
    with pytest.raises(UserError, match=r"run folder .*run already exists.*--resume auto.*--prefix"):
        train.main(argv)
    assert files_of(tmp_path / "out" / "run" / "checkpoints") == before
    train.main(argv + ["--resume", "auto"])  # continuing is what --resume is for


def test_numbered_run_folders_are_claimed_exclusively(tmp_path):
    from tinyfusion.trainer import claim_run_dir
    (tmp_path / "001-DiT-S-2").mkdir()  # a run whose sibling 000 was deleted: counting entries gives 001 again
    args = Namespace(results_dir=str(tmp_path), prefix=None, resume=None)
    first = experiment_dir(args, "DiT-S/2")
    assert os.path.basename(first) == "002-DiT-S-2" and os.path.isdir(first)
    assert os.path.basename(experiment_dir(args, "DiT-S/2")) == "003-DiT-S-2"
    outcomes, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        try:
            outcomes.append(claim_run_dir(str(tmp_path / "race")))
        except UserError:
            outcomes.append(None)
    threads = [threading.Thread(target=claim) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert outcomes.count(None) == 7 and outcomes.count(str(tmp_path / "race")) == 1


def test_live_run_folder_cannot_be_resumed_twice(tmp_path):
    import fcntl
    from tinyfusion.trainer import claim_run_dir
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as other:  # another process's run, still alive
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="is in use by another running process"):
            claim_run_dir(str(tmp_path / "run"), resume="auto")
    assert claim_run_dir(str(tmp_path / "run"), resume="auto") == str(tmp_path / "run")  # it ended: resume


# 2. labels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels, shown", [((0, 1, 2, 4), "labels 0..4"), ((-1, 0, 1, 2), "labels -1..2"),
                                           ((0, 1, 2, 9), "labels 0..9")])
@pytest.mark.parametrize("recorded", [True, False])
def test_labels_outside_num_classes_are_refused(tmp_path, labels, shown, recorded):
    store = make_store(tmp_path / "store", labels * 2)
    if not recorded:  # a store written before the label range was recorded: computed when opened
        manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
        del manifest["label_range"]
        (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        train.main(train_argv(store, tmp_path / "out", "--prefix", "run"))
    msg = str(e.value)
    assert str(tmp_path / "store") in msg and shown in msg and "--num-classes 4" in msg and "\n" not in msg
    assert ("null class" in msg) == (labels[-1] == 4)
    assert not (tmp_path / "out" / "run" / "checkpoints").exists()


def test_reference_layout_labels_are_checked(tmp_path):
    feats, labs = make_reference_store(tmp_path)
    np.save(labs / "6.npy", np.array([4], np.int32))  # another dtype, and the null class of --num-classes 4
    np.save(labs / "2.npy", np.int64(3))  # a 0-d array
    store = open_feature_store(tmp_path)
    expected = [np.load(labs / f).reshape(-1)[0] for f in store.files]
    np.testing.assert_array_equal(store.labels(), expected)
    with pytest.raises(UserError, match=rf"{tmp_path} holds labels 0..4, outside 0..3 .*null class"):
        store.check_num_classes(4)
    (labs / "7.npy").write_bytes((labs / "7.npy").read_bytes()[:-4])  # truncated
    with pytest.raises(UserError, match=str(labs / "7.npy")):
        open_feature_store(tmp_path).labels()


def test_label_range_is_recorded(tmp_path):
    store = open_feature_store(make_store(tmp_path / "s", (3, 1, 2, 1)))
    assert store.manifest["label_range"] == [1, 3] and store.label_range() == (1, 3)


# 3. finished sample batches ---------------------------------------------------------------------

SAMPLE = ["--model", MODEL, "--vae", "none", "--channels", "3", "--image-size", "8", "--num-classes", "10",
          "--num-sampling-steps", "2", "--per-proc-batch-size", "4", "--cfg-scale", "1.5", "--device", "cpu"]


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    tiny_weights(MODEL, str(path), in_channels=3, input_size=8)
    return str(path)


def test_finished_batch_is_never_overwritten(tmp_path, sample_ckpt, capsys):
    argv = [*SAMPLE, "--ckpt", sample_ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "5"]
    sample_ddp.main(argv)
    [npz] = [p for p in os.listdir(tmp_path) if p.endswith(".npz")]
    before = files_of(tmp_path)
    capsys.readouterr()
    sample_ddp.main(argv)  # the same job again: done, nothing resampled or rewritten
    assert "already finished" in capsys.readouterr().out and files_of(tmp_path) == before
    with pytest.raises(UserError, match=r"finished batch made with other settings \(num_fid_samples: 5 -> 3\)"):
        sample_ddp.main([*argv, "--num-fid-samples", "3"])
    os.remove(tmp_path / npz.replace(".npz", ".settings.json"))
    with pytest.raises(UserError, match="no readable record"):  # a file this job cannot vouch for
        sample_ddp.main(argv)
    assert files_of(tmp_path)[npz] == before[npz]


# 4. non-finite runs -----------------------------------------------------------------------------

def test_all_nan_data_stops_and_writes_no_final_model(tmp_path):
    store = make_store(tmp_path / "store", fill=np.nan)
    final = tmp_path / "final.pt"
    final.write_bytes(b"an earlier result")
    with pytest.raises(UserError, match="last 3 steps .* non-finite .*--max-nonfinite-steps 3"):
        train.main(train_argv(store, tmp_path / "out", "--prefix", "a", "--save-model", final,
                              "--max-nonfinite-steps", 3, steps=8))
    with pytest.raises(UserError, match="no training step was applied"):  # never stopping: still no final model
        train.main(train_argv(store, tmp_path / "out", "--prefix", "b", "--save-model", final,
                              "--max-nonfinite-steps", 0, steps=3))
    assert final.read_bytes() == b"an earlier result"


# 5. output paths before any work ----------------------------------------------------------------

def test_output_paths_are_checked_before_any_work(tmp_path, sample_ckpt, monkeypatch):
    (tmp_path / "file").write_text("x")
    store = make_store(tmp_path / "store")
    monkeypatch.setattr(train, "Trainer", None)  # any work would crash on this, not raise a UserError
    with pytest.raises(UserError, match=r"--save-model .*file/m.pt cannot be created: .*file is a file"):
        train.main(train_argv(store, tmp_path / "out", "--prefix", "r", "--save-model", tmp_path / "file" / "m.pt"))
    with pytest.raises(UserError, match="--results-dir"):
        train.main(train_argv(store, tmp_path / "file" / "out", "--prefix", "r"))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(evaluator, "evaluate", None)
    with pytest.raises(UserError, match="--json"):
        evaluator.main(["ref.npz", "sam.npz", "--feature-net", "digits", "--json", str(tmp_path / "file" / "m.json")])
    monkeypatch.setattr("tinyfusion.sample_job.create_model", None)
    with pytest.raises(UserError, match="--out"):
        sample_ddp.main([*SAMPLE, "--ckpt", sample_ckpt, "--num-fid-samples", "2", "--out",
                         str(tmp_path / "file" / "s.npz")])


# 6. stale temporaries ---------------------------------------------------------------------------

def test_stale_temporary_checkpoints_are_removed(tmp_path):
    store = make_store(tmp_path / "store")
    argv = train_argv(store, tmp_path / "out", "--prefix", "run", steps=2)
    train.main(argv)
    ckpts = tmp_path / "out" / "run" / "checkpoints"
    stale = ckpts / ".tmp-k1ll3d0000004.pt"
    stale.write_bytes(b"\0" * 4096)  # what a SIGKILL during torch.save leaves
    train.main(train_argv(store, tmp_path / "out", "--prefix", "run", "--resume", "auto", steps=4))
    assert sorted(os.listdir(ckpts)) == ["0000002.pt", "0000004.pt"]


# 7. unreadable checkpoints ----------------------------------------------------------------------

@pytest.fixture
def bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(64)}, str(good))
    files = {"empty.pt": b"", "text.pt": b"hello, this is a README\n",
             "cut.safetensors": good.read_bytes()[:-100], "junk.safetensors": b"garbage" * 20}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.pt").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, reason", [("empty.pt", "is empty (0 bytes)"), ("text.pt", "not a torch or safetensors"),
                                          ("cut.safetensors", "not a valid .safetensors"),
                                          ("junk.safetensors", "not a valid .safetensors"),
                                          ("folder.pt", "is a folder, not a file")])
def test_unreadable_checkpoints_one_line(bad_files, name, reason):
    for load in (load_checkpoint, load_inception):
        with pytest.raises(UserError) as e:
            load(str(bad_files / name))
        assert str(bad_files / name) in str(e.value) and reason in str(e.value) and "\n" not in str(e.value)


# 8. --resume with another depth -----------------------------------------------------------------

def test_resume_with_another_depth_is_one_line(tmp_path):
    store = make_store(tmp_path / "store")
    train.main(train_argv(store, tmp_path / "out", "--prefix", "d2"))
    ckpt = tmp_path / "out" / "d2" / "checkpoints" / "0000002.pt"
    argv = train_argv(store, tmp_path / "out", "--prefix", "d3", "--resume", ckpt)
    argv[argv.index(MODEL)] = "DiT-Tiny-D3/2"
    with pytest.raises(UserError) as e:
        train.main(argv)
    msg = str(e.value)
    assert msg.startswith(f"{ckpt} does not fit DiT-Tiny-D3/2") and "\n" not in msg
    assert "missing 10 keys: blocks 2" in msg  # one DiT block: qkv, proj, fc1, fc2, adaLN (weight + bias each)


# 9. garbage .npy in the reference layout --------------------------------------------------------

def make_reference_store(root, n=8, channels=3):
    feats, labs = root / "imagenet256_features", root / "imagenet256_labels"
    feats.mkdir(parents=True)
    labs.mkdir()
    for i in range(n):
        np.save(feats / f"{i}.npy", np.zeros((2, channels, 8, 8), np.float32))
        np.save(labs / f"{i}.npy", np.array([i % 4]))
    return feats, labs


def test_garbage_npy_in_reference_layout_is_named(tmp_path):
    feats, labs = make_reference_store(tmp_path)
    (feats / "3.npy").write_text("not an array")
    store = open_feature_store(tmp_path)
    with pytest.raises(UserError, match=rf"cannot read {feats / '3.npy'} \(it holds pickled data or is not a .npy"):
        store[3]
    (labs / "5.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match=str(labs / "5.npy")):
        open_feature_store(tmp_path).check_num_classes(4)


# 10. non-image files ----------------------------------------------------------------------------

def make_image_folder(root, n=3):
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i + c, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    (root / "c1" / "1b.png").write_text("<html>not found</html>")  # a failed download with an image name
    return root


def test_non_image_file_is_named_or_skipped(tmp_path):
    imgs = make_image_folder(tmp_path / "imgs")
    kw = dict(image_size=8, vae="none", batch_size=4, num_workers=0, runtime=Runtime())
    with pytest.raises(UserError, match=rf"{imgs / 'c1' / '1b.png'} is not a readable image .*--bad-images skip"):
        extract_features(imgs, tmp_path / "store", **kw)
    assert not (tmp_path / "store").exists()  # stopped before anything was written
    manifest = extract_features(imgs, tmp_path / "store", bad_images="skip", **kw)
    assert manifest["count"] == 6 and manifest["skipped_images"] == [os.path.join("c1", "1b.png")]
    assert open_feature_store(tmp_path / "store").label_range() == (0, 1)

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(flat / f"{i}.png")
    (flat / "1b.png").write_bytes(b"\x89PNG but cut")
    with pytest.raises(UserError, match=rf"{flat / '1b.png'} is not a readable image"):
        save_npz.main(["--image_dir", str(flat), "--out", str(tmp_path / "f.npz")])
    assert not (tmp_path / "f.npz").exists()
    save_npz.main(["--image_dir", str(flat), "--out", str(tmp_path / "f.npz"), "--num", "3", "--bad-images", "skip"])
    np.testing.assert_array_equal(np.load(tmp_path / "f.npz")["arr_0"][:, 0, 0, 0], [0, 1, 2])


# 11. disk full ----------------------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes beyond `nbytes` fail as on a full disk (EFBIG; the SIGXFSZ signal is ignored meanwhile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("name", ["0000002.pt", "model.pt", "model.safetensors", "parts.npy"])
def test_disk_full_keeps_the_last_good_file(tmp_path, name):
    path = tmp_path / name
    small, big = {"w": torch.ones(4)}, {"w": torch.zeros(1 << 18)}
    write = {"0000002.pt": save_checkpoint, "model.pt": save_weights, "model.safetensors": save_weights,
             "parts.npy": lambda sd, p: _np_save_atomic(sd["w"].numpy(), p)}[name]
    write(small, path)
    before = path.read_bytes()
    with file_size_limit(100_000), pytest.raises(UserError) as e:
        write(big, path)
    assert str(e.value).startswith(f"writing {path} failed: the disk is full") and "MiB free" in str(e.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [name]  # no temporary left behind


def _np_save_atomic(arr, path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


# 12. smaller ones -------------------------------------------------------------------------------

def test_groups_repeat_form_from_help():
    from models.layer_mask import parse_groups
    assert parse_groups("[[1,2]]*6", 12) == [(1, 2)] * 6
    assert parse_groups("[[1,2]] * 2 + [[2,4]]", 8) == [(1, 2), (1, 2), (2, 4)]
    with pytest.raises(UserError, match="not a list"):
        parse_groups("__import__('os').getcwd()", 12)  # parsed as data, never evaluated


def test_vae_none_channels_for_reference_layout(tmp_path):
    make_reference_store(tmp_path, channels=1)
    store = open_feature_store(tmp_path)
    args = Namespace(model=MODEL, image_size=8, vae="none", channels=1)
    assert latent_shape_for(args, store) == (1, 8, 8)
    store.check_latent_shape(latent_shape_for(args, store))


class CountingDigits(DigitsExtractor):
    calls = 0

    def __call__(self, images):
        CountingDigits.calls += 1
        return super().__call__(images)


def test_evaluator_warns_on_few_images_and_refuses_nan(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    write_sample_batch(tmp_path / "ref.npz", rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    write_sample_batch(tmp_path / "sam.npz", rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sam.npz"), "--feature-net", "digits",
                    "--device", "cpu", "--json", str(tmp_path / "m.json")])
    assert "warning: FID from 5 images, no more than the 64 feature dimensions" in capsys.readouterr().out
    assert np.isfinite(json.loads((tmp_path / "m.json").read_text())["FID"])

    np.savez(tmp_path / "nan_ref.npz", mu=np.full(64, np.nan), sigma=np.eye(64))
    with pytest.raises(UserError, match=r"nan_ref.npz: the stored mu/sigma statistics contain NaN"):
        evaluator.main([str(tmp_path / "nan_ref.npz"), str(tmp_path / "sam.npz"), "--feature-net", "digits",
                        "--device", "cpu", "--json", str(tmp_path / "n.json")])
    assert not (tmp_path / "n.json").exists()


def test_image_size_mismatch_found_before_reference_pass(tmp_path):
    rng = np.random.default_rng(0)
    write_sample_batch(tmp_path / "ref.npz", rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    write_sample_batch(tmp_path / "sam.npz", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    CountingDigits.calls = 0
    with pytest.raises(UserError, match=r"ref.npz holds 8x8 images but sample batch .*sam.npz holds 16x16"):
        metrics.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sam.npz"),
                         CountingDigits(load_digits_classifier()))
    assert CountingDigits.calls == 0


def test_save_npz_negative_num(tmp_path):
    with pytest.raises(UserError, match=r"--num -2 must be >= 1"):
        save_npz.main(["--image_dir", str(tmp_path), "--num", "-2"])
