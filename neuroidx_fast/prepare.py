"""What a pass of a model over a dataset starts with (the device, the model's input dtype, the dataset's
length), and how it reads the dataset's batches."""

from __future__ import annotations

import contextlib
import functools
import operator

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from .background import BackgroundBatches, background_enabled
from .ops.reference import decode_pixels

__all__ = ["model_device", "param_dtype", "eval_on_device", "evaluating", "restores_modes", "dataset_length",
           "split_batch", "collate_images", "image_loader", "pins_batches", "reads_in_background", "as_index",
           "integer_tensor", "check_preprocess", "check_label_range", "positive_int", "nonfinite_images",
           "check_pixel_batch", "pixel_space", "first_line"]


def check_pixel_batch(images: torch.Tensor, what: str) -> None:
    """A batch of images [B, C, H, W] a pass can read: floating pixels in [0, 1], or 8-bit ones (uint8)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not (images.is_floating_point()
                                                                       or images.dtype == torch.uint8):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what}: images must be float tensors [3, H, W] in pixel space [0, 1] (or uint8 tensors "
                         f"of 8-bit pixels); got a batch {shape} {getattr(images, 'dtype', '')}: convert them "
                         "(e.g. to_tensor) and put normalisation in preprocess=")
    if images.shape[1] not in (1, 3):
        last = " (channels last, as numpy and PIL arrays are: permute(2, 0, 1) each image)" \
            if images.shape[-1] in (1, 3) else ""
        raise ValueError(f"{what}: images must be [3, H, W] (RGB) or [1, H, W] (gray), channels first; got a batch "
                         f"{tuple(images.shape)}{last}")


def pixel_space(images: torch.Tensor) -> torch.Tensor:
    """Floating pixel-space images: 8-bit ones (uint8, as torchvision's read_image or PILToTensor give
    them) become float32 k / 255, the very values to_tensor makes of the same files, so that an index and
    everything made from it are the same either way; floating images pass as they are."""
    return decode_pixels(images)  # exact on every device (CUDA's division by 255 is a multiply)


def nonfinite_images(batch: torch.Tensor) -> torch.Tensor:
    """[n] int64: the rows of ``batch`` [N, ...] that hold a NaN or infinite value (the images a
    pixel-space check names)."""
    return (~torch.isfinite(batch).flatten(1).all(dim=1)).nonzero().reshape(-1)


def as_index(value):
    """``value`` as a Python int when it is an integer (int, NumPy integer, 0-d integer tensor: anything
    with ``__index__``) other than a bool; None otherwise (floats, bools, None, strings)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.dim())):
        return None  # (a [[3]] tensor has an __index__ too: not a number but a tensor of one)
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_pixel_range(batch: torch.Tensor) -> None:
    """A ValueError where images given to the API directly (not through a pass, which reads whatever
    the dataset gives) are not finite pixel-space ones in [0, 1] (to rounding): normalised images, or
    0-255 ones, would be normalised again by preprocess= and give wrong results without a word."""
    bad = nonfinite_images(batch)[:5].tolist()
    if bad:
        raise ValueError(f"image(s) {bad} of the set hold NaN or infinite pixels: give finite pixel-space images")
    low, high = (float(v) for v in torch.aminmax(batch))  # one pass over the set, not two
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"images must be in pixel space [0, 1], got values in [{low:.3g}, {high:.3g}]: pass the "
                         "images before normalisation and put the normalisation in preprocess=")


def as_seed(seed) -> int:
    """A random seed given to the API, as a Python int (any integer: NumPy and 0-d tensor ones too); a
    ValueError for None, a bool, a float or anything else, so that a run cannot silently be
    irreproducible (scikit-learn takes None for "fresh randomness")."""
    value = as_index(seed)
    if value is None:
        raise ValueError(f"seed must be an int, got {seed!r}")
    return value


def integer_tensor(name: str, values) -> torch.Tensor:
    """``values`` (a tensor, array, list or number of integers) as an int64 tensor; a ValueError naming
    ``name`` for anything else (strings, floats, bools, None, integers past int64), where torch's own
    errors ("too many dimensions 'str'", "Overflow when unpacking long long") named neither."""
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        tensor = None
    if tensor is not None and tensor.numel() == 0:
        return tensor.to(torch.int64)  # ([] is a float tensor to torch)
    if tensor is None or tensor.dtype.is_floating_point or tensor.is_complex() or tensor.dtype == torch.bool:
        got = type(values).__name__ if tensor is None else f"{tensor.dtype} values"
        raise ValueError(f"{name} must be integers (int64), got {got}: {str(values)[:80]}")
    return tensor.to(torch.int64)


def check_preprocess(preprocess) -> None:
    """``preprocess``: None or a callable (a function, a module, e.g. torchvision's Normalize) that takes
    and returns a batch of images on the device; a name such as "imagenet" is the CLI's --normalize."""
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be None or a callable that takes a batch [B, 3, H, W] and returns the "
                        f"model's input (e.g. torchvision.transforms.Normalize(mean, std)), got {preprocess!r}")


