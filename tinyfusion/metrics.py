"""ADM's evaluation suite (IS, FID, sFID, Precision, Recall) over a pluggable feature network.

Numerics follow guided-diffusion's `evaluations/evaluator.py` (TF1), which TinyFusion reuses:
float32 features, mean in float32, `np.cov` (N-1, float64), TTUR Frechet distance with the
sqrtm epsilon retry, IS over splits of 5000 in file order, and the kynkaat k-NN manifold P/R with
squared distances computed in float16 first. The feature network only has to map uint8 NHWC
batches to a dict of features, so a small classifier can stand in for Inception.
"""
import contextlib
import warnings
from typing import Callable, Dict, Iterable, Protocol

import numpy as np
import torch
from scipy import linalg

from core.errors import UserError
from tinyfusion.npz import iter_npz_batches, npz_array_info, npz_keys, validate_sample_batch

PR_K = 3  # neighbourhood size of ADM's ManifoldEstimator


class FeatureExtractor(Protocol):
    """uint8 (N, H, W, 3) -> {'pool': (N, F) [, 'spatial': (N, S)] [, 'logits': (N, C)]} float32."""

    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]: ...


def compute_activations(extractor, batches: Iterable[np.ndarray], progress=False, total=None):
    """Run `extractor` over image batches; concatenate each returned feature into one (N, F) array."""
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=total)
    parts = {}
    for batch in batches:
        for name, feats in extractor(batch).items():
            parts.setdefault(name, []).append(np.asarray(feats, np.float32).reshape(len(batch), -1))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def feature_stats(acts):
    """(mu, sigma) as ADM: float32 mean, float64 covariance normalised by N - 1."""
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def _sqrtm(m):
    with warnings.catch_warnings():  # singular products are handled by the caller's retry
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) (TTUR/ADM). ADM passes the samples as 1, the ref as 2."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                        f"{sigma1.shape} vs {sigma2.shape}; use the same feature network for both batches")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error may leave a slight imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """Mean over consecutive splits (file order) of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits).

    ADM takes np.log of the softmax, which is -inf/NaN for underflowed classes; log-softmax is the
    same quantity without that failure.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for part in logits.split(split_size):
        logp = torch.log_softmax(part, dim=1)
        log_py = torch.logsumexp(logp, dim=0) - np.log(len(part))  # log of the marginal mean_x p(y|x)
        kl = (logp.exp() * (logp - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


@contextlib.contextmanager
def tf32_disabled():
    """TF32 matmuls/convolutions shift FID; sampling scripts turn them on, evaluation must not."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _as_half(t):
    return t.half().float()


def pairwise_sq_distances(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) between rows, as ADM's DistanceBlock: in float16 (each op rounded
    to float16, products accumulated in float32 as on GPU), redone in float32 if anything overflows."""
    uh, vh = _as_half(u), _as_half(v)
    nu = _as_half(_as_half(uh * uh).sum(1))[:, None]
    nv = _as_half(_as_half(vh * vh).sum(1))[None, :]
    d = _as_half(_as_half(nu - _as_half(2 * _as_half(uh @ vh.T))) + nv).clamp_min(0)
    if torch.isfinite(d).all():
        return d
    return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]).clamp_min(0)


def _blocks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(feats, k=PR_K, batch_size=10000):
    """Squared distance of each point to its k-th nearest neighbour within `feats` (itself counted
    as the 0-th, i.e. ADM's np.partition(...)[:, k]). Keeps only k+1 candidates per row in memory."""
    n = len(feats)
    if n <= k:
        raise UserError(f"precision/recall needs more than k={k} images per batch, got {n}")
    radii = torch.empty(n, device=feats.device)
    for rows in _blocks(n, batch_size):
        best = None
        for cols in _blocks(n, batch_size):
            d = pairwise_sq_distances(feats[rows], feats[cols])
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[rows] = best[:, k]
    return radii


def precision_recall(ref_feats, sample_feats, k=PR_K, batch_size=10000, device="cpu"):
    """Improved precision/recall (Kynkaanniemi et al.) as in ADM's ManifoldEstimator.

    precision: fraction of samples within the k-NN ball (`<=`) of some reference point;
    recall: fraction of reference points within the k-NN ball of some sample.
    """
    ref = torch.as_tensor(np.asarray(ref_feats, np.float32), device=device)
    sam = torch.as_tensor(np.asarray(sample_feats, np.float32), device=device)
    with tf32_disabled():
        ref_radii, sam_radii = manifold_radii(ref, k, batch_size), manifold_radii(sam, k, batch_size)
        ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
        sam_covered = torch.zeros(len(sam), dtype=torch.bool, device=device)
        for r in _blocks(len(ref), batch_size):
            for s in _blocks(len(sam), batch_size):
                d = pairwise_sq_distances(ref[r], sam[s])  # ref as rows, like ADM's evaluate_pr
                ref_covered[r] |= (d <= sam_radii[s][None, :]).any(1)
                sam_covered[s] |= (d <= ref_radii[r][:, None]).any(0)
    return sam_covered.double().mean().item(), ref_covered.double().mean().item()


