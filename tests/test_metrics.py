"""ADM metric numerics and npz streaming, each checked against an independent numpy/scipy computation."""
import warnings
import zipfile

import numpy as np
import pytest
import torch

from core.errors import UserError
from tinyfusion import metrics
from tinyfusion.metrics import evaluate, frechet_distance, inception_score, manifold_radii, precision_recall
from tinyfusion.npz import NpzWriter, iter_npz_batches, validate_sample_batch, write_sample_batch


def _fid_by_eigh(mu1, s1, mu2, s2):
    """Independent FID: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD eigenproblem."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))


def _gaussian_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_independent_formula():
    rng = np.random.default_rng(0)
    mu1, s1 = _gaussian_stats(rng, 200, 16)
    mu2, s2 = _gaussian_stats(rng, 150, 16, shift=0.5)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-7)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    rng = np.random.default_rng(1)
    mu1, s1 = _gaussian_stats(rng, 50, 8)
    mu2, s2 = _gaussian_stats(rng, 50, 8)
    real_sqrtm, calls = metrics.linalg.sqrtm, []

    def sqrtm_nan_first(m):  # what scipy returns for a singular product with a Jordan block at 0
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm_nan_first)
    eps = 1e-2  # large enough for the offset to be visible
    with pytest.warns(UserWarning, match="singular product"):
        got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    off = np.eye(8) * eps  # the offset enters the sqrt term only, as in ADM
    expect = _fid_by_eigh(mu1, s1 + off, mu2, s2 + off) - np.trace(off) * 2
    assert got == pytest.approx(expect, rel=1e-7)
    assert abs(got - _fid_by_eigh(mu1, s1, mu2, s2)) > 1e-4


def test_frechet_distance_rejects_large_imaginary_part(monkeypatch):
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 1j))
    with pytest.raises(ValueError, match="Imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_inception_score_hand_computed():
    a, b = [np.log(3.0), 0.0], [0.0, np.log(3.0)]  # p = (3/4, 1/4) and (1/4, 3/4)
    kl = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)  # KL to the marginal (1/2, 1/2)
    assert inception_score(np.array([a, b]), split_size=5000) == pytest.approx(np.exp(kl), rel=1e-12)
    # splits follow file order: [a, a] scores exp(0) = 1, [a, b] scores exp(kl); the mean is reported
    assert inception_score(np.array([a, a, a, b]), split_size=2) == pytest.approx((1 + np.exp(kl)) / 2, rel=1e-12)
    # underflowed probabilities (np.log(p) = -inf in ADM) stay finite
    assert np.isfinite(inception_score(np.array([[0.0, -1e4], [-1e4, 0.0]])))


def _brute_pr(ref, sam, k=3):
    """Float64 brute force: radius = k-th NN distance (self excluded), `<=` ball membership."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref, r_sam = np.sort(d2(ref, ref), 1)[:, k], np.sort(d2(sam, sam), 1)[:, k]
    d = d2(ref, sam)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sam[None, :]).any(1).mean(), r_ref


def test_precision_recall_matches_brute_force_with_ties():
    # small integer features: float16 distances are exact, so ties (`<=`) are decided identically
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 6, (37, 4)).astype(np.float32)  # with `<` instead of `<=`: 0.48 / 0.81
    sam = rng.integers(2, 9, (23, 4)).astype(np.float32)
    prec, rec, r_ref = _brute_pr(ref.astype(np.float64), sam.astype(np.float64))
    assert 0 < prec < 1 and 0 < rec < 1
    assert precision_recall(ref, sam, batch_size=8) == (pytest.approx(prec, abs=0), pytest.approx(rec, abs=0))
    np.testing.assert_array_equal(manifold_radii(torch.from_numpy(ref), batch_size=5).numpy(), r_ref)


def test_precision_recall_float16_overflow_falls_back_to_float32():
    rng = np.random.default_rng(3)
    ref = (rng.standard_normal((30, 16)) * 100).astype(np.float32)  # |x|^2 ~ 1.6e5 > float16 max
    sam = (rng.standard_normal((25, 16)) * 100 + 30).astype(np.float32)
    d = metrics.pairwise_sq_distances(torch.from_numpy(ref), torch.from_numpy(sam)).numpy()
    np.testing.assert_allclose(d, ((ref[:, None].astype(np.float64) - sam[None]) ** 2).sum(-1), rtol=1e-4)
    prec, rec, _ = _brute_pr(ref.astype(np.float64), sam.astype(np.float64))
    assert precision_recall(ref, sam) == (pytest.approx(prec), pytest.approx(rec))


def test_pairwise_distances_are_float16_rounded_like_adm():
    u = torch.tensor([[0.1, 0.2, 0.3]])
    v = torch.tensor([[0.3, 0.1, 0.2]])
    exact = ((u - v) ** 2).sum().item()
    got = metrics.pairwise_sq_distances(u, v).item()
    assert got == float(np.float16(got)) and got != pytest.approx(exact, rel=1e-5)


