"""image_conv_grad: the pixel gradient of strided convolutions by phases equals autograd's."""

import pytest
import torch
from torch import nn

from neuroidx_fast.image_conv_grad import image_conv_gradients, phase_kernel, strided_input_gradient


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,size", [
    (3, 8, 7, 2, 0, (20, 20)),     # VGG-M conv1
    (3, 5, 7, 2, 3, (17, 22)),     # a ResNet stem, odd and unequal sides
    (3, 4, 11, 4, 2, (23, 23)),    # AlexNet conv1 (trailing rows the forward never reads)
    (2, 3, 3, 3, 1, (10, 7)),      # kernel as large as the stride
    (1, 2, 2, 3, 0, (9, 11)),      # kernel smaller than the stride: some pixels get no gradient
    (1, 2, 2, 3, 0, (10, 11)),     # ... and the last row lies past every window (zeros appended)
    (4, 6, (5, 3), 2, (2, 1), (12, 9)),  # non-square kernel and padding
])
def test_strided_input_gradient_equals_autograd(cin, cout, kernel, stride, padding, size):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding).double()
    x = torch.randn(2, cin, *size, generator=g, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want, = torch.autograd.grad(out, x, grad_out)
    got = strided_input_gradient(grad_out, phase_kernel(conv.weight.detach(), stride), stride,
                                 tuple(conv.padding), size)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def stem():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=1))


def test_context_patches_only_frozen_image_facing_strided_convs_and_restores_them():
    net = stem()
    body = net[:4]
    for p in net.parameters():
        p.requires_grad_(False)
    with image_conv_gradients(net) as patched:
        assert patched == 1 and "forward" in net[0].__dict__   # 8-channel input and stride 1: untouched
        assert "forward" not in net[2].__dict__ and "forward" not in net[4].__dict__
        x = torch.rand(3, 3, 31, 29, requires_grad=True)
        assert "_ImageConv" in net[0](x).grad_fn.name()
        out = body(x)
        fast, = torch.autograd.grad((out * out).sum(), x)
        with torch.no_grad():
            plain_out = body(x)
        with torch.no_grad():  # a change of the weights inside the block rebuilds the phase kernel
            net[0].weight.mul_(2)
        doubled, = torch.autograd.grad(net[0](x).sum(), x)
        with torch.no_grad():
            net[0].weight.div_(2)
        halved, = torch.autograd.grad(net[0](x).sum(), x)
        torch.testing.assert_close(doubled, 2 * halved)
    assert not any("forward" in m.__dict__ for m in net.modules())
    slow_out = body(x)
    slow, = torch.autograd.grad((slow_out * slow_out).sum(), x)
    assert torch.equal(out.detach(), slow_out.detach()) and torch.equal(plain_out, slow_out.detach())
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_trainable_weights_and_subclasses_keep_their_forward():
    class MyConv(nn.Conv2d):
        pass
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), MyConv(3, 4, 3, stride=2))
    net[1].weight.requires_grad_(False)
    net[1].bias.requires_grad_(False)
    with image_conv_gradients(net) as patched:  # net[0]'s weights train: its weight gradient is needed
        assert patched == 0
    net[0].weight.requires_grad_(False)
    net[0].bias.requires_grad_(False)
    with image_conv_gradients(net, enabled=False) as patched:
        assert patched == 0 and "forward" not in net[0].__dict__
