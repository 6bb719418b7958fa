"""Statically quantized CNNs (ONNX Runtime's `quant_pre_process` + `quantize_static`,
QDQ and QOperator, per-tensor and per-channel, dedicated QDQ pairs) through
the real CLI.

The model is a small ResNet (random weights, BatchNorm folded by the export):
a stem with a MaxPool, two identity blocks, a downsampling block (never a
candidate), two identity blocks with LeakyReLU, then MaxPool -> Flatten ->
Linear, so the last block's exit reaches the head through ops that pass the
quantized integers on (QOperator) or share their quantization (QDQ).

Exactness: the pruned quantized model is compared with the float model
pruned the same way and then quantized with the quantization parameters of
the original quantized model (`TensorQuantOverrides` fixing every
activation's scale and zero point). The two are the same graph with the
same integer weights, scales and zero points, except that an int32 bias
whose input scale changed (the op now reads the previous block's output)
may differ by one: the reference quantizes the float bias for the new scale,
the tool can only requantize the int32 bias it has (round(B * s_old /
s_new)). Outputs therefore agree to within a quantization step or two of
the output on a few elements (one step where a bias rounding tips an
output value), not bit for bit.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from sglp_onnx.cli import main
from sglp_onnx.evidence.activations import probe_shapes
from sglp_onnx.graph.flops import tensors_needed
from sglp_onnx.evidence.gated_runner import GatedRunner
from sglp_onnx.surgery.remove import remove_units
from sglp_onnx.units import patterns
from sglp_onnx.units.discovery import find_units, probe_targets

FORMATS = {
    "qdq": dict(quant_format=QuantFormat.QDQ, per_channel=False),
    "qdq-per-channel": dict(quant_format=QuantFormat.QDQ, per_channel=True),
    "qdq-dedicated": dict(quant_format=QuantFormat.QDQ, per_channel=False, dedicated=True),
    "qoperator": dict(quant_format=QuantFormat.QOperator, per_channel=False),
    "qoperator-per-channel": dict(quant_format=QuantFormat.QOperator, per_channel=True),
}
UNITS = ["layer1.0", "layer1.1", "layer2.1", "layer2.2"]  # layer2.0 downsamples: never a candidate
SHAPE = (3, 16, 16)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, leaky: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.1) if leaky else nn.ReLU()
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.act(y + (x if self.down is None else self.down(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16, leaky=True), Block(16, 16, leaky=True))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def samples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 8) -> None:
        self.batches = [{"input": x[i:i + batch]} for i in range(0, len(x), batch)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def quantize(source: Path, target: Path, *, quant_format, per_channel: bool, dedicated: bool = False,
             overrides: dict | None = None) -> Path:
    extra = {"DedicatedQDQPair": dedicated}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    quantize_static(str(source), str(target), Reader(samples(32, seed=0)), quant_format=quant_format,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options=extra)
    return target


@dataclass
class Models:
    root: Path
    float_model: Path  # the pre-processed float model every quantized one comes from
    quantized: dict[str, Path]
    calib: Path
    float_report: dict


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    net = Net().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    exported = root / "float.onnx"
    torch.onnx.export(net, (torch.from_numpy(samples(2, seed=9)),), str(exported), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    pre = root / "float.pre.onnx"
    quant_pre_process(str(exported), str(pre))
    quantized = {name: quantize(pre, root / f"{name}.onnx", **kw) for name, kw in FORMATS.items()}
    calib = root / "calib.npz"
    np.savez(calib, input=samples(20, seed=3))
    code = main(["compress", str(pre), "--calib", str(calib), "-o", str(root / "float.kept.onnx"),
                 "--report", str(root / "float.json"), "--criterion", "last", "--remove", "0", "-q"])
    assert code == 0
    return Models(root, pre, quantized, calib, json.loads((root / "float.json").read_text()))


def compress(models: Models, name: str, *args: str) -> tuple[int, dict | None, Path]:
    """`sglp-onnx compress` on the quantized model `name`: exit code, report, and the output path; when
    the repair maps were written, a copy without them (`graphs.plain_bypass`: what the
    float-then-quantized reference computes; the repair itself is tested below and in test_repair.py)."""
    tag = "".join(c if c.isalnum() else "_" for c in " ".join(args))
    out = models.root / f"{name}.{tag}.pruned.onnx"
    report_path = out.with_suffix(".json")
    # The references are bypasses: every case but the defaults' asks for no repair.
    extra = [] if "--repair" in args or args in DEFAULT_ARGS else ["--repair", "none"]
    code = main(["compress", str(models.quantized[name]), "--calib", str(models.calib), "-o", str(out),
                 "--report", str(report_path), "--force", "-q", *args, *extra])
    return code, json.loads(report_path.read_text()) if code == 0 else None, out


# Every option at its default (the batch size given is the default, for a distinct output name).
DEFAULT_ARGS = ((), ("--batch-size", "64"))


def assert_matches_reference_or_repaired(models, name: str, out: Path, report: dict) -> None:
    """The defaults repair: where the maps were written, they are closer to the original than the bypass on
    the held-out samples (the maps themselves: test_repair.py); otherwise the output is the reference."""
    repair = report["repair"]
    if repair and repair["applied"]:
        assert report["fidelity"]["score"] < repair["fidelity_without_repair"]["score"]
    else:
        assert_matches_reference(models, name, out, report["removed"])


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


# -- the reference: the float model pruned the same way, quantized with the same parameters -----------------------

def activation_parameters(quantized: onnx.ModelProto) -> dict[str, list[dict]]:
    """Every activation's scale and zero point in `quantized`, keyed by its float tensor's name."""
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    outputs = {o.name for o in quantized.graph.output}
    found: dict[str, list[dict]] = {}
    for node in quantized.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:  # QDQ, and QOperator's input
            name = node.input[0]
            if name.endswith("_QuantizeLinear_Input") and name[: -len("_QuantizeLinear_Input")] in outputs:
                name = name[: -len("_QuantizeLinear_Input")]  # QDQ renames a quantized graph output
            found[name] = [{"scale": inits[node.input[1]], "zero_point": inits[node.input[2]]}]
        for out in node.output:  # QOperator: X_quantized with X_scale, X_zero_point
            base = out.removesuffix("_quantized")
            if out.endswith("_quantized") and f"{base}_scale" in inits and f"{base}_zero_point" in inits:
                found.setdefault(base, [{"scale": inits[f"{base}_scale"], "zero_point": inits[f"{base}_zero_point"]}])
    return found


def reference(models: Models, name: str, removed: list[str]) -> onnx.ModelProto:
    float_model = onnx.load(str(models.float_model))
    units = {u.name: u for u in find_units(float_model)}
    assert sorted(units) == sorted(UNITS)
    pruned = models.root / f"reference.{name}.float.onnx"
    onnx.save(remove_units(float_model, [units[n] for n in removed]), str(pruned))
    target = models.root / f"reference.{name}.onnx"
    quantize(pruned, target, **FORMATS[name],
             overrides=activation_parameters(onnx.load(str(models.quantized[name]))))
    return onnx.load(str(target))


def canonical(model: onnx.ModelProto) -> dict[str, list]:
    """Every node but Q/DQ by name, with its inputs seen through Q/DQ: constants as
    arrays, Q/DQ as (op, what they read...), computed tensors by name."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def resolve(t: str):
        if t in inits:
            return inits[t]
        p = producer.get(t)
        if p is not None and p.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return (p.op_type, *[resolve(i) for i in p.input])
        return t

    return {n.name: [resolve(i) for i in n.input] for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}


