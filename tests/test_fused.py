"""Graphs from ONNX Runtime's transformer optimizer: residual joins fused
into com.microsoft SkipLayerNormalization (with Attention,
EmbedLayerNormalization, BiasGelu/FastGelu around them).

Tiny BERT (post-norm) and GPT-2 (pre-norm) with random, per-layer distinct
weights are exported with the TorchScript exporter at opset 17, optimized
with `onnxruntime.transformers.optimizer.optimize_model` and converted to
fp16 (`keep_io_types`). `compress` must find the layers, validate, write
fused nodes again, and prune exactly like the unfused export (and, for
GPT-2, like transformers with those layers deleted).
"""

from __future__ import annotations

import collections
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphs import plain_bypass
from sglp_onnx.cli import main
from sglp_onnx.evidence.activations import probe_shapes
from sglp_onnx.surgery.remove import remove_units
from sglp_onnx.units.discovery import find_units, probe_targets
from sglp_onnx.units.patterns import finish, prepare
from sglp_onnx.units.patterns.skip_layer_norm import FUSED_EPSILON

optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
transformers = pytest.importorskip("transformers")

VOCAB = 100
LAYERS = 4
HIDDEN = 32
HEADS = 2
SEQ = 12
N_CALIB = 16
CLI = str(Path(sys.executable).with_name("sglp-onnx"))
FUSED_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def build(arch: str) -> nn.Module:
    if arch == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=64, max_position_embeddings=64)
        model = transformers.BertForMaskedLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=64, n_positions=64,
            bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    config._attn_implementation = "eager"  # the optimizer fuses what the eager export spells out
    # A random init has every norm weight 1 and bias 0: the exporter would
    # merge them into one initializer. A trained model's layers differ.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def token_batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, SEQ), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-max(1, n // 4):, SEQ * 2 // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """arch -> {"torch", "plain", "fused", "fused16", "calib"}: the model, its
    export, the optimizer's fused graph and its fp16 copy, calibration data."""
    from sglp_onnx.tools.export.hf import export_hf

    root = tmp_path_factory.mktemp("fused")
    staged = {}
    torch.manual_seed(0)
    for arch in ("bert", "gpt2"):
        model = build(arch)
        plain = root / f"{arch}.onnx"
        export_hf(model, plain, exporter="legacy", opset=17)
        fused = optimizer.optimize_model(str(plain), model_type=arch, num_heads=HEADS, hidden_size=HIDDEN)
        fused.save_model_to_file(str(root / f"{arch}.fused.onnx"))
        fused.convert_float_to_float16(keep_io_types=True)
        fused.save_model_to_file(str(root / f"{arch}.fused16.onnx"))
        calib = root / f"{arch}.calib.npz"
        np.savez(calib, **token_batch(N_CALIB, seed=1))
        staged[arch] = {"torch": model, "plain": plain, "fused": root / f"{arch}.fused.onnx",
                        "fused16": root / f"{arch}.fused16.onnx", "calib": calib}
    return staged


def ops(path_or_model) -> collections.Counter:
    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, Path) else path_or_model
    return collections.Counter(n.op_type for n in model.graph.node)


