"""hybridseg.weights: the one torch.load, manifests, the shared cache and the ``pretrained`` modes
(auto / required / none) that train.json follows."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest
import torch

from hybridseg.io import InputDataError
from hybridseg.weights import cache_dir, read_manifest, read_state_dict, resolve_pretrained
from tests.reference import REPO_ROOT


def _manifest(tmp_path, files: dict[str, bytes]) -> str:
    """A manifest of generated files (full SHA-256 each), as a bundle's configs/weights.json."""
    entries = [
        {"name": n, "file": f"{n}.pth", "url": f"http://127.0.0.1:9/{n}.pth", "licence": "test", "network": "test"}
        | {"sha256": hashlib.sha256(b).hexdigest()}
        for n, b in files.items()
    ]
    path = tmp_path / "bundle" / "configs" / "weights.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"bundle": "test_bundle", "files": entries}, indent=4))
    return str(path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_auto_without_cached_files_warns_once_naming_the_fetch_command_and_loads_nothing(tmp_path, caplog):
    m = _manifest(tmp_path, {"cnn": b"1", "vit": b"2"})
    with caplog.at_level(logging.INFO):
        got = resolve_pretrained(m, "auto", {"a": "cnn", "b": "vit"}, tmp_path / "empty")
    assert got == {}
    (msg,) = _warnings(caplog)  # ONE warning for both files
    assert "cnn.pth" in msg and "vit.pth" in msg and "from scratch" in msg
    assert f"python -m hybridseg weights fetch test_bundle --dir {tmp_path / 'empty'}" in msg


def test_required_without_cached_files_is_an_error_naming_the_fetch_command(tmp_path):
    m = _manifest(tmp_path, {"cnn": b"1"})
    with pytest.raises(InputDataError, match=r"pretrained=required .*cnn\.pth.*weights fetch test_bundle"):
        resolve_pretrained(m, "required", {"a": "cnn"}, tmp_path / "empty")


def test_none_loads_nothing_and_does_not_warn(tmp_path, caplog):
    m = _manifest(tmp_path, {"cnn": b"1"})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cnn.pth").write_bytes(b"1")
    with caplog.at_level(logging.INFO):
        assert resolve_pretrained(m, "none", {"a": "cnn"}, tmp_path / "cache") == {}
    assert not _warnings(caplog)
    with pytest.raises(ValueError, match="auto, required, none"):
        resolve_pretrained(m, "yes", {"a": "cnn"})


def test_cached_files_are_used_from_the_env_folder_or_the_bundle_models_folder(tmp_path, monkeypatch, caplog):
    m = _manifest(tmp_path, {"cnn": b"cnn bytes", "vit": b"vit bytes"})
    monkeypatch.setenv("HYBRIDSEG_WEIGHTS", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "cnn.pth").write_bytes(b"cnn bytes")
    # where `monai.bundle download_large_files` puts the packaged bundle's large_files.yml entries
    (tmp_path / "bundle" / "models" / "pretrained").mkdir(parents=True)
    (tmp_path / "bundle" / "models" / "pretrained" / "vit.pth").write_bytes(b"vit bytes")
    with caplog.at_level(logging.INFO):
        got = resolve_pretrained(m, "required", {"a": "cnn", "b": "vit"})
    assert got == {"a": str(tmp_path / "env" / "cnn.pth"), "b": str(tmp_path / "bundle/models/pretrained/vit.pth")}
    assert not _warnings(caplog)
    (tmp_path / "env" / "cnn.pth").write_bytes(b"cnn bytez")  # damaged: an error, never a silent scratch run
    with pytest.raises(InputDataError, match=r"cnn\.pth: SHA-256 .* differs"):
        resolve_pretrained(m, "auto", {"a": "cnn"})


def test_an_explicit_file_is_used_as_given_and_a_missing_one_is_an_error(tmp_path):
    m = _manifest(tmp_path, {"cnn": b"1"})
    own = tmp_path / "my_weights.pth"
    own.write_bytes(b"x")
    assert resolve_pretrained(m, "required", {"a": str(own)}, tmp_path / "empty") == {"a": str(own)}
    with pytest.raises(InputDataError, match="absent.pth: pretrained file for 'a' does not exist"):
        resolve_pretrained(m, "auto", {"a": str(tmp_path / "absent.pth")})


def test_a_manifest_with_an_unknown_field_or_no_hash_is_refused(tmp_path):
    path = tmp_path / "weights.json"
    base = {"name": "a", "file": "a.pth", "url": "u", "licence": "l", "network": "n"}
    for entry, problem in (({**base, "sha256": "0", "colour": 1}, "unknown fields"), (base, "needs sha256")):
        path.write_text(json.dumps({"bundle": "b", "files": [entry]}))
        with pytest.raises(InputDataError, match=problem):
            read_manifest(path)


def test_read_state_dict_unwraps_containers_and_refuses_html_saved_as_pth(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "ck.pth")
    assert set(read_state_dict(tmp_path / "ck.pth", ("model",))) == {"w"}
    (tmp_path / "page.pth").write_text("<html>quota exceeded</html>")
    with pytest.raises(InputDataError, match="not a torch.save file"):
        read_state_dict(tmp_path / "page.pth")


def test_every_torch_load_in_the_package_is_the_one_in_weights_py():
    """Unpickling arbitrary objects runs code: one function loads files, always with weights_only=True."""
    calls = []
    for f in (REPO_ROOT / "bundles").rglob("*.py"):
        for line in f.read_text(encoding="utf-8").splitlines():
            if re.search(r"\btorch\.load\(", line) and not line.lstrip().startswith(('"', "#", "``")):
                calls.append((f.relative_to(REPO_ROOT).as_posix(), line.strip()))
    assert calls == [
        ("bundles/common/hybridseg/weights.py", "return torch.load(p, map_location=map_location, weights_only=True)")
    ]
