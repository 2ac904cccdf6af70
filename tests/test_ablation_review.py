"""Ablation and the training loop on cases found in review: results that must equal the naive loop's
(SPEC.md section 6) where the engine's shortcuts do not apply, exact ties between drops, and clear
errors (NaN under ablation, empty datasets, bad arguments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

import neuroidx_fast.ablation as abl
from neuroidx_fast.train import evaluate_classifier, train_classifier


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Pairs(torch.utils.data.Dataset):
    """(image, int label) pairs from two tensors; ``classes`` when given."""

    def __init__(self, images, labels, classes=None):
        self.images, self.labels = images, labels
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def one_set_result(correct, intact_correct, class_counts) -> abl.AblationResult:
    return abl.AblationResult(layer="l", mode="zero", masks=torch.tensor([[True]]), units=torch.tensor([0]),
                              correct=torch.tensor([correct]), intact_correct=torch.tensor(intact_correct),
                              class_counts=torch.tensor(class_counts))


def test_equal_drops_are_a_tie():
    # class 0: 3 -> 2 of 3 correct, class 1: 1 -> 0 of 3: both drop 1/3; 5 -> 4 of 5 and 2 -> 0 of 10: both 1/5
    for correct, intact, counts, drop in (([2, 0], [3, 1], [3, 3], 1 / 3), ([0, 2], [1, 3], [3, 3], 1 / 3),
                                          ([4, 0], [5, 2], [5, 10], 1 / 5)):
        result = one_set_result(correct, intact, counts)
        assert result.drop.tolist() == [[drop, drop]]
        assert result.max_drop_class.tolist() == [-1]
        assert result.max_drop.tolist() == [drop]
    # overall: 4 of 6 correct -> 2 of 6, exactly 1/3
    assert one_set_result([2, 0], [3, 1], [3, 3]).overall_drop.tolist() == [1 / 3]
    assert one_set_result([1, 0], [3, 1], [3, 3]).max_drop_class.tolist() == [0]
