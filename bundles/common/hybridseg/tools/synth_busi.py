"""Synthetic BUSI-like breast ultrasound images in BUSI's exact file layout.

Writes ``OUT/{benign,malignant,normal}/<class> (<k>).png`` with ``<class> (<k>)_mask.png`` (0/255) and,
for images with more lesions, ``_mask_1.png`` / ``_mask_2.png`` (one lesion per mask file, as BUSI does).
Class counts follow BUSI's 437/210/133 proportions. Each image has tissue layers (skin, subcutaneous
fat with Cooper's ligaments, glandular tissue, pectoral muscle), multiplicative Rayleigh speckle, depth
attenuation and, for benign/malignant, a hypoechoic perturbed-ellipse lesion with a blurred margin and
posterior shadowing or enhancement. Benign lesions are mostly smooth, wider-than-tall ovals with
posterior enhancement; malignant ones are irregular, fuzzier, often taller and shadowing. ``normal``
images have empty masks. About one image in twenty is stored as RGB (gray replicated), like a few BUSI
files. Lesions are much darker than their surroundings so that a small network can learn them.

Outputs are byte-for-byte deterministic for a given seed, size and count (numpy's seeded generator,
PNGs written by Pillow with fixed options and no metadata).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from hybridseg.io import InputDataError, atomic_path

BUSI_CLASS_COUNTS = {"benign": 437, "malignant": 210, "normal": 133}
RGB_FRACTION = 0.05
EXTRA_LESION_FRACTION = 0.04


def prepare_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``out``; refuse a file, or a non-empty folder unless ``overwrite`` (files of the same names
    are then replaced, others are left alone)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputDataError(out, "output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputDataError(
            out, "output folder is not empty; choose an empty folder or pass --overwrite to replace files in it"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def class_counts(n: int) -> dict[str, int]:
    """Images per class for ``n`` images: BUSI's proportions, largest-remainder rounded; every class gets
    at least one image when ``n >= 3``."""
    total = sum(BUSI_CLASS_COUNTS.values())
    names = list(BUSI_CLASS_COUNTS)
    raw = [n * BUSI_CLASS_COUNTS[c] / total for c in names]
    counts = [int(np.floor(r)) for r in raw]
    for i in sorted(range(len(names)), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(names):
        for i in range(len(names)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return dict(zip(names, counts, strict=True))


def _lowfreq(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field with about ``cells`` bumps across the image, unit standard deviation."""
    coarse = rng.standard_normal((cells + 2, cells + 2))
    field = ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=3)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-8)


