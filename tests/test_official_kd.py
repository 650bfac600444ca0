"""Masked KD and the BI score against golden outputs of the official TinyFusion code
(tests/fixtures/official_kd.safetensors: tiny teacher/student, inputs and the official terms)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from diffusion import create_diffusion
from models.dit import DiT
from tinyfusion.pruning import bi_importance_clean, choose_removed

GOLDEN = load_file(Path(__file__).parent / "fixtures" / "official_kd.safetensors")
TERMS = ("loss", "kd_loss", "gt", "mse", "vb", "vb_kd")


def official_model(prefix, depth):
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=depth, num_heads=4, num_classes=10)
    model.load_state_dict({k[len(prefix):]: v for k, v in GOLDEN.items() if k.startswith(prefix)})
    return model.eval()


class Wrapped(torch.nn.Module):
    """Stands in for DDP: the student behind `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def official_setup():
    """As the official train_masked_kd.py: `target_layer` and `.feature` hooks, student wrapped."""
    student, teacher = official_model("student.", 2), official_model("teacher.", 4)

    def hook(module, args, output):
        module.feature = output

    for s, t in GOLDEN["layer_map"].tolist():
        student.blocks[s].target_layer = t
        student.blocks[s].register_forward_hook(hook)
        teacher.blocks[t].register_forward_hook(hook)
    return Wrapped(student), teacher


def inputs():
    return dict(x_start=GOLDEN["x_start"], t=GOLDEN["t"], model_kwargs=dict(y=GOLDEN["y"]), noise=GOLDEN["noise"])


def assert_terms(ours, prefix, names):
    for name in names:
        torch.testing.assert_close(ours[name].detach(), GOLDEN[f"{prefix}.{name}"], rtol=1e-5, atol=0,
                                   msg=lambda m: f"{prefix}.{name}: {m}")


@pytest.mark.parametrize("beta,alpha", [(0.01, 0.9), (0.5, 0.7)])
def test_kd_rep_terms_match_the_official_code(beta, alpha):
    student, teacher = official_setup()
    ours = create_diffusion("").training_losses_kd_rep(student, teacher, **inputs(), beta_feat=beta, alpha_kd=alpha)
    assert_terms(ours, f"kd_rep_beta{beta}_alpha{alpha}", TERMS + ("feat_loss",))


def test_kd_rep_with_a_layer_map_matches_without_hooks():
    student, teacher = official_model("student.", 2), official_model("teacher.", 4)
    layer_map = [tuple(p) for p in GOLDEN["layer_map"].tolist()]
    ours = create_diffusion("").training_losses_kd_rep(student, teacher, **inputs(), beta_feat=0.5, alpha_kd=0.7,
                                                        layer_map=layer_map)
    assert_terms(ours, "kd_rep_beta0.5_alpha0.7", TERMS + ("feat_loss",))
    assert not hasattr(student.blocks[0], "feature")  # our temporary hooks leave nothing behind


def test_kd_terms_match_the_official_code():
    student, teacher = official_setup()
    ours = create_diffusion("").training_losses_kd(student, teacher, **inputs(), alpha_kd=0.9)
    assert_terms(ours, "kd_alpha0.9", TERMS)


def test_a_layer_map_naming_a_missing_block_is_one_clear_error():
    student, teacher = official_model("student.", 2), official_model("teacher.", 4)
    with pytest.raises(UserError, match="pair 2:3 names a block the models lack"):
        create_diffusion("").training_losses_kd_rep(student, teacher, **inputs(), layer_map=[(0, 1), (2, 3)])


def test_bi_scores_and_removed_blocks_match_the_official_code():
    teacher, n = official_model("teacher.", 4), int(GOLDEN["bi.batch_size"])
    x, t, y = GOLDEN["bi.x"], GOLDEN["bi.t"], GOLDEN["bi.y"]
    batches = [(x[i:i + n], t[i:i + n], y[i:i + n]) for i in range(0, len(x), n)]
    importance = bi_importance_clean(teacher.train(), batches)
    similarity = 1.0 - torch.tensor(importance, dtype=torch.float64)
    torch.testing.assert_close(similarity, GOLDEN["bi.scores"].double(), rtol=1e-5, atol=0)
    assert choose_removed(importance, 2) == GOLDEN["bi.removed_n2"].tolist()
    assert teacher.training  # scored in eval mode, then restored
