"""Shared small models for the core tests: tiny torch residual nets, an export
helper for both torch exporters, and an independent rewiring of ONNX graphs.

`rewire` is written straight on the protobuf, without onnx-graphsurgeon or
sglp_onnx.surgery.remove, so that it can serve as the reference the surgery is
compared against.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from sglp_onnx.tools.export.torch_export import export_torch

EXPORTERS = ("dynamo", "legacy")


# -- torch models -----------------------------------------------------------

class BasicBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))) with a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, a stage of 3 identity blocks, a stage opened by a projection block plus 2 identity blocks.

    Identity blocks (the prunable units): layer1.0, layer1.1, layer1.2, layer2.1, layer2.2.
    """

    IDENTITY_BLOCKS = ("layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2")

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16), BasicBlock(16, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim ** -0.5

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.proj(weights @ v)


class PreNormBlock(nn.Module):
    """x + attn(ln(x)), then + mlp(ln(x)): two residual Adds, one layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """(batch, tokens, dim) -> class logits through `depth` pre-norm blocks."""

    def __init__(self, depth: int = 3, dim: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.Sequential(*[PreNormBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.inp(x)))
        return self.head(x.mean(dim=1))


class LinearBlock(nn.Module):
    """x + fc2(relu(fc1(x)))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Input layer, `depth` residual Linear blocks, head: the hand-checkable GradNorm model."""

    def __init__(self, depth: int = 3, dim: int = 6, hidden: int = 8, num_classes: int = 3, in_dim: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(*[LinearBlock(dim, hidden) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


class GeluLike(nn.Module):
    """The tanh-GELU inner term h + c*h**3: an Add of x and f(x) with no weights in f."""

    def forward(self, h):
        return h + 0.044715 * h * h * h


class GeluLikeNet(nn.Module):
    """One real residual block (`block`) and one weightless x + c*x^3 (`act`)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, dim)
        self.act = GeluLike()
        self.block = LinearBlock(dim, dim)
        self.fc_out = nn.Linear(dim, 3)

    def forward(self, x):
        return self.fc_out(self.block(self.act(self.fc_in(x))))


class NestedBlock(nn.Module):
    """x + fc_b(inner(fc_a(x))) where `inner` is itself residual: only the outer block is a unit."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc_a = nn.Linear(dim, dim)
        self.inner = LinearBlock(dim, dim)
        self.fc_b = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc_b(torch.relu(self.inner(self.fc_a(x))))


class NestedNet(nn.Module):
    """Two outer residual blocks, each containing an inner residual block."""

    OUTER = ("outer.0", "outer.1")

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, dim)
        self.outer = nn.Sequential(NestedBlock(dim), NestedBlock(dim))
        self.fc_out = nn.Linear(dim, 3)

    def forward(self, x):
        return self.fc_out(self.outer(self.fc_in(x)))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random normalisation affines and running statistics, so that no block is an identity by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def seeded(cls, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(cls(**kwargs), seed)


class PassThrough(nn.Identity):
    """nn.Identity that also accepts the extra arguments a transformer layer is called with."""

    def forward(self, x, *args, **kwargs):
        return x


def with_identity(model: nn.Module, scopes: Iterable[str]) -> nn.Module:
    """A copy of `model` with the submodules at `scopes` replaced by an identity."""
    clone = copy.deepcopy(model)
    for scope in scopes:
        parent_path, _, child = scope.rpartition(".")
        parent = clone.get_submodule(parent_path) if parent_path else clone
        setattr(parent, child, PassThrough())
    return clone.eval()


def torch_out(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    if not isinstance(out, torch.Tensor):
        out = out.logits
    return out.numpy()


# -- export and run -----------------------------------------------------------

def export(model: nn.Module, x: torch.Tensor | np.ndarray, path: str | Path, exporter: str,
           *, input_names: Sequence[str] = ("input",), output_names: Sequence[str] = ("logits",)) -> onnx.ModelProto:
    """Export with `sglp_onnx.tools.export.torch_export.export_torch` (dynamic batch) and return the written model."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return export_torch(model, (x,), path, exporter=exporter, input_names=input_names, output_names=output_names)


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
    sess = session(model)
    if isinstance(feed, np.ndarray):
        feed = {sess.get_inputs()[0].name: feed}
    return sess.run(None, feed)


# -- the independent reference rewiring -------------------------------------

