"""Synthetic abdominal CT volumes with BTCV's 13 organ labels, in the raw BTCV file layout.

Writes ``OUT/img/img0001.nii.gz`` (int16 HU) and ``OUT/label/label0001.nii.gz`` (uint8, BTCV ids 0..13).
Case ids follow BTCV's training ids (0001-0010, 0021-0040, then 0041, ...), so 30 volumes contain the
standard 12 test cases and :func:`hybridseg.data.synapse.datalist_synapse` uses the standard split.

Array axes and affine: axis 0 runs from the patient's right to left, axis 1 from anterior to posterior,
axis 2 from inferior to superior; the affine is ``diag(-sx, -sy, sz)`` (nibabel's RAS world), the usual
storage of CT converted from DICOM. The grid covers an in-plane field of view of 330-390 mm and 240-300
mm craniocaudally (drawn per case), so spacing is ``FOV / shape``: about (0.7, 0.7, 3.0) mm at
512x512x90 and coarser on small test grids; anatomy keeps its physical proportions.

Anatomy (normalised coordinates, jittered per case): air (-1000 HU) outside a body ellipse; skin and
subcutaneous fat, an abdominal muscle wall, visceral fat with bowel; vertebra, spinal canal, paraspinal
and psoas muscles, ribs in the upper half; liver (right, with a left lobe across the midline),
gallbladder under it, spleen left-posterior, kidneys posterior beside the spine, adrenals above-medial
to them, aorta left-anterior of the spine, IVC right of it, esophagus in the upper slices, stomach
left-anterior, pancreas across the midline with the splenic vein behind it and the portal vein running
to the liver hilum. Each organ has its own mean HU (contrast-enhanced, portal venous phase); Gaussian
noise and slight blur are added. Every volume contains all 13 labels (small organs have a minimum size
of about 1.5 voxels in-plane), so the BTCV 13 -> 8 mapping is exercised.

``realism="hard"`` (for recipes that must learn something closer to real CT): organ positions jittered
about three times as much (up to 8 % of the field of view per axis) and sizes by 0.75-1.3x, more irregular
organ outlines, organ intensities varying by +-25 HU between cases (liver, spleen and pancreas contrasts
overlap from case to case), a smooth additive intensity non-uniformity of 15-40 HU amplitude across the
volume, partial volume (the HU volume blurred by a point-spread function of about one voxel in-plane and
1.5 slices craniocaudally while labels stay sharp) and noise of 20-40 HU. The default ``"easy"`` keeps
organs at fixed places with clean intensities for the unit tests.

Files are byte-for-byte deterministic for a given seed and shape (see
:func:`hybridseg.data.synapse.write_nifti`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hybridseg.data.synapse import LABEL_SCHEMES, write_nifti
from hybridseg.tools.synth_busi import prepare_output_dir

# BTCV's 30 labelled training cases: 0001-0010 and 0021-0040.
BTCV_CASE_IDS = tuple(range(1, 11)) + tuple(range(21, 41))

# Mean HU per BTCV label (portal venous phase), chosen distinct so organs can be told apart.
ORGAN_HU = {
    1: 120,  # spleen
    2: 175,  # right kidney
    3: 175,  # left kidney
    4: 8,  # gallbladder (bile)
    5: 40,  # esophagus
    6: 100,  # liver
    7: 25,  # stomach (contents)
    8: 230,  # aorta
    9: 160,  # inferior vena cava
    10: 190,  # portal and splenic vein
    11: 75,  # pancreas
    12: 55,  # right adrenal
    13: 55,  # left adrenal
}
REALISM = ("easy", "hard")
HU_AIR, HU_FAT, HU_MUSCLE, HU_BOWEL, HU_BONE, HU_CORTEX, HU_CSF = -1000, -95, 50, 20, 300, 750, 15


def case_ids(n: int) -> list[int]:
    """BTCV's training ids for the first 30 cases, then consecutive ids after 40."""
    ids = list(BTCV_CASE_IDS[:n])
    ids += list(range(41, 41 + max(0, n - len(BTCV_CASE_IDS))))
    return ids


@dataclass
class _Grid:
    """Maps normalised anatomy coordinates to voxels: a (right -1 .. left +1), p (anterior -1 ..
    posterior +1), s (inferior 0 .. superior 1)."""

    shape: tuple[int, int, int]

    def vox(self, a: float, p: float, s: float) -> np.ndarray:
        x, y, z = self.shape
        return np.array([(a + 1) / 2 * (x - 1), (p + 1) / 2 * (y - 1), s * (z - 1)])

    def radii(self, ra: float, rp: float, rs: float) -> np.ndarray:
        x, y, z = self.shape
        return np.maximum([ra * x / 2, rp * y / 2, rs * z], [1.5, 1.5, 1.0])