def _batch_stats(path, acts, feature, keys):
    """Stored (mu, sigma) if the npz has them (ADM's rule: `mu` present -> use stored stats), else
    computed from the activations; None when neither is available."""
    mu_key, sigma_key = ("mu", "sigma") if feature == "pool" else ("mu_s", "sigma_s")
    if "mu" in keys and mu_key in keys:
        if sigma_key not in keys:
            raise UserError(f"{path} stores {mu_key} without {sigma_key}; store both or neither")
        data = np.load(path)
        return _finite_stats(path, f"stored {mu_key}/{sigma_key}", data[mu_key], data[sigma_key])
    if feature in acts:
        return _finite_stats(path, f"{feature} features", *feature_stats(acts[feature]))
    return None


def _finite_stats(path, what, mu, sigma):
    """NaN/inf statistics would print `FID: nan` and exit 0; stop with the file's name instead."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: the {what} statistics contain NaN or inf: the batch is damaged (or its images "
                        f"are); recompute or re-download it")
    return mu, sigma


def check_image_sizes(ref_npz, sample_npz):
    """Reference and sample images must have one resolution: a mismatch is an input error, found before any pass."""
    ref_shape, sample_shape = validate_sample_batch(ref_npz), validate_sample_batch(sample_npz)
    if ref_shape[1:3] != sample_shape[1:3]:
        raise UserError(f"reference {ref_npz} holds {ref_shape[1]}x{ref_shape[2]} images but sample batch "
                        f"{sample_npz} holds {sample_shape[1]}x{sample_shape[2]}: compare batches of one resolution "
                        f"(sample at the reference's --image-size, or use the reference batch of that size)")
    return ref_shape[0], sample_shape[0]


def evaluate(ref_npz, sample_npz, extractor: FeatureExtractor, batch_size=64, device="cpu",
             progress=False, log: Callable[[str], None] = lambda msg: None):
    """IS, FID, sFID, precision, recall of a sample batch against a reference batch (ADM order).

    `batch_size` images go through `extractor` at a time (ADM: 64); `device` runs the P/R distances.

    The reference needs `arr_0` images (for P/R and, without stored stats, FID) or stored `mu`/`sigma`
    (FID only, e.g. MAR's stats file). Metrics the inputs cannot give are None.
    """
    ref_keys, sample_keys = npz_keys(ref_npz), npz_keys(sample_npz)
    if "arr_0" not in ref_keys and "mu" not in ref_keys:
        raise UserError(f"reference {ref_npz} has neither images (arr_0) nor statistics (mu, sigma); "
                        "use an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz")
    n_sample, n_ref = validate_sample_batch(sample_npz)[0], None
    if "arr_0" in ref_keys:
        n_ref, n_sample = check_image_sizes(ref_npz, sample_npz)
        if min(n_ref, n_sample) <= PR_K:  # fail before the slow feature pass
            raise UserError(f"precision/recall needs more than {PR_K} images per batch; "
                            f"got {n_ref} reference and {n_sample} sample images")

    def activations(path):
        n = npz_array_info(path)[0][0]
        return compute_activations(extractor, iter_npz_batches(path, batch_size), progress,
                                   total=-(-n // batch_size))

    with tf32_disabled():
        log("computing reference batch activations...")
        ref_acts = activations(ref_npz) if "arr_0" in ref_keys else {}
        log("computing/reading reference batch statistics...")
        ref_stats = {f: _batch_stats(ref_npz, ref_acts, f, ref_keys) for f in ("pool", "spatial")}
        log("computing sample batch activations...")
        sample_acts = activations(sample_npz)
        log("computing/reading sample batch statistics...")
        sample_stats = {f: _batch_stats(sample_npz, sample_acts, f, sample_keys) for f in ("pool", "spatial")}

        log("Computing evaluations...")
        out = {"IS": inception_score(sample_acts["logits"]) if "logits" in sample_acts else None}
        for name, f in (("FID", "pool"), ("sFID", "spatial")):
            both = ref_stats[f] is not None and sample_stats[f] is not None
            out[name] = frechet_distance(*sample_stats[f], *ref_stats[f]) if both else None
            if both:
                few_images_warning(name, ref_stats[f][0].size, n_ref, n_sample, log)
        if "pool" in ref_acts:
            out["precision"], out["recall"] = precision_recall(ref_acts["pool"], sample_acts["pool"], device=device)
        else:
            out["precision"] = out["recall"] = None
    return out


def few_images_warning(name, dim, n_ref, n_sample, log):
    """FID from fewer images than feature dimensions uses a singular covariance: mostly estimation noise."""
    n = min(v for v in (n_ref, n_sample) if v is not None)
    if n <= dim:
        log(f"warning: {name} from {n} images, no more than the {dim} feature dimensions: its covariance is singular "
            f"and the value is dominated by estimation error (ADM uses 50,000 samples); do not compare it")


def format_report(results):
    """ADM's printout plus the `Latex:` row (IS & FID & sFID & Prec & Rec)."""
    def fmt(v, spec=""):
        return "n/a" if v is None else format(v, spec)

    r = results
    return "\n".join([
        f"Inception Score: {fmt(r['IS'])}", f"FID: {fmt(r['FID'])}", f"sFID: {fmt(r['sFID'])}",
        f"Precision: {fmt(r['precision'])}", f"Recall: {fmt(r['recall'])}",
        "Latex: " + " & ".join(fmt(r[k], ".2f") for k in ("IS", "FID", "sFID", "precision", "recall")),
    ])
