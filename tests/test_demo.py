"""The demo pipeline in a reduced form: every stage runs the real scripts; the report has all rows."""
import json
import math
import os

import pytest
import torch

from demo import METHODS, TEACHERS, Demo, calibration_loss, main, parse_args
from core.errors import UserError


def test_demo_reduced(tmp_path):
    out = tmp_path / "report"
    argv = ["--out", str(out), "--prune-steps", "4", "--finetune-steps", "4", "--samples", "40",
            "--sampling-steps", "4", "--quiet"]
    main(argv)
    report = open(out / "report.md").read()
    results = json.load(open(out / "results.json"))
    assert [r["method"] for r in results] == ["teacher (unpruned)", *METHODS]
    for r in results:
        assert f"| {r['method']} |" in report
        for key in ("FID", "IS", "precision", "recall", "class_acc", "speedup"):
            assert math.isfinite(r[key]), (r["method"], key)
        assert os.path.exists(out / r["grid"])
        assert len(r["kept"]) == (12 if r["method"].startswith("teacher") else 6)
    assert os.path.exists(out / "decisions.png")
    # A second run with other settings is refused; the first run's files stay.
    with pytest.raises(UserError, match="--overwrite"):
        main(argv[:-1] + ["--samples", "50"])
    assert (out / "report.md").exists()


def test_demo_sit_family_runs_every_stage_on_the_sit_teacher(tmp_path):
    """--family SiT: each script gets the SiT teacher and models, and the SiT sampler (fast: commands only)."""
    assert (parse_args([]).out, parse_args([]).teacher) == ("demo_report", TEACHERS["DiT"])
    args = parse_args(["--family", "SiT", "--out", str(tmp_path)])
    assert args.teacher == TEACHERS["SiT"] and args.teacher != TEACHERS["DiT"]
    demo, calls = Demo(args), []
    demo.run = lambda name, script, argv, total=None, desc=None: calls.append((script, [str(a) for a in argv]))
    pruned = demo.prune(0)
    with open(tmp_path / "seed0" / "pruned" / "learned.json", "w") as f:
        json.dump({"pruned_model": "SiT-Tiny-D6/2"}, f)
    demo.finetune(0, "learned", pruned["learned"])
    demo.grid("teacher", demo.model, args.teacher)
    assert [c[0] for c in calls] == ["prune_by_learning.py", "prune_by_score.py", "prune_by_index.py",
                                     "prune_by_score.py", "train_masked_kd.py", "sample.py"]
    for script, argv in calls:
        assert argv[argv.index("--model") + 1] in ("SiT-Tiny/2", "SiT-Tiny-D6/2"), script
        assert args.teacher in argv, script
    kd = calls[4][1]
    assert kd[kd.index("--teacher") + 1] == "SiT-Tiny/2"
    assert calls[5][1][:3] == ["ODE", "--sampling-method", "euler"]


def test_calibration_loss_of_sit_is_the_velocity_mse(tmp_path):
    """The demo's SiT calibration loss is SiT's Linear-path velocity MSE, computed here independently."""
    from tinyfusion.cli import create_model
    from tinyfusion.data import open_feature_store
    from tinyfusion.digits import write_digits_data
    data = str(tmp_path / "digits")
    write_digits_data(data, str(tmp_path / "ref.npz"))
    got = calibration_loss("SiT-Tiny/2", TEACHERS["SiT"], data, batches=2, batch_size=16)
    store, model = open_feature_store(data), create_model("SiT-Tiny/2", (1, 8, 8), 10, TEACHERS["SiT"]).eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(store), generator=g)[:32]
    losses = []
    with torch.no_grad():
        for part in idx.split(16):
            x1 = torch.stack([store[int(j)][0] for j in part])
            y = torch.stack([store[int(j)][1] for j in part])
            t, x0 = torch.rand(16, generator=g), torch.randn(x1.shape, generator=g)
            torch.rand(16, generator=g)  # the label-dropout draw (no dropout at calibration)
            xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0  # Linear path: alpha t, sigma 1 - t
            losses.append(((model(xt, t, y) - (x1 - x0)) ** 2).mean())
    assert got == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