def _bbox(shape, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
    lo = np.maximum(np.floor(lo).astype(int), 0)
    hi = np.minimum(np.ceil(hi).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _ellipsoid(shape, centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator, wobble: float):
    """Perturbed ellipsoid: (bbox slices, boolean mask inside the bbox) or None when outside the grid."""
    box = _bbox(shape, centre - radii * (1 + 3 * wobble), centre + radii * (1 + 3 * wobble))
    if box is None:
        return None
    i, j, k = np.ogrid[box]
    u, v, w = (i - centre[0]) / radii[0], (j - centre[1]) / radii[1], (k - centre[2]) / radii[2]
    theta = np.arctan2(v, u)
    boundary = 1.0
    for order in (2, 3, 4):
        boundary = boundary + wobble * rng.uniform(-1, 1) * np.cos(order * theta + rng.uniform(0, 2 * np.pi))
    boundary = boundary + wobble * rng.uniform(-1, 1) * w
    mask = (u**2 + v**2 + w**2) <= boundary**2
    nearest = tuple(int(np.clip(np.rint(c), s.start, s.stop - 1)) - s.start for c, s in zip(centre, box, strict=True))
    mask[nearest] = True  # small structures on coarse grids keep at least their centre voxel
    return box, mask


def _capsule(shape, points: Sequence[np.ndarray], radii: np.ndarray):
    """Voxels within one (anisotropic) radius of a polyline: (bbox slices, mask) or None."""
    pts = np.asarray(points, dtype=float)
    box = _bbox(shape, pts.min(0) - radii, pts.max(0) + radii)
    if box is None:
        return None
    i, j, k = np.ogrid[box]
    coords = [i / radii[0], j / radii[1], k / radii[2]]
    scaled = pts / radii
    best = None
    for p0, p1 in zip(scaled[:-1], scaled[1:], strict=True):
        d = p1 - p0
        t = sum((c - p0[n]) * d[n] for n, c in enumerate(coords)) / max(float(d @ d), 1e-12)
        t = np.clip(t, 0.0, 1.0)
        dist2 = sum((c - (p0[n] + t * d[n])) ** 2 for n, c in enumerate(coords))
        best = dist2 if best is None else np.minimum(best, dist2)
    mask = best <= 1.0
    nearest = tuple(
        int(np.clip(np.rint(c), s.start, s.stop - 1)) - s.start for c, s in zip(pts[len(pts) // 2], box, strict=True)
    )
    mask[nearest] = True
    return box, mask


def make_ct_case(
    shape: tuple[int, int, int], rng: np.random.Generator, realism: str = "easy"
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One synthetic case: (int16 HU volume, uint8 BTCV label volume, voxel spacing in mm); ``realism``
    ``"easy"`` or ``"hard"`` (see the module docstring)."""
    hard = realism == "hard"
    spread = 2.7 if hard else 1.0  # position jitter multiplier
    hu_jitter = 25.0 if hard else 8.0  # organ HU varies between cases by up to this
    x, y, z = shape
    g = _Grid(shape)
    fov_xy, fov_z = rng.uniform(330, 390), rng.uniform(240, 300)
    spacing = (fov_xy / x, fov_xy / y, fov_z / z)
    hu = np.full(shape, float(HU_AIR), dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    def jit(scale: float = 0.03) -> float:
        return float(rng.uniform(-scale * spread, scale * spread))

    # Body outline, fat, muscle wall, visceral fat with bowel loops (in-plane, slightly varying along z).
    a = np.linspace(-1, 1, x)[:, None, None]
    p = np.linspace(-1, 1, y)[None, :, None]
    s = np.linspace(0, 1, z)[None, None, :]
    ra, rp = 0.86 + jit(0.04) + 0.03 * s, 0.66 + jit(0.04) + 0.02 * s
    rho = np.sqrt((a / ra) ** 2 + ((p - 0.02) / rp) ** 2)
    body = rho <= 1.0
    fat_depth = rng.uniform(0.08, 0.14)
    hu[body] = HU_FAT
    wall = (rho <= 1.0 - fat_depth) & (rho > 1.0 - fat_depth - 0.05)
    cavity = rho <= 1.0 - fat_depth - 0.05
    hu[wall] = HU_MUSCLE
    coarse = rng.standard_normal((max(x // 8, 4), max(y // 8, 4), max(z // 4, 3)))
    bowel = ndimage.zoom(coarse, np.array(shape) / np.array(coarse.shape), order=1)[:x, :y, :z] > 0.2
    hu[cavity] = np.where(bowel[cavity], HU_BOWEL, HU_FAT + 10)

    def paint_tissue(shape_mask, value: float) -> None:
        if shape_mask is None:
            return
        box, m = shape_mask
        m = m & body[box]
        hu[box][m] = value
        label[box][m] = 0

    # Spine, spinal canal, posterior elements, paraspinal and psoas muscles, ribs.
    paint_tissue(_capsule(shape, [g.vox(0, 0.62, -0.1), g.vox(0, 0.62, 1.1)], g.radii(0.15, 0.1, 0.02)), HU_MUSCLE)
    for side in (-1, 1):
        paint_tissue(
            _capsule(shape, [g.vox(side * 0.15, 0.55, -0.1), g.vox(side * 0.15, 0.55, 1.1)], g.radii(0.09, 0.08, 0.02)),
            HU_MUSCLE,
        )
        paint_tissue(
            _capsule(
                shape, [g.vox(side * 0.12, 0.36, -0.1), g.vox(side * 0.11, 0.36, 0.45)], g.radii(0.06, 0.06, 0.02)
            ),
            HU_MUSCLE,
        )
    paint_tissue(_capsule(shape, [g.vox(0, 0.42, -0.1), g.vox(0, 0.42, 1.1)], g.radii(0.1, 0.085, 0.02)), HU_CORTEX)
    paint_tissue(_capsule(shape, [g.vox(0, 0.42, -0.1), g.vox(0, 0.42, 1.1)], g.radii(0.08, 0.065, 0.02)), HU_BONE)
    paint_tissue(_capsule(shape, [g.vox(0, 0.56, -0.1), g.vox(0, 0.56, 1.1)], g.radii(0.035, 0.035, 0.02)), HU_CSF)
    paint_tissue(_capsule(shape, [g.vox(0, 0.63, -0.1), g.vox(0, 0.63, 1.1)], g.radii(0.02, 0.05, 0.02)), HU_CORTEX)
    rib_rho = 1.0 - fat_depth - 0.03
    for angle in np.deg2rad([-150, -120, -60, -30, 0, 30, 60, 120, 150, 180]):  # none at the midline
        ca, cp = np.cos(angle) * rib_rho * 0.86, 0.02 + np.sin(angle) * rib_rho * 0.66
        paint_tissue(_capsule(shape, [g.vox(ca, cp, 0.5), g.vox(ca, cp, 1.1)], g.radii(0.025, 0.025, 0.02)), HU_CORTEX)

    def organ(label_id: int, shape_mask) -> None:
        if shape_mask is None:
            return
        box, m = shape_mask
        m = m & cavity[box]  # organs stay inside the abdominal wall
        hu[box][m] = ORGAN_HU[label_id] + rng.uniform(-hu_jitter, hu_jitter)
        label[box][m] = label_id

    def ell(label_id: int, a0, p0, s0, ra0, rp0, rs0, wobble=0.06) -> None:
        scale = rng.uniform(0.75, 1.3) if hard else rng.uniform(0.88, 1.12)
        centre = g.vox(a0 + jit(), p0 + jit(), s0 + jit(0.04))
        wobble = wobble * 2 if hard else wobble
        organ(label_id, _ellipsoid(shape, centre, g.radii(ra0 * scale, rp0 * scale, rs0 * scale), rng, wobble))

    def tube(label_id: int, pts, r) -> None:
        da, dp = jit(0.02), jit(0.02)
        organ(label_id, _capsule(shape, [g.vox(a0 + da, p0 + dp, s0) for a0, p0, s0 in pts], g.radii(r, r, r)))

    # Organs, drawn so that later (smaller, embedded) structures win where shapes overlap.
    ell(6, -0.4, -0.02, 0.74, 0.42, 0.5, 0.3, wobble=0.05)  # liver, right lobe
    ell(6, 0.0, -0.3, 0.82, 0.25, 0.18, 0.15)  # liver, left lobe across the midline
    ell(1, 0.58, 0.28, 0.72, 0.13, 0.2, 0.17)  # spleen
    ell(2, -0.3, 0.36, 0.36, 0.1, 0.13, 0.19, wobble=0.03)  # right kidney (lower than the left)
    ell(3, 0.32, 0.36, 0.42, 0.1, 0.13, 0.19, wobble=0.03)  # left kidney
    ell(7, 0.32, -0.22, 0.7, 0.2, 0.17, 0.17, wobble=0.08)  # stomach
    ell(4, -0.3, -0.28, 0.52, 0.07, 0.1, 0.1, wobble=0.03)  # gallbladder
    s_pan = 0.55 + jit(0.03)
    tube(11, [(-0.12, 0.0, s_pan - 0.03), (0.1, 0.04, s_pan), (0.45, 0.12, s_pan + 0.04)], 0.07)  # pancreas
    tube(10, [(0.0, 0.14, s_pan + 0.02), (0.44, 0.22, s_pan + 0.06)], 0.025)  # splenic vein, behind it
    tube(10, [(-0.02, 0.08, s_pan + 0.02), (-0.2, -0.02, s_pan + 0.1)], 0.035)  # portal vein
    tube(5, [(0.1, 0.11, 0.78), (0.12, 0.1, 1.05)], 0.035)  # esophagus
    tube(9, [(-0.1, 0.2, -0.05), (-0.12, 0.18, 0.85)], 0.05)  # inferior vena cava
    tube(8, [(0.06, 0.24, -0.05), (0.05, 0.22, 1.05)], 0.055)  # aorta
    ell(12, -0.19, 0.3, 0.6, 0.035, 0.06, 0.07, wobble=0.02)  # right adrenal
    ell(13, 0.18, 0.3, 0.62, 0.035, 0.06, 0.07, wobble=0.02)  # left adrenal

    missing = sorted(set(LABEL_SCHEMES["btcv13"]) - set(np.unique(label).tolist()))
    if missing:  # the minimum sizes above should make this impossible; fail loudly rather than silently
        raise RuntimeError(f"synthetic case lost labels {missing} at shape {shape}")
    if hard:
        coarse = rng.standard_normal((4, 4, 3))
        field = ndimage.zoom(coarse, np.array(shape) / np.array(coarse.shape), order=3)[:x, :y, :z]
        field = field / (np.abs(field).max() + 1e-6) * rng.uniform(15, 40)  # intensity non-uniformity, HU
        hu = ndimage.gaussian_filter(hu, sigma=(1.0, 1.0, 1.5)) + np.where(hu > HU_AIR + 200, field, 0.0)
        hu += rng.normal(0.0, rng.uniform(20, 40), size=shape).astype(np.float32)
    else:
        hu = ndimage.gaussian_filter(hu, sigma=0.6)
        hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return hu, label, spacing


def synth_synapse(
    out: str,
    n: int = 4,
    shape: Sequence[int] = (64, 64, 24),
    seed: int = 0,
    overwrite: bool = False,
    realism: str = "easy",
) -> str:
    """Write ``n`` synthetic CT volumes with BTCV's 13 labels under ``out/img`` and ``out/label``.

    Args:
        out: output folder (created; must be empty unless ``overwrite``).
        n: number of volumes (case ids as BTCV's: 0001-0010, 0021-0040, then 0041, ...).
        shape: volume shape X Y Z (right-left, anterior-posterior, inferior-superior); each at least 32,
            32, 8. Spacing follows from a 330-390 mm in-plane and 240-300 mm craniocaudal field of view.
        seed: seed of everything random; the same arguments give byte-identical files.
        overwrite: allow a non-empty ``out`` (files of the same names are replaced).
        realism: ``"easy"`` (default: organs at fixed places, clean intensities) or ``"hard"`` (varying
            positions, sizes and intensities, non-uniformity, partial volume, stronger noise; see the module
            docstring).

    Returns:
        The output folder.
    """
    if isinstance(shape, str):
        shape = [int(v) for v in shape.replace(",", " ").split()]
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or shape[0] < 32 or shape[1] < 32 or shape[2] < 8:
        raise ValueError(f"shape must be three sizes X Y Z of at least 32 32 8, got {shape}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if realism not in REALISM:
        raise ValueError(f"realism must be one of {', '.join(REALISM)}, got {realism!r}")
    out_dir = prepare_output_dir(out, overwrite)
    for cid in case_ids(n):
        rng = np.random.default_rng([int(seed), cid])
        hu, label, spacing = make_ct_case(shape, rng, realism)
        sx, sy, sz = spacing
        # RAS affine with axis 0 towards the patient's left and axis 1 towards posterior; centred in-plane.
        affine = np.array(
            [
                [-sx, 0, 0, sx * (shape[0] - 1) / 2],
                [0, -sy, 0, sy * (shape[1] - 1) / 2],
                [0, 0, sz, -sz * shape[2] / 2],
                [0, 0, 0, 1],
            ]
        )
        write_nifti(out_dir / "img" / f"img{cid:04d}.nii.gz", hu, affine)
        write_nifti(out_dir / "label" / f"label{cid:04d}.nii.gz", label, affine)
    return str(out_dir)