def assert_same(a, b, where: str) -> None:
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a[0] == b[0], where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{k}")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype == np.int32:  # a bias requantized for its new input scale
            assert np.abs(a.astype(np.int64) - b).max(initial=0) <= 1, where
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def assert_matches_reference(models: Models, name: str, pruned_path: Path, removed: list[str]) -> None:
    pruned, ref = onnx.load(str(pruned_path)), reference(models, name, removed)
    got, want = canonical(pruned), canonical(ref)
    assert sorted(got) == sorted(want)
    for node in got:
        assert len(got[node]) == len(want[node]), node
        for k, (a, b) in enumerate(zip(got[node], want[node])):
            assert_same(a, b, f"{node}[{k}]")
    x = samples(64, seed=7)
    a, b = run(pruned, x), run(ref, x)
    step = float(numpy_helper.to_array(next(i for i in ref.graph.initializer if i.name == "logits_scale")))
    assert np.abs(a - b).max() <= 2 * step + 1e-6
    assert np.mean(a != b) < 0.1


# -- compress through the CLI ---------------------------------------------------------------------------------

CASES = [(name, ("--remove", "2")) for name in FORMATS] + [
    (name, args) for name in ("qdq", "qoperator")
    for args in (("--criterion", "last", "--remove", "2"), ("--criterion", "cka-removal", "--remove", "1"), ())
]


