"""Pruned checkpoints (slice + renumber, names, records), score baselines on planted structure, and the
prune_by_index / prune_by_score scripts end to end and on bad input."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.errors import UserError
from models import DiT, build_model
from tinyfusion.checkpoint import load_weights, read_weights, save_weights
from tinyfusion.errors import run_main
from tinyfusion.families.dit import DiffusionObjective
from tinyfusion.pruning import (ORACLE_KEPT, choose_removed, kept_state_dict, parse_kept_indices, pruned_model_name,
                                read_record, save_pruned, score_blocks)
from test_layer_mask import TINY, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- indices, names, files

def test_parse_kept_indices():
    assert parse_kept_indices("[4, 0, 2]", 6) == [0, 2, 4]
    assert parse_kept_indices("1,3", 6) == [1, 3]
    for spec, needle in [("[0, 6]", "out of range"), ("[-1]", "out of range"), ("[1, 1, 2]", "more than once"),
                         ("[]", "empty"), ("[0.5]", "integers"), ("zero", "not a list")]:
        with pytest.raises(UserError, match=needle):
            parse_kept_indices(spec, 6)
    assert ORACLE_KEPT[28] == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]


def test_kept_state_dict_renumbers_each_list():
    sd = {"embed": torch.tensor(-1.0)}
    for name, n in (("encoder_blocks", 3), ("decoder_blocks", 3)):
        for i in range(n):
            sd[f"{name}.{i}.w"] = torch.tensor(float(i + (10 if name[0] == "d" else 0)))
    sd["head"] = torch.tensor(-2.0)
    out = kept_state_dict(sd, ("encoder_blocks", "decoder_blocks"), [5, 0, 3])
    assert out == {"embed": sd["embed"], "encoder_blocks.0.w": sd["encoder_blocks.0.w"],
                   "decoder_blocks.0.w": sd["decoder_blocks.0.w"], "decoder_blocks.1.w": sd["decoder_blocks.2.w"],
                   "head": sd["head"]}
    with pytest.raises(UserError, match="out of range"):
        kept_state_dict(sd, ("encoder_blocks", "decoder_blocks"), [6])


@pytest.mark.parametrize("source, kept, depths, name", [
    ("DiT-XL/2", list(range(14)), [28], "DiT-D14/2"), ("DiT-S/2", [0, 2, 4, 6, 8, 10], [12], "DiT-S-D6/2"),
    ("DiT-D14/2", [0, 2, 4, 6, 8, 10, 12], [14], "DiT-D7/2"), ("SiT-XL/4", [0, 1], [28], "SiT-D2/4"),
    ("DiT-S-D4/2", [0, 3], [4], "DiT-S-D2/2"), ("MAR-L", list(range(0, 32, 2)), [16, 16], "MAR-L-D16"),
    ("MAR-B", list(range(10)), [12, 12], "MAR-B-E10D0"), ("MAR-L", [0, 16, 17], [16, 16], "MAR-L-E1D2"),
])
def test_pruned_model_names(source, kept, depths, name):
    assert pruned_model_name(source, kept, depths) == name


def test_pruned_names_resolve_in_the_registry():
    sd = tiny_model(DiT, depth=4).state_dict()
    with torch.device("meta"):
        model = build_model(pruned_model_name("DiT-S/2", [0, 1], [4]), **TINY)
    assert model.depth == 2 and model.blocks[0].attn.qkv.weight.shape == sd["blocks.0.attn.qkv.weight"].shape


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_save_pruned_and_read_record(tmp_path, ext):
    sd = {"a": torch.arange(3.0)}
    path = tmp_path / f"out{ext}"
    assert read_record(path) is None
    save_pruned(path, sd, {"kept": [0, 2], "method": "x"})
    assert json.loads((tmp_path / "out.json").read_text())["kept"] == [0, 2]
    assert read_record(path) == {"kept": [0, 2], "method": "x"}
    assert torch.equal(read_weights(path)["a"], sd["a"])
    with pytest.raises(UserError, match="weights path"):
        save_pruned(tmp_path / "x.json", sd, {})


def test_choose_removed_never_removes_the_last_block():
    assert choose_removed([0.5, 0.1, 0.3, 0.0], 2) == [1, 2]
    assert choose_removed([0.2, 0.2, 0.9, 0.0], 1) == [0]  # tie: lower index first
    with pytest.raises(UserError, match="--n-pruned 4"):
        choose_removed([0.0] * 4, 4)


# ----------------------------------------------------------------------------- scores

def planted_model():
    """Depth 8: blocks 1,3,5,7 carry signal; the adaLN gates of 0,2,4,6 are zero, so those are exact identities."""
    model = tiny_model(DiT, depth=8)
    hidden = TINY["hidden_size"]
    with torch.no_grad():
        for i in (0, 2, 4, 6):
            lin = model.blocks[i].adaLN_modulation[-1]
            for chunk in (2, 5):  # gate_msa, gate_mlp
                lin.weight[chunk * hidden:(chunk + 1) * hidden] = 0
                lin.bias[chunk * hidden:(chunk + 1) * hidden] = 0
    return model


def calib_batches(n=2, size=4):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 4, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


class TeacherObjective(DiffusionObjective):
    """Loss = distance to the unpruned model's output, so removing any signal block strictly raises it."""

    def __init__(self, teacher):
        super().__init__((4, 8, 8), class_dropout_prob=0.0)
        self.teacher = teacher

    def loss(self, model, x, y, draws, step):
        x_t = self.diffusion.q_sample(x, draws["t"], draws["noise"])
        return (model(x_t, draws["t"], y) - self.teacher(x_t, draws["t"], y)).square().flatten(1).mean(1), {}


