"""Checkpoint I/O: every supported format loads, unsafe pickles are refused, mismatches are explained."""
import argparse
import os
import pickle

import pytest
import torch

from core.errors import UserError
from models import DiT_models
from tinyfusion.checkpoint import load_weights, read_weights, save_checkpoint, save_weights


def tiny(depth=4, **kw):
    torch.manual_seed(depth)
    return DiT_models["DiT-S/2"](input_size=4, depth=depth, hidden_size=32, num_heads=2, num_classes=5, **kw)


@pytest.mark.parametrize("fmt", ["plain", "training", "safetensors", "official_args"])
def test_formats_load(tmp_path, fmt):
    src, dst = tiny(), tiny(depth=4)
    for p in dst.parameters():
        p.data.zero_()
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "plain":
        save_weights(sd, path)
    elif fmt == "safetensors":
        save_weights(sd, path, metadata={"model": "DiT-S/2"})
    else:
        noise = {k: torch.randn_like(v) for k, v in sd.items()}  # 'model' differs: 'ema' must win
        obj = {"model": noise, "ema": sd, "opt": {}}
        if fmt == "official_args":  # what the official train.py writes
            obj["args"] = argparse.Namespace(model="DiT-S/2", epochs=1)
        save_checkpoint(obj, path)
    load_weights(dst, path, "DiT-S/2")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        read_weights(path)


def test_pruned_checkpoint_into_full_model_names_the_missing_layers(tmp_path):
    with torch.device("meta"):
        d14, xl = DiT_models["DiT-D14/2"](), DiT_models["DiT-XL/2"]()
    from tinyfusion.checkpoint import check_state_dict
    with pytest.raises(UserError) as err:
        check_state_dict(xl, d14.state_dict(), "DiT-XL/2", "d14.pt")
    msg = str(err.value)
    assert "missing 140 keys: blocks 14-27" in msg and "\n" not in msg


def test_num_classes_and_family_and_missing_file(tmp_path):
    path = tmp_path / "w.pt"
    save_weights(tiny().state_dict(), path)
    with pytest.raises(UserError, match="--num-classes 5"):
        load_weights(DiT_models["DiT-S/2"](input_size=4, depth=4, hidden_size=32, num_heads=2, num_classes=7), path)
    mar_like = {"encoder_blocks.0.norm1.weight": torch.zeros(3)}
    save_weights(mar_like, tmp_path / "mar.pt")
    with pytest.raises(UserError, match="is a MAR checkpoint"):
        load_weights(tiny(), tmp_path / "mar.pt", "DiT-S/2")
    with pytest.raises(UserError, match="does not exist"):
        read_weights(tmp_path / "nope.pt")


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "w.pt"
    save_weights({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda: 0}, path)  # lambdas cannot be pickled
    assert torch.equal(read_weights(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]
