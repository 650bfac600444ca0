"""Output paths are checked before any work starts, so a bad one never costs a finished computation."""
import os
import tempfile

from core.errors import UserError


def check_output_dir(folder, flag, shown=None):
    """Fail now if folder `folder` (existing or to be created) cannot be written; `flag` names the option."""
    shown = shown or folder
    existing = os.path.abspath(os.path.expanduser(folder))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {shown} cannot be created: {existing} is a file, not a folder; pick another path")
    try:  # a real probe: permissions, read-only mounts and ACLs all show up here (os.access misses some)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {shown} is not writable ({e.strerror} in {existing}): pick a writable location")


def check_output_file(path, flag):
    """Fail now if file `path` cannot be written later (a folder, a read-only file, an unwritable folder)."""
    if not path:
        return
    full = os.path.expanduser(path)
    if os.path.isdir(full):
        raise UserError(f"{flag} {path} is a folder: give a file path (e.g. {os.path.join(path, 'model.pt')})")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise UserError(f"{flag} {path} exists and is read-only: pick another path")
    check_output_dir(os.path.dirname(os.path.abspath(full)), flag, shown=path)
