"""Reading weights files: official plain state dicts, training dicts ({'model', 'ema', 'opt', ...}; MAR's
{'model', 'model_ema'}) and .safetensors files, from a local path.

Pickles are always opened with `weights_only=True`, so a checkpoint can never run code on load.
Release names (fetched into a cache) are resolved above this layer: tinyfusion.checkpoint.
"""
import argparse
import os
import pickle

import torch

from .errors import UserError

# Official DiT/SiT/TinyFusion training checkpoints store their argparse Namespace under 'args'.
# A Namespace is a plain attribute bag (no code runs when it is rebuilt), so it is allowed.
torch.serialization.add_safe_globals([argparse.Namespace])

# Preference order when a file holds several copies of the weights: EMA first (what evaluation uses).
WEIGHT_KEYS = ("ema", "model_ema", "model", "state_dict")


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def read_checkpoint_file(path):
    """A whole checkpoint object (dict) from a local file; one clear error for missing, unsafe or unreadable files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder, not a file: pass the checkpoint file inside it "
                        f"(e.g. {os.path.join(path, 'checkpoints', '0500000.pt')})")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check the path (or download the file first)")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            return {"state_dict": load_file(path), "metadata": metadata}
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on bad files
            raise UserError(f"cannot read {path} ({_first_line(e)}): it is not a valid .safetensors file, or it is "
                            f"truncated; fetch it again") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds Python objects that could run code when unpickled "
                        f"({_first_line(e)}); re-save it as a plain state dict or .safetensors from a trusted source")
    except Exception as e:  # the zip reader and the unpickler fail in many ways (RuntimeError, EOFError, KeyError...)
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {_first_line(e)}): the file is not a "
                        f"torch or safetensors checkpoint, or it is truncated") from None


def extract_state_dict(obj, path="checkpoint"):
    """The weights inside a loaded checkpoint: 'ema', then 'model_ema', 'model', 'state_dict', else the dict itself."""
    if isinstance(obj, dict):
        for key in WEIGHT_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError(f"{path} holds no state dict (looked for a plain dict of tensors or the keys "
                    f"{', '.join(WEIGHT_KEYS)})")


def read_state_dict(path):
    """State dict (CPU tensors) of a local weights file in any supported format."""
    return extract_state_dict(read_checkpoint_file(path), path)
