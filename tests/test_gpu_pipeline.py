"""The GPU data path of a pass: batches stacked into page-locked memory, one device sync a batch."""

import warnings

import pytest
import torch
from torch.utils.data import default_collate

import neuroidx_fast as nx
from neuroidx_fast.prepare import collate_images, image_loader
from models import ImageSet, make_model

pytestmark = pytest.mark.gpu


def test_pinned_collate_equals_default_collate():
    data = ImageSet(n=6)
    items = [data[i] for i in range(6)]
    pinned, expected = collate_images(items, pin=True), default_collate(items)
    assert pinned[0].is_pinned() and torch.equal(pinned[0], expected[0]) and torch.equal(pinned[1], expected[1])
    bare = [image for image, _ in items]
    assert collate_images(bare, pin=True).is_pinned()
    assert torch.equal(collate_images(bare, pin=True), default_collate(bare))


def test_image_loader_pins_batches_for_a_gpu_only():
    data = ImageSet(n=5)
    assert all(images.is_pinned() for images, _ in image_loader(data, 2, torch.device("cuda")))
    assert not any(images.is_pinned() for images, _ in image_loader(data, 2, torch.device("cpu")))


def _syncs(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_index_dataset_syncs_the_device_about_once_a_batch():
    """Each layer's NaN and overflow checks used to read the device (three syncs a layer a batch): the
    GPU then idled while the CPU stacked the next batch. Counted on a 3-layer index, 2 against 8 batches
    (what the index costs once cancels out)."""
    model = make_model("vgg").cuda()
    layers = ["features.0", "features.3", "features.8"]

    def index(n):
        return lambda: nx.index_dataset(model, ImageSet(n=n, labels=False), layers, k=2, batch_size=4,
                                        progress=False, device="cuda")

    few, many = _syncs(index(8)), _syncs(index(32))
    assert many - few <= 2 * 6, f"{few} syncs for 2 batches, {many} for 8: more than 2 a batch"


@pytest.fixture
def no_tf32():
    """Float32 convolutions on the GPU as on the CPU (TF32 would reorder close top-K values)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def test_index_on_the_gpu_equals_the_cpu_index_with_labels_and_nan_errors(no_tf32):
    model = make_model("vgg")
    data = ImageSet(n=9)
    layers = ["features.0", "features.2"]
    cpu = nx.index_dataset(model, data, layers, k=3, batch_size=4, progress=False, backend="torch")
    gpu = nx.index_dataset(model.cuda(), data, layers, k=3, batch_size=4, progress=False, device="cuda",
                           backend="torch")
    for name in layers:
        assert torch.equal(cpu[name].ids, gpu[name].ids)
        assert torch.equal(cpu[name].class_count, gpu[name].class_count)
        assert torch.allclose(cpu[name].mean_sum, gpu[name].mean_sum, rtol=1e-5)
    with torch.no_grad():
        model.features[0].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"features.0.*unit\(s\) 1"):
        nx.index_dataset(model, data, layers, k=3, batch_size=4, progress=False, device="cuda")
    bad = ImageSet(n=9)
    bad.images[6, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"images \[6\] hold NaN or infinite pixels"):
        nx.index_dataset(make_model("vgg").cuda(), bad, layers, k=3, batch_size=4, progress=False, device="cuda")


def test_pinned_collate_takes_images_that_require_grad():
    items = [torch.rand(3, 4, 4, requires_grad=True) for _ in range(2)]
    batch = collate_images(items, pin=True)  # (an out= stack refuses inputs that require grad)
    assert batch.is_pinned() and torch.equal(batch, torch.stack(items).detach())
