"""Image parametrisations and random transforms for activation maximisation, batched (one image per row).

Everything here is deterministic on a device for a given seed: no atomics in any backward (the warps
are matrix products and FFT phase shifts, not ``grid_sample`` / ``interpolate`` whose CUDA backwards
accumulate with atomics), and every random number is drawn on the CPU from a per-image generator, so
that an image's draws do not depend on which other images share its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["color_matrix", "color_matrix_from_images", "ImageParam", "RandomTransforms", "unit_generator",
           "total_variation"]

PARAMS = ("fourier", "pixel")


def color_matrix(correlation: float = 0.8) -> torch.Tensor:
    """[3, 3] symmetric square root of the RGB covariance of natural images, modelled as equal-variance
    channels with one pairwise correlation ``correlation`` (natural images: about 0.8-0.95).

    That covariance, (1 - rho) I + rho 11^T, has eigenvalue 1 + 2 rho on the luminance axis (1, 1, 1)/sqrt(3)
    and 1 - rho on the two opponent-colour axes; the square root keeps the eigenvectors and takes the root
    of each eigenvalue. Its columns have unit norm (the diagonal of the covariance is 1), so it maps
    decorrelated unit-variance parameters to RGB values of unit variance with the natural correlation:
    gradient steps in the decorrelated space move luminance more than colour, as natural images do.
    """
    if not -0.5 < correlation < 1.0:
        raise ValueError(f"correlation must be in (-0.5, 1) for a positive definite covariance, got {correlation}")
    lum = torch.full((3, 3), 1.0 / 3.0, dtype=torch.float64)
    opp = torch.eye(3, dtype=torch.float64) - lum
    return (math.sqrt(1 + 2 * correlation) * lum + math.sqrt(1 - correlation) * opp).float()


def color_matrix_from_images(images: torch.Tensor) -> torch.Tensor:
    """[3, 3] square root of the pixel colour covariance of ``images`` [N, 3, H, W], scaled to unit-norm
    columns at most (a dataset-specific alternative to ``color_matrix``)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"expected images [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")
    pixels = images.detach().double().permute(1, 0, 2, 3).reshape(3, -1)
    if pixels.shape[1] < 2:  # the covariance of one pixel is NaN (0 / 0), on which eigh fails to converge
        raise ValueError(f"a colour covariance needs at least 2 pixels, got images {tuple(images.shape)} "
                         f"({pixels.shape[1]} pixel(s)): give more or larger images, or use color_matrix()")
    if not bool(torch.isfinite(pixels).all()):  # (eigh of a NaN covariance fails to converge too)
        raise ValueError(f"images hold {int((~torch.isfinite(pixels)).sum())} NaN or infinite pixel value(s): a "
                         "colour covariance needs finite pixels")
    cov = torch.cov(pixels)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs @ torch.diag(vals.clamp(min=1e-12).sqrt()) @ vecs.T
    return (root / root.norm(dim=0).max()).float()


