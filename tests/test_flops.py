"""FLOPs from the ONNX graph against `torch.utils.flop_counter.FlopCounterMode`.

Single ops are built as ONNX graphs next to the torch call they stand for;
whole models (the committed CNNs, a transformer exported here, a tiny Llama)
are compared in total and per prunable unit, within 5 %.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sglp_onnx.files.calibration import CalibrationSet
from sglp_onnx.graph.flops import node_flops, tensors_needed
from sglp_onnx.units import discover
from sglp_onnx.evidence.activations import probe_shapes

MODELS = Path(__file__).resolve().parents[1] / "models"
TOLERANCE = 0.05


def torch_flops(fn, *args) -> tuple[int, dict[str, int]]:
    """Total FLOPs of `fn(*args)` and FLOPs per module path (root class name stripped).

    The math backend makes scaled_dot_product_attention visible to the
    counter as bmm on CPU (the fused CPU kernel is not registered).
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        path = name.split(".", 1)[1] if "." in name else ""
        per_module[path] = sum(ops.values())
    return counter.get_total_flops(), per_module


# -- single ops ----------------------------------------------------------

def one_node_model(node: onnx.NodeProto, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                   opset: int = 20) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "op",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # onnx >= 1.23 writes IR 14, which ONNX Runtime rejects
    return model


def onnx_op_flops(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> int:
    shapes, _ = probe_shapes(model, inputs, tensors_needed(model))
    return sum(node_flops(model, shapes).values())


def r(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def conv_case(dims, c_in, c_out, k, *, groups=1, stride=1, pad=0, dilation=1, size=9):
    x, w = r(2, c_in, *([size] * dims)), r(c_out, c_in // groups, *([k] * dims))
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=groups, strides=[stride] * dims,
                            pads=[pad] * 2 * dims, dilations=[dilation] * dims)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return (one_node_model(node, {"x": x}, {"w": w}), {"x": x},
            lambda: conv(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad,
                         dilation=dilation, groups=groups))


def conv_transpose_case(c_in, c_out, k, *, groups=1, stride=2):
    x, w = r(2, c_in, 5, 5), r(c_in, c_out // groups, k, k)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=groups, strides=[stride, stride])
    return (one_node_model(node, {"x": x}, {"w": w}), {"x": x},
            lambda: F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, groups=groups))


def gemm_case(trans_a, trans_b):
    m, k, n = 6, 10, 7
    a = r(k, m) if trans_a else r(m, k)
    b = r(n, k) if trans_b else r(k, n)
    c = r(n)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=trans_b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return (one_node_model(node, {"a": a}, {"b": b, "c": c}), {"a": a},
            lambda: torch.addmm(torch.from_numpy(c), ta.T if trans_a else ta, tb.T if trans_b else tb))


def matmul_case(shape_a, shape_b):
    a, b = r(*shape_a), r(*shape_b)
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    return (one_node_model(node, {"a": a, "b": b}, {}), {"a": a, "b": b},
            lambda: torch.matmul(torch.from_numpy(a), torch.from_numpy(b)))


def einsum_case(equation, shape_a, shape_b):
    a, b = r(*shape_a), r(*shape_b)
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    return (one_node_model(node, {"a": a, "b": b}, {}), {"a": a, "b": b},
            lambda: torch.einsum(equation, torch.from_numpy(a), torch.from_numpy(b)))


def attention_case(b, h_q, h_kv, t_q, t_kv, d, *, causal):
    q, k, v = r(b, h_q, t_q, d), r(b, h_kv, t_kv, d), r(b, h_kv, t_kv, d)
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))
    return (one_node_model(node, {"q": q, "k": k, "v": v}, {}, opset=23), {"q": q, "k": k, "v": v},
            lambda: F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                                   is_causal=causal, enable_gqa=h_q != h_kv))


