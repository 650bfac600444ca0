"""Masked KD: the 2-std mask, zero KD terms for identical models, layer maps from records, script run."""
import numpy as np
import pytest
import torch

from models import build_model
from tinyfusion.errors import UserError
from tinyfusion.kd import MaskedKDObjective, layer_map_from_record, masked_rep_loss, parse_layer_map
from tinyfusion.objectives import DiffusionObjective


def test_mask_zeroes_exactly_the_entries_beyond_two_std():
    torch.manual_seed(0)
    teacher = torch.randn(3, 16, 8)
    teacher[0, 2, 5] = 40.0  # a massive activation
    teacher[2, 7, 1] = -35.0
    student = torch.randn(3, 16, 8)
    student[1, 3, 3] = 30.0
    t, s = teacher.numpy().astype(np.float64), student.numpy().astype(np.float64)

    def keep(h, b, strict):
        dev, bound = np.abs(h[b] - h[b].mean()), 2 * h[b].std(ddof=1)
        return dev < bound if strict else dev <= bound

    # official (default): each state masked by its own statistics
    both = [((keep(s, b, True) * s[b] - keep(t, b, True) * t[b]) ** 2).mean() for b in range(3)]
    assert not keep(t, 0, True)[2, 5] and not keep(s, 1, True)[3, 3]
    np.testing.assert_allclose(masked_rep_loss(student, teacher, 2.0).numpy(), both, rtol=1e-5)
    # ours (--rep-mask teacher): the difference masked with the teacher's mask
    ours = [(((s[b] - t[b]) * keep(t, b, False)) ** 2).mean() for b in range(3)]
    np.testing.assert_allclose(masked_rep_loss(student, teacher, 2.0, "teacher").numpy(), ours, rtol=1e-5)


def test_identical_student_and_teacher_give_zero_kd_terms():
    torch.manual_seed(0)
    model = build_model("DiT-Tiny-D4/2", input_size=4, num_classes=4)
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    teacher = build_model("DiT-Tiny-D4/2", input_size=4, num_classes=4)
    teacher.load_state_dict(model.state_dict())
    model.train()
    draws = DiffusionObjective((4, 4, 4)).draw(5, torch.Generator().manual_seed(1))
    draws["t"][0] = 0  # where the official vb_kd is the decoder NLL, not a KL
    x, y = torch.randn(5, 4, 4, 4), torch.randint(0, 4, (5,))
    diff = DiffusionObjective((4, 4, 4)).loss(model, x, y, draws, 0)[0]
    # ours (all output channels, teacher mask): every KD term vanishes, only 0.1 x L_Diff is left
    obj = MaskedKDObjective(DiffusionObjective((4, 4, 4)), model, teacher, [(i, i) for i in range(4)],
                            rep_mask="teacher", kd_channels="all")
    total, logs = obj.loss(model, x, y, draws, 0)
    assert float(logs["kd"]) == 0.0 and float(logs["rep"]) == 0.0 and float(logs["diff"]) > 0
    torch.testing.assert_close(total, 0.1 * diff)
    # official: the eps MSE and the KL vanish; at t = 0 vb_kd is the VB term of the ordinary loss
    obj = MaskedKDObjective(DiffusionObjective((4, 4, 4)), model, teacher, [(i, i) for i in range(4)])
    total, logs = obj.loss(model, x, y, draws, 0)
    terms = obj.base.diffusion.training_losses(model, x, draws["t"], dict(y=y, force_drop_ids=draws["drop"]),
                                               noise=draws["noise"])
    kd = torch.where(draws["t"] == 0, terms["vb"], torch.zeros(()))
    assert float(logs["rep"]) == 0.0
    torch.testing.assert_close(total, 0.9 * kd + 0.1 * diff)


def test_layer_maps_follow_the_reference_tables():
    d14 = {"source_depth": 28, "kept": list(range(0, 28, 2)), "groups": [[1, 2]] * 14}
    assert layer_map_from_record(d14, 28) == [(i, 2 * i + 1) for i in range(14)]
    # D19 from XL: groups of 4 keeping 3,3,2,3,2,3,3 blocks.
    keep_counts, kept = [3, 3, 2, 3, 2, 3, 3], []
    for g, n in enumerate(keep_counts):
        kept += [4 * g + j for j in range(n)]
    d19 = {"source_depth": 28, "kept": kept, "groups": [[n, 4] for n in keep_counts]}
    pairs = layer_map_from_record(d19, 28)
    assert [s for s, _ in pairs] == [2, 5, 7, 10, 12, 15, 18]
    assert [t for _, t in pairs] == [3, 7, 11, 15, 19, 23, 27]
    oracle = {"source_depth": 28, "kept": [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]}
    assert layer_map_from_record(oracle, 28) == [(i, 2 * i + 1) for i in range(14)]
    with pytest.raises(UserError, match="depth-28"):
        layer_map_from_record(d14, 14)
    with pytest.raises(UserError, match="out of range"):
        parse_layer_map("0:1,14:3", 14, 28)
    assert parse_layer_map("[[0, 1], [1, 3]]", 14, 28) == [(0, 1), (1, 3)]


def test_width_mismatch_is_refused():
    with torch.device("meta"):
        s, t = build_model("DiT-Tiny-D2/2", input_size=4), build_model("DiT-S-D4/2", input_size=4)
    with pytest.raises(UserError, match="width"):
        MaskedKDObjective(DiffusionObjective((4, 4, 4)), s, t, [(0, 1)])


@pytest.mark.parametrize("family", ["DiT", "SiT"])
def test_train_masked_kd_runs_end_to_end(tmp_path, family):
    from test_train import make_store
    from tinyfusion.checkpoint import save_weights
    from train_masked_kd import main
    store = make_store(str(tmp_path / "store"))
    torch.manual_seed(0)
    teacher = build_model(f"{family}-Tiny-D4/2", input_size=4, num_classes=4)
    save_weights(teacher.state_dict(), tmp_path / "teacher.pt")
    from tinyfusion.pruning import write_pruned
    write_pruned(tmp_path / "student.pt", f"{family}-Tiny-D4/2", str(tmp_path / "teacher.pt"), teacher.state_dict(),
                 teacher.block_lists, [0, 2], "index", groups=[[1, 2], [1, 2]])
    main(["--model", f"{family}-Tiny-D2/2", "--load-weight", str(tmp_path / "student.pt"), "--teacher",
          f"{family}-Tiny-D4/2", "--load-teacher", str(tmp_path / "teacher.pt"), "--data-path", store,
          "--image-size", "32", "--num-classes", "4", "--num-workers", "0", "--global-batch-size", "8",
          "--max-steps", "3", "--log-every", "1", "--results-dir", str(tmp_path / "out"), "--prefix", "kd",
          "--save-model", str(tmp_path / "final.pt"),
          # the speed switches, one family each: they must not change what the script does
          *(["--teacher-precision", "bf16", "--grad-checkpointing"] if family == "SiT" else ["--no-fused-adamw"])])
    log = open(tmp_path / "out" / "kd" / "log.txt").read()
    assert "layer map [(0, 1), (1, 3)]" in log and "(step=0000003)" in log
    assert (tmp_path / "final.pt").exists()
