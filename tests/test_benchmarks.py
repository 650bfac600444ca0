"""Smoke tests of benchmarks/: each script runs one tiny iteration, prints its table, and its numbers
agree with what a separate computation says they must be."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

from benchmarks import (bench_evaluator, bench_loader, bench_memory, bench_sampler_tradeoff, bench_sampling,
                        bench_training, bench_vae)
from conftest import ROOT

SMOKE = ["--smoke", "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_torch_state():
    """The scripts set torch's thread count and global seed; give the rest of the suite its own back."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def table_rows(text):
    """Cells of the Markdown table rows in `text` (header and separator excluded)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.parametrize("family,names", [("DiT", ["DiT-XL/2", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2"]),
                                          ("SiT", ["SiT-XL/2", "SiT-D14/2"]), ("MAR", ["MAR-L", "MAR-L-D16"])])
def test_sampling_table(family, names, capsys):
    rows = bench_sampling.main(SMOKE + ["--family", family])
    printed = table_rows(capsys.readouterr().out)
    assert [r[0] for r in printed] == names
    depths = {"DiT-XL/2": 28, "DiT-D19/2": 19, "DiT-D14/2": 14, "DiT-D7/2": 7, "SiT-XL/2": 28, "SiT-D14/2": 14,
              "MAR-L": 32, "MAR-L-D16": 16}  # the registry's (paper's) depths, kept by the smoke models
    assert [int(r[1]) for r in printed] == [depths[n] for n in names]
    for row, cells in zip(rows, printed):  # speedup = reference seconds / seconds; images/s = batch 2 / seconds
        assert cells[6] == f"{rows[0]['seconds'] / row['seconds']:.2f}x"
        assert float(cells[5]) == pytest.approx(2 / row["seconds"], rel=1e-3, abs=1e-3)


def test_training_table(capsys):
    rows = bench_training.main(SMOKE)
    printed = table_rows(capsys.readouterr().out)
    assert [r[0] for r in printed] == list(bench_training.CONFIGS)
    by = {r["config"]: r for r in rows}
    assert [by[c]["depth"] for c in ("plain", "mask+lora", "plain-D/2", "kd")] == [12, 12, 6, 6]
    # mask-only trains exactly the gate logits: 6 groups of 1:2 -> 2 options each
    from models import build_model
    total = sum(p.numel() for p in build_model("DiT-B/2", input_size=4, hidden_size=64, num_heads=4).parameters())
    assert by["mask-only"]["trainable_pct"] == pytest.approx(100 * 12 / (total + 12))
    assert by["mask-only"]["trainable_pct"] < by["mask+lora"]["trainable_pct"] < by["mask+full"]["trainable_pct"]
    for r, cells in zip(rows, printed):
        assert cells[6] == f"{r['seconds'] / by['plain']['seconds']:.2f}x"
        assert r["peak_bytes"] is not None and cells[5] != "n/a"  # Linux: the RSS peak is readable


def test_training_ladder(capsys):
    rows = bench_training.main(SMOKE + ["--ladder", "--configs", "plain", "--skip", "compile"])
    printed = table_rows(capsys.readouterr().out)
    # CPU: no TF32 row; each row adds one switch to the previous ones
    assert [c[1] for c in printed] == ["fp32 eager", "+ fused AdamW", "+ bf16 autocast", "+ grad checkpointing"]
    for r, cells in zip(rows, printed):
        assert cells[5] == f"{rows[0]['seconds'] / r['seconds']:.2f}x"


def test_vae_table(capsys):
    rows = bench_vae.main(SMOKE)
    printed = table_rows(capsys.readouterr().out)
    assert [(c[0], c[1], c[2]) for c in printed] == [(w, l, p) for w in ("encode", "decode") for l, p in bench_vae.ROWS]
    for r in rows:  # channels-last changes the layout, not the result; bf16 only rounds
        assert r["max_abs_diff"] < (1e-4 if r["precision"] == "fp32" else 0.2), r


def test_saved_bytes_of_an_mlp_match_the_formula():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    nbytes, _ = bench_memory.saved_bytes(lambda: net(torch.randn(5, 8)), net.parameters())
    assert nbytes == 5 * (8 + 16 + 16) * 4  # inputs of Linear 1, GELU and Linear 2, fp32


def test_memory_table(capsys):
    rows = bench_memory.main(SMOKE + ["--batch-size", "4", "--check-linearity"])
    printed = table_rows(capsys.readouterr().out)
    assert [(c[0], c[1], c[2]) for c in printed] == [(c, p, "on" if g else "off") for c, p, g in bench_memory.ROWS]
    from models import build_model
    model = build_model("DiT-B/2", input_size=4, hidden_size=64, num_heads=4)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # plain fp32: weights + EMA copy (all params) + grads + two AdamW moments (trainable), 4 bytes each
    expected = 4 * (2 * params + 3 * trainable)
    assert rows[0]["static"] == pytest.approx(expected, rel=0.01)
    by = {(r["config"], r["precision"], r["checkpointing"]): r for r in rows}
    assert by["mask+lora", "bf16", True]["per_image"] < by["mask+lora", "bf16", False]["per_image"]
    assert by["mask+lora", "bf16", False]["static"] < by["mask+full", "bf16", False]["static"]
    assert max(r["linearity_error"] for r in rows) < 0.01  # what the extrapolation to large batches rests on


def test_loader_table_and_check(tmp_path, capsys):
    rows = bench_loader.main(SMOKE + ["--root", str(tmp_path)])
    printed = table_rows(capsys.readouterr().out)
    assert [r["files"] for r in rows] == [2, 2 * 200]  # latents + labels shard; a feature and a label per image
    assert printed[0][5] == f"{rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}x" and printed[1][5] == "1.00x"
    # the content check the benchmark runs first must catch a store that differs from its source
    latents, labels = bench_loader.source_arrays(200, (4, 32, 32))
    from tinyfusion.data import open_feature_store
    store = open_feature_store(tmp_path / "sharded")
    bench_loader.check_store(store, latents, labels, lambda i: i, [(5, 0), (7, 1)])
    with pytest.raises(RuntimeError, match="differs"):
        bench_loader.check_store(store, latents, labels, lambda i: i + 1, [(5, 0)])


def test_evaluator_table(capsys):
    rows = bench_evaluator.main(SMOKE)
    printed = table_rows(capsys.readouterr().out)
    assert len(printed) == 4 and printed[0][2] == f"{rows[0]['images_per_s']:.1f} images/s"
    # FID of the smoke features by the eigenvalue form: tr(sqrt(S1 S2)) = sum sqrt(eig(S1 S2))
    sam_ref = bench_evaluator.random_features(256, 64, seed=1)
    ref, sam = (x.astype(np.float64) for x in sam_ref)
    s1, s2 = np.cov(sam, rowvar=False), np.cov(ref, rowvar=False)
    diff = sam.mean(0) - ref.mean(0)
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(linalg.eigvals(s1 @ s2)).real.sum()
    assert rows[2]["fid"] == pytest.approx(fid, rel=1e-4)
    # precision/recall by brute force in float64 (the evaluator's float16 distances may flip a few border cases)
    ref, sam = (x.astype(np.float64) for x in bench_evaluator.random_features(256, 64, seed=2))

    def radii(x):
        return np.sort(((x[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, 3]
    d = ((ref[:, None] - sam[None]) ** 2).sum(-1)
    precision, recall = (d <= radii(ref)[:, None]).any(0).mean(), (d <= radii(sam)[None]).any(1).mean()
    assert rows[3]["precision"] == pytest.approx(precision, abs=0.02)
    assert rows[3]["recall"] == pytest.approx(recall, abs=0.02)


def test_sampler_tradeoff_table(tmp_path, capsys):
    # a missing reference batch is rebuilt (no download) instead of failing
    rows = bench_sampler_tradeoff.main(SMOKE + ["--ref-batch", str(tmp_path / "missing.npz")])
    out = capsys.readouterr().out
    assert "missing.npz is missing: built the held-out digits" in out
    printed = table_rows(out)
    assert [(r[0], int(r[1])) for r in printed] == [("DDPM", 10), ("DDIM", 5)]
    for row, cells in zip(rows, printed):  # speedup = reference seconds / seconds; images/s = 20 samples / seconds
        assert cells[4] == f"{rows[0]['seconds'] / row['seconds']:.2f}x"
        assert float(cells[3]) == pytest.approx(20 / row["seconds"], rel=0.01, abs=0.1)
        assert 0 <= row["accuracy"] <= 1 and row["fid"] > 0
    # the row's samples are sample_digits' with the script's labels and seed: same class accuracy from scratch
    from tinyfusion.digits import (DigitsExtractor, class_accuracy, load_digits_classifier, load_digits_teacher,
                                   sample_digits)
    labels = np.arange(20) % 10
    images = sample_digits(load_digits_teacher(), labels, 5, 1.5, seed=0, sampler="ddim")
    assert class_accuracy(DigitsExtractor(load_digits_classifier()), images, labels) == rows[1]["accuracy"]


def test_script_runs_standalone(tmp_path):
    """`python benchmarks/<script>.py` (not only the package import) finds the repo and prints its table."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_loader.py"), *SMOKE,
                          "--root", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| sharded (manifest + shards) |" in out.stdout and "x reference" in out.stdout


def test_search_step_table(capsys):
    from benchmarks import bench_search_step
    rows = bench_search_step.main(SMOKE)
    printed = table_rows(capsys.readouterr().out)
    assert [(c[0], c[1]) for c in printed] == [("DiT-S/2", "full"), ("DiT-S/2", "lora")]
    for r, cells in zip(rows, printed):
        assert cells[4] == f"{r['seconds_split'] / r['seconds_official']:.2f}x"
        assert cells[7] == f"{r['saved_split'] / r['saved_official']:.2f}x"
        # the same masks and draws: the two formulations give the same loss (up to float rounding) ...
        assert r["loss_rel_diff"] < 1e-5
        # ... while the split one keeps activations only for the samples that keep each block (1:2: ~half)
        assert 0.3 < r["saved_ratio"] < 0.8
