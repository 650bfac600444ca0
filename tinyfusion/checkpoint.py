"""Checkpoint I/O for scripts: reading by path or release name (core.weights reads the file), checking
weights against a model, and atomic writes (temp file + rename), so a killed job never leaves a
truncated checkpoint behind."""
import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile

import torch

from core.errors import UserError
from core.weights import read_checkpoint_file, read_state_dict
from .download import resolve


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions instead
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        if not _is_write_failure(e):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free / 2**20
        raise UserError(f"writing {path} failed: the disk is full or over quota ({free:.0f} MiB free in {folder}); "
                        f"files written before are kept. Free some space and rerun (training: --resume auto)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _is_write_failure(e):
    """Out of space (or over a quota / file-size limit). Only OSError carries an errno: numpy's short write,
    torch.save's zip writer and safetensors report the failure in their message instead."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(e)
    return (isinstance(e, OSError) and "requested and" in text and "written" in text) or \
        (isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)) or \
        (type(e).__name__ == "SafetensorError" and "I/O error" in text)


def remove_stale_temporaries(folder):
    """Delete `.tmp-*` files that atomic writes of a killed process left in `folder`."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _is_safetensors(path):
    return os.fspath(path).endswith(".safetensors")


def load_checkpoint(name_or_path):
    """A whole checkpoint object (dict); a release name (tinyfusion.download.RELEASES) that is not a local path
    is fetched first."""
    return read_checkpoint_file(resolve(name_or_path))


def read_weights(name_or_path):
    """State dict (CPU tensors) of a weights file in any supported format, or of a release (fetched first)."""
    return read_state_dict(resolve(name_or_path))


def _families_mismatch(model, state_dict):
    """(families whose weights `state_dict` looks like, the model's family), when the model's is not among them."""
    from .families import FAMILIES, family_of_model
    model_family = family_of_model(model)
    file_families = [f for f in FAMILIES if f.owns_state_dict(state_dict)]
    if model_family and file_families and model_family not in file_families:
        return "/".join(f.name for f in file_families), model_family.name
    return None


def _summarize(keys, n=4):
    """'blocks 14-27 (392 keys)' style summary: block indices are collapsed into ranges."""
    keys = sorted(keys)
    groups = {}
    for k in keys:
        m = re.match(r"^(.*?blocks)\.(\d+)\.", k)
        if m:
            groups.setdefault(m.group(1), set()).add(int(m.group(2)))
    parts = [f"{name} {_ranges(sorted(idx))}" for name, idx in groups.items()]
    rest = [k for k in keys if not re.match(r"^.*?blocks\.\d+\.", k)]
    parts += rest[:n] + ([f"... {len(rest) - n} more"] if len(rest) > n else [])
    return f"{len(keys)} keys: " + ", ".join(parts)


def _ranges(idx):
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(out)


def check_state_dict(model, state_dict, model_name, path):
    """Raise one UserError naming missing / unexpected / wrong-shape keys if the weights do not fit."""
    expected = model.state_dict()
    family = getattr(model, "family", type(model).__name__)
    mismatch = _families_mismatch(model, state_dict)
    if mismatch:
        raise UserError(f"{path} is a {mismatch[0]} checkpoint but --model {model_name} is a {mismatch[1]} model: "
                        f"pick a {mismatch[0]} model name")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    msg = [f"{path} does not fit {model_name} ({family}, depth {getattr(model, 'depth', '?')})"]
    if missing:
        msg.append(f"missing {_summarize(missing)}")
    if unexpected:
        msg.append(f"unexpected {_summarize(unexpected)}")
    if shapes:
        shown = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes[:3])
        msg.append(f"wrong shape in {len(shapes)} keys: {shown}")
        table = "y_embedder.embedding_table.weight"
        if table in shapes:
            msg.append(f"the checkpoint was trained with --num-classes {state_dict[table].shape[0] - 1}")
    raise UserError("; ".join(msg) + ". Check --model (pruned checkpoints need their depth, e.g. DiT-D14/2), "
                    "--image-size and --num-classes")


def load_weights(model, path, model_name=None):
    """Load a weights file into `model` strictly, with a clear error on any mismatch. Returns the model."""
    state_dict = read_weights(path)
    check_state_dict(model, state_dict, model_name or type(model).__name__, path)
    model.load_state_dict(state_dict, strict=True)
    return model


def save_weights(state_dict, path, metadata=None):
    """Write a plain state dict (official format, .pt) or .safetensors (with string metadata), atomically."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if _is_safetensors(path):
            from safetensors.torch import save_file
            save_file({k: v.clone() for k, v in state_dict.items()}, tmp,
                      metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(state_dict, tmp)


def save_checkpoint(obj, path):
    """Write a training checkpoint dict ({'model', 'ema', 'opt', ...}) atomically with torch.save."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