def run(path_or_model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def compress(capsys, source: Path, out: Path, *options) -> dict:
    code, _, err = cli(capsys, "-q", "compress", source, "-o", out, "--calib", source.with_name(
        source.name.split(".")[0] + ".calib.npz"), "--force", *options)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert all(report["validation"][k] for k in ("checker", "runs", "signature", "finite", "opset_ir_kept"))
    return report


def removed_of(report: dict) -> set[int]:
    return {i for i, u in enumerate(report["units"]) if u["removed"]}


def prune(path: Path, layers: set[int], feed: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`path` with the layer units `layers` removed, through the library (what compress writes)."""
    prepared, used = prepare(onnx.load(str(path)))
    shapes, dtypes = probe_shapes(prepared, feed, probe_targets(prepared))
    units = find_units(prepared, shapes=shapes, dtypes=dtypes)
    assert len(units) == LAYERS and all(u.sublayers == 2 and u.has_attention for u in units)
    return finish(remove_units(prepared, [units[i] for i in sorted(layers)]), used)


def gpt2_without(model: nn.Module, removed: set[int]) -> nn.Module:
    clone = copy.deepcopy(model)
    kept = [i for i in range(LAYERS) if i not in removed]
    clone.transformer.h = nn.ModuleList([clone.transformer.h[i] for i in kept])
    clone.config.n_layer = len(kept)
    for new, block in enumerate(clone.transformer.h):
        block.attn.layer_idx = new
    return clone.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()


def test_optimizer_fused_every_residual_join(staged):
    bert, gpt2 = ops(staged["bert"]["fused"]), ops(staged["gpt2"]["fused"])
    assert bert["SkipLayerNormalization"] == gpt2["SkipLayerNormalization"] == 2 * LAYERS
    assert bert["Attention"] == LAYERS and bert["EmbedLayerNormalization"] == 1 and bert["BiasGelu"] == LAYERS + 1
    assert gpt2["FastGelu"] == LAYERS


@pytest.mark.parametrize("arch, kind", [("bert", "fused"), ("gpt2", "fused"), ("bert", "fused16"), ("gpt2", "fused16")])
def test_prepare_then_finish_is_the_original(staged, arch, kind):
    model = onnx.load(str(staged[arch][kind]))
    prepared, used = prepare(model)
    assert [p.name for p in used] == ["skip-layer-norm"]
    assert not any(n.op_type in FUSED_NORMS for n in prepared.graph.node)
    restored = finish(remove_units(prepared, []), used)
    assert sorted(n.SerializeToString() for n in restored.graph.node) == \
        sorted(n.SerializeToString() for n in model.graph.node)
    feed = token_batch(4, seed=3)
    for got, want in zip(run(restored, feed), run(model, feed)):
        np.testing.assert_array_equal(got, want)
    # The split graph computes the same (up to the order of the sums' rounding).
    for got, want in zip(run(prepared, feed), run(model, feed)):
        np.testing.assert_allclose(got, want, atol=1e-5 if kind == "fused" else 5e-2)


@pytest.mark.parametrize("arch, kind", [("bert", "fused"), ("gpt2", "fused"), ("bert", "fused16"), ("gpt2", "fused16")])
def test_compress_refuses_and_prunes_like_the_plain_export(staged, capsys, tmp_path, arch, kind):
    model = staged[arch]
    out = tmp_path / f"{arch}.{kind}.pruned.onnx"
    # The default criterion, damage, bypassing only (the same removal repaired: test_repair.py).
    report = compress(capsys, model[kind], out, "--remove", "2", "--repair", "none")
    assert all(u["sublayers"] == 2 and u["attention"] for u in report["units"])
    if arch == "bert":  # scopes from the sublayers' projections name the layers
        assert [u["name"] for u in report["units"]] == [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
    removed = removed_of(report)
    assert len(removed) == 2

    written = onnx.load(str(out))
    counts = ops(written)
    assert 0 < counts["SkipLayerNormalization"] < 2 * LAYERS
    assert not any(n.name.startswith("sglp") for n in written.graph.node)
    onnx.checker.check_model(written, full_check=True)

    feed = token_batch(3, seed=7)
    (got,) = run(out, feed)
    (want,) = run(prune(model["plain"], removed, feed), feed)
    tolerance = 1e-4 if kind == "fused" else 3e-2
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=tolerance, rtol=tolerance)
    if arch == "gpt2":
        reference = torch_logits(gpt2_without(model["torch"], removed), feed)
        np.testing.assert_allclose(got[real], reference[real], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_first_and_middle_layers_removed_leave_a_standalone_norm_where_the_sum_went(staged, arch):
    """Removing layer 0 of pre-norm GPT-2 leaves layer 1's input norm reading
    the embeddings (a plain LayerNormalization); every other norm is fused again."""
    model = staged[arch]
    feed = token_batch(3, seed=5)
    removed = {0, 2}
    pruned = prune(model["fused"], removed, feed)
    onnx.checker.check_model(pruned, full_check=True)
    counts = ops(pruned)
    # Post-norm BERT keeps two fused norms per kept layer; pre-norm GPT-2
    # re-pairs each residual with the next kept norm.
    assert counts["SkipLayerNormalization"] == 2 * (LAYERS - len(removed))
    assert not any(n.name.startswith("sglp") for n in pruned.graph.node)
    (norm,) = [n for n in pruned.graph.node if n.op_type == "LayerNormalization"]
    if arch == "gpt2":
        (first,) = [n for n in onnx.load(str(model["fused"])).graph.node if n.op_type == "LayerNormalization"]
        assert norm.input[0] == first.input[0]  # the embeddings
        assert norm.input[1] == "transformer.h.1.ln_1.weight"
    (got,) = run(pruned, feed)
    (want,) = run(prune(model["plain"], removed, feed), feed)
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    if arch == "gpt2":
        reference = torch_logits(gpt2_without(model["torch"], removed), feed)
        np.testing.assert_allclose(got[real], reference[real], atol=1e-4, rtol=1e-4)


def test_nothing_removed_writes_the_original(staged, capsys, tmp_path):
    source = staged["gpt2"]["fused16"]
    out = tmp_path / "same.onnx"
    report = compress(capsys, source, out, "--remove", "0")
    assert report["validation"]["exact_when_nothing_removed"] is True
    assert ops(out) == ops(source)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_flops_of_fused_and_plain_graphs_agree(staged, capsys, tmp_path, arch):
    plain = compress(capsys, staged[arch]["plain"], tmp_path / "plain.onnx", "--remove", "1", "--criterion", "last")
    fused = compress(capsys, staged[arch]["fused"], tmp_path / "fused.onnx", "--remove", "1", "--criterion", "last")
    assert fused["before"]["flops"] == pytest.approx(plain["before"]["flops"], rel=0.02)
    assert fused["after"]["flops"] == pytest.approx(plain["after"]["flops"], rel=0.02)
    assert [u["flops"] for u in fused["units"]] == pytest.approx([u["flops"] for u in plain["units"]], rel=0.02)
    # Every layer's attention (BERT: a fused Attention node) is counted.
    assert all(u["flops"] > 0.15 * fused["before"]["flops"] for u in fused["units"])


def test_target_flops_sublayers_and_cka_removal_on_fused_graphs(staged, capsys, tmp_path):
    bert, gpt2 = staged["bert"]["fused"], staged["gpt2"]["fused16"]
    report = compress(capsys, bert, tmp_path / "t.onnx", "--target-flops", "0.3")
    assert report["after"]["flops"] <= 0.7 * report["before"]["flops"]
    report = compress(capsys, gpt2, tmp_path / "s.onnx", "--granularity", "sublayer", "--remove", "3")
    assert len(report["units"]) == 2 * LAYERS and len(removed_of(report)) == 3
    assert [u["attention"] for u in report["units"]] == [True, False] * LAYERS
    report = compress(capsys, gpt2, tmp_path / "c.onnx", "--criterion", "cka-removal", "--remove", "2")
    assert len(removed_of(report)) == 2


def test_bad_calibration_exits_2_with_one_line(staged, tmp_path):
    bad = tmp_path / "bad.npz"
    feed = token_batch(4, seed=0)
    np.savez(bad, input_ids=feed["input_ids"].astype(np.float32), attention_mask=feed["attention_mask"])
    result = subprocess.run([CLI, "compress", str(staged["bert"]["fused"]), "-o", str(tmp_path / "x.onnx"),
                             "--calib", str(bad), "--remove", "1"], capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "input_ids" in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_of_the_wrong_shape_exits_2(staged, capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    feed = token_batch(4, seed=0)
    np.savez(bad, input_ids=feed["input_ids"][:, :, None], attention_mask=feed["attention_mask"])
    code, _, err = cli(capsys, "compress", staged["gpt2"]["fused16"], "-o", tmp_path / "x.onnx", "--calib", bad,
                       "--remove", "1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "x.onnx").exists()


def rms_stack(layers: int = 3, width: int = 8, seed: int = 0):
    """A pre-norm stack spelled like the onnxruntime-genai builder: each
    SkipSimplifiedLayerNormalization reads the residual stream as `input`,
    the sublayer output as `skip`, has a bias, and normalises for the next
    layer; nodes are unnamed. Returns the model and a numpy reference of it
    with some residuals removed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((width, width)).astype(np.float32) / 3 for _ in range(layers)]
    gammas = [1 + 0.1 * rng.standard_normal(width).astype(np.float32) for _ in range(layers + 1)]
    biases = [0.1 * rng.standard_normal(width).astype(np.float32) for _ in range(layers)]
    head = rng.standard_normal((width, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in
             [*((f"w{k}", w) for k, w in enumerate(weights)), *((f"g{k}", g) for k, g in enumerate(gammas)),
              *((f"b{k}", b) for k, b in enumerate(biases)), ("head", head)]]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g0"], ["n0"], axis=-1, epsilon=1e-6)]
    for k in range(layers):
        nodes.append(helper.make_node("MatMul", [f"n{k}", f"w{k}"], [f"a{k}"]))
        residual = "x" if k == 0 else f"h{k}"
        outputs = [f"n{k + 1}"] + (["", "", f"h{k + 1}"] if k < layers - 1 else [])
        nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [residual, f"a{k}", f"g{k + 1}", f"b{k}"],
                                      outputs, domain="com.microsoft"))
        # Dynamo-style scope metadata must come back on the fused node.
        nodes[-1].metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", f"layers.{k}", "norm"]))
    nodes.append(helper.make_node("MatMul", [f"n{layers}", "head"], ["y"]))
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)

    def reference(x: np.ndarray, removed: set[int]) -> np.ndarray:
        def rms(v, g, eps):
            return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g

        h = x
        n = rms(h, gammas[0], 1e-6)
        for k in range(layers):
            if k not in removed:
                h = h + n @ weights[k] + biases[k]
            n = rms(h, gammas[k + 1], FUSED_EPSILON)
        return n @ head

    return model, reference


