"""The demo pipeline in a reduced form: every stage runs the real scripts; the report has all rows."""
import json
import math
import os

import pytest

from demo import METHODS, main
from tinyfusion.errors import UserError


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