OP_CASES = {
    "conv1d": lambda: conv_case(1, 4, 6, 3, pad=1),
    "conv2d-strided-dilated": lambda: conv_case(2, 4, 8, 3, stride=2, pad=2, dilation=2),
    "conv2d-grouped": lambda: conv_case(2, 8, 12, 3, groups=4, pad=1),
    "conv2d-depthwise": lambda: conv_case(2, 8, 8, 3, groups=8, pad=1),
    "conv3d": lambda: conv_case(3, 2, 4, 3, size=5),
    "conv-transpose": lambda: conv_transpose_case(4, 6, 3),
    "conv-transpose-grouped": lambda: conv_transpose_case(6, 4, 2, groups=2),
    "gemm": lambda: gemm_case(0, 0),
    "gemm-transB": lambda: gemm_case(0, 1),
    "gemm-transA-transB": lambda: gemm_case(1, 1),
    "matmul-2d": lambda: matmul_case((5, 8), (8, 3)),
    "matmul-broadcast": lambda: matmul_case((2, 1, 4, 8), (3, 8, 5)),
    "matmul-vector-left": lambda: matmul_case((8,), (8, 3)),
    "einsum-attention-scores": lambda: einsum_case("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 6, 4)),
    "einsum-ellipsis": lambda: einsum_case("...ij,...jk->...ik", (2, 3, 4, 5), (2, 1, 5, 6)),
    "attention-mha": lambda: attention_case(2, 4, 4, 6, 6, 8, causal=False),
    "attention-gqa-causal": lambda: attention_case(2, 4, 2, 6, 6, 8, causal=True),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_single_op_flops_equal_torch(case):
    model, inputs, torch_call = OP_CASES[case]()
    expected, _ = torch_flops(torch_call)
    assert expected > 0
    assert onnx_op_flops(model, inputs) == expected


def test_matmul_with_vector_on_the_right():
    # torch lowers this to aten.mv, which FlopCounterMode does not count: 2 * 2 * 5 * 8 by hand.
    model, inputs, _ = matmul_case((2, 5, 8), (8,))
    assert onnx_op_flops(model, inputs) == 2 * 2 * 5 * 8


def test_attention_counts_the_past_kv_cache():
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk_out", "pv_out"])
    b, h, t, past, d = 1, 4, 1, 9, 8
    new, cached = (b, h, t, d), (b, h, past, d)
    inputs = {"q": new, "k": new, "v": new, "pk": cached, "pv": cached}
    model = one_node_model(node, {k: np.zeros(v, np.float32) for k, v in inputs.items()}, {}, opset=23)
    # The shapes a probe would report, given directly (nothing runs).
    flops = sum(node_flops(model, {**inputs, "y": new}).values())
    expected, _ = torch_flops(lambda: F.scaled_dot_product_attention(
        torch.zeros(b, h, t, d), torch.zeros(b, h, t + past, d), torch.zeros(b, h, t + past, d)))
    assert flops == expected


# -- whole models --------------------------------------------------------

def assert_model_flops_match(onnx_model: onnx.ModelProto, feed: dict[str, np.ndarray],
                             torch_model: nn.Module, torch_args: tuple, *, min_units: int) -> None:
    """Total FLOPs per sample, and each unit's FLOPs against the torch module it came from."""
    n = next(iter(feed.values())).shape[0]
    units, total = discover(onnx_model, CalibrationSet(inputs=feed), granularity="layer", provider="cpu")
    expected_total, per_module = torch_flops(torch_model, *torch_args)
    assert total == pytest.approx(expected_total / n, rel=TOLERANCE)
    matched = 0
    for unit in units:
        if unit.scope in per_module:
            assert unit.flops == pytest.approx(per_module[unit.scope] / n, rel=TOLERANCE), unit.scope
            matched += 1
    assert matched >= min_units


def committed(name: str) -> Path:
    path = MODELS / name
    if not path.is_file():
        pytest.skip(f"{name} is not in models/ (train it with the scripts there)")
    return path


def test_cnn1d_flops_match_torch():
    from models.cnn1d import cnn1d_radio

    model = onnx.load(str(committed("cnn1d_radio.onnx")))
    x = np.load(committed("cnn1d_radio.calib.npz"))["input"][:2]
    assert_model_flops_match(model, {"input": x}, cnn1d_radio().eval(), (torch.from_numpy(x),), min_units=16)


@pytest.mark.parametrize("depth", [56, 110])
def test_resnet_digits_flops_match_torch(depth):
    from models import resnet_cifar

    model = onnx.load(str(committed(f"resnet{depth}_digits.onnx")))
    x = np.load(committed(f"resnet{depth}_digits.calib.npz"))["input"][:2]
    net = getattr(resnet_cifar, f"resnet{depth}_digits")().eval()
    assert_model_flops_match(model, {"input": x}, net, (torch.from_numpy(x),), min_units=3 * ((depth - 2) // 6 - 1))


class TransformerLayer(nn.Module):
    """Pre-norm layer: multi-head self-attention written out with matmuls, then a ReLU MLP."""

    def __init__(self, width: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        attention = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, layers: int = 3, width: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[TransformerLayer(width) for _ in range(layers)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.layers(x))


def test_transformer_flops_match_torch(tmp_path):
    from sglp_onnx.tools.export.torch_export import export_torch

    torch.manual_seed(0)
    net = TinyTransformer().eval()
    x = torch.randn(2, 12, 32)
    # The legacy exporter takes about a second; dynamo is covered by the Llama test.
    model = export_torch(net, (x,), tmp_path / "transformer.onnx", exporter="legacy")
    assert_model_flops_match(model, {"input": x.numpy()}, net, (x,), min_units=2)


def _llama_wrapper(lm):
    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    return Logits().eval()


@pytest.mark.slow
def test_tiny_llama_from_config_flops_match_torch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_onnx.tools.export.torch_export import export_torch

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    net = _llama_wrapper(LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 64, (2, 16))
    model = export_torch(net, (ids,), tmp_path / "llama.onnx", exporter="dynamo")
    assert_model_flops_match(model, {"input": ids.numpy()}, net, (ids,), min_units=2)


@pytest.mark.parametrize("name", ["tinyllama_pydoc.onnx", "tinyllama_pydoc.kv.onnx"])
def test_committed_tiny_llama_flops_match_torch(name):
    """The committed Llama (GQA, RoPE) against its HF model, total and per decoder layer.

    The KV-cache export is fed an empty cache, so both count the same prompt.
    """
    from models.tiny_llama import PYDOC_DIR, load_tiny_llama

    model = onnx.load(str(committed(name)))
    if not PYDOC_DIR.is_dir():
        pytest.skip("models/tinyllama_pydoc/ (the HF weights) is absent")
    calib = np.load(committed("tinyllama_pydoc.calib.npz"))
    ids, mask = calib["input_ids"][:2, :32], calib["attention_mask"][:2, :32]
    feed = {"input_ids": ids, "attention_mask": mask}
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values"):
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = np.zeros((2, dims[1], 0, dims[3]), np.float32)
        elif vi.name == "position_ids":
            feed[vi.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    lm = load_tiny_llama(PYDOC_DIR)

    def forward(i, m):
        return lm(input_ids=i, attention_mask=m, use_cache=False).logits

    assert_model_flops_match(model, feed, forward, (torch.from_numpy(ids), torch.from_numpy(mask)), min_units=8)


def test_matmul_nbits_weights_count_as_their_logical_parameters():
    """A 4-bit MatMulNBits weight counts K x N parameters (not its packed
    bytes) and its scales and zero points none, so an int4 model reports the
    parameter count of its float original."""
    from sglp_onnx.graph.flops import model_params

    k, n, block = 64, 48, 32
    blocks = k // block
    ms = "com.microsoft"

    def model(nodes, inits):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])

    fp32 = model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [helper.make_tensor("w", TensorProto.FLOAT, [k, n], np.ones(k * n, np.float32))])
    int4 = model([helper.make_node("MatMulNBits", ["x", "q4", "scales", "zp"], ["y"], domain=ms, K=k, N=n, bits=4,
                                   block_size=block)],
                 [helper.make_tensor("q4", TensorProto.UINT8, [n, blocks, block // 2], np.zeros(n * k // 2, np.uint8)),
                  helper.make_tensor("scales", TensorProto.FLOAT, [n, blocks], np.ones(n * blocks, np.float32)),
                  helper.make_tensor("zp", TensorProto.UINT8, [n * blocks // 2], np.zeros(n * blocks // 2, np.uint8))])
    assert model_params(fp32) == model_params(int4) == k * n
