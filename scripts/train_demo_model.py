"""Train the demo network shipped in neuroidx_fast/assets (reproducible: fixed seeds, CPU).

    python scripts/train_demo_model.py [--epochs N] [--out PATH]

Writes the safetensors checkpoint and prints its held-out accuracy and SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from neuroidx_fast.data import Shapes
from neuroidx_fast.demo_model import DEMO_DATA, demo_model, demo_weights_path
from neuroidx_fast.train import evaluate_classifier, train_classifier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=demo_weights_path())
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = demo_model(trained=False)
    train = Shapes(DEMO_DATA["train"]["n"], size=DEMO_DATA["size"], seed=DEMO_DATA["train"]["seed"])
    test = Shapes(DEMO_DATA["test"]["n"], size=DEMO_DATA["size"], seed=DEMO_DATA["test"]["seed"])
    start = time.perf_counter()
    history = train_classifier(model, train, epochs=args.epochs, lr=1e-3, batch_size=64, seed=0, device="cpu",
                               progress=True, eval_dataset=test)
    accuracy = evaluate_classifier(model, test)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(args.out))
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    os.close(fd)
    save_file(state, tmp, metadata={"test_accuracy": f"{accuracy:.4f}", "epochs": str(args.epochs)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f}s; train loss "
          f"{history['loss'][-1]:.3f}; held-out accuracy {accuracy:.3f}; {os.path.getsize(args.out) / 1e6:.2f} MB; "
          f"sha256 {digest}")


if __name__ == "__main__":
    main()
