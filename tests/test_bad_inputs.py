"""A table of bad inputs across every script: each must exit non-zero with one `error:` line naming the
problem, print no traceback, and leave what was written before it unchanged.

The scripts run in this process (their main(argv) under run_main, as `python script.py` does), so the
whole table costs one torch import; the models are a 2-block Tiny DiT on 8x8 pixels.
"""
import importlib
import os

import numpy as np
import pytest

from test_reliability import MODEL, files_of, make_image_folder, make_reference_store, make_store, train_argv
from test_sample import tiny_weights
from tinyfusion.errors import run_main
from tinyfusion.npz import write_sample_batch

T = ["--model", MODEL, "--image-size", "8", "--num-classes", "4", "--vae", "none", "--num-workers", "0",
     "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1", "--device", "cpu", "--results-dir", "{runs}"]
KD = ["--teacher", MODEL, "--layer-map", "0:0,1:1"]
LEARN = ["--precision", "fp32"]
PRUNE = ["--model", MODEL, "--image-size", "8", "--num-classes", "4", "--vae", "none"]
SCORE_DATA = [*PRUNE, "--device", "cpu", "--ckpt", "{weights}", "--save-model", "{tmp}/p.pt", "--n-pruned", "1",
              "--nsamples", "2", "--batch-size", "2"]
SCORE = [*SCORE_DATA, "--calib-random"]
SAMPLE = ["--model", MODEL, "--image-size", "8", "--num-classes", "4", "--vae", "none", "--device", "cpu",
          "--num-sampling-steps", "2"]
FID = [*SAMPLE, "--ckpt", "{weights}", "--per-proc-batch-size", "4", "--sample-dir", "{samples}"]
EVAL = ["--feature-net", "digits", "--device", "cpu"]