@pytest.mark.parametrize(("name", "args"), CASES, ids=[f"{n}[{' '.join(a) or 'default'}]" for n, a in CASES])
def test_compress_equals_the_float_model_pruned_then_quantized(models, name, args):
    code, report, out = compress(models, name, *args)
    assert code == 0
    assert [u["name"] for u in report["units"]] == UNITS
    assert all(report["validation"][k] for k in ("checker", "opset_ir_kept", "signature", "runs", "finite"))
    expected = {(): 1, ("--criterion", "cka-removal", "--remove", "1"): 1}.get(args, 2)
    assert len(report["removed"]) == expected
    if args[:2] == ("--criterion", "last"):
        assert report["removed"] == UNITS[-2:]
    assert report["after"]["file_size"] < report["before"]["file_size"]
    assert report["after"]["params"] < report["before"]["params"]
    # FLOPs and parameters count like the float model's (integer ops counted as their float ones).
    assert report["before"]["flops"] == models.float_report["before"]["flops"]
    assert report["before"]["params"] == models.float_report["before"]["params"]
    assert [u["flops"] for u in report["units"]] == [u["flops"] for u in models.float_report["units"]]
    assert [u["params"] for u in report["units"]] == [u["params"] for u in models.float_report["units"]]
    assert report["fidelity"]["kind"] == "kl"
    assert_matches_reference_or_repaired(models, name, out, report)


@pytest.mark.parametrize("name", list(FORMATS))
def test_default_options_with_the_candidates_side_by_side(models, monkeypatch, name):
    """Every option at its default, the candidates' suffixes in one session
    (what large models get; a weight budget of 0 makes this one "large")."""
    from sglp_onnx.evidence import gated_runner

    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)
    code, report, out = compress(models, name, "--batch-size", "64")  # (the default, for a distinct output name)
    assert code == 0
    assert len(report["removed"]) == 1 and report["criterion"] == "damage"
    assert all(report["validation"][k] for k in ("checker", "opset_ir_kept", "signature", "runs", "finite"))
    assert_matches_reference_or_repaired(models, name, out, report)


@pytest.mark.parametrize("name", ["qdq", "qoperator"])
def test_target_flops(models, name):
    code, report, out = compress(models, name, "--target-flops", "0.3")
    assert code == 0
    removed = sum(u["flops"] for u in report["units"] if u["removed"])
    assert removed >= 0.3 * report["before"]["flops"]
    assert report["after"]["flops"] == report["before"]["flops"] - removed
    assert_matches_reference(models, name, out, report["removed"])


@pytest.mark.parametrize("name", ["qdq-dedicated", "qoperator"])
def test_sequential_calibration(models, name):
    code, report, out = compress(models, name, "--sequential", "--criterion", "last", "--remove", "1")
    assert code == 0
    assert report["removed"] == UNITS[-1:]
    assert_matches_reference(models, name, out, report["removed"])


