"""Released checkpoints, fetched by name into a cache folder and verified before they are used.

A name from RELEASES (e.g. `DiT-XL-2-256x256.pt`) given where a checkpoint path is expected is
downloaded on first use into the cache folder ($TINYFUSION_CACHE, default `pretrained_models/` as in
the official code), as the official `download.py` scripts do. A local path that exists always wins.

A download is streamed to `<file>.part` beside its final place, resumed with an HTTP Range request
when the connection drops (also by the next run after a kill), checked (the size the server announced
or the recorded one, the sha256 when recorded, and that it starts like a torch checkpoint, not a web
page), and only then renamed into place. A file that fails a check is deleted. Processes that need
the same file (torchrun ranks) take a lock, so one downloads and the others then find it.
"""
import contextlib
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from core.errors import UserError

CACHE_ENV = "TINYFUSION_CACHE"
OFFLINE_ENV = "TINYFUSION_OFFLINE"  # set to 1: never touch the network, report what to fetch instead
DEFAULT_CACHE = "pretrained_models"  # the official DiT/SiT/MAR scripts' folder, relative to the working directory
# Dropbox serves its `dl=0` links as the file itself (not a preview page) to wget; MAR's download.py sends this.
USER_AGENT = "Wget/1.16 (linux-gnu)"
TIMEOUT_S = 60
RETRIES = 3  # resumes within one run after a dropped connection
CHUNK = 1 << 20
# Every release is a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle (protocol marker 0x80).
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass(frozen=True)
class Release:
    name: str          # what users type: --ckpt NAME, python download.py NAME
    url: str           # verbatim from the official download script or release page
    file: str          # path inside the cache folder (the official layout)
    size: int = None   # bytes; None: not recorded (the server's announced length is checked instead)
    sha256: str = None  # None: not recorded (no download was possible where this table was written)