def test_skip_simplified_norm_with_the_residual_as_input_and_a_bias():
    model, reference = rms_stack()
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    prepared, used = prepare(model)
    bias_adds = [n for n in prepared.graph.node if n.name.startswith("sglp_split/bias/")]
    # The bias goes with the sublayer (skip), not with the residual stream (input).
    assert len(bias_adds) == 3 and all(n.input[0].startswith("a") for n in bias_adds)
    restored = finish(remove_units(prepared, []), used)
    assert sorted(n.SerializeToString() for n in restored.graph.node) == \
        sorted(n.SerializeToString() for n in model.graph.node)
    shapes, dtypes = probe_shapes(prepared, {"x": x}, probe_targets(prepared))
    units = find_units(prepared, shapes=shapes, dtypes=dtypes)
    assert [(u.entry, u.exit) for u in units] == [("x", "h1"), ("h1", "h2"), ("h2", "sglp_unnamed#2/sglp_sum_output")]
    for removed in ({0}, {1}, {2}, {0, 1}, {1, 2}):
        pruned = finish(remove_units(prepared, [units[i] for i in removed]), used)
        counts = ops(pruned)
        assert counts["SkipSimplifiedLayerNormalization"] == 3 - len(removed)
        assert counts["SimplifiedLayerNormalization"] == 1  # layer 0's, or the one now reading x
        assert not any(n.name for n in pruned.graph.node)
        (got,) = run(pruned, {"x": x})
        np.testing.assert_allclose(got, reference(x, removed), atol=1e-5, rtol=1e-5)


