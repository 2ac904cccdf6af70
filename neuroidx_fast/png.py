"""PNG output shared by Neuron Features, maximisation images and reports (Pillow), written atomically."""

from __future__ import annotations

import math

import torch

from .atomic import write_atomic

__all__ = ["to_uint8", "to_pil", "image_grid", "save_png", "DEAD_GRAY"]

# What an undefined (NaN) image, e.g. a dead unit's NF, looks like: dark gray, never a silent black.
DEAD_GRAY = 0.15


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] (clamped) as uint8 0..255, rounded to nearest; NaN is drawn ``DEAD_GRAY``."""
    images = images.float()
    images = torch.where(torch.isnan(images), torch.full_like(images, DEAD_GRAY), images)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _as_uint8_hwc(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3, h, w] or [1, h, w], got {getattr(image, 'shape', image)!r}")
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).contiguous()


def to_pil(image: torch.Tensor, scale: int = 1):
    """A [3, h, w] image (float in [0, 1], NaN drawn dark gray; or uint8) as a PIL RGB image, enlarged
    ``scale`` times with nearest-neighbour pixels so that small crops stay readable."""
    from PIL import Image

    pil = Image.fromarray(_as_uint8_hwc(image).numpy(), mode="RGB")
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def image_grid(images, ncols: int | None = None, gap: int = 2, scale: int = 1, background=(255, 255, 255)):
    """Tile images ([N, 3, h, w] tensor or a list of same-size [3, h, w]) row by row into one PIL image."""
    from PIL import Image

    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    tiles = [to_pil(im, scale) for im in images]
    w, h = tiles[0].size
    if any(t.size != (w, h) for t in tiles):
        raise ValueError("image_grid needs images of one size")
    # no more columns than tiles: ncols=50 for 3 tiles drew a 2500 px wide, mostly blank image
    ncols = min(ncols or math.ceil(math.sqrt(len(tiles))), len(tiles))
    nrows = math.ceil(len(tiles) / ncols)
    grid = Image.new("RGB", (ncols * w + (ncols - 1) * gap, nrows * h + (nrows - 1) * gap), background)
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % ncols) * (w + gap), (i // ncols) * (h + gap)))
    return grid


def save_png(image, path) -> str:
    """Write a PIL image (or a [3, h, w] tensor) to ``path`` as PNG atomically; returns the path."""
    if isinstance(image, torch.Tensor):
        image = to_pil(image)

    def write(tmp):
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")

    return write_atomic(path, write, suffix=".png")