@pytest.mark.parametrize("name", list(FORMATS))
def test_removing_nothing_gives_back_the_same_graph(models, name):
    code, report, out = compress(models, name, "--remove", "0")
    assert code == 0
    source, pruned = onnx.load(str(models.quantized[name])), onnx.load(str(out))
    assert Counter(n.op_type for n in pruned.graph.node) == Counter(n.op_type for n in source.graph.node)
    assert sorted(i.name for i in pruned.graph.initializer) == sorted(i.name for i in source.graph.initializer)
    x = samples(16, seed=5)
    np.testing.assert_array_equal(run(pruned, x), run(source, x))


def test_dedicated_pairs_stay_dedicated(models):
    code, report, out = compress(models, "qdq-dedicated", "--criterion", "last", "--remove", "2")
    assert code == 0
    pruned = onnx.load(str(out))
    readers = Counter(i for n in pruned.graph.node for i in n.input)
    activation_dq = [n for n in pruned.graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] not in {i.name for i in pruned.graph.initializer}]
    assert activation_dq and all(readers[n.output[0]] <= 1 for n in activation_dq)  # the logits' DQ: 0


@pytest.mark.parametrize(("bad", "says"), [("shape", "shape"), ("dtype", "dtype")])
@pytest.mark.parametrize("name", ["qdq", "qoperator"])
def test_bad_calibration_exits_2_with_one_line(models, capsys, name, bad, says):
    data = np.zeros((6, 3, 8, 8), np.float32) if bad == "shape" else np.zeros((6, *SHAPE), np.int64)
    calib = models.root / f"bad-{bad}.npz"
    np.savez(calib, input=data)
    out = models.root / f"bad-{name}-{bad}.onnx"
    capsys.readouterr()
    code = main(["compress", str(models.quantized[name]), "--calib", str(calib), "-o", str(out), "--remove", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not out.exists()


# -- the gated graph the criteria run ------------------------------------------------------------------------

def discovered(path: Path) -> tuple[onnx.ModelProto, list, list]:
    """(the model prepared by the patterns, its units, the patterns that rewrote it)."""
    model, used = patterns.prepare(onnx.load(str(path)))
    shapes, dtypes = probe_shapes(model, {"input": samples(2, seed=1)}, probe_targets(model) + tensors_needed(model))
    return model, find_units(model, shapes=shapes, dtypes=dtypes), used


@pytest.mark.parametrize("name", ["qoperator", "qoperator-per-channel"])
def test_gated_runs_are_the_written_models_bit_for_bit(models, name):
    """QOperator: the gated copy (damage, cka-removal, fidelity) computes exactly the
    pruned model that is written, chained removals and partial passes included."""
    model, units, used = discovered(models.quantized[name])
    out = model.graph.output[0].name
    runner = GatedRunner(model, units, [out])
    x = samples(16, seed=4)
    for removed in [(0,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]:
        written = run(patterns.finish(remove_units(model, [units[i] for i in removed]), used), x)
        np.testing.assert_array_equal(runner.run({"input": x}, removed)[out], written)
        *before, last = removed
        current = runner.run({"input": x}, before, entries=True)
        np.testing.assert_array_equal(runner.run_extension({"input": x}, before, last, current)[out], written)


def test_qdq_gated_runs_follow_the_written_models(models):
    """QDQ: the gates keep ONNX Runtime from fusing the ops beside them into integer
    kernels, so the gated copy rounds differently; it stays within a few output steps."""
    model, units, used = discovered(models.quantized["qdq"])
    out = model.graph.output[0].name
    runner = GatedRunner(model, units, [out])
    x = samples(16, seed=4)
    step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "logits_scale")))
    for removed in [(1,), (2, 3)]:
        written = run(patterns.finish(remove_units(model, [units[i] for i in removed]), used), x)
        assert np.abs(runner.run({"input": x}, removed)[out] - written).max() <= 8 * step


