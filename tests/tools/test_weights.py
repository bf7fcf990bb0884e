"""``python -m hybridseg weights fetch|list`` against an HTTP server on 127.0.0.1 serving generated files:
a verified download, a wrong hash (nothing cached), an interrupted download resumed with a Range request,
a file known by its hash prefix (full hash pinned), and a file with no direct download placed by hand.
Nothing here leaves the loopback address: every manifest URL points at the local server."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
from pathlib import Path

import pytest
import torch

from hybridseg.io import InputDataError
from hybridseg.tools.cli import main
from hybridseg.tools.weights import fetch, list_weights
from hybridseg.weights import find_cached, pinned_hash_file, read_manifest


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with Range support; ``server.cut_once`` makes the first answer for a path stop half-way."""

    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            self.wfile.write(body[start : start + len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut_once = {}, [], set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _weights_bytes(seed: int, n: int = 20000) -> bytes:
    """A real (small) state dict file, so that placed files also pass the weights-only load check."""
    buf = io.BytesIO()
    torch.save({"layer.weight": torch.randn(n, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def _manifest(path: Path, entries: list[dict]) -> str:
    base = {"licence": "test", "network": "test"}
    path.write_text(json.dumps({"bundle": "test_bundle", "files": [{**base, **e} for e in entries]}, indent=4))
    return str(path)


def test_fetch_downloads_verifies_and_caches_then_lists_it(server, tmp_path, capsys):
    body = _weights_bytes(0)
    server.files["/a.pth"] = body
    m = _manifest(
        tmp_path / "m.json",
        [{"name": "a", "file": "a.pth", "url": server.url + "/a.pth", "sha256": hashlib.sha256(body).hexdigest()}],
    )
    cache = tmp_path / "cache"
    got = fetch("test_bundle", dir=str(cache), manifest=m)
    assert Path(got["a"]).read_bytes() == body
    assert sorted(p.name for p in cache.iterdir()) == ["a.pth"], "partial or temporary files left behind"
    assert "downloaded and verified" in capsys.readouterr().out
    fetch("test_bundle", dir=str(cache), manifest=m)  # cached: checked, not downloaded again
    assert len(server.requests) == 1 and "already cached" in capsys.readouterr().out
    rows = list_weights("test_bundle", dir=str(cache), manifest=m)
    assert rows[0]["status"].startswith("cached")


def test_a_wrong_hash_is_an_error_and_nothing_is_cached(server, tmp_path):
    server.files["/a.pth"] = _weights_bytes(0)
    m = _manifest(
        tmp_path / "m.json", [{"name": "a", "file": "a.pth", "url": server.url + "/a.pth", "sha256": "0" * 64}]
    )
    cache = tmp_path / "cache"
    with pytest.raises(InputDataError, match=r"a\.pth: downloaded file rejected, nothing was cached: .*SHA-256"):
        fetch("test_bundle", dir=str(cache), manifest=m)
    assert list(cache.iterdir()) == []


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    body = _weights_bytes(1)
    server.files["/big.pth"] = body
    server.cut_once.add("/big.pth")
    digest = hashlib.sha256(body).hexdigest()
    m = _manifest(
        tmp_path / "m.json", [{"name": "big", "file": "big.pth", "url": server.url + "/big.pth", "sha256": digest}]
    )
    cache = tmp_path / "cache"
    with pytest.raises(InputDataError, match="interrupted after .*run fetch again to resume"):
        fetch("test_bundle", dir=str(cache), manifest=m)
    part = cache / "big.pth.part"
    assert part.stat().st_size == len(body) // 2 and not (cache / "big.pth").exists()
    assert list_weights("test_bundle", dir=str(cache), manifest=m)[0]["status"].startswith("partial")
    fetch("test_bundle", dir=str(cache), manifest=m)
    assert server.requests[-1] == ("/big.pth", f"bytes={len(body) // 2}-")
    assert (cache / "big.pth").read_bytes() == body and not part.exists()


def test_a_hash_prefix_is_checked_and_the_full_hash_pinned_on_the_first_download(server, tmp_path):
    body = _weights_bytes(2)
    digest = hashlib.sha256(body).hexdigest()
    server.files["/w-x.pth"] = body
    entry = {"name": "w", "file": "w-x.pth", "url": server.url + "/w-x.pth", "sha256_prefix": digest[:8]}
    m = _manifest(tmp_path / "m.json", [entry])
    cache = tmp_path / "cache"
    fetch("test_bundle", dir=str(cache), manifest=m)
    assert pinned_hash_file(cache / "w-x.pth").read_text().strip() == digest
    man = read_manifest(m)
    assert find_cached(man, man.files[0], cache) == cache / "w-x.pth"
    (cache / "w-x.pth").write_bytes(body[:-1] + b"!")  # damaged later: the pinned hash catches it
    with pytest.raises(InputDataError, match=r"w-x\.pth: SHA-256 .* differs .*weights fetch test_bundle"):
        find_cached(man, man.files[0], cache)
    wrong = {**entry, "name": "v", "file": "v.pth", "sha256_prefix": "ffffffff"}
    m2 = _manifest(tmp_path / "m2.json", [wrong])
    with pytest.raises(InputDataError, match="does not start with ffffffff"):
        fetch("test_bundle", dir=str(cache), manifest=m2)
    assert not (cache / "v.pth").exists()


def test_a_file_without_direct_download_is_explained_then_checked_once_placed(server, tmp_path, capsys):
    entry = {
        "name": "drive",
        "file": "drive_model.pth",
        "url": server.url + "/drive/view",
        "manual": "Download the archive in a browser and extract the model.",
    }
    m = _manifest(tmp_path / "m.json", [entry])
    cache = tmp_path / "cache"
    with pytest.raises(InputDataError, match="still missing: drive_model.pth"):
        fetch("test_bundle", dir=str(cache), manifest=m)
    out = capsys.readouterr().out
    assert "no direct download" in out and "extract the model" in out and str(cache / "drive_model.pth") in out
    assert server.requests == [], "a shared-drive page must not be downloaded as if it were the file"
    cache.mkdir()
    (cache / "drive_model.pth").write_bytes(b"<html>a sign-in page</html>")
    with pytest.raises(InputDataError, match="drive_model.pth: cannot be read as a PyTorch checkpoint"):
        fetch("test_bundle", dir=str(cache), manifest=m)
    (cache / "drive_model.pth").write_bytes(_weights_bytes(3))
    fetch("test_bundle", dir=str(cache), manifest=m)
    assert "checked (1 tensors" in capsys.readouterr().out
    assert pinned_hash_file(cache / "drive_model.pth").is_file()


def test_the_cli_lists_and_fetches_into_the_weights_env_folder(server, tmp_path, monkeypatch, capsys):
    body = _weights_bytes(4)
    server.files["/a.pth"] = body
    m = _manifest(
        tmp_path / "m.json",
        [{"name": "a", "file": "a.pth", "url": server.url + "/a.pth", "sha256": hashlib.sha256(body).hexdigest()}],
    )
    monkeypatch.setenv("HYBRIDSEG_WEIGHTS", str(tmp_path / "env cache"))
    main(["weights", "list", "test_bundle", "--manifest", m])
    out = capsys.readouterr().out
    assert "missing" in out and "python -m hybridseg weights fetch test_bundle" in out
    main(["weights", "fetch", "test_bundle", "--manifest", m])
    assert (tmp_path / "env cache" / "a.pth").read_bytes() == body
    server.files.clear()
    m_missing = _manifest(
        tmp_path / "m2.json", [{"name": "b", "file": "b.pth", "url": server.url + "/b", "sha256": "0" * 64}]
    )
    with pytest.raises(SystemExit) as info:
        main(["weights", "fetch", "test_bundle", "--manifest", m_missing])
    assert info.value.code == 1 and "HTTP 404" in capsys.readouterr().err


def test_the_bundles_manifests_name_official_files_with_hashes():
    from tests.reference import REPO_ROOT

    cf = read_manifest(REPO_ROOT / "bundles/cfformer_busi/configs/weights.json")
    assert [e.name for e in cf.files] == ["resnet34", "swin_v2_t", "swin_v2_s", "swin_v2_b"]
    for e in cf.files:
        assert e.url == f"https://download.pytorch.org/models/{e.file}" and e.direct
        assert e.file.split("-")[1].startswith(e.sha256_prefix) and e.size_mib > 50  # torchvision's naming
    br = read_manifest(REPO_ROOT / "bundles/braunetpp_synapse/configs/weights.json")
    assert {e.name for e in br.files} == {"biformer_base", "braunetpp_synapse"}
    assert all(not e.direct and e.manual for e in br.files)