def _wave(rng: np.random.Generator, x: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth wavy line (sum of three sinusoids) used for tissue-layer boundaries."""
    out = np.zeros_like(x)
    for k in (1, 2, 3):
        out += amplitude / k * np.sin(2 * np.pi * (k * rng.uniform(0.5, 1.5) * x + rng.uniform()))
    return out


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity map (0 = anechoic, 1 = bright) of the layered breast, before speckle."""
    y = np.linspace(0, 1, h)[:, None]
    x = np.linspace(0, 1, w)[None, :]
    skin = 0.035 + _wave(rng, x, 0.005)
    fat_end = rng.uniform(0.18, 0.28) + _wave(rng, x, 0.03)
    gland_end = rng.uniform(0.62, 0.74) + _wave(rng, x, 0.04)
    muscle_end = gland_end + rng.uniform(0.12, 0.18) + _wave(rng, x, 0.02)
    gland_texture = _lowfreq(rng, (h, w), 10)
    tissue = np.where(y < skin, 0.85, 0.0)
    tissue = np.where((y >= skin) & (y < fat_end), 0.33 + 0.05 * _lowfreq(rng, (h, w), 6), tissue)
    tissue = np.where((y >= fat_end) & (y < gland_end), 0.62 + 0.12 * gland_texture, tissue)
    striations = 0.06 * np.sin(2 * np.pi * (y * rng.uniform(25, 40) + 0.3 * _wave(rng, x, 1.0)))
    tissue = np.where((y >= gland_end) & (y < muscle_end), 0.45 + striations, tissue)
    tissue = np.where(y >= muscle_end, 0.18, tissue)
    # Cooper's ligaments: thin bright curves crossing the fat layer.
    for _ in range(rng.integers(2, 5)):
        centre = rng.uniform(0.08, 0.22) + _wave(rng, x, 0.04)
        dist = np.abs(y - centre) * h
        tissue = tissue + 0.3 * np.exp(-((dist / 1.2) ** 2)) * (y < fat_end)
    return np.clip(tissue, 0.02, 1.0)


def _lesion(
    rng: np.random.Generator, h: int, w: int, malignant: bool, centre: tuple[float, float], radius: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """One perturbed-ellipse lesion: (hard mask, soft blurred-margin weight, lowest row of the lesion)."""
    cy, cx = centre
    aspect = rng.uniform(0.75, 1.25) if malignant else rng.uniform(0.5, 0.8)  # height / width
    rx, ry = radius * w, radius * w * aspect
    tilt = rng.uniform(-0.4, 0.4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy * h, xx - cx * w
    u = (dx * np.cos(tilt) + dy * np.sin(tilt)) / rx
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / ry
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    harmonics = range(2, 9) if malignant else range(2, 4)
    for k in harmonics:
        amp = rng.uniform(0.03, 0.09) if malignant else rng.uniform(0.0, 0.04)
        boundary += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if malignant:  # spiculated margin
        boundary += rng.uniform(0.02, 0.05) * np.cos(rng.integers(12, 20) * theta + rng.uniform(0, 2 * np.pi))
    d = np.sqrt(u**2 + v**2) / boundary
    mask = d <= 1.0
    blur_px = rng.uniform(2.0, 3.5) if malignant else rng.uniform(0.8, 1.6)
    blur_px *= max(h, w) / 200
    soft = 1.0 / (1.0 + np.exp(-(1.0 - d) * min(rx, ry) / max(blur_px, 1e-3)))
    bottom = float(yy[mask].max()) if mask.any() else cy * h
    return mask, soft, bottom


def _posterior(
    rng: np.random.Generator, h: int, w: int, mask: np.ndarray, bottom: float, malignant: bool
) -> np.ndarray:
    """Multiplicative posterior acoustic feature below a lesion: shadowing (<1) or enhancement (>1)."""
    shadow = rng.uniform() < (0.7 if malignant else 0.2)
    gain = rng.uniform(0.45, 0.7) if shadow else rng.uniform(1.2, 1.45)
    cols = np.nonzero(mask.any(axis=0))[0]
    if cols.size == 0:
        return np.ones((h, w))
    x = np.arange(w)[None, :]
    centre, half = (cols[0] + cols[-1]) / 2, max((cols[-1] - cols[0]) / 2, 1.0)
    across = np.clip(1.0 - (np.abs(x - centre) / half) ** 4, 0.0, 1.0)
    y = np.arange(h)[:, None]
    depth = (y - bottom) / h
    along = np.where(depth > 0, (1 - np.exp(-depth * 40)) * np.exp(-depth * rng.uniform(1.0, 3.0)), 0.0)
    return 1.0 + (gain - 1.0) * across * along


def make_busi_image(
    rng: np.random.Generator, h: int, w: int, cls: str, n_lesions: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic image: (H, W) uint8 image and one (H, W) bool mask per lesion (one empty mask for
    ``normal``)."""
    tissue = _tissue(rng, h, w)
    malignant = cls == "malignant"
    masks: list[np.ndarray] = []
    gains = np.ones((h, w))
    placed: list[tuple[float, float, float]] = []
    for i in range(n_lesions if cls != "normal" else 0):
        radius = rng.uniform(0.09, 0.2) if i == 0 else rng.uniform(0.05, 0.1)
        for _attempt in range(20):  # keep extra lesions apart from earlier ones when there is room
            centre = (rng.uniform(0.38, 0.6), rng.uniform(0.25, 0.75))
            if all(np.hypot((centre[0] - c0) * h / w, centre[1] - c1) > 1.2 * (radius + r) for c0, c1, r in placed):
                break
        placed.append((centre[0], centre[1], radius))
        mask, soft, bottom = _lesion(rng, h, w, malignant, centre, radius)
        inside = (rng.uniform(0.1, 0.2) if malignant else rng.uniform(0.04, 0.14)) * (
            1 + 0.25 * _lowfreq(rng, (h, w), 8)
        )
        tissue = tissue * (1 - soft) + np.clip(inside, 0.01, 1) * soft
        gains = gains * _posterior(rng, h, w, mask, bottom, malignant)
        masks.append(mask)
    if cls == "normal":
        masks.append(np.zeros((h, w), dtype=bool))
    depth = np.linspace(0, 1, h)[:, None]
    attenuation = 1.0 - rng.uniform(0.15, 0.35) * depth
    speckle = rng.rayleigh(1.0, (h, w)) / np.sqrt(np.pi / 2)  # mean 1
    speckle = ndimage.gaussian_filter(speckle, sigma=(0.5, 1.0))  # laterally elongated grain
    echo = ndimage.gaussian_filter(tissue * gains * attenuation, 0.7) * speckle
    image = np.clip(np.rint(echo * rng.uniform(180, 220)), 0, 255).astype(np.uint8)
    return image, masks


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=6)


def synth_busi(
    out: str, n: int = 12, size: int = 128, seed: int = 0, size_jitter: float = 0.0, overwrite: bool = False
) -> str:
    """Write ``n`` synthetic BUSI-like images with masks in BUSI's layout under ``out``.

    Args:
        out: output folder (created; must be empty unless ``overwrite``).
        n: number of images, split over benign/malignant/normal in BUSI's 437/210/133 proportions
            (each class gets at least one image when ``n >= 3``).
        size: image height and width in pixels.
        seed: seed of everything random; the same arguments give byte-identical files.
        size_jitter: when > 0, each image's height and width vary independently by up to this fraction
            of ``size`` (real BUSI images differ in size); 0 gives ``size x size`` images.
        overwrite: allow a non-empty ``out`` (files of the same names are replaced).

    Returns:
        The output folder. About 4% of lesion images get a second lesion (``_mask_1.png``; at least one
        when there are two or more lesion images), one gets a third (``_mask_2.png``) when there are at
        least 40; about 5% of images (at least one when ``n >= 8``) are stored as RGB.
    """
    n, size = int(n), int(size)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if not 0 <= size_jitter < 0.5:
        raise ValueError(f"size_jitter must be in [0, 0.5), got {size_jitter}")
    out_dir = prepare_output_dir(out, overwrite)
    counts = class_counts(n)
    names = [(cls, k) for cls, c in counts.items() for k in range(1, c + 1)]
    plan_rng = np.random.default_rng([int(seed), 0])
    lesion_images = [i for i, (cls, _) in enumerate(names) if cls != "normal"]
    n_lesions = [1] * len(names)
    n_extra = max(1, round(EXTRA_LESION_FRACTION * len(lesion_images))) if len(lesion_images) >= 2 else 0
    extra = plan_rng.choice(lesion_images, size=n_extra, replace=False) if n_extra else []
    for j, i in enumerate(extra):
        n_lesions[i] = 3 if (j == 0 and len(lesion_images) >= 40) else 2
    n_rgb = max(1, round(RGB_FRACTION * n)) if n >= 8 else 0
    rgb = set(plan_rng.choice(len(names), size=n_rgb, replace=False).tolist()) if n_rgb else set()
    for i, (cls, k) in enumerate(names):
        rng = np.random.default_rng([int(seed), 1, i])
        h = w = size
        if size_jitter > 0:
            h, w = (int(round(size * (1 + rng.uniform(-size_jitter, size_jitter)))) for _ in range(2))
        image, masks = make_busi_image(rng, h, w, cls, n_lesions[i])
        stem = f"{cls} ({k})"
        _save_png(out_dir / cls / f"{stem}.png", np.repeat(image[..., None], 3, axis=2) if i in rgb else image)
        for m, mask in enumerate(masks):
            suffix = "_mask" if m == 0 else f"_mask_{m}"
            _save_png(out_dir / cls / f"{stem}{suffix}.png", mask.astype(np.uint8) * np.uint8(255))
    return str(out_dir)
