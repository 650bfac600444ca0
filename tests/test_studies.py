"""The recoverability study: its statistics against scipy and hand computations, and a reduced run."""
import json

import numpy as np
import pytest
import scipy.stats

from core.errors import UserError
from studies.rank_stats import average_ranks, bootstrap_interval, kendall_tau_b, percentile, spearman
from studies.recoverability import all_subnets, constrained_pick, fits, main


def test_rank_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for n in (5, 17, 64):
        a = rng.integers(0, 6, n).astype(float)  # many ties
        b = np.round(a + rng.normal(0, 2, n))  # ties in both
        np.testing.assert_allclose(average_ranks(a), scipy.stats.rankdata(a))
        assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
        assert kendall_tau_b(a, b) == pytest.approx(scipy.stats.kendalltau(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


def test_bootstrap_interval_brackets_the_statistic():
    rng = np.random.default_rng(1)
    a = rng.normal(size=40)
    b = a + rng.normal(scale=0.5, size=40)
    lo, hi = bootstrap_interval(a, b, spearman, n_boot=300, seed=0)
    assert lo < spearman(a, b) < hi and hi - lo < 0.5
    assert (lo, hi) == bootstrap_interval(a, b, spearman, n_boot=300, seed=0)  # seeded


def test_percentile_by_hand():
    pop = [1.0, 2.0, 3.0, 4.0]
    assert percentile(1.0, pop) == 100.0          # member: 3 others, all worse
    assert percentile(4.0, pop) == 0.0
    assert percentile(2.0, pop) == pytest.approx(200 / 3)  # 3.0 and 4.0 of the 3 others
    assert percentile(2.5, pop) == 50.0           # outsider: 2 of 4 worse
    assert percentile(2.0, [1.0, 2.0, 2.0, 3.0]) == pytest.approx(100 / 3)  # ties are not worse
    assert percentile(4.0, pop, lower_is_better=False) == 100.0  # accuracy: higher is better


def test_subnet_families():
    assert len(all_subnets("1:2")) == 64 and len(all_subnets("1:4")) == 64 and len(all_subnets("2:4")) == 216
    assert len({tuple(k) for k in all_subnets("1:2")}) == 64
    assert all(len(k) == 3 for k in all_subnets("1:4"))
    assert fits([0, 2, 4, 7, 9, 11], "1:2") and not fits([0, 1, 2, 4, 8, 11], "1:2")
    importance = [5, 1, 0, 2, 3, 3, 9, 8, 0, 1, 4, 7]
    assert constrained_pick(importance, "1:2") == [0, 3, 4, 6, 9, 11]  # 4 vs 5 tie: lower index
    assert constrained_pick(importance, "1:4") == [0, 6, 11]


def test_reduced_study(tmp_path):
    """3 subnets, 2 fine-tuning steps, a 2-step search: the report's correlations and percentiles are
    recomputed here from the stored rows with scipy and by hand."""
    argv = ["--results", str(tmp_path / "res"), "--figures", str(tmp_path / "fig"), "--work", str(tmp_path / "w"),
            "--patterns", "1:2", "--budgets", "2", "--limit", "4", "--samples", "20", "--sampling-steps", "2",
            "--searches", "1:2 frozen lr1e-3", "--search-steps", "2", "--scores", "magnitude", "--quiet"]
    main(argv)
    rows = [json.loads(line) for line in open(tmp_path / "res" / "subnets.jsonl")]
    done = [r for r in rows if r["budget"] == 2 and r["pattern"] == "1:2" and fits(r["kept"], "1:2")]
    assert len(done) == 4 and all(np.isfinite(r["FID"]) and 0 <= r["class_acc"] <= 1 for r in done)
    summary = json.load(open(tmp_path / "res" / "summary.json"))
    calib, fid = [r["calib_loss"] for r in done], [r["FID"] for r in done]
    assert summary["n_subnets"] == 4
    assert summary["corr_FID"]["spearman"] == pytest.approx(scipy.stats.spearmanr(calib, fid).statistic)
    assert summary["corr_FID"]["kendall"] == pytest.approx(scipy.stats.kendalltau(calib, fid).statistic)
    methods = [json.loads(line) for line in open(tmp_path / "res" / "methods.jsonl")]
    search = next(m for m in methods if m["kind"] == "search")
    pick = next(p for p in summary["picks"] if p["method"].startswith("learned"))
    assert pick["kept"] == search["kept"]
    best = min(done, key=lambda r: r["calib_loss"])
    mincal = next(p for p in summary["picks"] if p["method"] == "min calibration loss")
    assert mincal["kept"] == best["kept"] and mincal["calib_pct"] == 100.0
    others = [f for r, f in zip(done, fid) if r["kept"] != best["kept"]]  # its FID percentile, by hand
    assert mincal["FID_pct"] == pytest.approx(100 * sum(f > best["FID"] for f in others) / 3)
    # Finished rows are reused; other settings are refused and the rows stay.
    before = open(tmp_path / "res" / "subnets.jsonl").read()
    main(argv + ["--part", "enumerate"])
    assert open(tmp_path / "res" / "subnets.jsonl").read() == before
    with pytest.raises(UserError, match="other settings"):
        main(argv[:-1] + ["--samples", "30"])
    assert open(tmp_path / "res" / "subnets.jsonl").read() == before


def test_visualize_activation_stats(tmp_path):
    """block_stats by hand, then the script's summary against a forward pass hooked here."""
    import torch
    from visualize_activation import block_stats, main as visualize
    h = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0]]])  # one outlier of 10 entries
    s = block_stats(h, 2.0)
    assert s["max_abs"].item() == 10.0 and s["median_abs"].item() == 0.0
    assert s["outlier_share"].item() == pytest.approx(0.1)  # |10 - 1| = 9 > 2 * std (= 6.3)
    out = tmp_path / "act.png"
    visualize(["--num-samples", "2", "--timesteps", "999", "--out", str(out)])
    assert out.stat().st_size > 1000
    import json as _json
    stats = _json.load(open(tmp_path / "act.json"))["stats"]["999"]
    from tinyfusion.digits import load_digits_teacher, load_split
    model = load_digits_teacher()
    seen = {}
    model.blocks[11].register_forward_hook(lambda m, a, o: seen.update(h=o))
    g = torch.Generator().manual_seed(0)
    x, y, _, _ = load_split()
    idx = torch.randperm(len(x), generator=g)[:2].numpy()
    x0 = torch.from_numpy(x[idx])
    noise = torch.randn(x0.shape, generator=g)
    from diffusion import create_diffusion
    t = torch.full((2,), 999)
    with torch.no_grad():
        model(create_diffusion("").q_sample(x0, t, noise=noise), t, torch.from_numpy(y[idx]))
    expected = seen["h"].abs().flatten(1).amax(1).tolist()
    assert stats[11]["max_abs"] == pytest.approx(expected, rel=1e-5)
