"""Release downloads against a local HTTP server on 127.0.0.1 (no other host is ever contacted):
full download, resume after a dropped connection or a killed run, checksum mismatch, error pages,
the offline message, one download for concurrent processes, and the scripts taking release names."""
import dataclasses
import hashlib
import http.server
import io
import os
import re
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from tinyfusion import download as dl

NAME = "TinyDiT-D14-MaskedKD-500K.pt"


def checkpoint_bytes(seed=0, n=300_000):
    """A real torch.save file (zip format), large enough to arrive in several reads."""
    buf = io.BytesIO()
    torch.save({"w": torch.randn(n, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


class Server:
    """Serves `files[path] = bytes` with Range support. `drop_after[path] = [n, ...]`: the next responses
    for that path send only n bytes of their body, then close. `html[path]`/`missing[path]`: an error page."""

    def __init__(self):
        self.files, self.drop_after, self.html, self.missing, self.delay = {}, {}, set(), set(), 0.0
        self.redirect = {}  # path -> path it moved to (302), as GitHub and Dropbox links do
        self.requests = []  # (path, Range header or None, bytes sent)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path, rng = self.path.split("?")[0], self.headers.get("Range")
                time.sleep(server.delay)
                if path in server.redirect:
                    server.requests.append((path, rng, 0))  # logged before replying: the client may finish first
                    self.send_response(302)
                    self.send_header("Location", server.redirect[path])
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if path in server.missing:
                    return self._reply(404, b"<html>Not Found</html>", "text/html", rng)
                if path in server.html:  # e.g. a share link that now shows a login page
                    return self._reply(200, b"<!DOCTYPE html><html>sign in</html>", "text/html", rng)
                body, start = server.files[path], 0
                if rng:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                if start >= len(body):  # as real servers: 416 with the size when the range starts past the end
                    server.requests.append((path, rng, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                drops = server.drop_after.get(path) or []
                n = drops.pop(0) if drops else None
                status = 206 if rng else 200
                sent = body[start:] if n is None else body[start:start + n]
                server.requests.append((path, rng, len(sent)))
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                self.wfile.write(sent)
                self.close_connection = True

            def _reply(self, code, body, kind, rng):
                server.requests.append((self.path, rng, len(body)))
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up early (it refused a web page) is part of the tests

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local server; the cache is tmp_path/cache; downloads allowed (they can only reach 127.0.0.1)."""
    srv = Server()
    monkeypatch.delenv(dl.OFFLINE_ENV, raising=False)
    monkeypatch.setenv(dl.CACHE_ENV, str(tmp_path / "cache"))
    yield srv
    srv.close()


def serve(monkeypatch, server, name, body, **fields):
    """Point release `name` at the local server (every other field kept unless given)."""
    path = f"/{name}"
    server.files[path] = body
    release = dataclasses.replace(dl.RELEASES[name], url=server.url(path) + "?rlkey=x&dl=0", **fields)
    assert release.url.startswith("http://127.0.0.1:")
    monkeypatch.setitem(dl.RELEASES, name, release)
    return path


def cache_files(tmp_path):
    root = tmp_path / "cache"
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")) if root.exists() else []


def test_full_download_verified_renamed_and_loaded(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    digest = hashlib.sha256(body).hexdigest()
    serve(monkeypatch, server, NAME, body, size=len(body), sha256=digest)
    path = dl.fetch(NAME, progress=False)
    assert path == str(tmp_path / "cache" / NAME)
    assert open(path, "rb").read() == body and cache_files(tmp_path) == [NAME]
    assert dl.fetch(NAME) == path and len(server.requests) == 1  # cached: no second request
    from download import find_model
    torch.testing.assert_close(find_model(NAME)["w"], torch.load(io.BytesIO(body))["w"])


def test_dropped_connection_is_resumed_with_range(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    path = serve(monkeypatch, server, NAME, body)
    server.drop_after[path] = [100_000, 50_000]
    got = dl.fetch(NAME, progress=False)
    assert hashlib.sha256(open(got, "rb").read()).hexdigest() == hashlib.sha256(body).hexdigest()
    assert server.requests == [(path, None, 100_000), (path, "bytes=100000-", 50_000),
                               (path, "bytes=150000-", len(body) - 150_000)], server.requests


def test_killed_download_keeps_part_and_next_run_resumes(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    path = serve(monkeypatch, server, NAME, body)
    server.drop_after[path] = [123_456]
    monkeypatch.setattr(dl, "RETRIES", 0)  # a run that dies at the first break
    with pytest.raises(UserError, match="broke off.*123456 bytes received"):
        dl.fetch(NAME, progress=False)
    part = tmp_path / "cache" / (NAME + ".part")
    assert cache_files(tmp_path) == [NAME + ".part"] and part.read_bytes() == body[:123_456]
    assert open(dl.fetch(NAME, progress=False), "rb").read() == body  # the next run
    assert server.requests[-1] == (path, "bytes=123456-", len(body) - 123_456)
    assert cache_files(tmp_path) == [NAME]


def test_resume_through_a_redirect_keeps_the_range(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    path = serve(monkeypatch, server, NAME, body)
    server.files["/objects/blob"] = body
    server.redirect[path] = "/objects/blob"
    server.drop_after["/objects/blob"] = [70_000]
    assert open(dl.fetch(NAME, progress=False), "rb").read() == body
    assert server.requests == [(path, None, 0), ("/objects/blob", None, 70_000), (path, "bytes=70000-", 0),
                               ("/objects/blob", "bytes=70000-", len(body) - 70_000)], server.requests


def test_part_file_already_complete_is_not_fetched_again(server, monkeypatch, tmp_path):
    """Killed after the last byte but before the rename: the server answers 416, the part is verified and kept."""
    body = checkpoint_bytes()
    path = serve(monkeypatch, server, NAME, body)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / (NAME + ".part")).write_bytes(body)
    assert open(dl.fetch(NAME, progress=False), "rb").read() == body
    assert server.requests == [(path, f"bytes={len(body)}-", 0)] and cache_files(tmp_path) == [NAME]


def test_checksum_mismatch_keeps_nothing(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    serve(monkeypatch, server, NAME, body, sha256=hashlib.sha256(b"another file").hexdigest())
    with pytest.raises(UserError, match=f"sha256 {hashlib.sha256(body).hexdigest()}, expected .*nothing was kept"):
        dl.fetch(NAME, progress=False)
    assert cache_files(tmp_path) == []


def test_recorded_size_differs_from_served_keeps_nothing(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    serve(monkeypatch, server, NAME, body, size=len(body) + 1)
    with pytest.raises(UserError, match=f"serves {len(body)} bytes but .* has {len(body) + 1}"):
        dl.fetch(NAME, progress=False)
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("kind", ["html", "missing", "page-as-binary"])
def test_error_page_instead_of_the_file(server, monkeypatch, tmp_path, kind):
    path = serve(monkeypatch, server, NAME, b"<!DOCTYPE html><html>quota exceeded</html>")
    if kind != "page-as-binary":  # page-as-binary: an error page labelled application/octet-stream
        getattr(server, kind).add(path)
    needle = {"html": "answered with a web page", "missing": "answered HTTP 404",
              "page-as-binary": "not a torch checkpoint: it starts with b'<!DO'"}[kind]
    with pytest.raises(UserError, match=needle):
        dl.fetch(NAME, progress=False)
    assert cache_files(tmp_path) == []


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/DiT-XL-2-256x256.pt"


def test_offline_message_names_file_url_and_command(monkeypatch, tmp_path, capsys):
    from tinyfusion.errors import run_main
    import sample
    monkeypatch.delenv(dl.OFFLINE_ENV, raising=False)
    url = closed_port_url()
    monkeypatch.setitem(dl.RELEASES, NAME, dataclasses.replace(dl.RELEASES[NAME], url=url))
    with pytest.raises(SystemExit) as e:  # a script given a release name, with the host unreachable
        run_main(sample.main, ["--model", "DiT-Tiny-D2/2", "--ckpt", NAME, "--vae", "none", "--image-size", "8",
                               "--num-classes", "10", "--class-labels", "1", "--device", "cpu",
                               "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert NAME in err and url in err and f"python download.py {NAME}" in err and str(tmp_path / "c" / NAME) in err
    assert not (tmp_path / "c" / NAME).exists()
    monkeypatch.setenv(dl.OFFLINE_ENV, "1")  # offline mode says the same without trying (or writing anything)
    monkeypatch.setenv(dl.CACHE_ENV, str(tmp_path / "offline"))
    with pytest.raises(UserError, match=f"{dl.OFFLINE_ENV} is set.*python download.py {NAME}"):
        dl.fetch(NAME)
    assert not (tmp_path / "offline").exists()


def test_concurrent_processes_download_once(server, monkeypatch, tmp_path):
    body = checkpoint_bytes()
    serve(monkeypatch, server, NAME, body)
    server.delay = 0.3  # both ask before either has the file
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(dl.fetch(NAME, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(server.requests) == 1 and len(paths) == 2 and len(set(paths)) == 1
    assert open(paths[0], "rb").read() == body


def test_local_path_wins_over_release_name(server, monkeypatch, tmp_path):
    serve(monkeypatch, server, NAME, checkpoint_bytes(seed=1))
    monkeypatch.chdir(tmp_path)
    local = checkpoint_bytes(seed=2)
    (tmp_path / NAME).write_bytes(local)
    from download import find_model
    torch.testing.assert_close(find_model(NAME)["w"], torch.load(io.BytesIO(local))["w"])
    assert server.requests == []


def test_download_script_cache_dir_flag_and_printed_checksum(server, monkeypatch, tmp_path, capsys):
    body = checkpoint_bytes()
    serve(monkeypatch, server, NAME, body)
    monkeypatch.setenv(dl.CACHE_ENV, str(tmp_path / "env_cache"))
    import download
    download.main([NAME, "--cache-dir", str(tmp_path / "flag_cache")])  # the flag beats the variable
    assert (tmp_path / "flag_cache" / NAME).read_bytes() == body and not (tmp_path / "env_cache").exists()
    assert f"{len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()}" in capsys.readouterr().out


def test_default_checkpoint_follows_the_official_scripts():
    assert dl.default_checkpoint("DiT-XL/2", 256, 1000) == "DiT-XL-2-256x256.pt"
    assert dl.default_checkpoint("DiT-XL/2", 512, 1000) == "DiT-XL-2-512x512.pt"
    assert dl.default_checkpoint("SiT-XL/2", 256, 1000) == "SiT-XL-2-256x256.pt"
    for args in [("SiT-XL/2", 512, 1000), ("DiT-D14/2", 256, 1000), ("DiT-XL/2", 256, 10)]:
        with pytest.raises(UserError, match="--ckpt is required"):
            dl.default_checkpoint(*args)
    assert all(r.name in ("MAR-B", "MAR-L", "MAR-H") or r.file.endswith(r.name) for r in dl.RELEASES.values())


def test_sample_with_release_name_equals_local_file(server, monkeypatch, tmp_path):
    """sample.py --ckpt NAME fetches NAME and samples exactly what the same weights from a local file give."""
    import sample
    from test_sample import tiny_weights
    mode = torch.is_grad_enabled()
    tiny_weights("DiT-Tiny-D2/2", tmp_path / "local.pt", in_channels=3, input_size=8)
    serve(monkeypatch, server, NAME, (tmp_path / "local.pt").read_bytes())
    flags = ["--model", "DiT-Tiny-D2/2", "--vae", "none", "--image-size", "8", "--num-classes", "10",
             "--num-sampling-steps", "3", "--class-labels", "1", "2", "--device", "cpu"]
    try:
        sample.main([*flags, "--ckpt", NAME, "--out", str(tmp_path / "a.png")])
        sample.main([*flags, "--ckpt", str(tmp_path / "local.pt"), "--out", str(tmp_path / "b.png")])
    finally:
        torch.set_grad_enabled(mode)
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    assert a.std() > 1 and np.array_equal(a, b) and len(server.requests) == 1
    assert os.path.isfile(tmp_path / "cache" / NAME)


def test_missing_path_ending_in_a_release_name_says_how_to_fetch(tmp_path):
    from tinyfusion.checkpoint import read_weights
    with pytest.raises(UserError, match=f"pretrained/{NAME} does not exist; .*pass just {NAME} to fetch it"):
        read_weights(f"pretrained/{NAME}")
    with pytest.raises(UserError, match="checkpoint other/x.pt does not exist"):
        read_weights("other/x.pt")


def test_sample_ddp_without_ckpt_names_its_folder_pretrained():
    """The official folder name: `{model}-pretrained-size-...` when --ckpt is omitted."""
    import argparse
    from tinyfusion.sample_job import folder_name
    args = argparse.Namespace(model="DiT-XL/2", ckpt=None, vae="ema", image_size=256, cfg_scale=1.5, global_seed=0)
    assert folder_name(args, "ddpm-250") == "DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0-ddpm-250"


def test_sample_without_ckpt_fetches_the_official_release(capsys, tmp_path):
    """sample.py for DiT-XL/2 without --ckpt asks for DiT-XL-2-512x512.pt (offline here: one line, before
    the 675M-parameter model is built)."""
    from tinyfusion.errors import run_main
    import sample
    with pytest.raises(SystemExit):
        run_main(sample.main, ["--image-size", "512", "--device", "cpu", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download DiT-XL-2-512x512.pt" in err
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt" in err
