"""A small, deterministic classifier training loop (for known-answer tests and the demo checkpoint).

Not a training framework: Adam, cross-entropy, a fixed seed for shuffling and dropout, optional
preprocessing on the device (the same ``preprocess`` that ``index_dataset`` takes).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from .prepare import (as_index, check_label_range, check_pixel_batch, check_preprocess, collate_images, evaluating,
                      model_device, nonfinite_images, param_dtype, pixel_space, positive_int, split_batch)

__all__ = ["train_classifier", "evaluate_classifier"]


def _labelled(item, i):
    if not isinstance(item, (tuple, list)) or len(item) < 2 or not isinstance(item[0], torch.Tensor):
        raise ValueError(f"dataset item {i} is not an (image, label) pair: training a classifier needs labels")
    label = item[1]
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.reshape(())
    index = as_index(label)  # int, NumPy integer, 0-d integer tensor (as the DataLoader of cache=False takes)
    if index is None or index < 0:
        raise ValueError(f"dataset item {i} has label {label!r}: labels must be int class indices >= 0")
    return item[0], index


def _materialise(dataset):
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = _labelled(dataset[i], i)
        images.append(image)
        labels.append(label)
    return collate_images(images), torch.tensor(labels, dtype=torch.int64)  # one dtype and shape, or an error


def _batches(dataset, batch_size, shuffle, generator, cached, num_workers):
    """Yield (images, labels) batches: from in-memory tensors when ``cached`` is given, else a DataLoader.
    Both take the images in the same order (one permutation drawn from ``generator`` per epoch), so that
    ``cache`` changes the memory used, never the model trained."""
    n = len(cached[1]) if cached is not None else len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if cached is not None:
        images, labels = cached
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            yield images[chosen], labels[chosen]
        return
    # the loader's own generator only seeds its workers: a fixed one, apart from the shuffling stream
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                        collate_fn=collate_images, generator=torch.Generator().manual_seed(0))
    for batch in loader:
        images, labels = split_batch(batch)  # integer labels, or an error
        if labels is None:
            raise ValueError("the dataset must yield (image, label) pairs to train a classifier")
        yield images, labels


def _model_input(images: torch.Tensor, device, dtype, preprocess) -> torch.Tensor:
    """A batch as the model takes it: finite pixel-space images (checked: NaN pixels would make NaN logits,
    whose argmax is class 0), on the device, preprocessed, then in the model's dtype (the order of
    indexing and ablation: a preprocess with float32 constants takes the float32 pixels)."""
    check_pixel_batch(images, "the classifier's dataset")
    bad = nonfinite_images(images)[:5].tolist()
    if bad:
        raise ValueError(f"images at batch rows {bad} hold NaN or infinite pixels: give finite pixel-space images")
    x = pixel_space(images.to(device))
    return (preprocess(x) if preprocess is not None else x).to(dtype)


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Logits [B, classes] and labels that are classes of them (``check_label_range``)."""
    if logits.dim() != 2:
        raise ValueError(f"the model must output logits [B, classes], got {tuple(logits.shape)}")
    check_label_range(labels, logits.shape[1])


@contextlib.contextmanager
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def train_classifier(model: nn.Module, dataset, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
                     seed: int = 0, device=None, progress: bool = False, preprocess=None, weight_decay: float = 0.0,
                     cache: bool | None = None, num_workers: int = 0, eval_dataset=None,
                     schedule: str | None = "cosine") -> dict:
    """Train ``model`` in place on a dataset of (image, label) pairs with Adam and cross-entropy.

    The run is a function of (model's initial weights, dataset, arguments, ``seed``): ``seed`` fixes the
    shuffling and the dropout masks without touching the caller's global random state (on CUDA, cuDNN is
    made deterministic for the call). ``cache`` loads the whole dataset into memory once (default: when it
    holds at most 20,000 items), which matters for datasets generated per item such as ``Shapes``;
    otherwise a DataLoader with ``num_workers`` feeds it. ``preprocess`` runs on the device before the
    model. ``schedule``: "cosine" (the learning rate decays from ``lr`` to 0 over the run, step by step)
    or None (constant). ``eval_dataset``: measured after each epoch. The model is left in eval mode.

    Returns the history: {"loss": mean training loss per epoch, "accuracy": training accuracy per
    epoch (on the batches as trained), "eval_accuracy": per epoch (only with ``eval_dataset``)}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    epochs, batch_size = positive_int("epochs", epochs), positive_int("batch_size", batch_size)
    check_preprocess(preprocess)
    seed = positive_int("seed", seed, zero_ok=True)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if schedule not in ("cosine", None):
        raise ValueError(f"schedule must be 'cosine' or None, got {schedule!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to train on")
    device, dtype = model_device(model, device), param_dtype(model)
    if cache is None:
        cache = len(dataset) <= 20_000
    cached = _materialise(dataset) if cache else None
    history = {"loss": [], "accuracy": []}
    if eval_dataset is not None:
        history["eval_accuracy"] = []
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(dataset) / batch_size)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
                 if schedule == "cosine" else None)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    devices = [device] if device.type == "cuda" else []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, unit="epoch", desc="training")
    try:
        with torch.random.fork_rng(devices=devices), _deterministic_cudnn():
            torch.manual_seed(seed)  # dropout masks; fork_rng restores the caller's state afterwards
            for _ in range(epochs):
                model.train()
                total, correct, loss_sum = 0, 0, 0.0
                for images, labels in _batches(dataset, batch_size, True, generator, cached, num_workers):
                    x, y = _model_input(images, device, dtype, preprocess), labels.to(device)
                    logits = model(x)
                    _check_logits(logits, y)
                    loss = loss_fn(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    loss_sum += float(loss.detach()) * len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    total += len(y)
                history["loss"].append(loss_sum / total)
                history["accuracy"].append(correct / total)
                if eval_dataset is not None:
                    history["eval_accuracy"].append(evaluate_classifier(model, eval_dataset, batch_size, device,
                                                                        preprocess))
                if bar is not None:
                    bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{history['accuracy'][-1]:.3f}")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return history


def evaluate_classifier(model: nn.Module, dataset, batch_size: int = 256, device=None, preprocess=None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a dataset of (image, label) pairs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch_size = positive_int("batch_size", batch_size)
    device, dtype = model_device(model, device), param_dtype(model)
    correct = total = 0
    with evaluating(model), torch.no_grad():
        for images, labels in _batches(dataset, batch_size, False, None, None, 0):
            logits, labels = model(_model_input(images, device, dtype, preprocess)), labels.to(device)
            _check_logits(logits, labels)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    if total == 0:
        raise ValueError("the evaluation dataset is empty")
    return correct / total
