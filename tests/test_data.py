"""Feature-store readers (three layouts) and image helpers, checked against hand-built files and numpy."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from tinyfusion.data import (BaseFeatureStore, FeatureStore, MarCacheStore, ReferenceFeatureStore, center_crop_arr,
                             image_transform, open_feature_store, open_image_folder)


def write_sharded_store(root, latents, labels, shard_size, store="latents", scale=0.18215):
    """A store in the documented format, written with plain numpy (independent of the extraction job)."""
    os.makedirs(root, exist_ok=True)
    shards = []
    for k, s in enumerate(range(0, len(labels), shard_size)):
        np.save(os.path.join(root, f"latents-{k:05d}.npy"), latents[s: s + shard_size])
        np.save(os.path.join(root, f"labels-{k:05d}.npy"), labels[s: s + shard_size])
        shards.append({"latents": f"latents-{k:05d}.npy", "labels": f"labels-{k:05d}.npy",
                       "count": len(labels[s: s + shard_size])})
    c = latents.shape[2] // (2 if store == "moments" else 1)
    manifest = {"format_version": 1, "count": len(labels), "latent_shape": [c, *latents.shape[3:]],
                "dtype": latents.dtype.name, "store": store, "scale_factor": scale, "flips": True,
                "num_classes": int(labels.max()) + 1, "shards": shards}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_sharded_store_reads_entries_across_shards_and_flips(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((7, 2, 4, 2, 2)).astype(np.float16)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.int64)
    write_sharded_store(tmp_path, latents, labels, shard_size=3)
    store = open_feature_store(tmp_path)
    assert isinstance(store, FeatureStore) and len(store) == 7 and store.latent_shape == (4, 2, 2)
    assert store.num_classes == 10 and store.has_flips and not store.stochastic
    for i in range(7):
        for flip in (0, 1):
            x, y = store[(i, flip)]
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.item() == labels[i]
            np.testing.assert_array_equal(x.numpy(), latents[i, flip].astype(np.float32))
    np.testing.assert_array_equal(store[5][0].numpy(), latents[5, 0].astype(np.float32))  # int key = flip 0
    np.testing.assert_array_equal(store.labels(), labels)
    with pytest.raises(IndexError):
        store[7]
    # Workers started with spawn get the store pickled: the open memory maps must not travel.
    assert all(m is not None for m in store._shards)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._shards == [None] * 3 and torch.equal(clone[(6, 1)][0], store[(6, 1)][0])


def test_moments_store_samples_mean_plus_std_noise_times_scale(tmp_path):
    rng = np.random.default_rng(1)
    moments = rng.standard_normal((3, 2, 6, 2, 2)).astype(np.float32)  # [mean(3) | logvar(3)]
    write_sharded_store(tmp_path, moments, np.array([0, 1, 0]), shard_size=2, store="moments", scale=0.5)
    store = open_feature_store(tmp_path)
    assert store.stochastic and store.latent_shape == (3, 2, 2)
    x, _ = store[(2, 1, 123)]
    eps = torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(123)).numpy()
    mean, logvar = moments[2, 1, :3], moments[2, 1, 3:]
    np.testing.assert_allclose(x.numpy(), (mean + np.exp(0.5 * logvar) * eps) * 0.5, rtol=1e-5, atol=1e-6)
    assert torch.equal(store[(2, 1, 123)][0], x) and not torch.equal(store[(2, 1, 124)][0], x)


def test_reference_layout_pairs_by_name_in_reference_order(tmp_path):
    feats, labs = tmp_path / "imagenet256_features", tmp_path / "imagenet256_labels"
    feats.mkdir(), labs.mkdir()
    rng = np.random.default_rng(2)
    arrays = {i: rng.standard_normal((2, 4, 2, 2)).astype(np.float32) for i in range(12)}
    for i, a in arrays.items():
        np.save(feats / f"{i}.npy", a)
        np.save(labs / f"{i}.npy", np.array([i % 5]))
    for path in (tmp_path, feats):  # the parent or the features folder itself
        store = open_feature_store(path)
        assert isinstance(store, ReferenceFeatureStore) and len(store) == 12 and store.has_flips
        # The reference's CustomDataset uses sorted(os.listdir): 0, 1, 10, 11, 2, ...
        order = sorted(f"{i}.npy" for i in range(12))
        assert order[2] == "10.npy"
        x, y = store[(2, 1)]
        np.testing.assert_array_equal(x.numpy(), arrays[10][1])
        assert y.item() == 0 and store.latent_shape == (4, 2, 2)


def test_reference_layout_without_flips_refuses_flip(tmp_path):
    (tmp_path / "imagenet256_features").mkdir(), (tmp_path / "imagenet256_labels").mkdir()
    a = np.ones((1, 4, 2, 2), np.float32)
    np.save(tmp_path / "imagenet256_features" / "0.npy", a)
    np.save(tmp_path / "imagenet256_labels" / "0.npy", np.array([7]))
    store = open_feature_store(tmp_path)
    assert not store.has_flips and store[0][1].item() == 7
    with pytest.raises(UserError, match="no flipped latents"):
        store[(0, 1)]


def test_mar_cache_layout(tmp_path):
    rng = np.random.default_rng(3)
    data = {}
    for cls, files in (("n02", ["b.JPEG", "a.JPEG"]), ("n01", ["z.JPEG"])):
        (tmp_path / cls).mkdir()
        for f in files:
            m, mf = rng.standard_normal((2, 8, 2, 2)).astype(np.float32)
            np.savez(tmp_path / cls / (f + ".npz"), moments=m, moments_flip=mf)
            data[(cls, f)] = (m, mf)
    store = open_feature_store(tmp_path)
    assert isinstance(store, MarCacheStore) and len(store) == 3 and store.num_classes == 2
    assert store.latent_shape == (4, 2, 2) and store.stochastic
    # DatasetFolder order: classes sorted (n01 -> 0, n02 -> 1), files sorted within a class.
    expect = [("n01", "z.JPEG", 0), ("n02", "a.JPEG", 1), ("n02", "b.JPEG", 1)]
    for i, (cls, f, label) in enumerate(expect):
        x, y = store[(i, 1, 7)]
        mf = data[(cls, f)][1]
        eps = torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(7)).numpy()
        np.testing.assert_allclose(x.numpy(), (mf[:4] + np.exp(0.5 * mf[4:]) * eps) * 0.2325, rtol=1e-5, atol=1e-6)
        assert y.item() == label


def test_store_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_feature_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        open_feature_store(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a feature store"):
        open_feature_store(tmp_path / "junk")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "extract.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished"):
        open_feature_store(tmp_path / "unfinished")
    write_sharded_store(tmp_path / "ok", np.zeros((2, 2, 4, 4, 4), np.float32), np.array([0, 1]), 2)
    store = open_feature_store(tmp_path / "ok")
    store.check_latent_shape((4, 4, 4), "DiT-S/2")
    with pytest.raises(UserError, match=r"\(4, 4, 4\) but DiT-XL/2 expects \(4, 32, 32\)"):
        store.check_latent_shape((4, 32, 32), "DiT-XL/2")


def test_center_crop_arr_matches_numpy():
    rng = np.random.default_rng(4)
    # No resize needed (short side == target): a pure center crop, offset (48 - 32) // 2 = 8.
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.array(center_crop_arr(Image.fromarray(arr), 32)), arr[:, 8:40])
    # Short side exactly 2x the target: one BOX halving = the 2x2 block mean, then nothing else.
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blocks = arr.reshape(16, 2, 16, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out = np.array(center_crop_arr(Image.fromarray(arr), 16)).astype(np.float64)
    assert np.abs(out - blocks).max() <= 1.0  # PIL rounds the mean to uint8
    # Odd sizes end up exactly image_size square.
    for w, h in ((71, 50), (50, 201), (17, 17)):
        assert center_crop_arr(Image.new("RGB", (w, h)), 16).size == (16, 16)


def test_image_transform_range_and_flip():
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255
    x = image_transform(8)(Image.fromarray(arr))
    assert x.shape == (3, 8, 8) and x[:, :, :4].eq(1).all() and x[:, :, 4:].eq(-1).all()
    assert image_transform(8, channels=1)(Image.fromarray(arr).convert("L")).shape == (1, 8, 8)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an ImageFolder"):
        open_image_folder(tmp_path / "empty", 32)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="not an ImageFolder"):
        open_image_folder(tmp_path / "flat", 32)
    with pytest.raises(UserError, match="not divisible by 8"):
        open_image_folder(tmp_path / "flat", 36)
    with pytest.raises(UserError, match="does not exist"):
        open_image_folder(tmp_path / "nope", 32)
    (tmp_path / "ok" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "ok" / "cat" / "a.png")
    ds = open_image_folder(tmp_path / "ok", 16)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0 and x[0].eq(1).all() and x[1].eq(-1).all()


def test_base_store_is_abstract_enough():
    # The int / 2-tuple / 3-tuple key forms all reach get(index, flip, generator).
    class Fake(BaseFeatureStore):
        def __len__(self):
            return 2

        def _entry(self, index, flip):
            return np.full((1, 1, 1), 10 * index + flip, np.float32), index

    fake = Fake("fake", (1, 1, 1))
    assert fake[1][0].item() == 10 and fake[(1, 1)][0].item() == 11 and fake[(0, 1, 5)][0].item() == 1
