"""``python -m hybridseg``: help lists the commands; multi-value flags reach the functions intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from hybridseg.tools.cli import COMMANDS, main, normalise_argv

EXPECTED = [
    "synth_busi",
    "synth_synapse",
    "datalist_busi",
    "datalist_synapse",
    "convert_transunet",
    "demo",
    "bench",
    "export",
    "package",
    "weights",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAGER": "cat"}
    return subprocess.run(
        [sys.executable, "-m", "hybridseg", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert sorted(COMMANDS) == sorted(EXPECTED)
    text = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    for name in EXPECTED:
        assert name in text


def test_help_of_one_command_shows_its_flags():
    result = _run("datalist_busi", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "datalist_busi ROOT OUT <flags>" in text  # root and out: positional or --root/--out
    for flag in ("--classes", "--seed", "--split", "--absolute", "--layout"):
        assert flag in text


def test_cli_does_not_import_the_networks():
    code = "import sys, hybridseg.tools.cli; print(any(m.startswith('hybridseg.networks') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["x", "--shape", "64", "64", "24", "--seed", "1"], ["x", "--shape=[64, 64, 24]", "--seed", "1"]),
        (["--split", "0.7", "0.1", "0.2"], ["--split=[0.7, 0.1, 0.2]"]),
        (["--classes", "benign", "normal", "--absolute"], ["--classes=['benign', 'normal']", "--absolute"]),
        (["--classes", "benign"], ["--classes", "benign"]),
        (["--shape=[8,8,8]", "--n", "2"], ["--shape=[8,8,8]", "--n", "2"]),
    ],
)
def test_space_separated_values_become_one_list(argv: list[str], expected: list[str]):
    assert normalise_argv(argv) == expected


def test_space_separated_shape_reaches_the_generator(tmp_path: Path, capsys):
    main(["synth_synapse", "--out", str(tmp_path / "ct"), "--n", "1", "--shape", "40", "36", "9", "--seed", "2"])
    assert nib.load(tmp_path / "ct" / "img" / "img0001.nii.gz").shape == (40, 36, 9)


def test_space_separated_classes_and_split_reach_the_datalist(tmp_path: Path, capsys):
    main(["synth_busi", "--out", str(tmp_path / "b"), "--n", "12", "--size", "32"])
    out = tmp_path / "dl.json"
    main(
        [
            "datalist_busi",
            "--root",
            str(tmp_path / "b"),
            "--out",
            str(out),
            "--classes",
            "benign",
            "normal",
            "--split",
            "0.5",
            "0.25",
            "0.25",
            "--seed",
            "3",
        ]
    )
    data = json.loads(out.read_text())
    assert data["classes"] == ["benign", "normal"] and data["split"] == [0.5, 0.25, 0.25] and data["seed"] == 3
