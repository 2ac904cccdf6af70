"""The built-in demo network: a narrow VGG-M trained on the procedural Shapes dataset, shipped as a
small safetensors checkpoint (made by scripts/train_demo_model.py, reproducibly from its seed)."""

from __future__ import annotations

import os

from .models import VGGM, vgg_m

__all__ = ["DEMO_MODEL", "DEMO_DATA", "demo_model", "demo_weights_path", "demo_dataset"]

# The architecture and the data it was trained on; changing either means re-running the script.
DEMO_MODEL = {"num_classes": 10, "input_size": 64, "width": 0.25, "fc_width": 128, "lrn": True}
DEMO_DATA = {"size": 64, "train": {"n": 3000, "seed": 0}, "test": {"n": 600, "seed": 1}}
DEMO_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def demo_weights_path() -> str:
    return os.path.join(os.path.dirname(__file__), "assets", "demo_vgg_m.safetensors")


def demo_model(trained: bool = True) -> VGGM:
    """The demo VGG-M; ``trained=False`` gives it untrained (what the training script starts from)."""
    model = vgg_m(**DEMO_MODEL)
    if trained:
        from .loading import load_weights

        path = demo_weights_path()
        if not os.path.exists(path):
            raise FileNotFoundError(f"the demo checkpoint {path} is missing from this installation: reinstall "
                                    "neuroidx-fast, or make it with scripts/train_demo_model.py")
        load_weights(model, path)
    return model.eval()


def demo_dataset(n: int = 1000, seed: int = DEMO_DATA["test"]["seed"]):
    """Shapes images the demo model was not trained on (default: its held-out test set)."""
    from .data import Shapes

    return Shapes(n, size=DEMO_DATA["size"], seed=seed)
