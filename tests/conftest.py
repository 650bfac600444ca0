import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
# Tiny test models run fastest single-threaded; 2 threads on 2 shared cores thrash (20-50x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden():
    from safetensors.torch import load_file
    return load_file(os.path.join(FIXTURES, "official_tiny.safetensors"))


def tiny_config():
    return dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10,
                learn_sigma=True)


def golden_model(golden, cls_name="DiT"):
    """The tiny official-config model with the golden weights loaded (eval mode)."""
    from models import DiT, SiT
    cls = {"DiT": DiT, "SiT": SiT}[cls_name]
    prefix = cls_name.lower() + "."
    model = cls(**tiny_config()).eval()
    model.load_state_dict({k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}, strict=True)
    return model


@pytest.fixture(autouse=True)
def _no_release_downloads(tmp_path_factory, monkeypatch):
    """No test may fetch a released checkpoint from the internet: release names resolve into an empty
    scratch cache, and a download stops with the offline message before touching the network."""
    from tinyfusion.download import CACHE_ENV, OFFLINE_ENV
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "release_cache"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