@pytest.mark.parametrize("method", ["bi", "sensitivity", "output-error"])
def test_scores_find_the_planted_signal_blocks(method):
    model = planted_model()
    objective = TeacherObjective(copy.deepcopy(model)) if method == "sensitivity" else \
        DiffusionObjective((4, 8, 8), class_dropout_prob=0.0)
    importance = score_blocks(model, method, calib_batches(), objective, seed=0)
    assert choose_removed(importance, 4) == [0, 2, 4, 6], importance
    assert max(importance[i] for i in (0, 2, 4, 6)) < 1e-5 < min(importance[i] for i in (1, 3, 5, 7))
    assert type(model) is DiT and not hasattr(model, "layer_mask")  # scoring leaves the model as it was


def test_sensitivity_equals_brute_force_pruned_losses():
    model = tiny_model(DiT, depth=4)
    objective = DiffusionObjective((4, 8, 8), class_dropout_prob=0.0)
    batches = calib_batches(n=1)
    scores = score_blocks(model, "sensitivity", batches, objective, seed=5)
    (x, y), = batches
    draws = objective.draw(len(x), torch.Generator().manual_seed(5 * 100_003))  # score_blocks' draw for batch 0

    def loss(kept):
        pruned = DiT(depth=len(kept), **TINY).eval()
        pruned.load_state_dict(kept_state_dict(model.state_dict(), ("blocks",), kept))
        with torch.no_grad():
            return objective.loss(pruned, x, y, draws, 0)[0].double().mean().item()

    base = loss([0, 1, 2, 3])
    expected = [loss([j for j in range(4) if j != i]) - base for i in range(4)]
    assert np.allclose(scores, expected, rtol=1e-4, atol=1e-6)


def test_magnitude_and_random_scores():
    model = tiny_model(DiT, depth=3)
    expected = [np.mean(np.concatenate([p.detach().abs().numpy().ravel() for p in b.parameters()]))
                for b in model.blocks]
    assert np.allclose(score_blocks(model, "magnitude"), expected, rtol=1e-5)
    assert score_blocks(model, "random", seed=1) == score_blocks(model, "random", seed=1)
    assert score_blocks(model, "random", seed=1) != score_blocks(model, "random", seed=2)
    with pytest.raises(UserError, match="unknown scoring method"):
        score_blocks(model, "taylor")


# ----------------------------------------------------------------------------- scripts

