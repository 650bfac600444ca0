"""Masked KD: the 2-std mask, zero KD terms for identical models, layer maps from records, script run."""
import numpy as np
import pytest
import torch

from core.errors import UserError
from models import build_model
from tinyfusion.errors import run_main
from tinyfusion.families.dit import DiffusionObjective
from tinyfusion.kd import MaskedKDObjective, choose_layer_map, layer_map_from_record, masked_rep_loss, parse_layer_map


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


def test_official_layer_map_tables_are_the_default_for_their_students():
    """The official train_masked_kd.py's tables; a BI- or index-pruned D14 student's record gives other pairs."""
    bi_d14 = {"source_depth": 28, "kept": list(range(13)) + [27]}  # no groups: even groups of 2
    pairs, origin = choose_layer_map("DiT-D14/2", 14, 28, record=bi_d14)
    assert pairs == [(s, 2 * s + 1) for s in range(14)] and origin == "the official table"
    assert choose_layer_map("DiT-D14/2", 14, 28, source="record", record=bi_d14)[0] == \
        [(1, 1), (3, 3), (5, 5), (7, 7), (9, 9), (11, 11), (12, 13), (13, 27)]
    two_of_four = {"source_depth": 28, "kept": [4 * g + j for g in range(7) for j in (0, 1)], "groups": [[2, 4]] * 7}
    assert choose_layer_map("DiT-D14/2", 14, 28, record=two_of_four)[0] == [(s, 2 * s + 1) for s in range(14)]
    assert choose_layer_map("DiT-D14/2", 14, 28, source="record", record=two_of_four)[0] == \
        [(2 * g + 1, 4 * g + 3) for g in range(7)]
    d19 = choose_layer_map("DiT-D19/2", 19, 28, record=None)[0]
    assert d19 == list(zip([2, 5, 7, 10, 12, 15, 18], [3, 7, 11, 15, 19, 23, 27]))
    assert choose_layer_map("DiT-D7/2", 7, 14)[0] == [(s, 2 * s + 1) for s in range(7)]  # D7 from D14
    seven_of_fourteen = {"source_depth": 28, "kept": list(range(7)) + list(range(14, 21)), "groups": [[7, 14]] * 2}
    assert choose_layer_map("DiT-D14/2", 14, 28, source="record", record=seven_of_fourteen)[0] == [(6, 13), (13, 27)]
    # other students, or a teacher the table is not for: the record
    d7_from_xl = {"source_depth": 28, "kept": list(range(0, 28, 4)), "groups": [[1, 4]] * 7}
    assert choose_layer_map("DiT-D7/2", 7, 28, record=d7_from_xl) == ([(s, 4 * s + 3) for s in range(7)],
                                                                       "the pruning record")
    assert choose_layer_map("DiT-D14/2", 14, 28, spec="0:1,13:27", record=bi_d14)[0] == [(0, 1), (13, 27)]
    with pytest.raises(UserError, match="no official layer-map table for DiT-S-D6/2"):
        choose_layer_map("DiT-S-D6/2", 6, 12, source="table")
    with pytest.raises(UserError, match="depth-28 teacher, not 14"):
        choose_layer_map("DiT-D14/2", 14, 14, source="table")


def test_masked_kd_defaults_are_the_official_recipe():
    from train_masked_kd import build_parser
    args = build_parser().parse_args(["--load-teacher", "t.pt", "--data-path", "d"])
    assert (args.precision, args.grad_clip, args.rep_mask, args.kd_channels, args.layer_map_source) == \
        ("fp16", 1.0, "both", "eps", "auto")
    assert args.alpha_diff is None and args.alpha_kd == 0.9  # L_Diff weight 1 - alpha_kd, as official


def test_width_mismatch_is_refused():
    with torch.device("meta"):
        s, t = build_model("DiT-Tiny-D2/2", input_size=4), build_model("DiT-S-D4/2", input_size=4)
    with pytest.raises(UserError, match="width"):
        MaskedKDObjective(DiffusionObjective((4, 4, 4)), s, t, [(0, 1)])


@pytest.mark.parametrize("family", ["DiT", "SiT"])
def test_train_masked_kd_runs_end_to_end(tmp_path, family, capsys):
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
    if family == "SiT":
        return
    # bad input: one line naming the flag (argparse: after the usage line), nothing written
    base = ["--model", "DiT-Tiny-D2/2", "--load-weight", str(tmp_path / "student.pt"), "--teacher", "DiT-Tiny-D4/2",
            "--load-teacher", str(tmp_path / "teacher.pt"), "--data-path", store, "--image-size", "32",
            "--num-classes", "4", "--num-workers", "0", "--results-dir", str(tmp_path / "bad")]
    for extra, message in ((["--rep-mask", "student"], "argument --rep-mask: invalid choice: 'student'"),
                           (["--layer-map", "0:1,2:3"], "--layer-map pairs [(2, 3)] are out of range"),
                           (["--layer-map-source", "table"], "no official layer-map table for DiT-Tiny-D2/2")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: main(base + extra))
        assert e.value.code != 0
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