def test_opset_14_pre_norm_graph(staged, capsys, tmp_path):
    """Below opset 17 ONNX has no LayerNormalization (ONNX Runtime runs its
    own, and its optimizer writes one for GPT-2's first norm): such an input
    is refused as before. A norm that removing layer 0 leaves standalone is
    the fused node with a zero skip there, which the checker accepts."""
    from sglp_onnx.tools.export.hf import export_hf

    model = staged["gpt2"]["torch"]
    plain = tmp_path / "gpt2.onnx"
    export_hf(model, plain, exporter="legacy", opset=14)
    fused = tmp_path / "gpt2.fused.onnx"
    optimizer.optimize_model(str(plain), model_type="gpt2", num_heads=HEADS, hidden_size=HIDDEN).save_model_to_file(
        str(fused))
    assert ops(fused)["LayerNormalization"] == 1 and ops(fused)["SkipLayerNormalization"] == 2 * LAYERS
    code, _, err = cli(capsys, "compress", fused, "-o", tmp_path / "out.onnx", "--calib", staged["gpt2"]["calib"],
                       "--remove", "1")
    assert code == 2 and "LayerNormalization with domain_version of 14" in err and len(err.strip().splitlines()) == 1

    feed = token_batch(3, seed=2)
    pruned = prune(fused, {0}, feed)
    counts = ops(pruned)
    assert counts["LayerNormalization"] == 0 and counts["ConstantOfShape"] >= 1
    assert counts["SkipLayerNormalization"] == 2 * (LAYERS - 1) + 1  # layer 1's input norm, zero skip
    onnx.checker.check_model(pruned, full_check=True)
    (got,) = run(pruned, feed)
    real = feed["attention_mask"].astype(bool)
    want = torch_logits(gpt2_without(model, {0}), feed)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_flops_of_ort_transformer_ops():
    """Attention counts its packed projection and both attention matmuls; the
    others their attention matmuls (T_kv from the present key) or matmul."""
    from onnx import TensorProto, helper

    from sglp_onnx.graph.flops import node_flops, tensors_needed

    b, t, past, c, heads, kv_heads, head = 2, 5, 3, 32, 4, 2, 8
    ms = "com.microsoft"
    nodes = [
        helper.make_node("Attention", ["x", "w", "wb"], ["att"], name="att", domain=ms, num_heads=heads),
        helper.make_node("MultiHeadAttention", ["x", "k", "v", "", "", "", "pk", "pv"], ["mha", "mha_k", "mha_v"],
                         name="mha", domain=ms, num_heads=heads),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "gk", "gv", "sl", "tl"], ["gqa", "gqa_k", "gqa_v"],
                         name="gqa", domain=ms, num_heads=heads, kv_num_heads=kv_heads),
        helper.make_node("MatMulNBits", ["x", "q4", "scales"], ["nb"], name="nbits", domain=ms, K=c, N=64, bits=4,
                         block_size=32),
    ]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [c, 3 * c], np.zeros(3 * c * c)),
             helper.make_tensor("wb", TensorProto.FLOAT, [3 * c], np.zeros(3 * c)),
             helper.make_tensor("q4", TensorProto.UINT8, [64, 1, 16], np.zeros(64 * 16, np.uint8)),
             helper.make_tensor("scales", TensorProto.FLOAT, [64, 1], np.zeros(64))]
    graph = helper.make_graph(nodes, "ops", [], [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])
    assert {"mha_k", "gqa_k"} <= set(tensors_needed(model))
    shapes = {"x": (b, t, c), "att": (b, t, c), "k": (b, t, c), "v": (b, t, c), "pk": (b, heads, past, head),
              "mha": (b, t, c), "mha_k": (b, heads, past + t, head), "qkv": (b, t, (heads + 2 * kv_heads) * head),
              "gk": (b, kv_heads, past, head), "gqa": (b, t, heads * head), "gqa_k": (b, kv_heads, past + t, head),
              "nb": (b, t, 64)}
    flops = node_flops(model, shapes)
    assert flops["att"] == 2 * b * t * c * 3 * c + 2 * b * t * t * (c + c)
    assert flops["mha"] == 2 * b * t * (past + t) * (c + c)
    assert flops["gqa"] == 4 * b * t * (past + t) * heads * head
    assert flops["nbits"] == 2 * b * t * 64 * c
    del shapes["mha_k"], shapes["gqa_k"]  # without the present key: past + new
    flops = node_flops(model, shapes)
    assert flops["mha"] == 2 * b * t * (past + t) * (c + c) and flops["gqa"] == 4 * b * t * (past + t) * heads * head


