"""Property: no user input ever makes the CLI fail with exit 1 or a traceback.

Fuzzed calibration arrays, fuzzed option values and fuzzed small ONNX graphs
go through the real `main()`; every outcome must be success (0) or the
user's fault said in one line (2). An exit 1 here is a bug in our code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sglp_onnx.cli import main
from tiny_graphs import residual_mlp

# Derandomized: CI runs the same examples every time; SGLP_FUZZ_EXAMPLES widens a
# local run (make test-slow runs 25 each).
FUZZ = settings(max_examples=int(os.environ.get("SGLP_FUZZ_EXAMPLES", "12")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
# Half as many for a fuzzer whose every example compresses and may draw a plot (its edge cases are explicit examples).
FUZZ_COMPRESS = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))
WIDTH = 8


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _assert_users_fault_or_success(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("note:", "warning:"))]
        assert lines and lines[-1].startswith("error: "), err


@contextlib.contextmanager
def _workspace(model: onnx.ModelProto | bytes | None = None):
    with tempfile.TemporaryDirectory(prefix="sglp-fuzz-") as tmp:
        root = Path(tmp)
        path = root / "model.onnx"
        if isinstance(model, bytes):
            path.write_bytes(model)
        else:
            onnx.save_model(model if model is not None else residual_mlp(4, WIDTH), str(path))
        np.savez(root / "model.calib.npz", input=np.random.default_rng(0).standard_normal((16, WIDTH))
                 .astype(np.float32))
        yield root, path


DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.bool_, np.uint8]


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    special = draw(st.sampled_from(["normal", "nan", "inf", "huge", "zeros"]))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    if special == "nan" and values.size:
        values.flat[0] = np.nan
    elif special == "inf" and values.size:
        values.flat[-1] = np.inf
    elif special == "huge":
        values = values * 1e30
    elif special == "zeros":
        values = np.zeros(shape)
    with np.errstate(all="ignore"):
        return values.astype(dtype)


@FUZZ
@given(inputs=st.dictionaries(st.sampled_from(["input", "labels", "other", "input "]), arrays(), max_size=3),
       criterion=st.sampled_from(["last", "damage", "sglp", "cka-removal", "block-influence"]))
def test_fuzzed_calibration_never_exits_1(inputs, criterion):
    with _workspace() as (root, path):
        calib = root / "fuzzed.npz"
        np.savez(calib, **inputs)
        code, err = _run(["compress", str(path), "-o", str(root / "out.onnx"), "--calib", str(calib),
                          "--remove", "1", "--criterion", criterion])
        _assert_users_fault_or_success(code, err)


OPTION_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2", "3", "4", "100", "1e9", "0.5", "-0.5", "1.0", "nan",
                                           "inf", "-inf", "", " ", "abc", "0x10", "1,2", "None"]),
                          st.text(max_size=6))
OPTIONS = ["--remove", "--ratio", "--target-flops", "--max-loss", "--batch-size", "--seed", "--segments",
           "--criterion", "--granularity", "--provider", "--threads", "--calib", "--torch-model", "--log-level",
           "--torch-weights", "--report", "--plot"]


@FUZZ
@given(options=st.lists(st.tuples(st.sampled_from(OPTIONS), OPTION_VALUES), max_size=3),
       command=st.sampled_from(["compress", "analyze"]), dry_run=st.booleans())
def test_fuzzed_option_values_never_exit_1(options, command, dry_run):
    with _workspace() as (root, path):
        argv = [command, str(path)]
        if command == "compress":
            argv += ["-o", str(root / "out.onnx")] + (["--dry-run"] if dry_run else [])
        for flag, value in options:
            if flag in ("--calib", "--torch-weights", "--report", "--plot") and value.strip():
                value = str(root / value.strip().replace("/", "_"))
            argv += [flag, value]
        code, err = _run(argv)
        _assert_users_fault_or_success(code, err)


def _mutated(seed: int, kind: str) -> onnx.ModelProto | bytes:
    rng = np.random.default_rng(seed)
    model = residual_mlp(4, WIDTH)
    nodes = model.graph.node
    k = int(rng.integers(len(nodes)))
    if kind == "bytes":
        data = bytearray(model.SerializeToString())
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return bytes(data)
    if kind == "truncate":
        data = model.SerializeToString()
        return data[: int(rng.integers(len(data)))]
    if kind == "drop-node":
        del nodes[k]
    elif kind == "rename-input":
        nodes[k].input[int(rng.integers(len(nodes[k].input)))] = "nowhere"
    elif kind == "op-type":
        nodes[k].op_type = str(rng.choice(["Sub", "Relu", "Conv", "Unknown", "Softmax", "Identity"]))
    elif kind == "domain":
        nodes[k].domain = str(rng.choice(["com.microsoft", "x.y", "ai.onnx.ml"]))
    elif kind == "opset":
        model.opset_import[0].version = int(rng.choice([1, 7, 12, 30, 99]))
    elif kind == "input-dtype":
        model.graph.input[0].type.tensor_type.elem_type = int(rng.choice([2, 3, 6, 7, 9, 10, 11, 16]))
    elif kind == "input-shape":
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[int(rng.integers(len(dims)))].dim_value = int(rng.choice([0, 1, 3, 1000]))
    elif kind == "init-dtype":
        init = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
        init.data_type = int(rng.choice([2, 6, 7, 10, 11]))
    elif kind == "duplicate-output":
        model.graph.output.append(model.graph.output[0])
    elif kind == "cycle":
        nodes[0].input[0] = nodes[-1].output[0]
    elif kind == "sparse-init":  # valid ONNX that ONNX Runtime runs
        for init in list(model.graph.initializer):
            if rng.random() < 0.5:
                values = onnx.numpy_helper.to_array(init).copy()
                values[np.abs(values) < float(rng.choice([0.0, 0.2, 10.0]))] = 0
                flat = np.flatnonzero(values)
                model.graph.initializer.remove(init)
                model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
                    onnx.numpy_helper.from_array(values.reshape(-1)[flat], init.name),
                    onnx.numpy_helper.from_array(flat.astype(np.int64)), list(values.shape)))
    elif kind == "init-input":  # overridable weights: initializers that are graph inputs too
        for init in model.graph.initializer:
            if rng.random() < 0.5:
                model.graph.input.append(onnx.helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
    elif kind == "int-first-output":  # class ids first, as ArgMax / scikit-learn-to-ONNX write them
        head = model.graph.output[0].name
        keepdims = int(rng.integers(2))
        model.graph.node.extend([
            onnx.helper.make_node("ArgMax", [head], ["label"], axis=-1, keepdims=keepdims, name="am"),
            onnx.helper.make_node("Softmax", [head], ["probabilities"], axis=-1, name="sm")])
        outputs = [onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["batch", 1][:1 + keepdims])]
        if rng.random() < 0.7:
            outputs.append(onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 3]))
        if rng.random() < 0.5:
            outputs.append(model.graph.output[0])
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    return model


def _signature(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


@FUZZ
@example(seed=1024, kind="bytes", command="compress", criterion="last")  # a node name that is not UTF-8
@example(seed=1, kind="sparse-init", command="compress", criterion="damage")
@example(seed=2, kind="init-input", command="compress", criterion="damage")
@example(seed=3, kind="int-first-output", command="compress", criterion="damage")
@example(seed=4, kind="int-first-output", command="analyze", criterion="damage")
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(
    ["bytes", "truncate", "drop-node", "rename-input", "op-type", "domain", "opset", "input-dtype",
     "input-shape", "init-dtype", "duplicate-output", "cycle", "sparse-init", "init-input", "int-first-output"]),
       command=st.sampled_from(["compress", "analyze"]), criterion=st.sampled_from(["last", "damage"]))
def test_fuzzed_small_graphs_never_exit_1(seed, kind, command, criterion):
    with _workspace(_mutated(seed, kind)) as (root, path):
        argv = [command, str(path), "--remove", "1", "--criterion", criterion]
        if command == "compress":
            argv += ["-o", str(root / "out.onnx")]
        code, err = _run(argv)
        _assert_users_fault_or_success(code, err)
        if code == 0 and command == "compress":
            # A valid input: the signature is kept, whatever its kind, minus what the report says was removed.
            validation = json.loads((root / "out.json").read_text())["validation"]
            inputs, outputs = _signature(path)
            assert _signature(root / "out.onnx") == (
                [i for i in inputs if i not in validation["removed_inputs"]],
                [o for o in outputs if o not in validation["removed_outputs"]])


@FUZZ_COMPRESS
@example(length=245, suffix=".onnx", char="a", which="-o")  # legal: its temporary files must fit too
@example(length=251, suffix="", char="a", which="--report")
@example(length=300, suffix=".onnx", char="a", which="-o")
@example(length=126, suffix=".onnx", char="é", which="-o")
@given(length=st.integers(1, 300), suffix=st.sampled_from([".onnx", "", ".json.onnx"]),
       char=st.sampled_from(["a", "é", "-", "."]), which=st.sampled_from(["-o", "--report", "--plot"]))
def test_fuzzed_output_name_lengths_never_exit_1(length, suffix, char, which):
    """Names up to and beyond the file system's limit (255 bytes; 2 for "é"): a
    legal one works (its temporary files fit), a longer one is exit 2."""
    with _workspace() as (root, path):
        name = char * length + (".png" if which == "--plot" else suffix)
        argv = ["compress", str(path), "--remove", "1", "--criterion", "last"]
        argv += ["-o", str(root / "out.onnx"), which, str(root / name)] if which != "-o" else ["-o", str(root / name)]
        code, err = _run(argv)
        _assert_users_fault_or_success(code, err)
        if code == 0:
            assert not list(root.glob(".*.tmp"))