def test_npz_stream_roundtrip_and_validation(tmp_path):
    imgs = np.random.default_rng(4).integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "s.npz"
    with NpzWriter(path, 10, (5, 6, 3)) as w:
        for i in range(0, 10, 3):
            w.write(imgs[i:i + 3])
    np.testing.assert_array_equal(np.load(path)["arr_0"], imgs)
    batches = list(iter_npz_batches(path, 4))
    assert [len(b) for b in batches] == [4, 4, 2] and batches[0].flags.writeable
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    assert validate_sample_batch(path, expected_n=10) == (10, 5, 6, 3)
    with pytest.raises(UserError, match="expected 11"):
        validate_sample_batch(path, expected_n=11)
    with pytest.raises(UserError, match="expected 6x6"):
        validate_sample_batch(path, size=6)
    np.savez(tmp_path / "f.npz", imgs.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        validate_sample_batch(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", images=imgs)
    with pytest.raises(UserError, match="arr_0"):
        validate_sample_batch(tmp_path / "k.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not an .npz"):
        validate_sample_batch(tmp_path / "bad.npz")
    np.savez_compressed(tmp_path / "c.npz", imgs)  # deflated members stream too
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_batches(tmp_path / "c.npz", 3))), imgs)


def test_npz_writer_leaves_no_file_on_short_count(tmp_path):
    path = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="wrote 2 of 3"):
        with NpzWriter(path, 3, (2, 2, 3)) as w:
            w.write(np.zeros((2, 2, 2, 3), np.uint8))
    assert not path.exists() and not (tmp_path / "s.npz.tmp").exists()
    write_sample_batch(path, np.ones((3, 2, 2, 3), np.uint8))
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["arr_0.npy"]


class TinyExtractor:
    """Stand-in feature network: quadrant colour means (pool), row means (spatial), linear logits."""

    W = np.random.default_rng(5).standard_normal((12, 5)) / 50

    def __call__(self, images):
        x = images.astype(np.float64)
        n, h, w, _ = x.shape
        quads = x.reshape(n, 2, h // 2, 2, w // 2, 3).mean((2, 4)).reshape(n, 12)
        return {"pool": quads, "spatial": x.mean((2, 3)), "logits": quads @ self.W}


def test_evaluate_against_independent_metrics(tmp_path):
    rng = np.random.default_rng(6)
    ref = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    sam = np.clip(ref[:20].astype(int) + rng.integers(-40, 80, (20, 4, 4, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", ref)
    np.savez(tmp_path / "sam.npz", sam)
    out = evaluate(tmp_path / "ref.npz", tmp_path / "sam.npz", TinyExtractor(), batch_size=7)

    f_ref, f_sam = TinyExtractor()(ref), TinyExtractor()(sam)
    stats = {k: [(f[k].mean(0), np.cov(f[k], rowvar=False)) for f in (f_sam, f_ref)] for k in ("pool", "spatial")}
    assert out["FID"] == pytest.approx(_fid_by_eigh(*stats["pool"][0], *stats["pool"][1]), rel=1e-5)
    assert out["sFID"] == pytest.approx(_fid_by_eigh(*stats["spatial"][0], *stats["spatial"][1]), rel=1e-5)
    p = np.exp(f_sam["logits"]) / np.exp(f_sam["logits"]).sum(1, keepdims=True)
    assert out["IS"] == pytest.approx(np.exp(np.mean(np.sum(p * np.log(p / p.mean(0)), 1))), rel=1e-6)
    prec, rec, _ = _brute_pr(f_ref["pool"], f_sam["pool"])
    assert (out["precision"], out["recall"]) == (pytest.approx(prec), pytest.approx(rec))

    # ADM's rule: a reference carrying `mu` supplies FID/sFID stats; images only feed P/R
    mu, sigma = np.full(12, 9.0), np.eye(12) * 4
    mu_s, sigma_s = np.full(4, 3.0), np.eye(4)
    np.savez(tmp_path / "ref_stats.npz", ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stored = evaluate(tmp_path / "ref_stats.npz", tmp_path / "sam.npz", TinyExtractor())
    assert stored["FID"] == pytest.approx(_fid_by_eigh(*stats["pool"][0], mu, sigma), rel=1e-5)
    assert stored["sFID"] == pytest.approx(_fid_by_eigh(*stats["spatial"][0], mu_s, sigma_s), rel=1e-5)
    assert stored["precision"] == out["precision"]

    np.savez(tmp_path / "mar_stats.npz", mu=mu, sigma=sigma)  # MAR-style stats file: FID only
    only = evaluate(tmp_path / "mar_stats.npz", tmp_path / "sam.npz", TinyExtractor())
    assert only["FID"] == stored["FID"] and only["sFID"] is None and only["precision"] is None
    assert "Latex: " in metrics.format_report(only)


def test_evaluate_rejects_bad_inputs_before_feature_pass(tmp_path):
    def never_called(images):
        raise AssertionError("feature network ran on bad input")

    good = np.zeros((5, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "good.npz", good)
    np.savez(tmp_path / "few.npz", good[:3])
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(5))
    np.savez(tmp_path / "gray.npz", good[..., 0])
    cases = {"few.npz": "more than 3", "labels.npz": "neither images", "gray.npz": "expected \\(N, H, W, 3\\)"}
    for name, msg in cases.items():
        ref, sam = (name, "good.npz") if name != "gray.npz" else ("good.npz", name)
        with pytest.raises(UserError, match=msg):
            evaluate(tmp_path / ref, tmp_path / sam, never_called)


def test_tf32_disabled_restores_flags():
    torch.backends.cuda.matmul.allow_tf32 = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with metrics.tf32_disabled():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