# -- what is not exact is not a unit ---------------------------------------------------------------------------

def test_a_qoperator_exit_whose_scale_something_else_reads_is_no_unit(models):
    """Bypassing re-points every reader of the exit's scale that is not upstream of
    it: when an unrelated op shares that scale initializer, the block is refused."""
    source = onnx.load(str(models.quantized["qoperator"]))
    add = next(n for n in source.graph.node if n.op_type == "QLinearAdd" and "layer1.0" in n.name)
    other = next(n for n in source.graph.node if n.op_type == "QLinearConv" and "layer2.1/conv1" in n.name)
    other.input[6] = add.input[6]  # its output scale is now layer1.0's exit scale
    path = models.root / "shared-scale.onnx"
    onnx.save(source, str(path))
    _, units, _ = discovered(path)
    assert [u.name for u in units] == UNITS[1:]


def test_a_qdq_exit_whose_scale_something_else_reads_keeps_its_plain_bypass(models):
    """QDQ: the bypass is exact without companions except where ops that share the
    exit's quantization requantize it; with the scale shared elsewhere, none are offered."""
    source = onnx.load(str(models.quantized["qdq"]))
    _, units, _ = discovered(models.quantized["qdq"])
    exit_scale = units[0].companions[0][0]
    q = next(n for n in source.graph.node if n.op_type == "QuantizeLinear" and "layer2.1/conv2" in n.input[0])
    q.input[1] = exit_scale
    path = models.root / "shared-scale-qdq.onnx"
    onnx.save(source, str(path))
    _, units, _ = discovered(path)
    assert [u.name for u in units] == UNITS
    assert units[0].companions == () and units[1].companions != ()


# -- repair ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FORMATS))
def test_repair_maps_quantized_cuts_and_never_does_worse(models, name):
    """The default repair on quantized graphs: integer activations (QOperator) are dequantized with the
    entry's scale, mapped and requantized with the exit's; QDQ maps the dequantized float. Kept only where
    the held-out fidelity improves, and the model written is the one measured."""
    code, report, out = compress(models, name, "--criterion", "last", "--remove", "2", "--repair", "full")
    assert code == 0
    assert all(report["validation"][k] for k in ("checker", "opset_ir_kept", "signature", "runs", "finite"))
    repair = report["repair"]
    assert repair["cuts"] and repair["cuts"][0]["units"] == UNITS[-2:]
    integer_entry = name.startswith("qoperator")
    assert ("QuantizeLinear" in repair["cuts"][0]["nodes"]) == integer_entry
    plain, _, plain_out = compress(models, name, "--criterion", "last", "--remove", "2")
    assert plain == 0
    assert report["fidelity"]["score"] <= repair["fidelity_without_repair"]["score"]
    written = onnx.load(str(out))
    has_maps = any(n.name.startswith("sglp_repair/") for n in written.graph.node)
    assert has_maps == repair["applied"]
    if repair["applied"]:
        assert report["fidelity"]["score"] < repair["fidelity_without_repair"]["score"]
    else:
        assert "not applied" in repair["reason"]
    x = samples(6, seed=11)
    assert np.isfinite(run(out, x)).all()


def test_repaired_qdq_equals_an_independent_computation(models):
    """QDQ maps the dequantized float: the original QDQ model with the cut's exit opened, the bypass
    rewired and the reported map applied in numpy (`graphs.repaired_reference`) gives the written
    model's output, up to the requantization that follows the map (its float rounding can tip a value
    by a step), and much closer than the plain bypass does."""
    from graphs import repaired_reference

    code, report, out = compress(models, "qdq", "--criterion", "last", "--remove", "2", "--repair", "full")
    assert code == 0 and report["repair"]["applied"]
    x = samples(6, seed=11)
    original = onnx.load(str(models.quantized["qdq"]))
    got = run(out, x)
    (want,) = repaired_reference(original, report, onnx.load(str(out)), {"input": x})
    bypass = run(compress(models, "qdq", "--criterion", "last", "--remove", "2")[2], x)
    error = np.abs(got - want).max()
    assert error <= 0.02 * np.abs(want).max()
    assert error < np.abs(bypass - want).max() / 4
    assert (got.argmax(1) == want.argmax(1)).all()


