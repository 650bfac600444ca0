"""evaluator.py and save_npz.py end to end on tiny data (random-weight Inception, 16x16 images)."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyfusion import inception, metrics
from tinyfusion.inception import FIDInception3
from tinyfusion.npz import write_sample_batch

ROOT = Path(__file__).resolve().parents[1]


def _subprocess(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _in_process(script, *args, monkeypatch):
    """Run a script as __main__ in this process (saves the torch import of a subprocess)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(ROOT / script), run_name="__main__")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInception3()
    for m in model.modules():  # He init keeps random features from vanishing through ~90 layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("w") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def _low_rank_psd_sqrtm(m, rank=16):
    """Exact sqrtm of a symmetric PSD matrix of rank <= `rank`, in O(n^2 rank): scipy's sqrtm takes
    10-60 s per 2048x2048 matrix on the shared test CPU. With identical reference and sample batches
    of 4 images, S1 @ S2 = S @ S is symmetric PSD of rank <= 3."""
    assert np.allclose(m, m.T, rtol=1e-6, atol=1e-12 * np.abs(m).max())
    q, _ = np.linalg.qr(m @ np.random.default_rng(0).standard_normal((len(m), rank)))
    w, v = np.linalg.eigh(q.T @ m @ q)
    assert np.allclose(q @ (q.T @ m @ q) @ q.T, m, atol=1e-9 * np.abs(m).max())  # rank really <= `rank`
    u = q @ v
    return (u * np.sqrt(np.clip(w, 0, None))) @ u.T


def test_evaluator_end_to_end(tmp_path, weights, monkeypatch, capsys):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    write_sample_batch(tmp_path / "ref.npz", images)
    write_sample_batch(tmp_path / "sam.npz", images)
    monkeypatch.setattr(inception, "INPUT_SIZE", 75)  # smallest valid Inception input: 16x fewer FLOPs
    monkeypatch.setattr(metrics, "_sqrtm", _low_rank_psd_sqrtm)
    out = tmp_path / "m.json"
    _in_process("evaluator.py", tmp_path / "ref.npz", tmp_path / "sam.npz", "--inception-weights", weights,
                "--batch-size", 3, "--device", "cpu", "--json", out, monkeypatch=monkeypatch)
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out.read_text())
    # identical batches: Frechet distances vanish and every point lies in the other set's manifold
    assert abs(res["FID"]) < 1e-4 and abs(res["sFID"]) < 1e-4
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert 1.0 <= res["IS"] <= 4.0  # IS is bounded by the number of images
    assert lines[-6:-1] == [f"Inception Score: {res['IS']}", f"FID: {res['FID']}", f"sFID: {res['sFID']}",
                            "Precision: 1.0", "Recall: 1.0"]
    assert lines[-1] == f"Latex: {res['IS']:.2f} & {res['FID']:.2f} & {res['sFID']:.2f} & 1.00 & 1.00"


def _assert_user_error(capsys, match, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and match in err, err


@pytest.mark.parametrize("ref, sample, match", [
    ("good", "float", "uint8"),
    ("labels", "good", "neither images"),
    ("few", "good", "more than 3"),
])
def test_evaluator_bad_inputs(tmp_path, weights, monkeypatch, capsys, ref, sample, match):
    good = np.zeros((5, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "good.npz", good)
    np.savez(tmp_path / "float.npz", good.astype(np.float32))
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(5))
    np.savez(tmp_path / "few.npz", good[:3])
    _assert_user_error(capsys, match, lambda: _in_process(
        "evaluator.py", tmp_path / f"{ref}.npz", tmp_path / f"{sample}.npz", "--inception-weights", weights,
        monkeypatch=monkeypatch))


def test_evaluator_without_weights_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TINYFUSION_INCEPTION_WEIGHTS", raising=False)
    _assert_user_error(capsys, "pt_inception-2015-12-05-6726825d.pth", lambda: _in_process(
        "evaluator.py", tmp_path / "ref.npz", tmp_path / "sam.npz", monkeypatch=monkeypatch))


def _write_pngs(folder, arrays, names):
    folder.mkdir()
    for arr, name in zip(arrays, names):
        Image.fromarray(arr).save(folder / name)


def test_save_npz_sorted_first_n(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (6, 8, 10, 3), dtype=np.uint8)
    names = [f"{i:06d}.png" for i in range(6)]
    order = [4, 0, 5, 2, 1, 3]  # creation order differs from name order
    _write_pngs(tmp_path / "samples", imgs[order], [names[i] for i in order])
    (tmp_path / "samples" / "notes.txt").write_text("ignored")
    r = _subprocess("save_npz.py", "--image_dir", tmp_path / "samples", "--num", 4)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], imgs[:4])
    r = _subprocess("save_npz.py", "--image_dir", tmp_path / "samples", "--out", tmp_path / "all.npz")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "all.npz")["arr_0"], imgs)


@pytest.mark.parametrize("case, match", [("few", "need 10"), ("gray", "mode L"), ("sizes", "share one size")])
def test_save_npz_bad_inputs(tmp_path, case, match):
    rgb = np.zeros((3, 8, 8, 3), np.uint8)
    arrays = {"few": list(rgb), "gray": [rgb[0], rgb[1, ..., 0]], "sizes": [rgb[0], np.zeros((8, 9, 3), np.uint8)]}
    _write_pngs(tmp_path / "d", arrays[case], [f"{i}.png" for i in range(len(arrays[case]))])
    r = _subprocess("save_npz.py", "--image_dir", tmp_path / "d", "--num", 10 if case == "few" else 2)
    last = r.stderr.strip().splitlines()[-1]  # tqdm's progress bar comes before the error
    assert r.returncode == 2 and last.startswith("error: ") and match in last, r.stderr
    assert not (tmp_path / "d.npz").exists() and not (tmp_path / "d.npz.tmp").exists()
