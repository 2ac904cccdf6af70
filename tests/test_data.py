"""Built-in datasets: Shapes (procedural, per-item deterministic) and Digits (scikit-learn)."""

import re

import pytest
import torch
from torch.utils.data import DataLoader

from neuroidx_fast.data import SHAPES_COLORS, SHAPES_DEFAULT_CLASSES, Digits, Shapes


def test_shapes_items_types_and_range():
    data = Shapes(30, size=40, seed=1)
    assert len(data) == 30 and data.classes == list(SHAPES_DEFAULT_CLASSES)
    for i in range(len(data)):
        image, label = data[i]
        assert image.dtype == torch.float32 and image.shape == (3, 40, 40)
        assert float(image.min()) >= 0 and float(image.max()) <= 1
        assert isinstance(label, int) and label == int(data.targets[i])
    assert data.targets.dtype == torch.int64 and data.targets.shape == (30,)
    assert torch.bincount(data.targets, minlength=10).tolist() == [3] * 10  # balanced
    assert torch.equal(data[-1][0], data[29][0])


def test_shapes_deterministic_and_order_independent():
    a, b = Shapes(25, size=32, seed=7), Shapes(25, size=32, seed=7)
    forward = [a[i][0] for i in range(25)]
    backward = [b[i][0] for i in reversed(range(25))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x, y)
    assert torch.equal(Shapes(1000, size=32, seed=7)[24][0], forward[24])  # independent of n
    other = Shapes(25, size=32, seed=8)
    assert not any(torch.equal(forward[i], other[i][0]) for i in range(25))
    assert len({tuple(x.flatten()[:50].tolist()) for x in forward}) == 25  # items differ
    loader = DataLoader(a, batch_size=5, num_workers=2, shuffle=False)
    images = torch.cat([batch[0] for batch in loader])
    assert torch.equal(images, torch.stack(forward))


def _near_color(image, rgb, tol=0.2):
    """Share of pixels within ``tol`` (max over channels) of a color."""
    return float(((image - torch.tensor(rgb)[:, None, None]).abs().amax(0) < tol).float().mean())


def test_shapes_planted_color_and_shape():
    data = Shapes(100, size=64, seed=3)
    red, green = SHAPES_COLORS["red"], SHAPES_COLORS["green"]
    shares = {name: [] for name in data.classes}
    for i in range(len(data)):
        image, label = data[i]
        shares[data.classes[label]].append((_near_color(image, red), _near_color(image, green)))
    for name, values in shares.items():
        red_share = sum(v[0] for v in values) / len(values)
        green_share = sum(v[1] for v in values) / len(values)
        # a class's own color covers a good part of its images; the muted backgrounds never reach it
        assert (red_share > 0.04) if name.startswith("red ") else (red_share < 0.005), (name, red_share)
        assert (green_share > 0.04) if name.startswith("green ") else (green_share < 0.005), (name, green_share)
    # same color, different shape: the square covers more of its box than the stripes do, on average
    mean = lambda name: sum(v[0] for v in shares[name]) / len(shares[name])  # noqa: E731
    assert mean("red stripes") < mean("red square")


def test_shapes_options_and_errors():
    data = Shapes(12, size=17, seed=0, classes=["cyan cross", "orange disk", "black ring"], backgrounds="gradient",
                  noise=0.0)
    assert data.classes == ["cyan cross", "orange disk", "black ring"]
    assert data[4][1] == 1 and data[4][0].shape == (3, 17, 17)
    assert Shapes(3, size=128)[0][0].shape == (3, 128, 128)
    assert len(Shapes(0)) == 0
    for kwargs, match in [({"classes": ["purple disk"]}, "purple disk"), ({"classes": ["red hexagon"]}, "hexagon"),
                          ({"classes": []}, "empty"), ({"classes": ["red disk", "red disk"]}, "twice"),
                          ({"backgrounds": ["plaid"]}, "backgrounds"), ({"scale": (0.5, 0.2)}, "scale"),
                          ({"size": 4}, "size"), ({"noise": -1.0}, "noise")]:
        with pytest.raises(ValueError, match=match):
            Shapes(5, **kwargs)
    with pytest.raises(ValueError, match="n must be"):
        Shapes(-1)
    with pytest.raises(IndexError, match="out of range"):
        Shapes(5)[5]
    with pytest.raises(TypeError, match="ints"):
        Shapes(5)[1.5]


def test_digits_gray():
    data = Digits(size=24)
    assert len(data) == 1797 and data.classes == [str(d) for d in range(10)]
    assert data.targets.dtype == torch.int64 and set(data.targets.tolist()) == set(range(10))
    image, label = data[10]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and label == int(data.targets[10])
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert float(image.min()) >= 0 and float(image.max()) <= 1 and float(image.max()) > 0.5
    from sklearn.datasets import load_digits

    raw = load_digits()
    native = Digits(size=8)  # bilinear resize to the same size is the identity
    assert torch.allclose(native[5][0][0], torch.as_tensor(raw.images[5], dtype=torch.float32) / 16)
    assert native[5][1] == int(raw.target[5])