# -- a transformer whose layers chain through views (OPT), in QDQ ----------------------------------------------

def test_opt_qdq_layers_chain_through_requantized_views(tmp_path):
    """OPT flattens its hidden state to (tokens, hidden) around the MLP; in QDQ
    every Reshape's output is requantized (`Reshape -> Q -> DQ`). A layer's
    two residuals still make one unit, whose exit is the requantized view back
    to the entry's shape; removing the last two layers equals the float model
    pruned the same way, then quantized with the original's parameters."""
    from tiny_transformers import CONFIGS, LAYERS, SEQ, token_batch

    from sglp_onnx.tools.export.hf import export_hf

    torch.manual_seed(0)
    exported = tmp_path / "opt.onnx"
    export_hf(CONFIGS["opt"]().eval(), exported, with_cache=False, exporter="legacy")
    pre = tmp_path / "opt.pre.onnx"
    quant_pre_process(str(exported), str(pre))
    feed = token_batch(16, SEQ, seed=1)
    np.savez(tmp_path / "calib.npz", **feed)

    class Tokens(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: v[i:i + 4] for k, v in feed.items()} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.it, None)

    def quantize_opt(source: Path, target: Path, overrides: dict | None = None) -> Path:
        quantize_static(str(source), str(target), Tokens(), quant_format=QuantFormat.QDQ, per_channel=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"TensorQuantOverrides": overrides} if overrides else {})
        return target

    quantized = quantize_opt(pre, tmp_path / "opt.qdq.onnx")
    outputs = {}
    for name, source in (("qdq", quantized), ("float", pre)):
        outputs[name] = tmp_path / f"{name}.pruned.onnx"
        assert main(["-q", "compress", str(source), "--calib", str(tmp_path / "calib.npz"), "-o", str(outputs[name]),
                     "--criterion", "last", "--remove", "2", "--repair", "none"]) == 0
        report = json.loads(outputs[name].with_suffix(".json").read_text())
        assert [u["sublayers"] for u in report["units"]] == [2] * LAYERS
        assert [u["removed"] for u in report["units"]] == [False] * (LAYERS - 2) + [True] * 2
        assert report["fidelity"]["kind"] == "kl"
    ref = onnx.load(str(quantize_opt(outputs["float"], tmp_path / "reference.onnx",
                                     activation_parameters(onnx.load(str(quantized))))))
    pruned = onnx.load(str(outputs["qdq"]))
    got, want = canonical(pruned), canonical(ref)
    assert sorted(got) == sorted(want)
    norms = {n.name for n in pruned.graph.node if n.op_type == "LayerNormalization"}
    for node in got:
        for k, (a, b) in enumerate(zip(got[node], want[node])):
            if node in norms and k == 2:
                # The quantizer gives a norm's int32 bias the input's scale times the weight's: the tool
                # keeps the bias (its float value) where the norm reads another layer's output now, the
                # reference quantizes it for the new input scale. Both dequantize to the float bias.
                assert a[0] == b[0] == "DequantizeLinear"
                step = max(float(np.max(a[2])), float(np.max(b[2])))
                assert np.abs((a[1] - a[3]) * a[2] - (b[1] - b[3]) * b[2]).max() <= step
            else:
                assert_same(a, b, f"{node}[{k}]")
    test = token_batch(3, SEQ, seed=7)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (pruned, ref)]
    a, b = (s.run(None, test)[0] for s in sessions)
    np.testing.assert_allclose(a, b, atol=1e-3)
