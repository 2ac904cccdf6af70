"""Built-in datasets with known structure, for tests, demos and known-answer checks.

``Shapes``: procedural images of colored shapes on textured backgrounds, whose classes differ partly by
color only and partly by shape only, so that color- and shape-selective units have something to find.
``Digits``: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download), enlarged,
gray or tinted with a random color.

Both are map-style datasets yielding ``(image, label)``: ``image`` a float32 [3, size, size] pixel-space
tensor in [0, 1], ``label`` an int; ``.classes`` names the classes and ``.targets`` (int64 tensor) holds
every label. Every item is a pure function of (seed, index): any item can be made alone, in any order,
in any DataLoader worker, and is the same every time.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .prepare import as_index

__all__ = ["Shapes", "Digits", "SHAPES_COLORS", "SHAPES_SHAPES", "SHAPES_DEFAULT_CLASSES", "SHAPES_BACKGROUNDS"]

# Base colors (RGB in [0, 1]); every item jitters its color a little around the base.
SHAPES_COLORS = {
    "red": (0.86, 0.12, 0.10),
    "green": (0.12, 0.70, 0.16),
    "blue": (0.12, 0.26, 0.90),
    "yellow": (0.95, 0.86, 0.12),
    "cyan": (0.10, 0.80, 0.85),
    "magenta": (0.85, 0.15, 0.80),
    "orange": (0.98, 0.55, 0.08),
    "white": (0.94, 0.94, 0.94),
    "black": (0.05, 0.05, 0.05),
}
SHAPES_SHAPES = ("disk", "square", "triangle", "ring", "stripes", "cross")
SHAPES_BACKGROUNDS = ("noise", "gradient", "stripes")

# Pairs that differ only by color (red/green/blue disk, red/blue square, yellow/red triangle, green/white
# ring) and sets that differ only by shape (red disk, square, triangle, stripes).
SHAPES_DEFAULT_CLASSES = (
    "red disk", "green disk", "blue disk", "red square", "blue square",
    "yellow triangle", "red triangle", "red stripes", "green ring", "white ring",
)

_MASK64 = (1 << 64) - 1


def _item_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed from (seed, index, stream) (splitmix64 finaliser), so neighbouring items
    do not get neighbouring Mersenne-Twister seeds."""
    z = 0
    for part in (seed, index, stream):
        z = (z + part * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_index(i, length: int, what: str) -> int:
    index = as_index(i)  # ints, NumPy integers (a Subset of np.arange), 0-d integer tensors; no bools, floats
    if index is None:
        raise TypeError(f"{what} indices must be ints, got {type(i).__name__} {i!r}")
    i = index
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {i} out of range for {what} of {length} images")
    return i


def _uniform(g: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


class Shapes(Dataset):
    """Procedural images: one colored shape on a textured background; the class is (color, shape).

    ``n`` images of ``size`` x ``size`` pixels. ``classes``: names "<color> <shape>" with colors from
    ``SHAPES_COLORS`` and shapes from ``SHAPES_SHAPES`` (default ``SHAPES_DEFAULT_CLASSES``: ten classes,
    some differing only by color, some only by shape). Image ``i`` has label ``i % len(classes)``
    (balanced) and a random position, scale (``scale``: the shape's radius as a fraction of half the
    image side) and rotation of its shape, a small random jitter of its color, and a background drawn
    from ``backgrounds`` (smooth color noise, a two-color gradient, low-contrast stripes; muted colors)
    plus pixel noise of std ``noise``. Everything about image ``i`` depends only on (``seed``, ``i``).
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0, classes=None, backgrounds=SHAPES_BACKGROUNDS,
                 scale: tuple[float, float] = (0.35, 0.7), noise: float = 0.03, color_jitter: float = 0.06):
        self.n = _check_int("n", n, 0)
        self.size = _check_int("size", size, 8)
        self.seed = _check_int("seed", seed, 0)
        names = list(SHAPES_DEFAULT_CLASSES if classes is None else [classes] if isinstance(classes, str) else classes)
        if not names:
            raise ValueError("classes is empty: give at least one '<color> <shape>' name")
        if len(set(names)) != len(names):
            raise ValueError(f"classes named twice: {sorted({c for c in names if names.count(c) > 1})}")
        self._specs = []
        for name in names:
            parts = name.split() if isinstance(name, str) else []
            if len(parts) != 2 or parts[0] not in SHAPES_COLORS or parts[1] not in SHAPES_SHAPES:
                raise ValueError(f"class {name!r} is not '<color> <shape>' with a color in {list(SHAPES_COLORS)} "
                                 f"and a shape in {list(SHAPES_SHAPES)}")
            self._specs.append((torch.tensor(SHAPES_COLORS[parts[0]], dtype=torch.float32), parts[1]))
        self.classes = names
        backgrounds = [backgrounds] if isinstance(backgrounds, str) else list(backgrounds)
        unknown = [b for b in backgrounds if b not in SHAPES_BACKGROUNDS]
        if not backgrounds or unknown:
            raise ValueError(f"backgrounds must be a non-empty subset of {list(SHAPES_BACKGROUNDS)}, "
                             f"got {backgrounds!r}")
        self.backgrounds = backgrounds
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
        self.scale = (lo, hi)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (noise, color_jitter)) or \
                not (noise >= 0 and color_jitter >= 0 and math.isfinite(noise) and math.isfinite(color_jitter)):
            raise ValueError(f"noise and color_jitter must be finite and >= 0, got {noise!r}, {color_jitter!r}")
        self.noise, self.color_jitter = float(noise), float(color_jitter)
        self.targets = torch.arange(self.n, dtype=torch.int64) % len(names)
        # Pixel-centre coordinates in [-1, 1], shared by every item.
        axis = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size * 2 - 1
        self._y, self._x = torch.meshgrid(axis, axis, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Shapes(n={self.n}, size={self.size}, seed={self.seed}, classes={len(self.classes)})"

    def __getitem__(self, i):
        i = _check_index(i, self.n, "Shapes")
        label = int(self.targets[i])
        g = torch.Generator().manual_seed(_item_seed(self.seed, i))
        image = self._background(g)
        color, shape = self._specs[label]
        alpha = self._shape_mask(g, shape)
        jitter = (torch.rand(3, generator=g) * 2 - 1) * self.color_jitter
        brightness = 0.9 + 0.2 * torch.rand(1, generator=g)
        color = ((color + jitter) * brightness).clamp(0, 1)
        image = image * (1 - alpha) + color[:, None, None] * alpha
        if self.noise:
            image = image + self.noise * torch.randn(image.shape, generator=g)
        return image.clamp_(0, 1), label

    # -------------------------------------------------------------- drawing
    def _muted_color(self, g: torch.Generator) -> torch.Tensor:
        rgb = 0.2 + 0.6 * torch.rand(3, generator=g)
        gray = rgb.mean()
        keep = 0.25 + 0.35 * torch.rand(1, generator=g)  # saturation kept: muted, never vivid
        return gray + (rgb - gray) * keep

    def _direction(self, g: torch.Generator) -> torch.Tensor:
        angle = float(_uniform(g, 0, 2 * math.pi))
        return self._x * math.cos(angle) + self._y * math.sin(angle)  # in [-sqrt 2, sqrt 2]

    def _background(self, g: torch.Generator) -> torch.Tensor:
        kind = self.backgrounds[int(torch.randint(len(self.backgrounds), (1,), generator=g))]
        c1, c2 = self._muted_color(g), self._muted_color(g)
        if kind == "gradient":
            t = (self._direction(g) / math.sqrt(2) + 1) / 2
        elif kind == "noise":
            cells = int(torch.randint(3, 9, (1,), generator=g))
            coarse = torch.rand(1, 1, cells, cells, generator=g)
            t = F.interpolate(coarse, size=(self.size, self.size), mode="bicubic", align_corners=False)[0, 0]
        else:  # low-contrast stripes
            period = float(_uniform(g, 0.15, 0.5))  # in units of the half side
            phase = float(_uniform(g, 0, 2 * math.pi))
            contrast = float(_uniform(g, 0.15, 0.35))
            t = 0.5 + contrast * torch.sin(self._direction(g) * (2 * math.pi / period) + phase)
        t = t.clamp(0, 1)
        return c1[:, None, None] * (1 - t) + c2[:, None, None] * t

    def _shape_mask(self, g: torch.Generator, shape: str) -> torch.Tensor:
        """[size, size] coverage in [0, 1] of one randomly placed, scaled and rotated shape (anti-aliased
        over about one pixel through a signed distance)."""
        radius = float(_uniform(g, *self.scale))
        cx, cy = (float(v) for v in _uniform(g, -1 + radius, 1 - radius, 2))
        angle = float(_uniform(g, 0, 2 * math.pi))
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = self._x - cx, self._y - cy
        u = (dx * cos + dy * sin) / radius  # shape-local coordinates: the shape fits the unit disk
        v = (-dx * sin + dy * cos) / radius
        if shape == "disk":
            sdf = torch.sqrt(u * u + v * v) - 1
        elif shape == "ring":
            sdf = (torch.sqrt(u * u + v * v) - 0.72).abs() - 0.28
        elif shape == "square":
            sdf = torch.maximum(u.abs(), v.abs()) - 0.7
        elif shape == "stripes":  # a square filled with stripes of the shape's color
            period = 0.45
            stripes = -torch.sin(u * (2 * math.pi / period)) * (period / (2 * math.pi))
            sdf = torch.maximum(torch.maximum(u.abs(), v.abs()) - 0.75, stripes)
        elif shape == "triangle":  # equilateral, circumradius 1: inside where every edge term is <= 0
            edges = [u * math.cos(a) + v * math.sin(a) - 0.5
                     for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
            sdf = torch.maximum(torch.maximum(edges[0], edges[1]), edges[2])
        elif shape == "cross":
            arm = 0.3
            sdf = torch.minimum(torch.maximum(u.abs() - 1, v.abs() - arm), torch.maximum(u.abs() - arm, v.abs() - 1))
        else:  # validated in __init__
            raise AssertionError(shape)
        pixels_per_unit = radius * self.size / 2
        return (0.5 - sdf * pixels_per_unit).clamp(0, 1)


class Digits(Dataset):
    """scikit-learn's handwritten digits (1797 images, 8x8, classes "0".."9"), enlarged to ``size``.

    Images are upsampled bilinearly and rescaled to [0, 1]; gray is replicated to 3 channels, or, with
    ``colorize=True``, used as the coverage of a random saturated foreground color over a random dark
    background color (both a pure function of (``seed``, original digit index)). ``split``: "all", or a
    deterministic "train" / "test" split (a permutation drawn from ``seed`` puts ``test_fraction`` of
    the digits in "test").
    """

    def __init__(self, size: int = 32, colorize: bool = False, seed: int = 0, split: str = "all",
                 test_fraction: float = 0.25):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("Digits needs scikit-learn (pip install scikit-learn)") from None
        self.size = _check_int("size", size, 8)
        self.seed = _check_int("seed", seed, 0)
        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
        self.colorize, self.split = bool(colorize), split
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_test = int(round(len(labels) * test_fraction))
        if n_test in (0, len(labels)):
            raise ValueError(f"test_fraction={test_fraction!r} of {len(labels)} images leaves the "
                             f"{'test' if n_test == 0 else 'train'} split empty")
        chosen = {"all": torch.arange(len(labels)), "test": order[:n_test].sort().values,
                  "train": order[n_test:].sort().values}[split]
        self.source_index = chosen  # position of each item in load_digits()
        self._small = images[chosen]
        self.targets = labels[chosen].clone()
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return f"Digits(size={self.size}, colorize={self.colorize}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, i):
        i = _check_index(i, len(self), "Digits")
        gray = F.interpolate(self._small[i][None, None], size=(self.size, self.size), mode="bilinear",
                             align_corners=False)[0].clamp(0, 1)
        if not self.colorize:
            return gray.expand(3, -1, -1).contiguous(), int(self.targets[i])
        g = torch.Generator().manual_seed(_item_seed(self.seed, int(self.source_index[i]), stream=1))
        hue, fg_sat, fg_val, hue_shift, bg_sat, bg_val = torch.rand(6, generator=g, dtype=torch.float64).tolist()
        fg = _hsv_to_rgb(hue, 0.75 + 0.25 * fg_sat, 0.8 + 0.2 * fg_val)  # saturated, bright
        bg = _hsv_to_rgb((hue + 0.25 + 0.5 * hue_shift) % 1.0, bg_sat, 0.05 + 0.25 * bg_val)  # another hue, dark
        image = bg[:, None, None] * (1 - gray) + fg[:, None, None] * gray
        return image.clamp_(0, 1), int(self.targets[i])


def _hsv_to_rgb(h: float, s: float, v: float) -> torch.Tensor:
    k = torch.tensor([5.0, 3.0, 1.0])
    t = (k + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(t, 4 - t), 0, 1)
