"""Property: no user input ever makes the CLI fail with exit 1 or a traceback.

Fuzzed calibration arrays, fuzzed option values and fuzzed small ONNX graphs
go through the real `main()`; every outcome must be success (0) or the
user's fault said in one line (2). An exit 1 here is a bug in our code.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sglp_onnx.cli import main
from tiny_graphs import residual_mlp

# Derandomized: CI runs the same examples every time (wider runs: raise max_examples locally).
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
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
        model.graph.input[0].type.tensor_type.elem_type = int(rng.choice([2, 3, 6, 7, 9, 10, 11]))
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
    return model


@FUZZ
@example(seed=1024, kind="bytes", command="compress")  # a node name that is not UTF-8 (found by this test)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(
    ["bytes", "truncate", "drop-node", "rename-input", "op-type", "domain", "opset", "input-dtype",
     "input-shape", "init-dtype", "duplicate-output", "cycle"]),
       command=st.sampled_from(["compress", "analyze"]))
def test_fuzzed_small_graphs_never_exit_1(seed, kind, command):
    with _workspace(_mutated(seed, kind)) as (root, path):
        argv = [command, str(path), "--remove", "1", "--criterion", "last"]
        if command == "compress":
            argv += ["-o", str(root / "out.onnx")]
        code, err = _run(argv)
        _assert_users_fault_or_success(code, err)
