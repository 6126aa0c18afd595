"""A procedural batik motif generator: the built-in dataset, so every command runs offline.

Four families of classical Javanese motifs, each drawn as smooth fields on a tiled plane:

* kawung: four ellipses (palm-fruit petals) pointing at a centre, in a square grid;
* parang: diagonal bands whose edges follow an S-shaped wave, with lozenge dots between them;
* ceplok: symmetric star/rosette tiles (n-petal polar curves with a ring and corner quarters);
* truntum: small scattered flower/star points on a dark ground.

and a few colourways (sogan browns, indigo, cream/white with dark lines, red pesisir). Every image
is a deterministic function of ``(seed, index)``: the dataset can be any size (20k "images" cost
nothing) and every worker or rank draws the same image for the same index. Wax-crackle lines and
fabric grain are added so that the images have the fine texture a discriminator must learn.
"""
from __future__ import annotations

import math

import numpy as np

from batikfast.data.dataset import Dataset

MOTIFS = ("kawung", "parang", "ceplok", "truntum")

# (ground, motif, accent, line) in RGB 0..1; line is the canting outline colour.
COLOURWAYS = {
    "sogan": ((0.36, 0.22, 0.12), (0.78, 0.60, 0.38), (0.93, 0.85, 0.68), (0.16, 0.09, 0.05)),
    "indigo": ((0.09, 0.13, 0.30), (0.55, 0.66, 0.82), (0.93, 0.93, 0.90), (0.04, 0.05, 0.14)),
    "cream": ((0.94, 0.90, 0.80), (0.45, 0.28, 0.16), (0.20, 0.24, 0.45), (0.12, 0.08, 0.06)),
    "pesisir": ((0.92, 0.86, 0.74), (0.70, 0.18, 0.16), (0.20, 0.40, 0.30), (0.25, 0.08, 0.06)),
}


