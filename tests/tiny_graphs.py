"""Tiny ONNX models built with onnx.helper, shared by the reliability tests.

Built from scratch, so the IR version is set explicitly: onnx >= 1.23 would
stamp IR 14, which ONNX Runtime refuses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def make_model(nodes, inputs, outputs, initializers, *, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sglp-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_mlp(n_blocks: int = 4, width: int = 8, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """`n_blocks` blocks `h + W2 relu(W1 h)` on a (batch, width) input, then a linear head."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "input"
    for i in range(n_blocks):
        s = f"blocks.{i}"
        inits += [_weight(rng, f"{s}.w1", (width, width)), _weight(rng, f"{s}.w2", (width, width))]
        nodes += [
            helper.make_node("MatMul", [h, f"{s}.w1"], [f"{s}.a"], name=f"{s}/MatMul"),
            helper.make_node("Relu", [f"{s}.a"], [f"{s}.r"], name=f"{s}/Relu"),
            helper.make_node("MatMul", [f"{s}.r", f"{s}.w2"], [f"{s}.f"], name=f"{s}/MatMul_1"),
            helper.make_node("Add", [h, f"{s}.f"], [f"{s}.out"], name=f"{s}/Add"),
        ]
        h = f"{s}.out"
    inits.append(_weight(rng, "head.w", (width, classes)))
    nodes.append(helper.make_node("MatMul", [h, "head.w"], ["logits"], name="head/MatMul"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )


def plain_mlp(width: int = 8, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """No residual Add anywhere: nothing can be removed."""
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, "w1", (width, width)), _weight(rng, "w2", (width, classes))]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )


def calibration(n: int = 16, width: int = 8, classes: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input": rng.standard_normal((n, width)).astype(np.float32),
        "labels": rng.integers(0, classes, size=n).astype(np.int64),
    }


def write_model_and_calibration(folder: Path, *, n_blocks: int = 4, n_samples: int = 16, width: int = 8,
                                name: str = "model") -> tuple[Path, Path]:
    """`folder/<name>.onnx` and its sidecar `folder/<name>.calib.npz`."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / f"{name}.onnx"
    onnx.save_model(residual_mlp(n_blocks, width), str(model_path))
    calib_path = folder / f"{name}.calib.npz"
    np.savez(calib_path, **calibration(n_samples, width))
    return model_path, calib_path