def rewire(model: onnx.ModelProto, pairs: Sequence[tuple[str, str]]) -> onnx.ModelProto:
    """Skip every (entry, exit) pair: consumers of exit read entry.

    Chains are resolved (when unit k and k+1 are both skipped, k+1's exit
    maps to k's entry). A graph output that is skipped keeps its name through
    an Identity. Nodes and initializers no output needs any more are dropped.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    target = dict((exit_, entry) for entry, exit_ in pairs)

    def resolve(name: str) -> str:
        seen = set()
        while name in target and name not in seen:
            seen.add(name)
            name = target[name]
        return name

    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in target:
                node.input[k] = resolve(name)

    output_names = {o.name for o in graph.output}
    for name in output_names & set(target):
        # Rename the old producer's output so the Identity can own the name.
        for node in graph.node:
            for k, produced in enumerate(node.output):
                if produced == name:
                    node.output[k] = name + "__skipped"
        graph.node.append(onnx.helper.make_node("Identity", [resolve(name)], [name], name=f"rewire/{name}"))

    # Dead-node elimination from the graph outputs.
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    live: set[int] = set()
    stack = list(output_names)
    visited: set[str] = set()
    while stack:
        name = stack.pop()
        if name in visited:
            continue
        visited.add(name)
        i = producer.get(name)
        if i is None or i in live:
            continue
        live.add(i)
        stack.extend(t for t in graph.node[i].input if t)
    kept = [copy.deepcopy(n) for i, n in enumerate(graph.node) if i in live]
    # Keep a topological order: the appended Identity nodes read tensors produced earlier.
    kept = _toposort(kept, {i.name for i in graph.input} | {i.name for i in graph.initializer})
    del graph.node[:]
    graph.node.extend(kept)
    read = {t for n in graph.node for t in n.input} | output_names
    inits = [copy.deepcopy(i) for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [copy.deepcopy(v) for v in graph.value_info if v.name in visited]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return out


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    done = set(available) | {""}
    ordered: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(t in done for t in n.input):
                ordered.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("cycle or missing tensor while ordering the rewired graph")
        pending = rest
    return ordered


def image_batch(n: int, shape: Sequence[int] = (3, 16, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# -- cached exports (one per model and exporter per test session) ---------------

def tiny_resnet() -> nn.Module:
    """Factory for `--torch-model graphs:tiny_resnet` (seeded, so weights are reproducible)."""
    return seeded(TinyResNet)


def tiny_transformer() -> nn.Module:
    return seeded(TinyTransformer)


def residual_mlp() -> nn.Module:
    return seeded(ResidualMLP)


TINY_MODELS = {
    # name: (factory, per-sample input shape)
    "resnet": (tiny_resnet, (3, 16, 16)),
    "transformer": (tiny_transformer, (5, 16)),
    "nested": (lambda: seeded(NestedNet), (8,)),
    "gelu_like": (lambda: seeded(GeluLikeNet), (8,)),
    "mlp": (residual_mlp, (5,)),
}

_EXPORT_DIR: Path | None = None
_EXPORTS: dict[tuple[str, str], tuple[nn.Module, Path]] = {}


def _export_dir() -> Path:
    global _EXPORT_DIR
    if _EXPORT_DIR is None:
        import atexit
        import shutil
        import tempfile

        _EXPORT_DIR = Path(tempfile.mkdtemp(prefix="sglp-test-exports-"))
        atexit.register(shutil.rmtree, _EXPORT_DIR, True)
    return _EXPORT_DIR


def exported(name: str, exporter: str) -> tuple[nn.Module, Path]:
    """The torch model `name` of TINY_MODELS and its ONNX export (cached for the session).

    Callers must not modify the file: copy it first.
    """
    key = (name, exporter)
    if key not in _EXPORTS:
        factory, shape = TINY_MODELS[name]
        model = factory()
        path = _export_dir() / f"{name}.{exporter}.onnx"
        export(model, example_input(name, 2), path, exporter)
        _EXPORTS[key] = (model, path)
    return _EXPORTS[key]


def example_input(name: str, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY_MODELS[name][1])).astype(np.float32)


def write_exported(folder: Path, name: str = "resnet", exporter: str = "legacy", n: int = 12) -> Path:
    """A copy of the export of `name` as folder/model.onnx, with its sidecar
    model.calib.npz (`n` samples, with labels); returns the model's path."""
    import shutil

    _, path = exported(name, exporter)
    model = folder / "model.onnx"
    shutil.copy(path, model)
    np.savez(folder / "model.calib.npz", input=example_input(name, n, seed=3), labels=np.arange(n) % 4)
    return model


def discover(model: onnx.ModelProto, feed: dict[str, np.ndarray] | np.ndarray, *, granularity: str = "layer"):
    """Units as the pipeline finds them: with shapes probed on one batch."""
    from sglp_onnx.evidence.activations import probe_shapes
    from sglp_onnx.units.discovery import find_units, probe_targets

    if isinstance(feed, np.ndarray):
        feed = {model.graph.input[0].name: feed}
    shapes, dtypes = probe_shapes(model, feed, probe_targets(model))
    return find_units(model, granularity=granularity, shapes=shapes, dtypes=dtypes)


