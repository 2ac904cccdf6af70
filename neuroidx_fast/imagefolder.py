"""An image folder as a dataset (one subfolder per class, JPEG/PNG), read with Pillow, in pixel space."""

from __future__ import annotations

import hashlib
import os
import warnings

import torch
from torch.utils.data import Dataset

from .prepare import positive_int

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _to_rgb(image):
    """An 8-bit RGB copy of a Pillow image. 16-bit and 32-bit grayscale (modes I;16*, I, F) are scaled
    to 0..255 first (Pillow's own conversion clips them at 255: near-white): I;16 from 0..65535; I and F
    from the smallest of 1 (F only), 255 and 65535 that holds the image's maximum, else that maximum."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        import numpy as np

        pixels = np.asarray(image, dtype=np.float64)
        peak = float(pixels.max(initial=0.0))
        if image.mode.startswith("I;16"):
            top = 65535.0
        else:
            ranges = ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0)
            top = next((r for r in ranges if peak <= r), peak)
        image = Image.fromarray(np.clip(np.rint(pixels / top * 255), 0, 255).astype(np.uint8))  # 2-d uint8: "L"
    return image.convert("RGB")


class ImageFolder(Dataset):
    """``root/<class>/<image>``: items are (image [3, size, size] float32 in [0, 1], label); with
    ``uint8=True`` the image is its 8-bit pixels as they are (uint8), which every pass reads as k / 255,
    the same values: a quarter of the bytes to move from loader workers and to the device, and Neuron
    Features crop them without a conversion (the ``neuroidx`` command reads folders so).

    Images are resized so that their shorter side is ``resize`` (default: ``size``) and center-cropped
    to ``size`` x ``size`` (``crop=False``: resized to ``size`` x ``size`` directly, aspect not kept).
    Classes are the subfolder names, sorted (one without images too, with a warning); images, in them
    and in their subfolders (linked ones too), are sorted by path, so ids are stable. A folder
    with images and no subfolders is one unlabelled set: items are images only.
    """

    def __init__(self, root, size: int = 224, resize: int | None = None, crop: bool = True, uint8: bool = False):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (or is not a directory)")
        size = positive_int("size", size)
        resize = positive_int("resize", resize, none_means="size")
        if resize is not None and not crop:
            raise ValueError("resize (the shorter side before the centre crop) applies only with cropping: drop "
                             "resize, or keep the crop")
        self.root, self.size, self.resize, self.crop, self.uint8 = root, size, resize or size, crop, bool(uint8)
        if self.resize < size and crop:
            raise ValueError(f"resize ({self.resize}) must be at least size ({size}) to crop from it")
        subfolders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                            and not d.startswith("."))
        self.samples: list[tuple[str, int]] = []
        loose = [f for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                 and os.path.isfile(os.path.join(root, f))]
        if subfolders:
            self.classes: list[str] | None = subfolders
            for label, name in enumerate(subfolders):
                for path in self._images(os.path.join(root, name)):
                    self.samples.append((path, label))
            if loose and not self.samples:
                raise ValueError(f"the subfolders of {root!r} ({', '.join(subfolders[:5])}) hold no images, and its "
                                 f"{len(loose)} images lie beside them: put the images in one subfolder per class, "
                                 "or remove the subfolders to index them as one unlabelled set")
            if loose:
                warnings.warn(f"{len(loose)} images at the top of {root!r} ({', '.join(loose[:3])}"
                              f"{' ...' if len(loose) > 3 else ''}) are in no class folder: left out", stacklevel=2)
            # (kept as classes: the class indices are those of the folder names a model was trained on)
            empty = sorted(set(subfolders) - {subfolders[label] for _, label in self.samples})
            if empty and self.samples:
                warnings.warn(f"{len(empty)} class folder(s) of {root!r} hold no JPEG or PNG images "
                              f"({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}): kept as classes without "
                              "images", stacklevel=2)
        else:
            self.classes = None
            self.samples = [(path, -1) for path in self._images(root)]
        if not self.samples:
            raise ValueError(f"no JPEG or PNG images in {root!r}: put images in one subfolder per class "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        self.targets = [label for _, label in self.samples] if self.classes else None

    @staticmethod
    def _images(folder: str) -> list[str]:
        # linked folders are followed, as a linked class folder is; one reached before (through a link back
        # up: a cycle; or through a second link) is not walked again
        found, walked = [], {os.path.realpath(folder)}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            kept = []
            for name in sorted(d for d in dirnames if not d.startswith(".")):
                real = os.path.realpath(os.path.join(dirpath, name))
                if real not in walked:
                    walked.add(real)
                    kept.append(name)
            dirnames[:] = kept
            found += [os.path.join(dirpath, f) for f in filenames
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        return sorted(found)

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """SHA-256 of the file list (paths relative to the root, sizes, modification times, labels): ids
        are positions in it, so a file added, removed or replaced changes what every later id names, and
        one edited in place changes the pixels its crops are cut from. (Reading every file's bytes would
        cost a pass over the dataset; a copy that keeps the times, cp -p, restores it.)"""
        digest = hashlib.sha256()
        for path, label in self.samples:
            try:
                stat = os.stat(path)
            except OSError as exc:  # (a broken link, a file removed since: as load says it)
                raise ValueError(f"cannot read image {path!r}: {exc}") from None
            digest.update(f"{os.path.relpath(path, self.root)}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
        return digest.hexdigest()

    def geometry(self) -> str:
        """How files become images (size, resize, crop): the same files made otherwise are other pixels,
        which a checkpoint's resume must not mix (``fingerprint`` covers the files themselves)."""
        return f"size={self.size}|resize={self.resize}|crop={self.crop}"

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.samples[i][0]
        try:
            with Image.open(path) as image:
                image = _to_rgb(image)
                if self.crop:
                    scale = self.resize / min(image.size)
                    w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
                    image = image.resize((w, h), Image.BILINEAR)
                    left, top = (w - self.size) // 2, (h - self.size) // 2
                    image = image.crop((left, top, left + self.size, top + self.size))
                else:
                    image = image.resize((self.size, self.size), Image.BILINEAR)
                data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot read image {path!r}: {exc}") from None
        image = data.reshape(self.size, self.size, 3).permute(2, 0, 1)
        return image.contiguous() if self.uint8 else image.float().div_(255)

    def __getitem__(self, i: int):
        image = self.load(i)
        return (image, self.samples[i][1]) if self.classes else image
