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

``realism="hard"`` makes the images look more like real scans and much harder to segment: fully developed
speckle (the magnitude of a complex Gaussian field blurred by an anisotropic point-spread function, so its
envelope is Rayleigh distributed, contrast std/mean about 0.52, with lateral grain), stronger and varying
depth attenuation, additive electronic noise and a gain that varies between images; lesions only 20-60 %
as bright as the tissue around them with heterogeneous interiors and wider blurred
margins; microlobulated benign and spiculated malignant margins; lesion sizes spread log-uniformly from
about 0.3 % to 25 % of the image area (BUSI spans well under 1 % to over 30 %); lesions anywhere from
just under the skin to the pectoral muscle; and hypoechoic distractors (fat lobules, ducts, rib-like
shadows) in every image, ``normal`` ones included, so that "dark" is not "lesion".

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
REALISM = ("easy", "hard")
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
    rng: np.random.Generator,
    h: int,
    w: int,
    malignant: bool,
    centre: tuple[float, float],
    radius: float,
    hard: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One perturbed-ellipse lesion: (hard mask, soft blurred-margin weight, lowest row of the lesion).
    ``hard``: spiculated (malignant) or microlobulated (benign) margins and wider blur."""
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
    if hard:
        boundary += _hard_margin(rng, theta, malignant)
    d = np.sqrt(u**2 + v**2) / boundary
    mask = d <= 1.0
    blur_px = rng.uniform(2.0, 3.5) if malignant else rng.uniform(0.8, 1.6)
    blur_px *= max(h, w) / 200
    if hard:  # wider margins, but never so wide that a small lesion loses its dark core
        blur_px = min(blur_px * rng.uniform(1.5, 2.5), 0.25 * min(rx, ry))
    soft = 1.0 / (1.0 + np.exp(-(1.0 - d) * min(rx, ry) / max(blur_px, 1e-3)))
    bottom = float(yy[mask].max()) if mask.any() else cy * h
    return mask, soft, bottom


def _hard_margin(rng: np.random.Generator, theta: np.ndarray, malignant: bool) -> np.ndarray:
    """Extra radial boundary offset: narrow spicules (malignant) or small lobules (benign)."""
    offset = np.zeros_like(theta)
    n, (lo, hi), width = (
        (rng.integers(5, 12), (0.15, 0.45), (0.04, 0.09))
        if malignant
        else (rng.integers(4, 9), (0.04, 0.1), (0.15, 0.3))
    )
    for _ in range(n):
        gap = np.angle(np.exp(1j * (theta - rng.uniform(-np.pi, np.pi))))  # wrapped angle to the spike
        offset += rng.uniform(lo, hi) * np.exp(-((gap / rng.uniform(*width)) ** 2))
    return offset


def _distractors(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """Hypoechoic structures that are not lesions: fat lobules, ducts and a rib-like shadow band."""
    h, w = tissue.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for _ in range(rng.integers(2, 6)):  # lobules and duct segments: small dark ellipses, any orientation
        cy, cx, r, aspect, tilt = (
            rng.uniform(0.1, 0.8),
            rng.uniform(0, 1),
            rng.uniform(0.02, 0.07),
            rng.uniform(0.25, 0.9),
            rng.uniform(0, np.pi),
        )
        u = ((xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)) / r
        v = (-(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)) / (r * aspect)
        soft = 1.0 / (1.0 + np.exp(np.minimum((np.sqrt(u**2 + v**2) - 1.0) * 6, 50)))
        tissue = tissue * (1 - soft * rng.uniform(0.35, 0.7))
    if rng.uniform() < 0.4:  # a vertical shadow band from the surface (rib, poor probe contact)
        cx, half = rng.uniform(0, 1), rng.uniform(0.03, 0.1)
        across = np.clip(1 - (np.abs(xx - cx) / half) ** 2, 0, 1)
        tissue = tissue * (1 - rng.uniform(0.3, 0.6) * across)
    return tissue


def _rayleigh_speckle(rng: np.random.Generator, shape: tuple[int, int], grain: tuple[float, float]) -> np.ndarray:
    """Fully developed speckle with mean 1: the envelope of a complex Gaussian field blurred by a Gaussian
    point-spread function of ``grain`` pixels (axial, lateral). Rayleigh distributed whatever the grain."""
    re, im = (ndimage.gaussian_filter(rng.standard_normal(shape), grain) for _ in range(2))
    env = np.hypot(re, im)
    return env / env.mean()


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
    rng: np.random.Generator, h: int, w: int, cls: str, n_lesions: int, realism: str = "easy"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic image: (H, W) uint8 image and one (H, W) bool mask per lesion (one empty mask for
    ``normal``). ``realism`` is ``"easy"`` or ``"hard"`` (see the module docstring)."""
    hard = realism == "hard"
    tissue = _tissue(rng, h, w)
    if hard:
        tissue = _distractors(rng, tissue)
    malignant = cls == "malignant"
    masks: list[np.ndarray] = []
    gains = np.ones((h, w))
    placed: list[tuple[float, float, float]] = []
    for i in range(n_lesions if cls != "normal" else 0):
        radius = rng.uniform(0.09, 0.2) if i == 0 else rng.uniform(0.05, 0.1)
        if hard:  # log-uniform: many small lesions, a few very large ones, as in BUSI
            radius = float(np.exp(rng.uniform(np.log(0.04), np.log(0.3)))) if i == 0 else rng.uniform(0.04, 0.1)
        for _attempt in range(20):  # keep extra lesions apart from earlier ones when there is room
            centre = (rng.uniform(0.38, 0.6), rng.uniform(0.25, 0.75))
            if hard:
                centre = (rng.uniform(0.18 + radius * 0.5, 0.72), rng.uniform(0.15, 0.85))
            if all(np.hypot((centre[0] - c0) * h / w, centre[1] - c1) > 1.2 * (radius + r) for c0, c1, r in placed):
                break
        placed.append((centre[0], centre[1], radius))
        mask, soft, bottom = _lesion(rng, h, w, malignant, centre, radius, hard=hard)
        inside = (rng.uniform(0.1, 0.2) if malignant else rng.uniform(0.04, 0.14)) * (
            1 + 0.25 * _lowfreq(rng, (h, w), 8)
        )
        if hard:  # a fraction of the local tissue brightness, heterogeneous inside
            local = ndimage.gaussian_filter(tissue, max(h, w) * radius * 0.5)
            inside = local * rng.uniform(0.2, 0.6) * (1 + 0.3 * _lowfreq(rng, (h, w), 12))
        tissue = tissue * (1 - soft) + np.clip(inside, 0.01, 1) * soft
        gains = gains * _posterior(rng, h, w, mask, bottom, malignant)
        masks.append(mask)
    if cls == "normal":
        masks.append(np.zeros((h, w), dtype=bool))
    depth = np.linspace(0, 1, h)[:, None]
    if hard:
        attenuation = np.exp(-rng.uniform(0.5, 1.5) * depth) * (1 + 0.1 * _lowfreq(rng, (h, w), 3))
        grain = max(1.0, max(h, w) / 200)
        speckle = _rayleigh_speckle(rng, (h, w), (grain, 2 * grain))
        echo = ndimage.gaussian_filter(tissue * gains * attenuation, 0.7) * speckle
        echo = echo * rng.uniform(150, 240) + rng.normal(0, rng.uniform(2, 6), (h, w))
        return np.clip(np.rint(echo), 0, 255).astype(np.uint8), masks
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
    out: str,
    n: int = 12,
    size: int = 128,
    seed: int = 0,
    size_jitter: float = 0.0,
    overwrite: bool = False,
    realism: str = "easy",
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
        realism: ``"easy"`` (default: dark, clearly bounded lesions a small network learns in minutes) or
            ``"hard"`` (speckle, attenuation, low contrast, irregular margins, BUSI-like sizes, distractors;
            see the module docstring).

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
    if realism not in REALISM:
        raise ValueError(f"realism must be one of {', '.join(REALISM)}, got {realism!r}")
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
        image, masks = make_busi_image(rng, h, w, cls, n_lesions[i], realism)
        stem = f"{cls} ({k})"
        _save_png(out_dir / cls / f"{stem}.png", np.repeat(image[..., None], 3, axis=2) if i in rgb else image)
        for m, mask in enumerate(masks):
            suffix = "_mask" if m == 0 else f"_mask_{m}"
            _save_png(out_dir / cls / f"{stem}{suffix}.png", mask.astype(np.uint8) * np.uint8(255))
    return str(out_dir)