def test_digits_split_and_color():
    train, test = Digits(split="train", seed=1), Digits(split="test", seed=1)
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.25)
    assert not set(train.source_index.tolist()) & set(test.source_index.tolist())
    assert torch.equal(Digits(split="test", seed=1).source_index, test.source_index)
    assert not torch.equal(Digits(split="test", seed=2).source_index, test.source_index)
    color = Digits(size=16, colorize=True, seed=1, split="test")
    image, label = color[3]
    assert image.shape == (3, 16, 16) and label == int(test.targets[3])
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert not torch.equal(image[0], image[1]) or not torch.equal(image[1], image[2])  # tinted
    assert torch.equal(Digits(size=16, colorize=True, seed=1, split="test")[3][0], image)  # deterministic
    assert torch.equal(color[3][0], image)
    # the tint follows the digit, not its position in the split
    full = Digits(size=16, colorize=True, seed=1)
    assert torch.equal(full[int(color.source_index[3])][0], image)
    with pytest.raises(ValueError, match="split"):
        Digits(split="validation")
    with pytest.raises(ValueError, match="test_fraction"):
        Digits(split="train", test_fraction=1.0)


def test_image_folder_reads_16_bit_and_other_modes(tmp_path):
    import numpy as np
    from PIL import Image

    from neuroidx_fast.imagefolder import ImageFolder

    (tmp_path / "a").mkdir()
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "a" / "0.png")  # 16-bit gray (I;16)
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "a" / "1.png")  # 8-bit gray (L)
    rgba = np.dstack([(ramp * 255).astype(np.uint8)] * 3 + [np.full((32, 32), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a" / "2.png")  # RGBA, opaque
    folder = ImageFolder(tmp_path, size=32)
    images = [folder[i][0] for i in range(3)]
    for image in images:  # the same ramp every time: 16-bit was clipped to near-white before
        assert image.shape == (3, 32, 32) and abs(float(image.mean()) - 0.5) < 0.01
    assert float((images[0] - images[1]).abs().max()) <= 1.5 / 255
    fingerprint = folder.fingerprint()
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "a" / "3.png")
    assert ImageFolder(tmp_path, size=32).fingerprint() != fingerprint  # a file added changes it


def test_image_folder_as_uint8_gives_the_same_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from neuroidx_fast.imagefolder import ImageFolder
    from neuroidx_fast.ops.reference import decode_pixels

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            pixels = np.random.default_rng(i + 3 * (label == "b")).integers(0, 256, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    floats, codes = ImageFolder(tmp_path, size=24), ImageFolder(tmp_path, size=24, uint8=True)
    for i in range(len(floats)):
        (image, label), (code, code_label) = floats[i], codes[i]
        assert code.dtype == torch.uint8 and code.shape == (3, 24, 24) and code.is_contiguous()
        assert label == code_label and torch.equal(decode_pixels(code[None])[0], image)  # k / 255 exactly


def test_a_resume_with_other_image_geometry_is_refused(tmp_path):
    # the same files resized or cropped otherwise are other pixels: a checkpoint must not mix them
    import numpy as np
    from PIL import Image

    import neuroidx_fast as nx
    from neuroidx_fast.imagefolder import ImageFolder
    from tests.models import make_model

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    ckpt = str(tmp_path / "ckpt")

    def index(**geometry):
        return nx.index_dataset(make_model("vgg"), ImageFolder(tmp_path / "data", **geometry), ["features.5"], k=2,
                                batch_size=3, checkpoint=ckpt, progress=False)

    index(size=24)
    index(size=24, uint8=True)  # the same pixels (k / 255 either way): resumes
    for other in ({"size": 24, "resize": 30}, {"size": 24, "crop": False}):
        with pytest.raises(ValueError, match="images are made otherwise from the files"):
            index(**other)


def test_load_weights_formats_and_batchnorm_counters(tmp_path):
    from safetensors.torch import save_file

    from neuroidx_fast.loading import load_weights

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    source = net()
    torch.nn.init.normal_(source[0].weight)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    for name in ("w.SAFETENSORS", "w.bin"):  # the format from the name (any case) or the bytes
        save_file(state, str(tmp_path / name))
        loaded = load_weights(net(), tmp_path / name)  # no counter: converted checkpoints often lack it
        assert torch.equal(loaded[0].weight, source[0].weight)
    without = source.state_dict()
    del without["1.num_batches_tracked"]  # a torch file keeps _metadata: torch's strict load wants the counter
    torch.save(without, tmp_path / "nocount.pt")
    assert torch.equal(load_weights(net(), tmp_path / "nocount.pt")[0].weight, source[0].weight)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read weights") as caught:
        load_weights(net(), tmp_path / "cut.pt")
    assert "pickled Python objects" not in str(caught.value)  # a truncated file is not a pickled model


def test_builtin_datasets_take_numpy_indices_and_refuse_floats_and_nan_settings():
    import numpy as np

    import neuroidx_fast as nx

    shapes = nx.Shapes(6, size=16)
    assert torch.equal(shapes[np.int64(2)][0], shapes[2][0]) and torch.equal(shapes[torch.tensor(3)][0], shapes[3][0])
    subset = torch.utils.data.Subset(shapes, np.arange(3))  # what index_dataset gets from a Subset of np.arange
    assert torch.equal(subset[1][0], shapes[1][0])
    for bad in (torch.tensor(2.9), torch.tensor(True), 1.5):
        with pytest.raises(TypeError, match="indices must be ints"):
            shapes[bad]
    for setting in ({"noise": float("nan")}, {"color_jitter": float("inf")}):
        with pytest.raises(ValueError, match="finite and >= 0"):
            nx.Shapes(4, **setting)


def test_image_folder_says_what_it_leaves_out(tmp_path):
    import numpy as np
    from PIL import Image

    from neuroidx_fast.imagefolder import ImageFolder

    def image(path):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    (tmp_path / "thumbs").mkdir()  # an empty subfolder beside the images
    image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="hold no images, and its 1 images lie beside them"):
        ImageFolder(tmp_path, size=8)
    image(tmp_path / "thumbs" / "b.png")
    with pytest.warns(UserWarning, match="1 images at the top of .* are in no class folder: left out"):
        assert len(ImageFolder(tmp_path, size=8)) == 1


def test_small_argument_checks_from_a_review(tmp_path):
    import numpy as np

    import neuroidx_fast as nx
    from neuroidx_fast.imagefolder import ImageFolder
    from neuroidx_fast.loading import parse_normalize
    from neuroidx_fast.prepare import as_index
    from tests.models import ImageSet, make_model

    for spec in ("0.5,1e-46", "0.5,1e39"):  # 0 and infinite as the float32 they become
        with pytest.raises(ValueError, match="standard deviations numbers > 0"):
            parse_normalize(spec)
    assert parse_normalize(" None ") is None and parse_normalize(" ImageNet") is not None
    assert as_index(torch.tensor(3)) == 3 and as_index(np.int64(3)) == 3 and as_index(torch.tensor([[3]])) is None
    index = nx.index_dataset(make_model("vgg"), ImageSet(n=6), ["features.5"], k=np.int64(2), batch_size=np.int64(3),
                             progress=False)
    assert index.k == 2
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="resize must be a positive int"):
        ImageFolder(tmp_path, size=8, resize=0)


def test_integer_arguments_are_checked_alike_everywhere(tmp_path):
    """One checker (prepare.positive_int) for the integer arguments of the API: NumPy and 0-d tensor
    integers pass as the ints they are (before, TopK, ImageFolder, ablation and color refused
    np.int64(3) where index_dataset took it); bools, floats and values below the bound are refused,
    naming the argument."""
    import numpy as np
    from PIL import Image

    from neuroidx_fast.imagefolder import ImageFolder
    from neuroidx_fast.models import vgg_m
    from neuroidx_fast.prepare import positive_int

    assert positive_int("k", np.int64(3)) == 3 and type(positive_int("k", torch.tensor(4))) is int
    assert positive_int("keep", 0, zero_ok=True) == 0 and positive_int("x", None, none_means="the default") is None
    for bad in (True, 2.0, 0, -1, "3", torch.tensor([3]), None):
        with pytest.raises(ValueError, match=f"k must be a positive int, got {re.escape(repr(bad))}"):
            positive_int("k", bad)
    with pytest.raises(ValueError, match=r"keep must be an int >= 0 \(or None: all\), got -1"):
        positive_int("keep", -1, zero_ok=True, none_means="all")

    (tmp_path / "a").mkdir()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(tmp_path / "a" / "x.png")
    folder = ImageFolder(tmp_path, size=np.int64(8), resize=np.int32(9))
    assert folder.size == 8 and type(folder.size) is int and folder[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="size must be a positive int, got True"):
        ImageFolder(tmp_path, size=True)
    model = vgg_m(num_classes=np.int64(5), input_size=64, width=0.05, fc_width=np.int64(16))
    assert model.fc8.out_features == 5 and model.fc8.in_features == 16
    with pytest.raises(ValueError, match=r"fc_width must be a positive int \(or None: 4096 \* width\), got 0"):
        vgg_m(num_classes=5, input_size=64, width=0.05, fc_width=0)
