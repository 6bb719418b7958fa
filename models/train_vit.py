"""Train the pre-norm ViT encoder on the scikit-learn digits and write its artifacts.

`python -m models.train_vit` writes vit_digits.{pt,onnx,calib.npz} into
models/ (the test split is models/digits.test.npz, written by
models/train_digits.py from the same fixed split).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from models.digits_data import load_split
from models.train_digits import CALIB_SAMPLES, _save_npz_if_changed, onnx_accuracy, random_shift, seed_everything
from models.vit_digits import ViTDigits

MODELS_DIR = Path(__file__).resolve().parent
EPOCHS = 60


def train(*, epochs: int = EPOCHS, seed: int = 0, batch_size: int = 64, lr: float = 2e-3, threads: int = 1,
          out_dir: Path = MODELS_DIR) -> dict:
    from sglp_onnx.tools.export.torch_export import export_torch

    seed_everything(seed, threads=threads)
    split = load_split()
    train_x, train_y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    background = -split.mean / split.std
    model = ViTDigits()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            images = random_shift(train_x[idx], background, generator)
            loss = torch.nn.functional.cross_entropy(model(images), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        test_acc = float((model(torch.from_numpy(split.test_x)).argmax(1).numpy() == split.test_y).mean())
    out_dir = Path(out_dir)
    torch.save(model.state_dict(), out_dir / "vit_digits.pt")
    onnx_path = out_dir / "vit_digits.onnx"
    export_torch(model, (torch.from_numpy(split.test_x[:1]),), onnx_path, input_names=("input",),
                 output_names=("logits",), dynamic_batch=True, exporter="legacy", opset=17)
    rng = np.random.default_rng(seed)
    calib_index = np.sort(rng.choice(len(split.train_x), size=CALIB_SAMPLES, replace=False))
    _save_npz_if_changed(out_dir / "vit_digits.calib.npz",
                         {"input": split.train_x[calib_index], "labels": split.train_y[calib_index]})
    return {"test_accuracy": test_acc, "onnx_test_accuracy": onnx_accuracy(onnx_path, split.test_x, split.test_y),
            "train_seconds": seconds, "test_samples": len(split.test_y)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args(argv)
    result = train(epochs=args.epochs, seed=args.seed, threads=args.threads, out_dir=args.out_dir)
    print(f"ViT (digits): test accuracy {100 * result['test_accuracy']:.2f}% (torch), "
          f"{100 * result['onnx_test_accuracy']:.2f}% (ONNX Runtime) on {result['test_samples']} images; "
          f"trained in {result['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
