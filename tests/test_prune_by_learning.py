"""prune_by_learning: finds planted signal blocks (1:2 and 2:4), writes exact pruned checkpoints, resumes."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from models import build_model
from prune_by_learning import main as prune_main
from test_train import make_store
from tinyfusion.checkpoint import load_weights, read_weights, save_weights
from tinyfusion.families.dit import DiffusionObjective
from tinyfusion.runtime import Runtime
from tinyfusion.trainer import TrainConfig, Trainer

KW = dict(input_size=4, num_classes=4)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 4-block DiT whose blocks 1 and 3 are trained, 0 and 2 near-identity (tiny random gates)."""
    root = tmp_path_factory.mktemp("planted")
    store = make_store(str(root / "store"), n=64)
    torch.manual_seed(0)
    small = build_model("DiT-Tiny-D2/2", **KW)
    config = TrainConfig(global_batch_size=16, max_steps=300, lr=2e-3, grad_clip=1.0, ema_decay=0.0, num_workers=0,
                         log_every=1000, ckpt_every=10_000, results_dir=str(root / "pre"))
    from tinyfusion.data import open_feature_store
    Trainer(Runtime(), small, DiffusionObjective((4, 4, 4)), open_feature_store(store), config).fit()
    big = build_model("DiT-Tiny-D4/2", **KW)
    sd = big.state_dict()
    trained = small.state_dict()
    for k, v in trained.items():
        if not k.startswith("blocks."):
            sd[k] = v
    for i in (0, 1):
        for k, v in trained.items():
            if k.startswith(f"blocks.{i}."):
                sd[k.replace(f"blocks.{i}.", f"blocks.{2 * i + 1}.", 1)] = v
    g = torch.Generator().manual_seed(1)
    for i in (0, 2):  # random block with gates ~1e-3: almost the identity
        sd[f"blocks.{i}.adaLN_modulation.1.weight"] = 1e-3 * torch.randn(sd[f"blocks.{i}.adaLN_modulation.1.weight"].shape, generator=g)
    save_weights(sd, root / "planted.pt")
    return SimpleNamespace(store=store, ckpt=str(root / "planted.pt"), root=root)


def run_prune(planted, out, groups, steps, extra=()):
    argv = ["--model", "DiT-Tiny-D4/2", "--groups", groups, "--load-weight", planted.ckpt, "--data-path", planted.store,
            "--image-size", "32", "--num-classes", "4", "--num-workers", "0", "--global-batch-size", "16",
            "--max-steps", str(steps), "--precision", "fp32", "--delta-w", "--lora", "--lora-rank", "4",
            "--log-every", "10", "--results-dir", str(out), "--save-model", str(out / "pruned.pt"),
            "--lr", "1e-3", *extra]
    prune_main(argv)
    return json.load(open(out / "pruned.json"))


@pytest.mark.parametrize("groups", ["1:2", "[[2,4]]"])
def test_finds_the_signal_blocks(planted, tmp_path, groups):
    record = run_prune(planted, tmp_path, groups, steps=200 if groups == "1:2" else 250)
    assert record["kept"] == [1, 3], record
    assert os.path.exists(tmp_path / "learn_mask-DiT-Tiny-D4-2" / "decisions.png")
    # The output is the ORIGINAL weights of the kept blocks, renumbered, loadable strictly as a depth-2 model.
    pruned = load_weights(build_model(record["pruned_model"], **KW), tmp_path / "pruned.pt")
    orig = read_weights(planted.ckpt)
    for k, v in pruned.state_dict().items():
        src = k.replace("blocks.0.", "blocks.1.", 1).replace("blocks.1.", "blocks.3.", 1) \
            if k.startswith("blocks.1.") else k.replace("blocks.0.", "blocks.1.", 1)
        assert torch.equal(v, orig[src]), k


def test_resume_continues_from_the_saved_step(planted, tmp_path, capsys):
    run_prune(planted, tmp_path, "1:2", steps=4, extra=["--ckpt-every", "2"])
    # resumed with gradient checkpointing: a memory switch, it must not change what is learned
    run_prune(planted, tmp_path, "1:2", steps=8, extra=["--ckpt-every", "2", "--resume", "auto", "--grad-checkpointing"])
    out = capsys.readouterr().out
    assert "at step 4" in out and "training 8 steps from step 4" in out
    assert os.path.exists(tmp_path / "learn_mask-DiT-Tiny-D4-2" / "checkpoints" / "0000008.pt")


def test_bad_groups_write_nothing(planted, tmp_path, capsys):
    from core.errors import UserError
    for groups in ("[[1,2]]", "[[1,2],[1,3]]", "[[3,2],[1,2]]", "[[0,2],[1,2]]"):
        with pytest.raises(UserError):
            run_prune(planted, tmp_path, groups, steps=2)
    assert not (tmp_path / "pruned.pt").exists()