def insert_skip_passthrough(model: onnx.ModelProto, entries: Iterable[str]) -> onnx.ModelProto:
    """A copy in which every residual Add reading one of `entries` directly
    reads it through Identity -> Cast(to=its own dtype) instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    entries = set(entries)
    dtypes = {vi.name: vi.type.tensor_type.elem_type
              for vi in list(out.graph.input) + list(out.graph.value_info) + list(out.graph.output)}
    nodes = []
    for k, node in enumerate(out.graph.node):
        if node.op_type == "Add":
            for j, name in enumerate(node.input):
                if name in entries:
                    ident, cast = f"{name}__id{k}", f"{name}__cast{k}"
                    nodes.append(onnx.helper.make_node("Identity", [name], [ident], name=f"skip_id_{k}"))
                    nodes.append(onnx.helper.make_node("Cast", [ident], [cast], name=f"skip_cast_{k}",
                                                       to=dtypes.get(name, onnx.TensorProto.FLOAT)))
                    node.input[j] = cast
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def params_of(model: onnx.ModelProto) -> int:
    """Elements of all non-scalar constants (initializers and Constant nodes)."""
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.dims:
                    total += int(np.prod(attr.t.dims))
    return total


def signature(model: onnx.ModelProto) -> tuple[list, list]:
    """Input and output (name, elem_type, dims) lists."""
    inits = {i.name for i in model.graph.initializer}

    def describe(vi):
        tt = vi.type.tensor_type
        return vi.name, tt.elem_type, tuple(d.dim_param or d.dim_value for d in tt.shape.dim)

    return ([describe(i) for i in model.graph.input if i.name not in inits],
            [describe(o) for o in model.graph.output])


# -- the independent reference of a repaired model ----------------------------

def apply_map(value: np.ndarray, cut: dict, constants: dict[str, np.ndarray]) -> np.ndarray:
    """A report cut's map (`repair.cuts[i]`) applied to `value` in numpy, from
    the map's constants as stored in the written model."""
    weight, bias = (constants[n].astype(np.float64) for n in cut["initializers"])
    moved = np.moveaxis(value.astype(np.float64), cut["axis"], -1)
    if cut["form"] == "diagonal":
        out = moved * weight.reshape(-1) + bias.reshape(-1)
    else:
        if weight.ndim > 2:  # a 1x1 Conv kernel (C_out, C_in, 1, ...): y = x @ kernel.T
            weight = weight.reshape(weight.shape[:2]).T
        out = moved @ weight + bias.reshape(-1)
    return np.moveaxis(out, -1, cut["axis"]).astype(value.dtype)


def repaired_reference(model: onnx.ModelProto, report: dict, pruned: onnx.ModelProto,
                       feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The original with the report's removed units bypassed and each reported
    cut's map applied, computed outside the graph: every cut's exit is opened
    into a graph input, the bypass is `rewire`, and the maps run in numpy,
    cut by cut, on what the rewired network computes at each cut's entry."""
    cuts = report["repair"]["cuts"]
    pairs = [(u["entry"], u["exit"]) for u in report["units"] if u["removed"]]
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer}
    opened = onnx.ModelProto()
    opened.CopyFrom(model)
    outputs = [o.name for o in model.graph.output]
    for k, cut in enumerate(cuts):
        assert cut["exit"] not in outputs
        for node in opened.graph.node:
            for j, name in enumerate(node.input):
                if name == cut["exit"]:
                    node.input[j] = f"opened/{k}"
        opened.graph.input.append(onnx.helper.make_tensor_value_info(f"opened/{k}", onnx.TensorProto.FLOAT, None))
        opened.graph.output.append(onnx.ValueInfoProto(name=cut["entry"]))
    opened = rewire(opened, [(e, x) for e, x in pairs if x not in {c["exit"] for c in cuts}])
    # Shapes of the entries: the original network's, for the maps not yet computed.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=c["entry"]) for c in cuts)
    entries = run(probe, feed)[len(outputs):]
    maps = {f"opened/{k}": np.zeros_like(e) for k, e in enumerate(entries)}
    for k, cut in enumerate(cuts):  # cuts are in front-to-back order
        values = run(opened, {**feed, **maps})
        maps[f"opened/{k}"] = apply_map(values[len(outputs) + k], cut, constants)
    return run(opened, {**feed, **maps})[:len(outputs)]


def plain_bypass(written: onnx.ModelProto | str | Path, report: dict) -> onnx.ModelProto:
    """A written model without its repair maps when the report says they were
    applied (`repair.strip_repairs`): the plain bypass, which is what a reference
    that deletes the removed blocks computes; the maps themselves are checked
    against an independent computation in test_repair.py."""
    from sglp_onnx.repair.graph import strip_repairs

    model = written if isinstance(written, onnx.ModelProto) else onnx.load(str(written))
    repair = report.get("repair")
    return strip_repairs(model, repair["cuts"]) if repair and repair["applied"] else model