# (id, script, argv, text the error line must contain, workspace entries that must stay unchanged)
CASES = [
    # train.py
    ("train-no-store", "train", [*T, "--data-path", "{tmp}/nope"], "feature path {tmp}/nope does not exist", []),
    ("train-null-class-label", "train", [*T, "--data-path", "{store_null}"], "labels 0..4, outside 0..3", []),
    ("train-negative-label", "train", [*T, "--data-path", "{store_neg}"], "holds labels -1..3", []),
    ("train-label-too-big", "train", [*T, "--data-path", "{store_big}"], "holds labels 0..9", []),
    ("train-reference-bad-label", "train", [*T, "--data-path", "{ref_bad_label}"], "imagenet256_labels/5.npy", []),
    ("train-garbage-features-in-worker", "train", [*T, "--data-path", "{ref_bad_feature}", "--num-workers", "1",
                                                   "--global-batch-size", "8"], "imagenet256_features/3.npy", []),
    ("train-reused-prefix", "train", [*T, "--data-path", "{store}", "--prefix", "run"], "already exists", ["runs"]),
    ("train-resume-other-depth", "train", [*T, "--data-path", "{store}", "--prefix", "d3", "--model", "DiT-Tiny-D3/2",
                                           "--resume", "{run_ckpt}"], "does not fit DiT-Tiny-D3/2", ["run"]),
    ("train-resume-empty", "train", [*T, "--data-path", "{store}", "--resume", "{empty}"], "is empty (0 bytes)", []),
    ("train-resume-text", "train", [*T, "--data-path", "{store}", "--resume", "{text}"], "not a torch", []),
    ("train-resume-folder", "train", [*T, "--data-path", "{store}", "--resume", "{tmp}"], "is a folder", []),
    ("train-resume-weights-only", "train", [*T, "--data-path", "{store}", "--resume", "{weights}"],
     "not a training checkpoint", []),
    ("train-weights-cut", "train", [*T, "--data-path", "{store}", "--load-weight", "{cut}"], "cut.safetensors", []),
    ("train-weights-junk", "train", [*T, "--data-path", "{store}", "--load-weight", "{junk}"],
     "not a valid .safetensors", []),
    ("train-save-model-under-file", "train", [*T, "--data-path", "{store}", "--save-model", "{file}/m.pt"],
     "--save-model {file}/m.pt cannot be created", []),
    ("train-save-model-folder", "train", [*T, "--data-path", "{store}", "--save-model", "{tmp}"], "is a folder", []),
    ("train-results-under-file", "train", [*T, "--data-path", "{store}", "--results-dir", "{file}/r"],
     "--results-dir", []),
    ("train-all-nan", "train", [*T, "--data-path", "{store_nan}", "--prefix", "nan", "--max-nonfinite-steps", "2",
                                "--save-model", "{final}"], "non-finite", ["final"]),
    ("train-resume-auto-no-prefix", "train", [*T, "--data-path", "{store}", "--resume", "auto"], "needs --prefix", []),
    ("train-batch-too-big", "train", [*T, "--data-path", "{store}", "--global-batch-size", "64"],
     "fewer than --global-batch-size 64", []),
    ("train-image-size", "train", [*T, "--data-path", "{store}", "--image-size", "12"], "not a multiple of 8", []),
    # train_masked_kd.py
    ("kd-no-teacher", "train_masked_kd", [*T, *KD, "--data-path", "{store}"], "--load-teacher is required", []),
    ("kd-teacher-empty", "train_masked_kd", [*T, *KD, "--data-path", "{store}", "--load-teacher", "{empty}"],
     "is empty", []),
    ("kd-save-model-under-file", "train_masked_kd", [*T, *KD, "--data-path", "{store}", "--load-teacher",
                                                     "{weights}", "--save-model", "{file}/k.pt"], "--save-model", []),
    ("kd-null-class-label", "train_masked_kd", [*T, *KD, "--data-path", "{store_null}", "--load-teacher", "{weights}"],
     "null class", []),
    # prune_by_learning.py
    ("learn-groups-syntax", "prune_by_learning", [*T, *LEARN, "--data-path", "{store}", "--groups", "[[1,2]]*"],
     "is not a list of [N, M] pairs", []),
    ("learn-groups-depth", "prune_by_learning", [*T, *LEARN, "--data-path", "{store}", "--groups", "[[1,2]]*3"],
     "model has depth 2", []),
    ("learn-save-model-folder", "prune_by_learning", [*T, *LEARN, "--data-path", "{store}", "--groups", "1:2",
                                                      "--save-model", "{tmp}"], "is a folder", []),
    ("learn-no-groups", "prune_by_learning", [*T, *LEARN, "--data-path", "{store}"], "not a pruning preset", []),
    # prune_by_score.py
    ("score-no-ckpt", "prune_by_score", [*SCORE, "--ckpt", "{tmp}/nope.pt"], "{tmp}/nope.pt does not exist", []),
    ("score-n-pruned", "prune_by_score", [*SCORE, "--n-pruned", "5"], "--n-pruned 5 is not possible", []),
    ("score-save-under-file", "prune_by_score", [*SCORE, "--save-model", "{file}/p.pt"], "cannot be created", []),
    ("score-calib-null-label", "prune_by_score", [*SCORE_DATA, "--data-path", "{store_null}"], "null class", []),
    ("score-ckpt-text", "prune_by_score", [*SCORE, "--ckpt", "{text}", "--method", "magnitude"], "not a torch", []),
    # prune_by_index.py
    ("index-out-of-range", "prune_by_index", [*PRUNE, "--ckpt", "{weights}", "--kept-indices", "[0, 5]",
                                              "--save-model", "{tmp}/i.pt"], "out of range", []),
    ("index-ckpt-junk", "prune_by_index", [*PRUNE, "--ckpt", "{junk}", "--kept-indices", "[0]",
                                           "--save-model", "{tmp}/i.pt"], "not a valid .safetensors", []),
    ("index-save-under-file", "prune_by_index", [*PRUNE, "--ckpt", "{weights}", "--kept-indices", "[0]",
                                                 "--save-model", "{file}/i.pt"], "--save-model", []),
    # sample.py
    ("sample-no-ckpt", "sample", [*SAMPLE, "--ckpt", "{tmp}/nope.pt", "--class-labels", "1"], "does not exist", []),
    ("sample-class-labels", "sample", [*SAMPLE, "--ckpt", "{weights}", "--class-labels", "7"], "--class-labels", []),
    ("sample-out-under-file", "sample", [*SAMPLE, "--ckpt", "{weights}", "--class-labels", "1", "--out",
                                         "{file}/g.png"], "--out {file}/g.png cannot be created", []),
    ("sample-ckpt-folder", "sample", [*SAMPLE, "--ckpt", "{tmp}", "--class-labels", "1"], "is a folder", []),
    # sample_ddp.py
    ("fid-other-count", "sample_ddp", [*FID, "--num-fid-samples", "3"], "num_fid_samples: 5 -> 3", ["samples"]),
    ("fid-unrecorded-out", "sample_ddp", [*FID, "--num-fid-samples", "5", "--out", "{ref8}"], "no readable record",
     ["ref8"]),
    ("fid-zero-samples", "sample_ddp", [*FID, "--num-fid-samples", "0"], "must be >= 1", []),
    ("fid-ckpt-empty", "sample_ddp", [*FID, "--num-fid-samples", "2", "--ckpt", "{empty}"], "is empty", []),
    ("fid-out-under-file", "sample_ddp", [*FID, "--num-fid-samples", "2", "--out", "{file}/s.npz"], "--out", []),
    # evaluator.py
    ("eval-size-mismatch", "evaluator", ["{ref8}", "{sam16}", *EVAL], "holds 8x8 images but sample batch", []),
    ("eval-nan-stats", "evaluator", ["{nan_ref}", "{sam8}", *EVAL, "--json", "{json}"], "contain NaN", ["json"]),
    ("eval-json-under-file", "evaluator", ["{ref8}", "{sam8}", *EVAL, "--json", "{file}/m.json"], "--json", []),
    ("eval-not-npz", "evaluator", ["{ref8}", "{text}", *EVAL], "is not an .npz file", []),
    ("eval-inception-empty", "evaluator", ["{ref8}", "{sam8}", "--inception-weights", "{empty}"], "is empty", []),
    ("eval-inception-text", "evaluator", ["{ref8}", "{sam8}", "--inception-weights", "{text}"], "not a torch", []),
    # save_npz.py
    ("npz-negative-num", "save_npz", ["--image_dir", "{flat}", "--num", "-2"], "--num -2 must be >= 1", []),
    ("npz-bad-image", "save_npz", ["--image_dir", "{flat}", "--out", "{tmp}/f.npz"], "1b.png is not a readable", []),
    ("npz-no-dir", "save_npz", ["--image_dir", "{tmp}/nope"], "is not a directory", []),
    ("npz-out-under-file", "save_npz", ["--image_dir", "{flat}", "--out", "{file}/x.npz"], "--out", []),
    ("npz-too-few", "save_npz", ["--image_dir", "{flat}", "--num", "10", "--bad-images", "skip"], "need 10", []),
    # extract_features.py
    ("extract-bad-image", "extract_features", ["--data-path", "{imgs}", "--features-path", "{tmp}/fs", "--vae", "none",
                                               "--image-size", "8", "--num-workers", "0", "--device", "cpu"],
     "1b.png is not a readable image", []),
    ("extract-out-under-file", "extract_features", ["--data-path", "{imgs}", "--features-path", "{file}/fs",
                                                    "--vae", "none", "--image-size", "8", "--device", "cpu"],
     "--features-path", []),
    ("extract-no-folder", "extract_features", ["--data-path", "{tmp}/nope", "--features-path", "{tmp}/fs2",
                                               "--vae", "none", "--image-size", "8", "--device", "cpu"],
     "does not exist", []),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace every case refers to ({name} in its argv)."""
    import sample_ddp
    import train
    tmp = tmp_path_factory.mktemp("bad")
    w = {"tmp": str(tmp), "runs": str(tmp / "runs"), "samples": str(tmp / "samples"), "file": str(tmp / "file"),
         "final": str(tmp / "final.pt"), "json": str(tmp / "m.json")}
    (tmp / "file").write_text("a regular file")
    (tmp / "final.pt").write_bytes(b"an earlier result")
    (tmp / "m.json").write_text('{"FID": 3.0}')
    w["store"] = make_store(tmp / "store")
    w["store_null"] = make_store(tmp / "store_null", (0, 1, 2, 4) * 2)
    w["store_neg"] = make_store(tmp / "store_neg", (-1, 1, 2, 3) * 2)
    w["store_big"] = make_store(tmp / "store_big", (0, 1, 2, 9) * 2)
    w["store_nan"] = make_store(tmp / "store_nan", fill=np.nan)
    make_reference_store(tmp / "ref_bad_label")
    (tmp / "ref_bad_label" / "imagenet256_labels" / "5.npy").write_text("junk")
    w["ref_bad_label"] = str(tmp / "ref_bad_label")
    make_reference_store(tmp / "ref_bad_feature")  # read in a DataLoader worker, which re-raises with its traceback
    (tmp / "ref_bad_feature" / "imagenet256_features" / "3.npy").write_text("junk")
    w["ref_bad_feature"] = str(tmp / "ref_bad_feature")
    w["weights"] = str(tmp / "w.pt")
    tiny_weights(MODEL, w["weights"], in_channels=3, input_size=8, num_classes=4)
    train.main(train_argv(w["store"], w["runs"], "--prefix", "run"))
    w["run"], w["run_ckpt"] = str(tmp / "runs" / "run"), str(tmp / "runs" / "run" / "checkpoints" / "0000002.pt")
    for name, data in {"empty": b"", "text": b"a README, not weights\n", "junk": b"garbage" * 20}.items():
        path = tmp / f"{name}.{'safetensors' if name == 'junk' else 'pt'}"
        path.write_bytes(data)
        w[name] = str(path)
    from safetensors.torch import save_file
    w["cut"] = str(tmp / "cut.safetensors")
    save_file({k: v.contiguous() for k, v in load_file_pt(w["weights"]).items()}, w["cut"])
    with open(w["cut"], "r+b") as f:  # an interrupted download
        f.truncate(os.path.getsize(w["cut"]) // 2)
    rng = np.random.default_rng(0)
    for name, n, side in (("ref8", 6, 8), ("sam8", 6, 8), ("sam16", 6, 16)):
        w[name] = str(tmp / f"{name}.npz")
        write_sample_batch(w[name], rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    w["nan_ref"] = str(tmp / "nan_ref.npz")
    np.savez(w["nan_ref"], mu=np.full(64, np.nan), sigma=np.eye(64))
    sample_ddp.main([a.format(**w) for a in FID] + ["--num-fid-samples", "5"])
    w["imgs"] = str(make_image_folder(tmp / "imgs"))
    flat = tmp / "flat"
    flat.mkdir()
    for i in range(3):
        write_png(flat / f"{i}.png", i)
    (flat / "1b.png").write_text("not an image")
    w["flat"] = str(flat)
    return w


def load_file_pt(path):
    import torch
    return torch.load(path, weights_only=True)


def write_png(path, value):
    from PIL import Image
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def entry(script):
    mod = importlib.import_module(script)
    if script in ("prune_by_score", "prune_by_index", "extract_features"):  # main(args) with build_parser()
        return lambda argv: mod.main(mod.build_parser().parse_args(argv))
    return mod.main


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, case, capsys):
    _, script, argv, needle, kept = case
    argv = [a.format(**ws) for a in argv]
    before = {k: snapshot(ws[k]) for k in kept}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(entry(script), argv)
    err = capsys.readouterr().err
    assert e.value.code not in (0, None)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert needle.format(**ws) in errors[0], errors[0]
    for k, old in before.items():
        assert snapshot(ws[k]) == old, f"{k} changed"


def snapshot(path):
    return files_of(path) if os.path.isdir(path) else open(path, "rb").read()


def test_table_is_large_and_covers_every_script():
    scripts = {c[1] for c in CASES}
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert scripts == {"train", "train_masked_kd", "prune_by_learning", "prune_by_score", "prune_by_index", "sample",
                       "sample_ddp", "evaluator", "save_npz", "extract_features"}