def check_label_range(labels: torch.Tensor, classes: int) -> None:
    """Labels that are classes of a model with ``classes`` outputs: a label past them would count as an
    error (or, negative, fail an index_add) instead of being refused."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"label {bad} is not a class of the model, which has {classes} outputs: labels must be class "
                         f"indices in [0, {classes}); got labels in [{int(labels.min())}, {int(labels.max())}]")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" for none): what one-line errors quote of torch's."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def shortened(items, most: int) -> str:
    """The first ``most`` of ``items``, comma-separated, with ", ..." where there are more (for messages)."""
    items = list(items)
    return ", ".join(map(str, items[:most])) + (", ..." if len(items) > most else "")


def positive_int(name: str, value, *, zero_ok: bool = False, none_means: str | None = None):
    """``value`` as a Python int, checked: an integer (``as_index``: NumPy and 0-d tensor integers too, not
    a bool or a float) >= 1, or >= 0 with ``zero_ok``. With ``none_means`` (what None stands for, said in
    the error), None is allowed and returned. Else a ValueError naming ``name``, what it must be and what
    it got."""
    if value is None and none_means is not None:
        return None
    number = as_index(value)
    if number is None or number < (0 if zero_ok else 1):
        kind = "an int >= 0" if zero_ok else "a positive int"
        alternative = f" (or None: {none_means})" if none_means is not None else ""
        raise ValueError(f"{name} must be {kind}{alternative}, got {value!r}")
    return number


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode inside the block; after it, every module's own mode again (a training
    model may hold frozen parts in eval mode, e.g. its BatchNorm layers: model.train() would undo that)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def restores_modes(function):
    """``function(model, ...)`` run inside ``evaluating(model)``: it may put the model in eval mode (its
    result must not depend on the model's mode), and the caller gets every module's own mode back. An
    argument that is not a module goes to ``function`` as it is, to be refused there."""

    @functools.wraps(function)
    def run(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return function(model, *args, **kwargs)
        with evaluating(model):
            return function(model, *args, **kwargs)

    return run


def canonical_device(device) -> torch.device:
    """``device`` as tensors report theirs: "cuda" with the current device's index (a tensor made on
    "cuda" is on "cuda:0", and torch.device("cuda") != torch.device("cuda:0")), "cpu" without one."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device or its name, e.g. 'cpu', 'cuda' or 'cuda:1'; got "
                         f"{device!r}") from None
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and device.index is not None:
        return torch.device("cpu")
    return device


def model_device(model: nn.Module, device) -> torch.device:
    """``device``, the model moved there; without one, where the model's parameters are (CPU if it has none)."""
    if device is not None:
        device = canonical_device(device)
        model.to(device)
        return device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs are cast to: the model's first floating-point parameter's (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def eval_on_device(model: nn.Module, device) -> tuple[torch.device, torch.dtype]:
    """Put the model on ``device`` (see ``model_device``) in eval mode; returns the device and ``param_dtype``."""
    device = model_device(model, device)
    model.eval()
    return device, param_dtype(model)


def dataset_length(dataset, purpose: str) -> int:
    """The length of a non-empty map-style dataset; the error for an empty one says 'nothing to <purpose>'."""
    try:
        length = len(dataset)
    except TypeError:
        raise TypeError("dataset must be a map-style dataset with __len__ and __getitem__") from None
    if length == 0:
        raise ValueError(f"the dataset is empty: nothing to {purpose}")
    return length


def collate_images(items: list, pin: bool = False):
    """A DataLoader's batch of dataset items (images, or (image, label) pairs), as torch's default_collate
    makes it, once their images are found to share one dtype and one shape. default_collate would stack
    uint8 and float images together as floats, the 8-bit ones then 0-255 instead of k / 255: wrong
    activations and crops, with no error.

    ``pin=True`` stacks CPU images straight into page-locked memory (for a copy to a GPU): torch's
    caching host allocator hands back the same pages batch after batch, where a fresh 154 MB batch (256
    images of 224 x 224) faulted its pages in and was then copied again by the DataLoader's pinning: an
    H100 indexing run spent 42 ms a batch in that stack (profiled 2026-11-22), against 25 ms of forward."""
    for item in items:
        _check_item_kind(item)
    # (default_collate said "each element in list of batch should be of equal size")
    if len({isinstance(item, (tuple, list)) for item in items}) > 1:
        raise ValueError("some dataset items have labels and others do not (one batch holds both (image, label) "
                         "pairs and bare images): give every image a label, or none")
    images = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    for image in images:
        if not isinstance(image, torch.Tensor):  # default_collate would stack numpy arrays, refuse PIL images
            raise ValueError(f"the dataset gives a {type(image).__name__} image: datasets must yield image tensors "
                             "[3, H, W] (float pixels in [0, 1], or uint8 8-bit pixels): add a transform such as "
                             "to_tensor or PILToTensor")
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) >= 2 and item[1] is None:
            raise ValueError("the dataset gives (image, None) pairs: give an int class label with each image, or "
                             "the image alone (a dataset without labels)")
    if images:
        dtypes = sorted({str(image.dtype) for image in images})
        if len(dtypes) > 1:
            raise ValueError(f"the dataset gives images of different dtypes in one batch ({', '.join(dtypes)}): give "
                             "every image the same type, all uint8 8-bit pixels or all float pixels in [0, 1] (e.g. "
                             "to_tensor, or PILToTensor, for every image)")
        shapes = sorted({tuple(image.shape) for image in images})
        if len(shapes) > 1:
            raise ValueError(f"the dataset gives images of different shapes in one batch ({shortened(shapes, 4)}): give "
                             "every image one size and number of channels (e.g. a Resize and CenterCrop transform)")
    if not pin or not images or images[0].device.type != "cpu":
        return default_collate(items)
    stacked = torch.empty((len(images),) + tuple(images[0].shape), dtype=images[0].dtype, pin_memory=True)
    with torch.no_grad():  # (images that require grad: an out= stack refuses them; a batch is data)
        torch.stack(images, out=stacked)
    if not isinstance(items[0], (tuple, list)):
        return stacked
    return [stacked] + default_collate([tuple(item[1:]) for item in items])


