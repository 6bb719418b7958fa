"""Train the residual 1-D CNN on synthetic radio frames and save its artifacts.

    python -m models.train_radio

Writes models/cnn1d_radio.pt (state_dict), models/cnn1d_radio.onnx (dynamo
export, dynamic batch), models/cnn1d_radio.calib.npz (256 training-distribution
frames with labels) and models/radio.test.npz (the held-out test set with its
SNRs), and prints test accuracy overall and per SNR bucket for torch and ONNX
Runtime.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cnn1d import cnn1d_radio
from .radio_signals import CLASSES, make_dataset

MODELS_DIR = Path(__file__).resolve().parent
WEIGHTS_PATH = MODELS_DIR / "cnn1d_radio.pt"
ONNX_PATH = MODELS_DIR / "cnn1d_radio.onnx"
CALIB_PATH = MODELS_DIR / "cnn1d_radio.calib.npz"
TEST_PATH = MODELS_DIR / "radio.test.npz"

SNR_RANGE = (-6.0, 18.0)
# Every split has its own seed; training seeds are TRAIN_SEED + epoch.
TRAIN_SEED = 1000
CALIB_SEED = 1
TEST_SEED = 2
CALIB_FRAMES = 256
# Inclusive SNR buckets (dB) used to report accuracy.
SNR_BUCKETS = ((-6, -1), (0, 5), (6, 11), (12, 18))


def accuracy_report(pred: np.ndarray, labels: np.ndarray, snr: np.ndarray) -> dict[str, float]:
    """Accuracy in percent overall (key "overall") and per SNR bucket (keys like "0..5 dB")."""
    correct = pred == labels
    report = {"overall": 100.0 * float(correct.mean())}
    for lo, hi in SNR_BUCKETS:
        inside = (snr >= lo) & (snr <= hi)
        if inside.any():
            report[f"{lo}..{hi} dB"] = 100.0 * float(correct[inside].mean())
    return report


def format_report(report: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.2f}%" for key, value in report.items())


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[s : s + batch_size])).numpy() for s in range(0, len(x), batch_size)])


def ort_logits(path: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[s : s + batch_size]})[0] for s in range(0, len(x), batch_size)])


def calibration_set() -> dict[str, np.ndarray]:
    """CALIB_FRAMES frames from the training distribution (own seed), with labels."""
    per_class = math.ceil(CALIB_FRAMES / len(CLASSES))
    x, y, _ = make_dataset(per_class, snr_db=SNR_RANGE, seed=CALIB_SEED)
    return {"input": x[:CALIB_FRAMES], "labels": y[:CALIB_FRAMES]}


def test_set(per_class: int) -> dict[str, np.ndarray]:
    x, y, snr = make_dataset(per_class, snr_db=SNR_RANGE, seed=TEST_SEED)
    return {"input": x, "labels": y, "snr": snr}


def train(*, epochs: int, per_class: int, batch_size: int, lr: float, weight_decay: float, seed: int,
          test: dict[str, np.ndarray]) -> nn.Module:
    torch.manual_seed(seed)
    model = cnn1d_radio(num_classes=len(CLASSES))
    steps_per_epoch = math.ceil(per_class * len(CLASSES) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    start_time = time.time()
    for epoch in range(epochs):
        # Fresh frames every epoch: the generator is cheap, and unseen frames
        # keep a small training budget from overfitting one fixed sample.
        x, y, _ = make_dataset(per_class, snr_db=SNR_RANGE, seed=TRAIN_SEED + epoch)
        x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for s in range(0, len(x_t), batch_size):
            xb, yb = x_t[s : s + batch_size], y_t[s : s + batch_size]
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(yb)
        # The test set is only watched here, never used to pick a checkpoint:
        # the saved model is the one after the last epoch.
        test_acc = accuracy_report(torch_logits(model, test["input"]).argmax(1), test["labels"], test["snr"])["overall"]
        print(
            f"epoch {epoch + 1:3d}/{epochs}  train loss {loss_sum / total:.4f}  train acc {100 * correct / total:.2f}%  "
            f"test acc {test_acc:.2f}%  {time.time() - start_time:6.0f}s",
            flush=True,
        )
    print(f"training time: {time.time() - start_time:.0f}s", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=1000, help="training frames per class per epoch")
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine two OpenMP threads per process
    # oversubscribe the cores and run several times slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sglp_onnx.tools.export.torch_export import export_torch

    test = test_set(args.test_per_class)
    model = train(
        epochs=args.epochs,
        per_class=args.per_class,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        test=test,
    )
    torch.save(model.state_dict(), WEIGHTS_PATH)
    export_torch(
        model, model.example_inputs(), ONNX_PATH,
        input_names=("input",), output_names=("logits",), dynamic_batch=True, exporter="dynamo",
    )
    np.savez(CALIB_PATH, **calibration_set())
    np.savez(TEST_PATH, **test)

    ref = torch_logits(model, test["input"])
    got = ort_logits(ONNX_PATH, test["input"])
    results = {
        "torch": accuracy_report(ref.argmax(1), test["labels"], test["snr"]),
        "onnx": accuracy_report(got.argmax(1), test["labels"], test["snr"]),
    }
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}  identity blocks: {len(model.identity_blocks())}  "
          f"ONNX file: {ONNX_PATH.stat().st_size} bytes")
    print(f"max |logit difference| torch vs ONNX Runtime: {np.abs(ref - got).max():.2e}")
    print(f"test frames: {len(test['labels'])}")
    for name, report in results.items():
        print(f"{name:5s} test accuracy: {format_report(report)}")
    return results


if __name__ == "__main__":
    main()