@pytest.mark.parametrize("kind", ["fused", "fused16"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_repair_on_the_optimizers_fused_graph(staged, capsys, tmp_path, arch, kind):
    """The default repair on ONNX Runtime's fused transformers (float32 and float16): the maps sit on the
    hidden state between the re-fused norms (float16 maps run in float32 between two Casts), the output
    validates, and the repair is written only where it improves the held-out fidelity."""
    model = staged[arch]
    out = tmp_path / f"{arch}.{kind}.repaired.onnx"
    report = compress(capsys, model[kind], out, "--remove", "2", "--repair", "full")
    repair = report["repair"]
    assert repair["cuts"] and all(c["nodes"] == "MatMul + Add" for c in repair["cuts"])
    assert report["fidelity"]["score"] <= repair["fidelity_without_repair"]["score"]
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert ops(written)["SkipLayerNormalization"] > 0
    maps = [n for n in written.graph.node if n.name.startswith("sglp_repair/")]
    assert bool(maps) == repair["applied"]
    if repair["applied"] and kind == "fused16":
        assert {n.op_type for n in maps} == {"Cast", "MatMul", "Add"}
    feed = token_batch(3, seed=7)
    (got,) = run(out, feed)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("arch, kind", [("bert", "fused"), ("gpt2", "fused"), ("bert", "fused16")])
def test_default_options_with_the_candidates_side_by_side(staged, capsys, tmp_path, monkeypatch, arch, kind):
    """The optimizer leaves nodes without names (Casts of the mask): the
    candidates' copies in one session must still get unique names. The copies
    are used for a large model; a budget of 0 makes this small one "large"."""
    from sglp_onnx.evidence import gated_runner

    monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)
    source = staged[arch][kind]
    assert any(not n.name for n in onnx.load(str(source)).graph.node) or arch == "gpt2"
    out = tmp_path / f"{arch}.{kind}.pruned.onnx"
    report = compress(capsys, source, out)  # every option at its default
    removed = removed_of(report)
    assert removed
    feed = token_batch(3, seed=7)
    (got,) = run(plain_bypass(out, report), feed)
    (want,) = run(prune(staged[arch]["plain"], removed, feed), feed)
    real = feed["attention_mask"].astype(bool)
    tolerance = 1e-4 if kind == "fused" else 3e-2
    np.testing.assert_allclose(got[real], want[real], atol=tolerance, rtol=tolerance)
