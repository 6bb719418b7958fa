"""Which repair to default to: map form and what the maps are fitted on.

    python benchmarks/repair_forms.py       # part of make bench-quality

For the bundled CNNs at `--ratio 0.3` and `0.5`, the default criterion's
removal set chosen without repair (`--repair none`) is repaired four ways:
a full linear map or a per-channel scale and bias (`diagonal`), each fitted
front to back on the pruned model's own entries (`pruned`, the default) or
on the original's entries (`original`). Test accuracy of each, beside the
plain bypass and what the default (repair-aware selection, full map, pruned
entries) writes. Fitting reads the calibration sidecar's selection samples
only. Writes benchmarks/results/repair_forms.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from benchmarks.common import MODELS_DIR, RESULTS_DIR, describe, publish  # noqa: E402

from sglp_onnx import repair  # noqa: E402
from sglp_onnx.evidence import measure  # noqa: E402
from sglp_onnx.files import CalibrationSet  # noqa: E402
from sglp_onnx.graph import set_threads  # noqa: E402
from sglp_onnx.pipeline import analyze, compress  # noqa: E402
from sglp_onnx.surgery import remove_units  # noqa: E402

MODELS = {"ResNet-56 (digits)": ("resnet56_digits", "digits"), "ResNet-110 (digits)": ("resnet110_digits", "digits"),
          "1-D CNN (radio)": ("cnn1d_radio", "radio")}
RATIOS = (0.3, 0.5)
VARIANTS = [(form, fit_on) for form in ("full", "diagonal") for fit_on in ("pruned", "original")]


def main() -> None:
    set_threads(1)
    header = ("| model | ratio | units | plain bypass | " + " | ".join(f"{f}, {o} entries" for f, o in VARIANTS)
              + " | default (repair-aware selection) |")
    lines = ["# Repair forms: test accuracy (%) of one removal set repaired four ways", "",
             f"Machine: {describe()}; one ONNX Runtime thread.", "",
             "Command: `python benchmarks/repair_forms.py` (part of `make bench-quality`). " + __doc__.split(
                 "\n\n")[1].replace("\n", " "), "", header, "|---|---:|---:|" + "---:|" * (len(VARIANTS) + 2)]
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for label, (stem, data) in MODELS.items():
            path = MODELS_DIR / f"{stem}.onnx"
            test = np.load(MODELS_DIR / f"{data}.test.npz")
            dataset = CalibrationSet(inputs={"input": test["input"]}, labels=test["labels"])

            def accuracy(model) -> str:
                return f"{100 * measure(model, dataset, batch_size=500)[0].accuracy:.1f}"

            for ratio in RATIOS:
                plain = analyze(path, ratio=ratio, suggest=None, repair="none")
                removed = plain.selection.removed
                cells = [label, f"{ratio:g}", str(len(removed)),
                         accuracy(remove_units(plain.model, [plain.units[i] for i in removed]))]
                for form, fit_on in VARIANTS:
                    start = time.perf_counter()
                    fits, _ = repair.fit_repairs(plain.model, plain.units, removed, plain.calib, form=form,
                                                 batch_size=64, fit_on=fit_on)
                    model, units = repair.with_repairs(plain.model, plain.units, fits)
                    cells.append(accuracy(remove_units(model, [units[i] for i in removed]))
                                 + f" ({time.perf_counter() - start:.1f} s)")
                default = compress(path, Path(tmp) / f"{stem}.{ratio}.onnx", ratio=ratio, force=True)
                cells.append(accuracy(default.pruned))
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    lines += ["", "Seconds in brackets: the fit alone (its passes over the selection samples)."]
    publish(lines, RESULTS_DIR / "repair_forms.md")


if __name__ == "__main__":
    main()
