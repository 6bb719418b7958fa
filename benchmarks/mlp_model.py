"""The synthetic deep residual MLP of the large-model benchmarks: `blocks`
blocks `h + W2 relu(W1 h)` of float32 `width x width` weights, then a head,
written straight into an external data file (building it never holds more
than one weight in memory; each weight seeded from its name). Shared by
large_model.py and real_size.py."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

IR_VERSION = 10  # onnx >= 1.23 stamps IR 14 on new models, which ONNX Runtime refuses


def _external(name: str, shape: tuple[int, ...], data, location: str) -> onnx.TensorProto:
    """A float32 initializer whose values go to the end of the open data file."""
    array = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape) / np.sqrt(shape[0])
    array = array.astype(np.float32)
    offset = data.tell()
    data.write(array.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def build(path: Path, *, blocks: int, width: int, classes: int = 10) -> int:
    """Write the model and `<name>.data`; returns the data file's size in bytes."""
    location = path.name + ".data"
    nodes, inits = [], []
    with open(path.parent / location, "wb") as data:
        h = "input"
        for i in range(blocks):
            s = f"blocks.{i}"
            inits += [_external(f"{s}.w1", (width, width), data, location),
                      _external(f"{s}.w2", (width, width), data, location)]
            nodes += [
                helper.make_node("MatMul", [h, f"{s}.w1"], [f"{s}.a"], name=f"/blocks.{i}/MatMul"),
                helper.make_node("Relu", [f"{s}.a"], [f"{s}.r"], name=f"/blocks.{i}/Relu"),
                helper.make_node("MatMul", [f"{s}.r", f"{s}.w2"], [f"{s}.f"], name=f"/blocks.{i}/MatMul_1"),
                helper.make_node("Add", [h, f"{s}.f"], [f"{s}.out"], name=f"/blocks.{i}/Add"),
            ]
            h = f"{s}.out"
        inits.append(_external("head.w", (width, classes), data, location))
        nodes.append(helper.make_node("MatMul", [h, "head.w"], ["logits"], name="/head/MatMul"))
        size = data.tell()
    graph = helper.make_graph(
        nodes, "large_residual_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sglp-bench")
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(path))
    return size
