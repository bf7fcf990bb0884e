"""Synthetic BUSI generator: BUSI's exact layout, class proportions, determinism, learnable lesions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hybridseg.io import InputDataError
from hybridseg.tools.synth_busi import class_counts, synth_busi

NAME_RE = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(_\d+)?)?\.png$")


@pytest.fixture(scope="module")
def busi12(tmp_path_factory) -> Path:
    return Path(synth_busi(tmp_path_factory.mktemp("busi") / "set", n=12, size=64, seed=0))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_counts_follow_busi_proportions():
    assert class_counts(780) == {"benign": 437, "malignant": 210, "normal": 133}
    assert class_counts(12) == {"benign": 7, "malignant": 3, "normal": 2}
    assert class_counts(3) == {"benign": 1, "malignant": 1, "normal": 1}
    assert sum(class_counts(101).values()) == 101


def test_layout_uses_busi_file_names_with_a_mask_for_every_image(busi12: Path):
    names = [p.name for p in busi12.rglob("*") if p.is_file()]
    assert all(NAME_RE.match(n) for n in names), names
    assert sorted(p.name for p in busi12.iterdir()) == ["benign", "malignant", "normal"]
    for cls, count in class_counts(12).items():
        images = sorted(p.name for p in (busi12 / cls).glob("*).png"))
        assert images == sorted(f"{cls} ({k}).png" for k in range(1, count + 1))
        for img in images:
            assert (busi12 / cls / img.replace(".png", "_mask.png")).is_file()
    assert list(busi12.rglob("*_mask_1.png")), "at least one image has a second lesion mask"


def test_masks_are_binary_and_empty_only_for_normal(busi12: Path):
    for mask_path in busi12.rglob("*_mask*.png"):
        with Image.open(mask_path) as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        if mask_path.parent.name == "normal":
            assert not mask.any(), mask_path
        else:
            assert mask.mean() > 0.01 * 255 / 4, f"{mask_path} lesion too small"


def test_images_have_requested_size_and_some_are_rgb(busi12: Path):
    modes = []
    for p in busi12.rglob("*).png"):
        with Image.open(p) as im:
            assert im.size == (64, 64)
            modes.append(im.mode)
    assert set(modes) == {"L", "RGB"}


def test_lesions_are_much_darker_than_the_tissue_around_them(busi12: Path):
    for mask_path in busi12.glob("*/*)_mask.png"):
        if mask_path.parent.name == "normal":
            continue
        image = np.asarray(Image.open(str(mask_path).replace("_mask.png", ".png")).convert("L"), dtype=float)
        mask = np.asarray(Image.open(mask_path)) > 0
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1)
        assert image[mask].mean() < 0.6 * image[ring].mean(), mask_path


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path):
    a = _files(Path(synth_busi(tmp_path / "a", n=6, size=48, seed=7)))
    b = _files(Path(synth_busi(tmp_path / "b", n=6, size=48, seed=7)))
    c = _files(Path(synth_busi(tmp_path / "c", n=6, size=48, seed=8)))
    assert a == b
    assert a["benign/benign (1).png"] != c["benign/benign (1).png"]


def test_size_jitter_varies_image_sizes(tmp_path: Path):
    out = Path(synth_busi(tmp_path / "j", n=6, size=64, seed=1, size_jitter=0.2))
    sizes = {Image.open(p).size for p in out.rglob("*).png")}
    assert len(sizes) > 1
    assert all(51 <= s <= 77 for wh in sizes for s in wh)


def test_many_images_include_a_third_lesion_mask(tmp_path: Path):
    out = Path(synth_busi(tmp_path / "m", n=50, size=32, seed=0))
    assert len(list(out.rglob("*_mask_2.png"))) == 1


def test_refuses_a_non_empty_output_folder_unless_overwrite(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(InputDataError, match="not empty"):
        synth_busi(tmp_path, n=3, size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    synth_busi(tmp_path, n=3, size=32, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"size": 8}, {"size_jitter": 0.7}])
def test_rejects_impossible_arguments(tmp_path: Path, kwargs: dict):
    with pytest.raises(ValueError):
        synth_busi(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