def pins_batches(device) -> bool:
    """Whether a pass on ``device`` reads its batches from page-locked memory (a CUDA device): a copy
    from there is asynchronous, where one from pageable memory first waits for the device's stream."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reads_in_background(device, num_workers: int) -> bool:
    """Whether a pass on ``device`` reads its batches in a background thread (``background``): where it
    pins them (a CUDA device, whose work the main thread only launches and waits on) and has no
    DataLoader workers to read them, unless NEUROIDX_BACKGROUND_BATCHES=0."""
    return background_enabled() and pins_batches(device) and num_workers == 0  # (a bad setting: an error anywhere)


def image_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                 background: bool | None = None):
    """A DataLoader of ``collate_images`` batches in dataset order, for a pass on ``device``: where
    ``pins_batches(device)``, in page-locked memory (stacked there directly without workers; pinned by
    the DataLoader's thread with them), so that ``.to(device, non_blocking=True)`` is an asynchronous copy.
    ``background`` (None: ``reads_in_background``): the batches read by a thread, one waiting and one
    being read ahead of the pass (``background.BackgroundBatches``; iterate it inside
    ``background.reading``, which stops the thread when the pass ends, on an error too)."""
    to_gpu = pins_batches(device)
    direct = to_gpu and num_workers == 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=functools.partial(collate_images, pin=True) if direct else collate_images,
                        pin_memory=to_gpu and not direct)
    if background is None:
        background = reads_in_background(device, num_workers)
    if not background:
        return loader
    device = torch.device(device)
    start = None
    if device.type == "cuda":  # (a new thread is on device 0; "cuda" alone: the current device)
        start = functools.partial(torch.cuda.set_device, canonical_device(device))
    return BackgroundBatches(loader, depth=1, start=start)


def _check_item_kind(item) -> None:
    """A dataset item is an image or an (image, label) pair (a longer tuple's further entries are left
    alone); a dict or a shorter tuple is refused, naming what it is."""
    if isinstance(item, dict):
        raise ValueError(f"the dataset gives dict items (keys {sorted(map(str, item))[:8]}): datasets must yield an "
                         "image tensor or an (image, label) pair; wrap it in a Dataset whose __getitem__ returns "
                         "them, e.g. (item['image'], item['label'])")
    if isinstance(item, (tuple, list)) and len(item) < 2:
        raise ValueError(f"the dataset gives {type(item).__name__}s of {len(item)} item(s): datasets must yield an "
                         "image tensor or an (image, label) pair (an image without a label is returned alone, not in a tuple)")


def split_batch(batch):
    """A DataLoader batch as (images, labels): images alone give labels None; (image, label) pairs give
    the labels as int64 [B] (they must be integer class indices)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
        labels = batch[1]
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]  # one-element label tensors, [1] each
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                or labels.is_complex() or labels.dim() != 1:
            shape = f" of shape {tuple(labels.shape)} for the batch" if isinstance(labels, torch.Tensor) else ""
            raise ValueError("the dataset's labels must be integer class indices (an int per image); got "
                             f"{type(labels).__name__} {getattr(labels, 'dtype', '')}{shape}")
        return batch[0], labels.to(torch.int64)
    shown = f" of {len(batch)} item(s)" if isinstance(batch, (list, tuple)) else ""
    raise ValueError("the dataset must yield an image tensor [3, H, W] or a pair (image, label); got "
                     f"a batch of {type(batch).__name__}{shown}")