def _uniform(rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> float:
    # A Python float: numpy float64 scalars would promote the float32 fields to float64 (NEP 50).
    return float(rng.uniform(low, high))


def _smooth_inside(signed: np.ndarray, width: float) -> np.ndarray:
    """1 inside (signed < 0), 0 outside, with a soft edge of ``width`` for anti-aliasing."""
    return np.clip(0.5 - signed / width, 0.0, 1.0)


def _outline(signed: np.ndarray, thickness: float, width: float) -> np.ndarray:
    return _smooth_inside(np.abs(signed) - thickness, width)


def _kawung(x, y, rng, aa):
    cx, cy = x - np.floor(x) - 0.5, y - np.floor(y) - 0.5
    major, minor = _uniform(rng, 0.20, 0.26), _uniform(rng, 0.09, 0.13)
    centre = _uniform(rng, 0.21, 0.26)
    fill = np.zeros_like(x)
    line = np.zeros_like(x)
    accent = np.zeros_like(x)
    for angle in (0.25, 0.75, 1.25, 1.75):
        ux, uy = math.cos(angle * math.pi), math.sin(angle * math.pi)
        along = cx * ux + cy * uy - centre
        across = -cx * uy + cy * ux
        radius = np.sqrt((along / major) ** 2 + (across / minor) ** 2)
        signed = (radius - 1.0) * minor
        fill = np.maximum(fill, _smooth_inside(signed, aa))
        line = np.maximum(line, _outline(signed, 0.012, aa))
        seed_dot = np.sqrt((along + 0.03) ** 2 + across ** 2) - 0.035
        accent = np.maximum(accent, _smooth_inside(seed_dot, aa))
    centre_dot = np.sqrt(cx ** 2 + cy ** 2) - 0.05
    accent = np.maximum(accent, _smooth_inside(centre_dot, aa))
    return fill, accent, line


def _parang(x, y, rng, aa):
    amplitude = _uniform(rng, 0.10, 0.22)
    wiggle = int(rng.integers(1, 3))
    s = (x + y) / np.sqrt(2.0)
    d = (x - y) / np.sqrt(2.0)
    wave = s + amplitude * np.sin(2 * np.pi * wiggle * d)
    frac = wave - np.floor(wave)
    half_width = _uniform(rng, 0.22, 0.32)
    signed = (np.abs(frac - 0.5) - half_width) / (1 + 2 * np.pi * amplitude * wiggle)
    fill = _smooth_inside(signed, aa)
    line = _outline(signed, 0.012, aa)
    # inner S-curve stroke along the band, the parang's "blade"
    stroke = np.abs(frac - 0.5 - 0.12 * np.sin(4 * np.pi * d)) - 0.03
    accent = _smooth_inside(stroke, aa) * fill
    # lozenge dots ("mlinjon") in the gaps between bands
    gap = np.abs(frac - 0.0)
    gap = np.minimum(gap, 1 - frac)
    cell = d * 2 * wiggle - np.floor(d * 2 * wiggle) - 0.5
    lozenge = gap * 1.4 + np.abs(cell) * 0.35 - 0.12
    accent = np.maximum(accent, _smooth_inside(lozenge, aa))
    return fill, accent, line


def _ceplok(x, y, rng, aa):
    cx, cy = x - np.floor(x) - 0.5, y - np.floor(y) - 0.5
    petals = int(rng.choice([4, 6, 8]))
    depth = _uniform(rng, 0.25, 0.45)
    radius = _uniform(rng, 0.28, 0.36)
    r = np.sqrt(cx ** 2 + cy ** 2)
    phi = np.arctan2(cy, cx)
    petal_edge = radius * (1 - depth + depth * np.abs(np.cos(petals * phi / 2)))
    signed = r - petal_edge
    fill = _smooth_inside(signed, aa)
    line = _outline(signed, 0.010, aa)
    ring = _outline(r - radius * 0.35, 0.012, aa)
    centre = _smooth_inside(r - radius * 0.18, aa)
    corner_r = np.sqrt((0.5 - np.abs(cx)) ** 2 + (0.5 - np.abs(cy)) ** 2)
    corners = _smooth_inside(corner_r - _uniform(rng, 0.10, 0.16), aa)
    line = np.maximum(line, _outline(corner_r - 0.18, 0.01, aa))
    accent = np.maximum(np.maximum(ring, centre), corners)
    return fill, accent, line


def _truntum(x, y, rng, aa):
    ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    cells = 64
    offsets = rng.uniform(0.25, 0.75, size=(2, cells, cells)).astype(np.float32)
    sizes = rng.uniform(0.10, 0.17, size=(cells, cells)).astype(np.float32)
    present = rng.uniform(size=(cells, cells)) < 0.85
    ox = offsets[0][iy % cells, ix % cells]
    oy = offsets[1][iy % cells, ix % cells]
    size = sizes[iy % cells, ix % cells]
    cx, cy = x - ix - ox, y - iy - oy
    r = np.sqrt(cx ** 2 + cy ** 2)
    phi = np.arctan2(cy, cx)
    star_edge = size * (0.55 + 0.45 * np.abs(np.cos(2.5 * phi)))
    signed = r - star_edge
    star = _smooth_inside(signed, aa) * present[iy % cells, ix % cells]
    dot = _smooth_inside(r - size * 0.25, aa) * present[iy % cells, ix % cells]
    line = _outline(signed, 0.008, aa) * present[iy % cells, ix % cells]
    return star, dot, line


_DRAW = {"kawung": _kawung, "parang": _parang, "ceplok": _ceplok, "truntum": _truntum}


def render_batik(resolution: int, rng: np.random.Generator, motif: str | None = None,
                 colourway: str | None = None) -> np.ndarray:
    """One batik image as ``float32`` ``[3, resolution, resolution]`` in [0, 1]."""
    motif = motif or MOTIFS[rng.integers(len(MOTIFS))]
    if motif not in _DRAW:
        raise ValueError(f"motif must be one of {MOTIFS}, got {motif!r}")
    if colourway is None:
        names = list(COLOURWAYS)
        # truntum is traditionally a light motif on a dark ground
        colourway = ("sogan", "indigo")[rng.integers(2)] if motif == "truntum" else \
            names[rng.integers(len(names))]
    ground, fill_c, accent_c, line_c = (np.asarray(c, np.float32) for c in COLOURWAYS[colourway])
    if motif == "truntum":
        fill_c, accent_c = accent_c, fill_c
    jitter = rng.normal(0, 0.04, size=(4, 3)).astype(np.float32)
    ground, fill_c, accent_c, line_c = (np.clip(c + j, 0, 1) for c, j in
                                        zip((ground, fill_c, accent_c, line_c), jitter))

    tiles = _uniform(rng, 2.0, 5.0) if motif != "truntum" else _uniform(rng, 4.0, 8.0)
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    x, y = np.meshgrid(coords, coords)
    angle = float(rng.normal(0, 0.05))
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = x * cos - y * sin, x * sin + y * cos
    x = x * tiles + _uniform(rng, 0, 1)
    y = y * tiles + _uniform(rng, 0, 1)
    aa = 1.5 * tiles / resolution
    fill, accent, line = _DRAW[motif](x, y, rng, aa)

    image = np.broadcast_to(ground[:, None, None], (3, resolution, resolution)).copy()
    for mask, colour in ((fill, fill_c), (accent * fill.max(initial=1.0), accent_c),
                         (line, line_c)):
        image += (colour[:, None, None] - image) * mask[None].astype(np.float32)
    image = _add_texture(image, rng, resolution)
    return np.clip(image, 0.0, 1.0)


def _add_texture(image: np.ndarray, rng: np.random.Generator, resolution: int) -> np.ndarray:
    # Wax crackle: dye seeping through random thin cracks, darker than the surroundings.
    coords = np.arange(resolution, dtype=np.float32) / resolution
    x, y = np.meshgrid(coords, coords)
    crackle = np.zeros_like(x)
    for _ in range(int(rng.integers(2, 6))):
        fx, fy = (float(v) for v in rng.uniform(3, 12, size=2))
        px, py = (float(v) for v in rng.uniform(0, 2 * np.pi, size=2))
        field = np.sin(fx * 2 * np.pi * x + px + 2 * np.sin(fy * np.pi * y + py))
        crackle = np.maximum(crackle, np.clip(1 - np.abs(field) * resolution / 6, 0, 1))
    image = image * (1 - 0.25 * crackle[None])
    grain = rng.standard_normal(size=(1, resolution, resolution), dtype=np.float32) * 0.015
    return image + grain


class BuiltinBatikDataset(Dataset):
    """Procedural batik motifs: ``size`` virtual images, each drawn from ``(seed, index)``.

    Args:
        resolution: image size (any positive integer).
        size: number of distinct images (before x-flips).
        seed: changes every image.
        xflip: double the dataset with mirrored copies.
        use_labels: label each image with its motif (one-hot over :data:`MOTIFS`).
        motifs: restrict to these motif families.
    """

    name = "builtin-batik"

    def __init__(self, resolution: int = 256, size: int = 20000, seed: int = 0,
                 xflip: bool = False, use_labels: bool = False, motifs=MOTIFS, channels: int = 3):
        if int(resolution) != resolution or resolution < 4:
            raise ValueError(f"resolution must be an integer >= 4, got {resolution!r}")
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        unknown = [m for m in motifs if m not in MOTIFS]
        if unknown or not motifs:
            raise ValueError(f"motifs must be a non-empty subset of {MOTIFS}, got {motifs!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.motifs = tuple(motifs)
        self.num_channels = channels
        self.label_dim = len(MOTIFS) if use_labels else 0
        super().__init__(int(size), xflip)

    def motif_of(self, raw_index: int) -> str:
        return self.motifs[raw_index % len(self.motifs)]

    def get_label(self, raw_index: int) -> np.ndarray:
        """The label without rendering the image (one-hot motif, or empty)."""
        label = np.zeros([self.label_dim], dtype=np.float32)
        if self.label_dim:
            label[MOTIFS.index(self.motif_of(raw_index))] = 1
        return label

    def _load_item(self, raw_index: int):
        rng = np.random.default_rng([self.seed, raw_index])
        image = render_batik(self.resolution, rng, self.motif_of(raw_index))
        if self.num_channels == 1:
            image = image.mean(axis=0, keepdims=True)
        image = np.rint(image * 255).astype(np.uint8)
        return image, self.get_label(raw_index)
