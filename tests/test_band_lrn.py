"""BandLocalResponseNorm against torch's nn.LocalResponseNorm where a review found them apart: float64
inputs (the band held float32's alpha / size), maps without positions, size or alpha changed after
construction (the band kept the old ones), beta 0 at a zero divisor, and forward-mode AD (the cpp kernels
dropped the tangent)."""

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from neuroidx_fast.models import BandLocalResponseNorm


def _both(channels=6, size=3, alpha=1.0, beta=0.75, k=1.0):
    return BandLocalResponseNorm(channels, size, alpha, beta, k), nn.LocalResponseNorm(size, alpha, beta, k)


def test_float64_is_float64_accurate():
    ours, torchs = _both(alpha=1.0)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ours(x), torchs(x), rtol=1e-13, atol=0)  # (was 1.8e-8 off: float32's alpha / size)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_map_without_positions_gives_an_empty_map(requires_grad):
    ours, torchs = _both()
    x = torch.zeros(2, 6, 0, 3, requires_grad=requires_grad)
    assert ours(x).shape == torchs(x).shape == (2, 6, 0, 3)  # (was a RuntimeError from the convolution)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_settings_changed_after_construction_are_used(backend, monkeypatch):
    monkeypatch.setenv("NEUROIDX_BACKEND", backend)
    ours, _ = _both(alpha=1e-4)
    ours.alpha, ours.size = 1.0, 5  # (the torch form kept the old band: up to 6.2 off)
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ours(x), nn.LocalResponseNorm(5, 1.0, 0.75, 1.0)(x), rtol=1e-5, atol=1e-6)


def test_beta_zero_at_a_zero_divisor_is_the_identity_as_in_torch():
    ours, torchs = _both(beta=0.0, k=0.0)
    x = torch.zeros(1, 6, 2, 2, requires_grad=True)
    y = ours(x)
    assert torch.equal(y, torchs(x))  # (was NaN: exp(-0 * log 0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # (torch's, at its first jvp)
def test_forward_mode_ad_keeps_the_tangent():
    ours, torchs = _both(alpha=0.5)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 6, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    for requires_grad in (False, True):  # (with grad: "You must implement the jvp function" from _BandLRN)
        tangents = []
        for module in (ours, torchs):
            with fwad.dual_level():
                dual = fwad.make_dual(x.clone().requires_grad_(requires_grad), v)
                tangents.append(fwad.unpack_dual(module(dual)).tangent)
        assert tangents[0] is not None and torch.allclose(tangents[0], tangents[1], rtol=1e-5, atol=1e-6)  # (was None)


def test_a_module_pickled_by_the_earlier_version_runs():
    import pickle

    ours, torchs = _both()
    old = BandLocalResponseNorm(6, 3, 1.0, 0.75, 1.0)
    del old.channels, old._bands  # (what the earlier version held instead: the band, a buffer)
    old.register_buffer("band", torch.ones(6, 6, 1, 1), persistent=False)
    loaded = pickle.loads(pickle.dumps(old))
    x = torch.randn(1, 6, 3, 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(loaded(x), torchs(x), rtol=1e-5, atol=1e-6) and "band" not in dict(loaded.named_buffers())


def test_vgg_m_checks_its_switches():
    from neuroidx_fast.models import vgg_m

    # before: lrn="no" kept the LRN layers, dropout="0.5" was torch's bare TypeError, numpy's float width refused
    with pytest.raises(ValueError, match="lrn must be True or False .*, got 'no'"):
        vgg_m(5, 64, width=0.05, lrn="no")
    for dropout in ("0.5", 1.5, True):
        with pytest.raises(ValueError, match="dropout must be a probability in"):
            vgg_m(5, 64, width=0.05, dropout=dropout)
    import numpy as np

    assert vgg_m(5, 64, width=np.float32(0.05), lrn=False, dropout=0.0).conv1.out_channels == 5
