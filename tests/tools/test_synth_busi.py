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


@pytest.fixture(scope="module")
def busi_pair(tmp_path_factory) -> dict[str, Path]:
    """The same 30 images (seed, size, classes) generated easy and hard."""
    root = tmp_path_factory.mktemp("realism")
    return {r: Path(synth_busi(root / r, n=30, size=128, seed=3, realism=r)) for r in ("easy", "hard")}


def _lesions(root: Path):
    """(image, first-lesion mask, class) for every image with a lesion."""
    for mask_path in sorted(root.glob("*/*)_mask.png")):
        if mask_path.parent.name != "normal":
            image = np.asarray(Image.open(str(mask_path).replace("_mask.png", ".png")).convert("L"), dtype=float)
            yield image, np.asarray(Image.open(mask_path)) > 0, mask_path.parent.name


def _contrast(image: np.ndarray, mask: np.ndarray) -> float:
    ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
    return image[mask].mean() / image[ring].mean()


def test_hard_realism_keeps_the_busi_layout_with_lesion_free_normal_images(busi_pair):
    hard = busi_pair["hard"]
    names = sorted(p.relative_to(hard).as_posix() for p in hard.rglob("*.png"))
    assert names == sorted(p.relative_to(busi_pair["easy"]).as_posix() for p in busi_pair["easy"].rglob("*.png"))
    normal = list((hard / "normal").glob("*_mask.png"))
    assert normal and all(not np.asarray(Image.open(p)).any() for p in normal)


def test_hard_lesions_have_lower_contrast_than_easy_ones(busi_pair):
    easy = [_contrast(i, m) for i, m, _ in _lesions(busi_pair["easy"])]
    hard = [_contrast(i, m) for i, m, _ in _lesions(busi_pair["hard"])]
    assert np.median(hard) > np.median(easy) + 0.15, (np.median(easy), np.median(hard))
    assert 0.3 < np.median(hard) < 0.8  # still hypoechoic, not invisible


def test_hard_speckle_is_fully_developed(busi_pair):
    """Rayleigh envelope: std/mean of the speckle is sqrt(4/pi - 1) = 0.52; easy mode's smoothed speckle is
    well below it. Measured as the ratio of the image to its local mean, in bright enough areas."""

    def speckle_contrast(root: Path) -> float:
        ratios = []
        for p in sorted(root.glob("*/*).png")):
            image = np.asarray(Image.open(p).convert("L"), dtype=float)
            local = ndimage.uniform_filter(image, 9)
            ratios.append((image / np.maximum(local, 1))[local > 60])
        return float(np.concatenate(ratios).std())

    easy, hard = speckle_contrast(busi_pair["easy"]), speckle_contrast(busi_pair["hard"])
    assert hard > easy + 0.1 and 0.38 < hard < 0.65, (easy, hard)


def test_hard_lesion_sizes_spread_over_two_orders_of_magnitude(busi_pair):
    areas = [m.mean() for _, m, _ in _lesions(busi_pair["hard"])]
    assert min(areas) < 0.01 and max(areas) > 0.08, sorted(areas)


def test_hard_malignant_margins_are_less_convex_than_easy_ones(busi_pair):
    from scipy.spatial import ConvexHull

    def solidity(root: Path) -> float:
        values = []
        for _, m, cls in _lesions(root):
            if cls == "malignant":
                points = np.argwhere(m)
                values.append(m.sum() / ConvexHull(points).volume)
        return float(np.mean(values))

    assert solidity(busi_pair["hard"]) < solidity(busi_pair["easy"]) - 0.05


def test_unknown_realism_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="realism"):
        synth_busi(tmp_path / "x", n=3, size=32, realism="real")
    assert not (tmp_path / "x").exists()
