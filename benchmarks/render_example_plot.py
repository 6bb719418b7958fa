"""Render the example figure committed as docs/cka_resnet56.png.

Compresses the bundled ResNet-56 (digits) with SGLP and its paired torch
model (GradNorm importance), 30% of the units, into a temporary folder, and
keeps only the `--plot` figure. Re-run after changing `sglp_onnx/plots.py`:

    .venv/bin/python benchmarks/render_example_plot.py

`--model` and `--torch-model` render another model (without a paired torch
model the importance is the gradient-free fallback).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, ROOT  # noqa: E402

from sglp_onnx import compress  # noqa: E402

DEFAULT_MODEL = MODELS_DIR / "resnet56_digits.onnx"
DEFAULT_FACTORY = "models.resnet_cifar:resnet56_digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--torch-model", default=DEFAULT_FACTORY,
                        help="MODULE:FACTORY of the paired torch model; 'none' for gradient-free importance")
    parser.add_argument("--torch-weights", type=Path, default=None,
                        help="default: the model's .pt beside it")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "cka_resnet56.png")
    args = parser.parse_args()

    options: dict = {"ratio": args.ratio}
    if args.torch_model.lower() != "none":
        weights = args.torch_weights or args.model.with_suffix(".pt")
        options.update(torch_model=args.torch_model, torch_weights=str(weights))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = compress(args.model, Path(tmp) / "pruned.onnx", plot=args.output, force=True, **options)
    print(result.summary())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
