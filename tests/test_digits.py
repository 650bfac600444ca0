"""The digits demo: data split and formats, the shipped classifier and teacher, the digits feature network."""
import hashlib
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from core.errors import UserError
from tinyfusion import digits
from tinyfusion.data import open_feature_store
from tinyfusion.metrics import evaluate
from tinyfusion.npz import write_sample_batch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


def _ref_pixels(v):
    """sklearn value v in 0..16 -> the uint8 the reference stores: x = v/8 - 1, clamp(127.5 x + 128), truncated."""
    return np.minimum(np.floor(15.9375 * v + 0.5), 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    digits.write_digits_data(root / "digits", root / "digits_ref.npz")
    return root


@pytest.fixture(scope="module")
def extractor():
    return digits.DigitsExtractor(digits.load_digits_classifier())


def test_store_is_the_stratified_train_split_without_flips(data):
    raw = load_digits()
    store = open_feature_store(data / "digits")
    per_class = np.bincount(raw.target)
    held = np.round(0.2 * per_class).astype(int)
    assert len(store) == per_class.sum() - held.sum() == 1438
    assert store.latent_shape == (1, 8, 8) and store.manifest["vae"] == "none" and store.num_classes == 10
    np.testing.assert_array_equal(np.bincount(store.labels()), per_class - held)
    lat = np.load(data / "digits" / "latents-00000.npy")
    assert lat.shape == (1438, 2, 1, 8, 8)
    np.testing.assert_array_equal(lat[:, 0], lat[:, 1])  # "flipped" copies are the digits themselves
    # every stored latent is an sklearn digit (v/8 - 1) with its own label
    values = (lat[:, 0, 0] + 1) * 8
    np.testing.assert_allclose(values, np.round(values), atol=1e-5)
    lookup = {(img.astype(np.uint8).tobytes()): t for img, t in zip(raw.images, raw.target)}
    assert [lookup[v.astype(np.uint8).tobytes()] for v in np.round(values)] == store.labels().tolist()


def test_reference_batch_is_the_held_out_rest_in_adm_format(data):
    raw = load_digits()
    ref = np.load(data / "digits_ref.npz")
    assert list(ref.keys()) == ["arr_0"]
    imgs = ref["arr_0"]
    assert imgs.dtype == np.uint8 and imgs.shape == (359, 8, 8, 3)
    assert (imgs == imgs[..., :1]).all()  # gray repeated
    # train + held-out is exactly the whole data set (as a multiset of uint8 images)
    train = np.load(data / "digits" / "latents-00000.npy")[:, 0, 0]
    train_u8 = _ref_pixels(np.round((train + 1) * 8))
    split = sorted(x.tobytes() for x in np.concatenate([train_u8, imgs[..., 0]]))
    assert split == sorted(_ref_pixels(x).tobytes() for x in raw.images)


def test_shipped_classifier_held_out_accuracy(extractor):
    _, _, x_test, y_test = digits.load_split()
    imgs = digits.to_uint8_gray(x_test)
    feats = extractor(imgs[:5])
    assert feats["pool"].shape == (5, 64) and feats["logits"].shape == (5, 10)
    assert feats["pool"].dtype == feats["logits"].dtype == np.float32
    head = extractor.model.head  # logits are the last layer applied to the 'pool' features
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.from_numpy(feats["pool"])).numpy(), feats["logits"], rtol=1e-5, atol=1e-5)
    acc = digits.class_accuracy(extractor, imgs, y_test)
    assert acc == np.mean([extractor(imgs[i:i + 1])["logits"].argmax() == y_test[i] for i in range(len(imgs))])
    assert acc > 0.9


def test_digits_features_through_evaluate(data, extractor, tmp_path):
    """Real train digits are close to held-out digits in classifier-feature FID; uniform noise is not."""
    train = np.load(data / "digits" / "latents-00000.npy")[:, 0]
    write_sample_batch(tmp_path / "real.npz", digits.to_uint8_gray(train))
    noise = np.random.default_rng(0).integers(0, 256, (359, 8, 8, 3), dtype=np.uint8)
    write_sample_batch(tmp_path / "noise.npz", noise)
    real = evaluate(data / "digits_ref.npz", tmp_path / "real.npz", extractor)
    bad = evaluate(data / "digits_ref.npz", tmp_path / "noise.npz", extractor)
    assert real["sFID"] is None and real["FID"] < 0.05 * bad["FID"]
    assert real["IS"] > 8 and real["precision"] > 0.9 and real["recall"] > 0.9
    assert bad["precision"] < 0.1


def test_evaluator_feature_net_digits(data, monkeypatch, capsys):
    ref = data / "digits_ref.npz"
    monkeypatch.setattr(sys, "argv", ["evaluator.py", str(ref), str(ref), "--feature-net", "digits", "--device", "cpu"])
    runpy.run_path(str(ROOT / "evaluator.py"), run_name="__main__")
    out = capsys.readouterr().out
    fid = float(out.split("FID: ")[1].split()[0])
    assert abs(fid) < 1e-3 and "sFID: n/a" in out  # identical batches: FID 0 by definition


@pytest.mark.parametrize("name", sorted(digits.TEACHERS))
def test_shipped_teacher_draws_recognisable_digits(extractor, name):
    model = digits.load_digits_teacher(model=name)
    assert (model.depth, model.in_channels, model.input_size, model.num_classes) == (12, 1, 8, 10)
    labels = np.arange(32) % 10
    imgs = digits.sample_digits(model, labels, num_steps=25, cfg_scale=digits.TEACHER_CFG, seed=0)
    assert imgs.shape == (32, 8, 8, 3) and imgs.dtype == np.uint8
    acc = digits.class_accuracy(extractor, imgs, labels)
    assert acc > 0.5, acc  # chance is 0.1


def test_missing_assets_name_the_rebuild_command(tmp_path):
    with pytest.raises(UserError, match="prepare_digits.py --retrain-classifier"):
        digits.load_digits_classifier(tmp_path / "none.safetensors")
    with pytest.raises(UserError, match="train.py --model DiT-Tiny/2"):
        digits.load_digits_teacher(tmp_path / "none.safetensors")
    with pytest.raises(UserError, match="train.py --model SiT-Tiny/2"):
        digits.load_digits_teacher(tmp_path / "none.safetensors", model="SiT-Tiny/2")


def test_assets_match_their_recorded_checksums_and_commands():
    readme = (ASSETS / "README.md").read_text()
    for name in ("digits_classifier.safetensors", "digits_teacher.safetensors", "sit_digits_teacher.safetensors"):
        data = (ASSETS / name).read_bytes()
        assert len(data) < 10 * 2**20
        assert hashlib.sha256(data).hexdigest() in readme
    assert digits.CLASSIFIER_REBUILD in readme
    for model, (path, rebuild) in digits.TEACHERS.items():
        card = json.loads(Path(path).with_suffix(".json").read_text())
        assert card["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert rebuild in readme and card["command"] == rebuild and card["model"] == model