@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    """A small registry model (DiT-S-D4/2 at 32 px, 10 classes) with random weights, saved as .pt."""
    torch.manual_seed(0)
    model = build_model("DiT-S-D4/2", input_size=4, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("src") / "src.pt"
    save_weights(model.state_dict(), path)
    return path, model.state_dict()


COMMON = ["--model", "DiT-S-D4/2", "--image-size", "32", "--num-classes", "10"]


def _run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *COMMON, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _check_output(path, source_sd, kept, method):
    record = read_record(path)
    assert record["pruned_model"] == "DiT-S-D2/2" and record["kept"] == kept and record["method"] == method
    assert record["removed"] == [i for i in range(4) if i not in kept] and record["source_model"] == "DiT-S-D4/2"
    pruned = load_weights(build_model("DiT-S-D2/2", input_size=4, num_classes=10), path, "DiT-S-D2/2")
    for new, old in enumerate(kept):
        assert torch.equal(pruned.blocks[new].mlp.fc1.weight, source_sd[f"blocks.{old}.mlp.fc1.weight"])
    return record


def test_prune_by_index_end_to_end(tmp_path, source_ckpt):
    ckpt, sd = source_ckpt
    out = tmp_path / "pruned.pt"
    r = _run_script("prune_by_index.py", "--ckpt", ckpt, "--kept-indices", "[3, 1]", "--save-model", out)
    assert r.returncode == 0, r.stderr
    assert "DiT-S-D2/2" in r.stdout
    _check_output(out, sd, [1, 3], "index")


def test_prune_by_score_end_to_end(tmp_path, source_ckpt):
    ckpt, sd = source_ckpt
    out = tmp_path / "pruned.safetensors"
    r = _run_script("prune_by_score.py", "--ckpt", ckpt, "--save-model", out, "--n-pruned", 2, "--method", "bi",
                    "--calib-random", "--nsamples", 4, "--batch-size", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    record = read_record(out)
    assert len(record["importance"]) == 4 and record["calibration"]["data"] == "gaussian"
    assert record["calibration"]["inputs"] == "clean"  # the official BI calibration is the DiT default
    kept = [i for i in range(4) if i not in choose_removed(record["importance"], 2)]
    _check_output(out, sd, kept, "bi")


def _reference_store(path, n=6):
    g = np.random.default_rng(0)
    for sub in ("imagenet256_features", "imagenet256_labels"):
        (path / sub).mkdir(parents=True)
    for i in range(n):
        np.save(path / "imagenet256_features" / f"{i}.npy", g.standard_normal((2, 4, 4, 4)).astype("f4"))
        np.save(path / "imagenet256_labels" / f"{i}.npy", np.array([i % 10]))
    return str(path)


def test_prune_by_score_reads_a_feature_store(tmp_path, source_ckpt):
    """The reference layout (one .npy per latent) as calibration data, in process."""
    import prune_by_score
    store = _reference_store(tmp_path / "store")
    out = tmp_path / "pruned.pt"
    argv = COMMON + ["--ckpt", str(source_ckpt[0]), "--save-model", str(out), "--n-pruned", "2", "--method",
                     "output-error", "--data-path", store, "--nsamples", "6", "--batch-size", "3", "--device", "cpu"]
    prune_by_score.main(prune_by_score.build_parser().parse_args(argv))
    record = read_record(out)
    assert record["calibration"] == {"data": store, "nsamples": 6, "batch_size": 3, "inputs": "noised"}
    assert min(record["importance"]) > 0  # skipping any block with random adaLN weights changes the output
    _check_output(out, source_ckpt[1], [i for i in range(4) if i not in choose_removed(record["importance"], 2)],
                  "output-error")


def test_bi_on_clean_latents_removes_a_planted_identity_block(tmp_path, source_ckpt):
    """The official BI calibration (the DiT default) on a feature store: a block whose residual branches are
    zero maps its input to itself (cosine similarity 1), so it is the first removed."""
    import prune_by_score
    sd = read_weights(source_ckpt[0])
    for k in ("blocks.2.attn.proj", "blocks.2.mlp.fc2"):
        sd[k + ".weight"].zero_()
        sd[k + ".bias"].zero_()
    save_weights(sd, tmp_path / "planted.pt")
    out = tmp_path / "bi.pt"
    argv = COMMON + ["--ckpt", str(tmp_path / "planted.pt"), "--save-model", str(out), "--n-pruned", "1",
                     "--data-path", _reference_store(tmp_path / "store"), "--nsamples", "6", "--batch-size", "4"]
    prune_by_score.main(prune_by_score.build_parser().parse_args(argv))
    record = read_record(out)
    assert record["method"] == "bi" and record["calibration"]["inputs"] == "clean"
    assert record["removed"] == [2] and abs(record["importance"][2]) < 1e-6 and min(record["importance"]) >= 0


def _in_process(module, argv, capsys):
    """Run a script's main like the command line does; returns (exit code, stderr)."""
    import importlib
    script = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: script.main(script.build_parser().parse_args(argv)))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("module, extra, needle", [
    ("prune_by_index", ["--kept-indices", "[0, 4]"], "out of range"),
    ("prune_by_index", ["--kept-indices", "[0, 1, 1]"], "more than once"),
    ("prune_by_index", ["--preset", "oracle"], "oracle"),
    ("prune_by_index", [], "exactly one of"),
    ("prune_by_score", ["--n-pruned", "4", "--calib-random"], "--n-pruned 4"),
    ("prune_by_score", ["--n-pruned", "1", "--data-path", "/nonexistent/features"], "does not exist"),
    ("prune_by_score", ["--n-pruned", "1", "--calib-random", "--image-size", "36"], "multiple of 8"),
])
def test_scripts_refuse_bad_input(tmp_path, source_ckpt, capsys, module, extra, needle):
    out = tmp_path / "out" / "pruned.pt"
    code, err = _in_process(module, COMMON + ["--ckpt", str(source_ckpt[0]), "--save-model", str(out)] + extra, capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()