def unit_generator(seed: int, unit: int) -> torch.Generator:
    """The CPU generator of one image of a batch: a function of (seed, unit) only."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(unit) * 7_919 + 12_345) % (2 ** 63))


def _freq_radius(h: int, w: int, device) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    return torch.sqrt(fx * fx + fy * fy)  # cycles per pixel, [h, w // 2 + 1]


def _gaussian_transfer(h: int, w: int, sigma: float, device) -> torch.Tensor:
    # Fourier transform of a Gaussian of std sigma pixels (circular blur).
    f = _freq_radius(h, w, device)
    return torch.exp(-2 * math.pi ** 2 * sigma ** 2 * f * f)


class ImageParam:
    """A batch of images [U, 3, h, w] in (0, 1) as a differentiable function of ``self.params``.

    ``pixel``: image = sigmoid(M z), z [U, 3, h, w]. ``fourier``: z = irfft2(s * c) with c the complex
    spectrum [U, 3, h, w//2+1] stored as real pairs and s = 1 / max(f, 1 / max(h, w)) the 1/f scaling
    (f in cycles per pixel), so that equal steps on every coefficient make natural, 1/f-like images.
    M is the colour matrix (identity when ``decorrelate`` is False).
    """

    def __init__(self, kind: str, params: torch.Tensor, size: tuple[int, int], matrix: torch.Tensor | None):
        if kind not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {kind!r}")
        self.kind, self.size = kind, size
        self.params = params.detach().clone().requires_grad_(True)
        self.matrix = matrix.to(params.device, torch.float32) if matrix is not None else None
        h, w = size
        if kind == "fourier":
            self.scale = 1.0 / torch.clamp(_freq_radius(h, w, params.device), min=1.0 / max(h, w))

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, kind: str, seeds: list[int], size, std: float = 0.01, decorrelate: bool = True,
               device=None, seed: int = 0) -> "ImageParam":
        """Small random parameters (a near-gray image), drawn per image from ``unit_generator(seed, s)``."""
        if kind not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {kind!r}")
        h, w = size
        shape = (3, h, w // 2 + 1, 2) if kind == "fourier" else (3, h, w)
        params = torch.stack([torch.randn(shape, generator=unit_generator(seed, s)) for s in seeds]) * std
        return cls(kind, params.to(device), (h, w), color_matrix() if decorrelate else None)

    @classmethod
    def from_images(cls, kind: str, images: torch.Tensor, decorrelate: bool = True, eps: float = 1e-3) -> "ImageParam":
        """The parameters whose image is ``images`` [U, 3, h, w] (clamped to [eps, 1 - eps])."""
        h, w = images.shape[-2:]
        matrix = color_matrix() if decorrelate else None
        z = torch.logit(images.detach().float().clamp(eps, 1 - eps))
        if matrix is not None:
            z = torch.einsum("ij,ujhw->uihw", torch.linalg.inv(matrix).to(z.device), z)
        if kind == "fourier":
            scale = 1.0 / torch.clamp(_freq_radius(h, w, z.device), min=1.0 / max(h, w))
            z = torch.view_as_real(torch.fft.rfft2(z, norm="ortho") / scale)
        elif kind not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {kind!r}")
        return cls(kind, z, (h, w), matrix)

    # ------------------------------------------------------------------ decoding
    def logits(self) -> torch.Tensor:
        if self.kind == "fourier":
            z = torch.fft.irfft2(torch.view_as_complex(self.params) * self.scale, s=self.size, norm="ortho")
        else:
            z = self.params
        if self.matrix is not None:  # one [3, 3] x [3, h w] product per image: no permuted copies
            z = torch.matmul(self.matrix, z.flatten(2)).view(z.shape)
        return z

    def image(self) -> torch.Tensor:
        return torch.sigmoid(self.logits())

    @torch.no_grad()
    def blur_(self, sigma: float) -> None:
        """Blur the pre-sigmoid image with a circular Gaussian of std ``sigma`` pixels (in place)."""
        if sigma <= 0:
            return
        h, w = self.size
        transfer = _gaussian_transfer(h, w, sigma, self.params.device)
        if self.kind == "fourier":  # the colour matrix mixes channels only, so it commutes with the blur
            self.params.mul_(transfer[..., None])
        else:
            spectrum = torch.fft.rfft2(self.params, norm="ortho") * transfer
            self.params.copy_(torch.fft.irfft2(spectrum, s=self.size, norm="ortho"))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """[U]: mean absolute difference between neighbouring pixels (anisotropic TV) of each image."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    return dx + dy


def _interp_matrix(coords: torch.Tensor, n: int) -> torch.Tensor:
    """[U, m, n] bilinear resampling rows: row i weighs input samples by the triangle kernel at coords[:, i]
    (coordinates clamped to [0, n - 1]: edge-replicate outside)."""
    coords = coords.clamp(0, n - 1)
    grid = torch.arange(n, dtype=coords.dtype, device=coords.device)
    return torch.relu(1 - (coords[..., None] - grid).abs())


def _shift_rows(x: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """Circularly shift x [U, 3, n, n] along ``dim`` (-1: each row, -2: each column) by a sub-pixel
    amount ``shift`` [U, n] (one per row / column), as a phase ramp in the Fourier domain."""
    n = x.shape[dim]
    k = torch.fft.rfftfreq(n, device=x.device, dtype=x.dtype)  # cycles per pixel
    angle = (-2 * math.pi) * shift[..., None] * k
    phase = torch.polar(torch.ones_like(angle), angle)
    if dim == -1:   # rows: shift [U, n_rows] -> [U, 1, n_rows, k]
        return torch.fft.irfft(torch.fft.rfft(x, dim=-1) * phase[:, None], n=n, dim=-1)
    spectrum = torch.fft.rfft(x, dim=-2)                     # [U, 3, k, n_cols]
    return torch.fft.irfft(spectrum * phase.transpose(1, 2)[:, None], n=n, dim=-2)


def _fft_size(n: int) -> int:
    """The smallest m >= n whose prime factors are 2, 3, 5 and 7 (fast FFT sizes for cuFFT / pocketfft)."""
    m = n
    while True:
        rest = m
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate square images [U, 3, n, n] by ``angle`` [U] radians about their centre with three shears
    (x, y, x: Paeth), each a per-row sub-pixel shift done with FFT phase ramps (circular, exact on
    band-limited images, deterministic)."""
    n = x.shape[-1]
    centred = torch.arange(n, dtype=x.dtype, device=x.device) - (n - 1) / 2
    a = (-torch.tan(angle / 2))[:, None] * centred  # [U, n]: x-shear shift of each row
    b = torch.sin(angle)[:, None] * centred          # y-shear shift of each column
    x = _shift_rows(x, a, dim=-1)
    x = _shift_rows(x, b, dim=-2)
    return _shift_rows(x, a, dim=-1)


class RandomTransforms:
    """Per-image random rotation + scale + jitter on a mid-gray surround ("standard"): the model sees a
    differently warped copy of each image at every step, so the optimum cannot hide in pixel-exact
    patterns.

    Output pixel p (relative to the image centre) shows the image at R(angle) (p / scale + t), with an
    angle in [-``degrees``, ``degrees``], a scale in [1 - ``scale``, 1 + ``scale``] and a translation t of up
    to ``jitter`` pixels on each axis; outside the image is mid-gray. The draws of image u come from
    ``unit_generator(seed, seeds[u])``. Two implementations of the same warp, both deterministic on
    their device: ``sample`` (bilinear ``grid_sample``; its CPU backward runs one image per thread) and
    ``fft`` (the image padded by ``pad`` gray pixels, rotated with three FFT shears, then resampled with
    per-image bilinear matrices: no atomics, so deterministic on CUDA, whose ``grid_sample`` backward is
    not). ``method="auto"``: ``sample`` on the CPU, ``fft`` elsewhere.
    """

    def __init__(self, seeds: list[int], steps: int, size, seed: int = 0, degrees: float = 10.0,
                 scale: float = 0.1, jitter: int | None = None, pad: int | None = None, device=None,
                 method: str = "auto"):
        if method not in ("auto", "sample", "fft"):
            raise ValueError(f"method must be 'auto', 'sample' or 'fft', got {method!r}")
        h, w = size
        self.size, self.method = (h, w), method
        self.jitter = max(1, min(h, w) // 16) if jitter is None else jitter
        if pad is None:  # fft: no sample may leave the canvas, no content may wrap around in a shear
            n = max(h, w)
            reach = n / 2 * scale / max(1 - scale, 1e-3) + self.jitter
            pad = max(2, math.ceil(max(reach, (n / 2 + reach) * math.sin(math.radians(abs(degrees))))) + 1)
        self.pad = pad
        draws = []
        for s in seeds:
            g = unit_generator(seed, s)
            g.manual_seed(g.initial_seed() ^ 0x5DEECE66D)  # a stream apart from the initial-image draws
            u = torch.rand(steps, 4, generator=g, dtype=torch.float64)
            draws.append(torch.stack([
                (2 * u[:, 0] - 1) * math.radians(degrees),
                1 + (2 * u[:, 1] - 1) * scale,
                (2 * u[:, 2] - 1) * self.jitter,
                (2 * u[:, 3] - 1) * self.jitter,
            ], dim=1))
        self.draws = torch.stack(draws).float().to(device) if draws else torch.zeros(0, steps, 4, device=device)

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        method = self.method
        if method == "auto":
            method = "sample" if images.device.type == "cpu" else "fft"
        draws = self.draws[:, step].to(images.device, images.dtype)
        return self._sample(images, *draws.unbind(1)) if method == "sample" else self._fft(images, *draws.unbind(1))

    def _sample(self, images, angle, scale, ty, tx):
        h, w = self.size
        ys = (torch.arange(h, dtype=images.dtype, device=images.device) - (h - 1) / 2)[None, :, None]
        xs = (torch.arange(w, dtype=images.dtype, device=images.device) - (w - 1) / 2)[None, None, :]
        Y = ys / scale[:, None, None] + ty[:, None, None]      # [U, h, 1]
        X = xs / scale[:, None, None] + tx[:, None, None]      # [U, 1, w]
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        x_in = X * cos + Y * sin                                 # the rotation of the fft path, same sense
        y_in = Y * cos - X * sin
        grid = torch.stack([x_in * (2 / max(w - 1, 1)), y_in * (2 / max(h - 1, 1))], dim=-1)
        out = F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out + 0.5

    def _fft(self, images, angle, scale, ty, tx):
        h, w = self.size
        side = _fft_size(max(h, w) + 2 * self.pad)  # square canvas: the same shears for rows and columns
        top, left = (side - h) // 2, (side - w) // 2
        canvas = F.pad(images, (left, side - w - left, top, side - h - top), value=0.5)
        canvas = _rotate(canvas, angle)
        ys = torch.arange(h, dtype=images.dtype, device=images.device) - (h - 1) / 2
        xs = torch.arange(w, dtype=images.dtype, device=images.device) - (w - 1) / 2
        rows = _interp_matrix(ys / scale[:, None] + (top + (h - 1) / 2) + ty[:, None], side)   # [U, h, side]
        cols = _interp_matrix(xs / scale[:, None] + (left + (w - 1) / 2) + tx[:, None], side)  # [U, w, side]
        return rows[:, None] @ canvas @ cols[:, None].transpose(-1, -2)