_MAR = "https://www.dropbox.com/scl/fi/{}/checkpoint-last.pth?rlkey={}&dl=0"
# Sizes and checksums are not recorded: they can only be measured by downloading the files, which
# was impossible where this table was written. `python download.py NAME` prints both after a fetch.
RELEASES = {r.name: r for r in (
    # facebookresearch/DiT download.py
    Release("DiT-XL-2-256x256.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "DiT-XL-2-256x256.pt"),
    Release("DiT-XL-2-512x512.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", "DiT-XL-2-512x512.pt"),
    # willisma/SiT download.py (saved under the name its sample scripts ask for)
    Release("SiT-XL-2-256x256.pt", "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
            "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0", "SiT-XL-2-256x256.pt"),
    # VainF/TinyFusion README, release v1.0.0
    Release("TinyDiT-D14-MaskedKD-500K.pt", "https://github.com/VainF/TinyFusion/releases/download/v1.0.0/"
            "TinyDiT-D14-MaskedKD-500K.pt", "TinyDiT-D14-MaskedKD-500K.pt"),
    # mseitzer/pytorch-fid release fid_weights (the FID Inception, converted TF weights)
    Release("pt_inception-2015-12-05-6726825d.pth", "https://github.com/mseitzer/pytorch-fid/releases/download/"
            "fid_weights/pt_inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
    # LTH14/mar util/download.py
    Release("kl16.ckpt", "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt?"
            "rlkey=l44xipsezc8atcffdp4q7mwmh&dl=0", "vae/kl16.ckpt"),
    Release("MAR-B", _MAR.format("f6dpuyjb7fudzxcyhvrhk", "a6i4bo71vhfo4anp33n9ukujb"), "mar/mar_base/checkpoint-last.pth"),
    Release("MAR-L", _MAR.format("pxacc5b2mrt3ifw4cah6k", "m48ovo6g7ivcbosrbdaz0ehqt"), "mar/mar_large/checkpoint-last.pth"),
    Release("MAR-H", _MAR.format("1qmfx6fpy3k7j9vcjjs3s", "4lae281yzxb406atp32vzc83o"), "mar/mar_huge/checkpoint-last.pth"),
)}
ALIASES = {"SiT-XL-2-256.pt": "SiT-XL-2-256x256.pt"}  # the name of the file on SiT's Dropbox


def cache_dir():
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE


def release_of(name):
    """The Release called `name` (or one of its aliases), else None."""
    name = os.fspath(name)
    return RELEASES.get(ALIASES.get(name, name))


def cached_path(release):
    return os.path.join(cache_dir(), release.file)


def resolve(name_or_path):
    """A local path to read: an existing path as is; a release name fetched into the cache when missing;
    anything else unchanged (the caller reports a missing file)."""
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    release = release_of(path)
    if release is None and release_of(os.path.basename(path)):  # e.g. the README's pretrained/<release>
        name = os.path.basename(path)
        raise UserError(f"{path} does not exist; {name} is a released checkpoint: pass just {name} to fetch it into "
                        f"{cache_dir()}/ (or run `python download.py {name}`)")
    return fetch(release.name) if release else path


def default_checkpoint(model, image_size, num_classes):
    """The release the official sample scripts fetch when --ckpt is omitted; a UserError where there is none."""
    if model == "DiT-XL/2" and image_size in (256, 512) and num_classes == 1000:
        return f"DiT-XL-2-{image_size}x{image_size}.pt"
    if model == "SiT-XL/2" and image_size == 256 and num_classes == 1000:
        return "SiT-XL-2-256x256.pt"
    raise UserError(f"--ckpt is required for {model} at --image-size {image_size}, --num-classes {num_classes}: "
                    f"only DiT-XL/2 (256, 512) and SiT-XL/2 (256) with 1000 classes are fetched when it is omitted, "
                    f"as in the official scripts")


def fetch(name, progress=True):
    """Path of release `name` in the cache folder, downloaded (and verified) first if it is not there."""
    release = release_of(name)
    if release is None:
        raise UserError(f"{name} is not a released checkpoint: known names are {', '.join(RELEASES)}")
    dest = cached_path(release)
    if os.path.isfile(dest):
        return dest
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise UserError(_unreachable(release, dest, f"{OFFLINE_ENV} is set"))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with _lock(dest):
        if not os.path.isfile(dest):  # another process may have finished it while we waited
            download(release, dest, progress=progress)
    return dest


def download(release, dest, progress=True, retries=None):
    """Stream `release` to `dest`.part (resuming what is there), verify it, rename it to `dest`; returns the sha256."""
    part, retries = dest + ".part", RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            _stream(release, dest, part, progress)
            break
        except _Interrupted as e:
            if attempt == retries:
                raise UserError(f"download of {release.name} from {release.url} broke off ({e}) {retries + 1} "
                                f"times; the {os.path.getsize(part) if os.path.exists(part) else 0} bytes received "
                                f"are kept in {part} and the next run resumes from there") from None
    digest = _verify(release, part)
    os.replace(part, dest)
    return digest


class _Interrupted(Exception):
    """The connection ended before the whole file arrived (the part file is kept for a resume)."""


def _unreachable(release, dest, why):
    return (f"cannot download {release.name} ({why}): fetch {release.url} where there is network, e.g. with "
            f"`python download.py {release.name}`, and copy it to {dest} (or pass a local path)")


def _stream(release, dest, part, progress):
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if offset and release.size is not None and offset == release.size:
        return  # complete already (killed between the last byte and the rename)
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(release.url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: complete already, or not a prefix of the file
            if re.fullmatch(rf"bytes \*/{offset}", e.headers.get("Content-Range", "")):
                return  # all bytes arrived before the last run stopped
            os.remove(part)
            return _stream(release, dest, part, progress)
        raise UserError(f"cannot download {release.name}: {release.url} answered HTTP {e.code} {e.reason}; nothing "
                        f"was written (the release may have moved: check the official repository)") from None
    except (urllib.error.URLError, OSError) as e:  # no DNS, refused, timed out: offline or host unreachable
        raise UserError(_unreachable(release, dest, str(getattr(e, "reason", e)))) from None
    with resp:
        kind = resp.headers.get("Content-Type", "")
        if kind.startswith("text/html"):
            raise UserError(f"cannot download {release.name}: {release.url} answered with a web page, not the file "
                            f"(an expired link or an error page); nothing was written")
        start, total = _content_range(resp.headers.get("Content-Range")) if resp.status == 206 else (0, None)
        if resp.status == 206 and start != offset:  # not the range asked for: start over on the next attempt
            os.remove(part)
            raise _Interrupted(f"asked for bytes {offset}- but got {start}-")
        if resp.status != 206:  # the server ignored the Range header and sends the whole file
            offset = 0
        if total is None and resp.headers.get("Content-Length"):
            total = offset + int(resp.headers["Content-Length"])
        if None not in (total, release.size) and total != release.size:
            raise UserError(f"{release.url} serves {total} bytes but {release.name} has {release.size}: the release "
                            f"changed or the link is wrong; nothing was written")
        _copy(resp, part, offset, total, release.name, progress)
    got = os.path.getsize(part)
    if total is not None and got < total:
        raise _Interrupted(f"{got} of {total} bytes")


def _content_range(value):
    """(first byte, total size or None) of a `bytes START-END/TOTAL` header."""
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    if not m:
        return -1, None
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _copy(resp, part, offset, total, name, progress):
    from tqdm import tqdm
    with open(part, "ab" if offset else "wb") as f, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
        try:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as e:  # connection reset or timed out mid-file
            f.write(getattr(e, "partial", b""))  # IncompleteRead carries the bytes that did arrive
            raise _Interrupted(f"{type(e).__name__} after {f.tell()} bytes") from None


def _verify(release, part):
    """Size, checksum and file type of a finished part file; deletes it and raises on any mismatch."""
    def reject(why):
        os.remove(part)
        raise UserError(f"download of {release.name} from {release.url} is bad ({why}); nothing was kept")
    size = os.path.getsize(part)
    if release.size is not None and size != release.size:
        reject(f"{size} bytes, expected {release.size}")
    with open(part, "rb") as f:
        head = f.read(4)
    if not head.startswith(CHECKPOINT_MAGIC):
        reject(f"it is not a torch checkpoint: it starts with {head!r}, perhaps an error page")
    digest = sha256_of(part)
    if release.sha256 is not None and digest != release.sha256:
        reject(f"sha256 {digest}, expected {release.sha256}: corrupt, or the release changed")
    return digest


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(dest):
    """An exclusive lock on `.<file>.lock` beside `dest` (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = os.path.join(os.path.dirname(os.path.abspath(dest)), f".{os.path.basename(dest)}.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
