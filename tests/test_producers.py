"""What the producers people deploy with write, through the real CLI.

Each test runs a real producer on a tiny model defined here (random
weights, nothing downloaded), then `sglp-onnx compress OUT.onnx --remove 2
--criterion last` in a subprocess, and compares the pruned model with a
reference computed independently of the producer's graph:

- optimum-onnx (`main_export`, text-generation with and without KV cache) of
  a tiny Llama: = transformers with those layers deleted, and one decoding
  step with the cache = transformers' own cache (also with layer 0 removed);
  text2text-generation of a tiny T5: its encoder and decoder files, each =
  transformers with those blocks deleted.
- fp16 conversion (ONNX Runtime's `convert_float_to_float16` and
  onnxconverter-common's, `keep_io_types`) of an unfused BERT / Llama
  export: = the fp32 export pruned the same way (fp16 tolerance).
  onnxconverter-common's fp16 Llama does not load in ONNX Runtime at all:
  compress must refuse it in one line (then xfail, the producer's bug).
- onnxslim and onnxsim on a ResNet-like CNN and a tiny BERT: = the
  unsimplified model pruned the same way (and = torch / transformers).
- `quantize_dynamic` (QInt8: DynamicQuantizeLinear + MatMulInteger) of a
  tiny BERT / Llama: = the float model pruned the same way, then quantized,
  bit for bit.
- plain `torch.onnx.export` at opsets 13, 17, 20 (TorchScript) and 26 (or
  the highest onnx knows; dynamo): = torch with those blocks as identity.

optimum-onnx's only release (0.1.0) requires transformers < 4.58, older than
the one the project tests with, so it is installed beside the environment
(`pip install --no-deps --target .venv/optimum-onnx optimum-onnx optimum
transformers<4.58 ...`) and runs in its own process with that folder first
on PYTHONPATH; SGLP_OPTIMUM_PATH names another folder. Each producer's test
skips when its package is missing.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphs import plain_bypass

from sglp_onnx import validate_report
from tiny_transformers import delete_layers

# The exporters warn about every traced branch of the HF code.
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 97
LAYERS = 4
SEQ = 12
N_CALIB = 16
REMOVED = {LAYERS - 2, LAYERS - 1}  # --criterion last --remove 2
VALIDATION = ("checker", "runs", "signature", "finite", "opset_ir_kept")
OPTIMUM_ENV = "SGLP_OPTIMUM_PATH"


# --------------------------------------------------------------------------- helpers


def session(source: Path | onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    data = str(source) if isinstance(source, Path) else source.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(source: Path | onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(source)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feed.items() if k in names})


LAST = ("--criterion", "last")


def pruned_path(model: Path, criterion: tuple[str, ...] = LAST) -> Path:
    tag = "" if criterion == LAST else "." + "-".join(a.lstrip("-") for a in criterion)
    return model.with_name(model.name.removesuffix(".onnx") + tag + ".pruned.onnx")


# These tests compare the tool's bypass with other producers' models pruned by hand: no repair maps
# (repaired models are compared with an independent computation in test_repair.py).
PLAIN = ("--repair", "none")


def cli(model: Path, calib: Path, criterion: tuple[str, ...] = LAST) -> subprocess.CompletedProcess:
    """`sglp-onnx compress MODEL --remove 2 --criterion last` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sglp_onnx.cli", "-q", "compress", str(model), "-o", str(pruned_path(model, criterion)),
         "--calib", str(calib), "--remove", "2", *criterion, "--force", *PLAIN],
        capture_output=True, text=True, env=env, timeout=600)


def compress_cli(model: Path, calib: Path, criterion: tuple[str, ...] = LAST) -> tuple[Path, dict]:
    """The CLI's output and report; it must exit 0 and the output pass validation."""
    result = cli(model, calib, criterion)
    assert result.returncode == 0, result.stderr
    out = pruned_path(model, criterion)
    report = json.loads(out.with_suffix(".json").read_text())
    assert all(report["validation"][k] for k in VALIDATION), report["validation"]
    validate_report(report)
    return out, report


def removed_of(report: dict) -> set[int]:
    return {i for i, u in enumerate(report["units"]) if u["removed"]}


def assert_same_units(report: dict, reference: dict) -> None:
    """Both runs saw the same units and removed the same ones."""
    assert [u["sublayers"] for u in report["units"]] == [u["sublayers"] for u in reference["units"]]
    assert removed_of(report) == removed_of(reference)


def token_batch(n: int, seed: int, length: int = SEQ) -> dict[str, np.ndarray]:
    """Random token ids; a quarter of the rows (at least one) right-padded, positions 0..length-1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-max(1, n // 4):, length * 2 // 3:] = 0
    positions = np.tile(np.arange(length, dtype=np.int64), (n, 1))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def calib_for(model: Path, feed: dict[str, np.ndarray]) -> Path:
    """A calibration .npz beside `model` holding the arrays named after its inputs."""
    names = {i.name for i in onnx.load(str(model), load_external_data=False).graph.input}
    path = model.with_name(model.name.removesuffix(".onnx") + ".calib.npz")
    np.savez(path, **{k: v for k, v in feed.items() if k in names})
    return path


def assert_close_on_tokens(got, want, mask, tol):
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)


def assert_pruning_shows(full, pruned, mask, tol):
    """The removed layers change the output well beyond the comparison's tolerance."""
    real = mask.astype(bool)
    assert np.abs(full[real] - pruned[real]).max() > 20 * tol


# --------------------------------------------------------------------------- tiny models


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.2 (10x the default): the layers change the logits visibly.
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.2)).eval()


@torch.no_grad()
def hf_logits(model: nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    names = ("input_ids", "attention_mask", "position_ids") if hasattr(model, "model") else (
        "input_ids", "attention_mask")
    return model(**{k: torch.from_numpy(feed[k]) for k in names}).logits.numpy()


class _Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_bert(model: nn.Module, path: Path) -> Path:
    """The plain TorchScript export at opset 17 (LayerNormalization, MatMul + Add, Erf GELU): unfused."""
    example = tuple(torch.from_numpy(token_batch(2, seed=0)[k]) for k in ("input_ids", "attention_mask"))
    dynamic = {k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask", "logits")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), example, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=dynamic)
    return path


class Basic(nn.Module):
    """conv-bn-relu-conv-bn plus the input; a stride or a width change takes a projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Basic(8, 8), Basic(8, 8), Basic(8, 16, stride=2), Basic(16, 16), Basic(16, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


IDENTITY_BLOCKS = [0, 1, 3, 4]  # block 2 downsamples: never a candidate


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics a trained model would have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
    return model.eval()


# --------------------------------------------------------------------------- staging


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("producers")


class Staged:
    """Models, exports and CLI runs built on first use and shared by the tests of this module."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict = {}

    def once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def compress(self, path: Path, feed: dict[str, np.ndarray], criterion: tuple[str, ...] = LAST):
        """`compress_cli` once per model and criterion."""
        return self.once(("compress", path, criterion), lambda: compress_cli(path, calib_for(path, feed), criterion))

    def bert(self) -> tuple[nn.Module, Path]:
        def build():
            pytest.importorskip("transformers")
            torch.manual_seed(0)
            model = tiny_bert()
            return model, export_bert(model, self.root / "bert.onnx")

        return self.once("bert", build)

    def llama(self) -> tuple[nn.Module, Path]:
        def build():
            pytest.importorskip("transformers")
            from sglp_onnx.tools.export.hf import export_hf

            torch.manual_seed(0)
            model = tiny_llama()
            path = self.root / "llama.onnx"
            export_hf(model, path, exporter="legacy", opset=17)
            return model, path

        return self.once("llama", build)

    def resnet(self) -> tuple[nn.Module, Path]:
        def build():
            model = tiny_resnet()
            path = self.root / "resnet.onnx"
            # Without constant folding the TorchScript exporter keeps every
            # BatchNormalization (the branch ends in one); the simplifiers fold them.
            torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                              do_constant_folding=False)
            return model, path

        return self.once("resnet", build)


@pytest.fixture(scope="module")
def staged(root) -> Staged:
    return Staged(root)


CALIB = token_batch(N_CALIB, seed=1)
FEED = token_batch(3, seed=7)
IMAGES = np.random.default_rng(3).standard_normal((N_CALIB, 3, 16, 16)).astype(np.float32)


def model_feed(arch: str) -> tuple[dict, dict]:
    return ({"x": IMAGES}, {"x": IMAGES[:4]}) if arch == "resnet" else (CALIB, FEED)


# --------------------------------------------------------------------------- 1. optimum-onnx

EXPORT_SCRIPT = r"""
import sys
try:
    from optimum.exporters.onnx import main_export
except Exception as error:  # missing, or not importable with this transformers
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(3)
import torch
torch.set_num_threads(1)
source, target, *tasks = sys.argv[1:]
for task in tasks or ("text-generation", "text-generation-with-past"):
    main_export(model_name_or_path=source, output=f"{target}/{task}", task=task, device="cpu",
                local_files_only=True, do_validation=False)
"""


def optimum_pythonpath() -> str | None:
    """The folder optimum-onnx (and the transformers it requires) was installed into, if any."""
    path = os.environ.get(OPTIMUM_ENV) or str(Path(sys.prefix) / "optimum-onnx")
    return path if Path(path).is_dir() else None


def optimum_export(source: Path, target: Path, *tasks: str) -> None:
    """optimum-onnx's `main_export` of the saved model `source` into `target/<task>`, in its own process."""
    extra = optimum_pythonpath()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(source), str(target), *tasks],
                            capture_output=True, text=True, env=env, timeout=600)
    if result.returncode == 3:
        pytest.skip(f"optimum.exporters.onnx is not importable ({result.stderr.strip().splitlines()[-1]}); "
                    f"install optimum-onnx into {Path(sys.prefix) / 'optimum-onnx'} or set {OPTIMUM_ENV}")
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def optimum_exports(root):
    """A tiny Llama saved with save_pretrained and exported by optimum-onnx, without and with KV cache."""
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    source = root / "llama-hf"
    tiny_llama().save_pretrained(str(source))
    target = root / "optimum"
    optimum_export(source, target)
    model = LlamaForCausalLM.from_pretrained(str(source)).eval()  # this environment's transformers
    return model, {False: target / "text-generation" / "model.onnx",
                   True: target / "text-generation-with-past" / "model.onnx"}


def empty_past(path: Path, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32)
            for i in session(path).get_inputs() if i.name.startswith("past_key_values.")}


# `random` with seed 3 removes layer 0, whose nodes compute the rotary
# tables and the mask the other layers read (checked below).
OPTIMUM_CASES = [(False, LAST, REMOVED), (True, LAST, REMOVED), (True, ("--criterion", "random", "--seed", "3"), {0, 2})]


@pytest.mark.parametrize("with_cache, criterion, removed", OPTIMUM_CASES,
                         ids=["no-cache", "kv-cache", "kv-cache-layer-0"])
def test_optimum_llama_equals_transformers_with_layers_deleted(optimum_exports, staged, with_cache, criterion,
                                                                removed):
    model, paths = optimum_exports
    path = paths[with_cache]
    names = [i.name for i in onnx.load(str(path)).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(names) == 3 + (2 * LAYERS if with_cache else 0)
    out, report = staged.compress(path, CALIB, criterion)
    assert len(report["units"]) == LAYERS and all(u["sublayers"] == 2 and u["attention"] for u in report["units"])
    assert removed_of(report) == removed
    if with_cache:
        kept = [i for i in range(LAYERS) if i not in removed]
        assert [i.name for i in onnx.load(str(out)).graph.input][3:] == [
            f"past_key_values.{i}.{kv}" for i in kept for kv in ("key", "value")]
        assert [o.name for o in onnx.load(str(out)).graph.output][1:] == [
            f"present.{i}.{kv}" for i in kept for kv in ("key", "value")]

    reference = delete_layers(model, removed)
    want = hf_logits(reference, FEED)
    # The export itself is transformers (past length 0 with a cache) ...
    (full, *_) = run(path, {**FEED, **empty_past(path, 3)})
    assert_close_on_tokens(full, hf_logits(model, FEED), FEED["attention_mask"], 1e-4)
    # ... and so is the pruned model, with those layers deleted.
    (got, *presents) = run(out, {**FEED, **empty_past(out, 3)})
    assert_close_on_tokens(got, want, FEED["attention_mask"], 1e-4)
    assert_pruning_shows(full, got, FEED["attention_mask"], 1e-4)
    if not with_cache:
        return

    # One decoding step with the pruned model's own cache = transformers' cache.
    prompt = token_batch(2, seed=11, length=5)
    (logits, *presents) = run(out, {"input_ids": prompt["input_ids"], "attention_mask": np.ones((2, 5), np.int64),
                                    "position_ids": prompt["position_ids"], **empty_past(out, 2)})
    token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    cache_names = [o.name for o in session(out).get_outputs()][1:]
    feed = {"input_ids": token, "attention_mask": np.ones((2, 6), np.int64),
            "position_ids": np.full((2, 1), 5, np.int64)}
    feed.update({"past_key_values." + n[len("present."):]: v for n, v in zip(cache_names, presents)})
    (step, *_) = run(out, feed)
    with torch.no_grad():
        first = reference(input_ids=torch.from_numpy(prompt["input_ids"]), use_cache=True)
        np.testing.assert_array_equal(first.logits[:, -1].argmax(-1, keepdim=True).numpy(), token)
        second = reference(input_ids=torch.from_numpy(token), past_key_values=first.past_key_values, use_cache=True)
    np.testing.assert_allclose(step, second.logits.numpy(), atol=1e-4, rtol=1e-4)


def test_optimum_t5_blocks_are_layers_and_prune_like_transformers(root, capsys):
    """T5 through optimum-onnx (text2text-generation: encoder_model.onnx and
    decoder_model.onnx). Each `block.N` runs `layer.0` self-attention,
    [`layer.1` cross-attention,] then its MLP, each module doing its own
    residual Add, and every attention adds block 0's position bias to its
    scores (an Add that looks residual, inside each real residual's
    branch). Every block is one unit of all its sublayers; removing the last
    two, and what the default options remove (their maps taken out), equals
    transformers without those blocks; the encoder's output, after an RMS
    norm spelled out in element-wise ops, is scored as a hidden state."""
    pytest.importorskip("transformers")
    from transformers import T5Config, T5ForConditionalGeneration

    from sglp_onnx.cli import main

    torch.manual_seed(0)
    source = root / "t5-hf"
    T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
        decoder_start_token_id=0)).eval().save_pretrained(str(source))
    target = root / "optimum-t5"
    optimum_export(source, target, "text2text-generation")
    folder = target / "text2text-generation"
    model = T5ForConditionalGeneration.from_pretrained(str(source)).eval()  # this environment's transformers
    encoder_feed = token_batch(N_CALIB, seed=1)
    decoder_feed = {"input_ids": token_batch(N_CALIB, seed=2, length=5)["input_ids"],
                    "encoder_attention_mask": encoder_feed["attention_mask"],
                    "encoder_hidden_states": np.random.default_rng(3).standard_normal(
                        (N_CALIB, SEQ, 32)).astype(np.float32)}
    test = token_batch(3, seed=7)
    ids, mask = test["input_ids"], test["attention_mask"]
    states = np.random.default_rng(4).standard_normal((3, SEQ, 32)).astype(np.float32)

    def reference(part: str, removed: set[int]) -> np.ndarray:
        """transformers' encoder output, or its decoder's logits on `states`, without the blocks `removed`."""
        smaller = copy.deepcopy(model)
        stack = getattr(smaller, part)
        stack.block = nn.ModuleList([b for i, b in enumerate(stack.block) if i not in removed])
        with torch.no_grad():
            if part == "encoder":
                return stack(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
            return smaller(decoder_input_ids=torch.from_numpy(ids[:, :5]), encoder_outputs=(torch.from_numpy(states),),
                           attention_mask=torch.from_numpy(mask)).logits.numpy()

    def check(part: str, out, removed: set[int]) -> None:
        if part == "encoder":
            (got,) = run(out, test)
            assert_close_on_tokens(got, reference(part, removed), mask, 1e-4)
        else:
            (got,) = run(out, {"input_ids": ids[:, :5], "encoder_attention_mask": mask,
                               "encoder_hidden_states": states})
            np.testing.assert_allclose(got, reference(part, removed), atol=1e-4, rtol=1e-4)

    for part, feed, sublayers, kind in (("encoder", encoder_feed, 2, "cosine"), ("decoder", decoder_feed, 3, "kl")):
        path = folder / f"{part}_model.onnx"
        calib = calib_for(path, feed)
        out, report = compress_cli(path, calib)
        assert [u["sublayers"] for u in report["units"]] == [sublayers] * LAYERS
        assert removed_of(report) == REMOVED
        assert report["fidelity"]["kind"] == kind
        check(part, out, REMOVED)
        # The default options (repair included), the maps taken out: the same bypass.
        out = folder / f"{part}.default.onnx"
        assert main(["-q", "compress", str(path), "-o", str(out), "--calib", str(calib)]) == 0, capsys.readouterr().err
        report = json.loads(out.with_suffix(".json").read_text())
        validate_report(report)
        assert all(report["validation"][k] for k in VALIDATION)
        assert len(removed_of(report)) == 1  # the default ratio, 0.25 of 4
        check(part, plain_bypass(out, report), removed_of(report))


# --------------------------------------------------------------------------- 2. fp16


def fp16_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx_model = pytest.importorskip("onnxruntime.transformers.onnx_model")
    wrapped = onnx_model.OnnxModel(model)
    wrapped.convert_float_to_float16(keep_io_types=True)
    return wrapped.model


def fp16_converter_common(model: onnx.ModelProto) -> onnx.ModelProto:
    float16 = pytest.importorskip("onnxconverter_common.float16")
    return float16.convert_float_to_float16(model, keep_io_types=True)


FP16 = {"ort": fp16_ort, "onnxconverter-common": fp16_converter_common}
FP16_TOLERANCE = 3e-2


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("converter", list(FP16))
def test_fp16_prunes_like_the_fp32_export(staged, converter, arch):
    _, plain = getattr(staged, arch)()
    half = staged.root / f"{arch}.{converter}.fp16.onnx"
    model = FP16[converter](onnx.load(str(plain)))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    onnx.save(model, str(half))
    try:
        session(half)
    except Exception as error:  # noqa: BLE001 - whatever ONNX Runtime raises on load
        # onnxconverter-common 1.16 on a Llama export: it keeps the RMSNorm's
        # Cast(to=FLOAT) nodes but declares their outputs float16 in
        # value_info, so ONNX Runtime refuses the file. compress must refuse
        # it the same way: exit 2, one line, nothing written.
        result = cli(half, calib_for(half, CALIB))
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "does not run in ONNX Runtime" in lines[0]
        assert not pruned_path(half).exists()
        reason = str(error).split("failed:")[-1].splitlines()[0][:160]
        pytest.xfail(f"{converter} wrote a model ONNX Runtime cannot load: {reason}")
    out, report = staged.compress(half, CALIB)
    reference, want_report = staged.compress(plain, CALIB)
    assert_same_units(report, want_report)
    assert removed_of(report) == REMOVED
    (got,) = run(out, FEED)
    (want,) = run(reference, FEED)
    assert got.dtype == np.float32  # keep_io_types
    assert_close_on_tokens(got, want, FEED["attention_mask"], FP16_TOLERANCE)
    (full,) = run(half, FEED)
    assert_pruning_shows(full, got, FEED["attention_mask"], FP16_TOLERANCE)


# --------------------------------------------------------------------------- 3. onnxslim, onnxsim


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    onnxslim = pytest.importorskip("onnxslim")
    return onnxslim.slim(model)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    onnxsim = pytest.importorskip("onnxsim")
    simplified, ok = onnxsim.simplify(model)
    assert ok
    return simplified


SIMPLIFIERS = {"onnxslim": slim, "onnxsim": simplify}


@pytest.mark.parametrize("arch", ["resnet", "bert"])
@pytest.mark.parametrize("tool", list(SIMPLIFIERS))
def test_simplified_graph_prunes_like_the_original(staged, tool, arch):
    torch_model, plain = getattr(staged, arch)()
    calib, feed = model_feed(arch)
    simplified = SIMPLIFIERS[tool](onnx.load(str(plain)))
    assert len(simplified.graph.node) < len(onnx.load(str(plain)).graph.node)
    path = staged.root / f"{arch}.{tool}.onnx"
    onnx.save(simplified, str(path))
    out, report = staged.compress(path, calib)
    reference, want_report = staged.compress(plain, calib)
    assert_same_units(report, want_report)
    (got,) = run(out, feed)
    (want,) = run(reference, feed)
    (full,) = run(path, feed)
    if arch == "resnet":
        assert len(report["units"]) == len(IDENTITY_BLOCKS)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        # and = torch with those blocks as identity
        removed = [IDENTITY_BLOCKS[i] for i in sorted(removed_of(report))]
        bypassed = copy.deepcopy(torch_model)
        for i in removed:
            bypassed.blocks[i] = nn.Identity()
        with torch.no_grad():
            np.testing.assert_allclose(got, bypassed(torch.from_numpy(feed["x"])).numpy(), atol=1e-4, rtol=1e-4)
        assert np.abs(full - got).max() > 1e-2
    else:
        assert len(report["units"]) == LAYERS and removed_of(report) == REMOVED
        assert_close_on_tokens(got, want, feed["attention_mask"], 1e-5)
        reference_logits = hf_logits(delete_layers(torch_model, REMOVED), feed)
        assert_close_on_tokens(got, reference_logits, feed["attention_mask"], 1e-4)
        assert_pruning_shows(full, got, feed["attention_mask"], 1e-4)


# --------------------------------------------------------------------------- 4. dynamic quantization


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_dynamic_quantization_prunes_like_the_float_model_pruned_then_quantized(staged, arch):
    quantization = pytest.importorskip("onnxruntime.quantization")
    _, plain = getattr(staged, arch)()
    quantized = staged.root / f"{arch}.int8.onnx"
    quantization.quantize_dynamic(plain, quantized, weight_type=quantization.QuantType.QInt8)
    ops = {n.op_type for n in onnx.load(str(quantized)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    out, report = staged.compress(quantized, CALIB)
    float_out, float_report = staged.compress(plain, CALIB)
    assert_same_units(report, float_report)
    assert removed_of(report) == REMOVED
    reference = staged.root / f"{arch}.pruned.int8.onnx"
    quantization.quantize_dynamic(float_out, reference, weight_type=quantization.QuantType.QInt8)
    (got,) = run(out, FEED)
    (want,) = run(reference, FEED)
    # The same integer weights and scales, activations quantized at run time
    # from the same values: the same numbers, bit for bit.
    np.testing.assert_array_equal(got, want)
    (full,) = run(quantized, FEED)
    assert_pruning_shows(full, got, FEED["attention_mask"], 1e-3)


# --------------------------------------------------------------------------- 5. opsets


class Block(nn.Module):
    """Pre-norm residual MLP block (LayerNorm spelled out below opset 17)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 16, depth: int = 5):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


TOP_OPSET = min(26, onnx.defs.onnx_opset_version())
OPSETS = [(13, "legacy"), (17, "legacy"), (20, "legacy"), (TOP_OPSET, "dynamo")]


@pytest.mark.parametrize("opset, exporter", OPSETS, ids=[f"opset{o}-{e}" for o, e in OPSETS])
def test_plain_export_at_opset_equals_torch_with_blocks_as_identity(root, opset, exporter):
    torch.manual_seed(opset)
    model = ResidualMLP().eval()
    path = root / f"mlp{opset}-{exporter}.onnx"
    example = (torch.randn(2, 8),)
    if exporter == "legacy":
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    else:
        torch.onnx.export(model, example, str(path), dynamo=True, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    written = onnx.load(str(path))
    assert {o.version for o in written.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    x = np.random.default_rng(opset).standard_normal((N_CALIB, 8)).astype(np.float32)
    out, report = compress_cli(path, calib_for(path, {"x": x}))
    assert len(report["units"]) == len(model.blocks)
    removed = removed_of(report)
    assert removed == {len(model.blocks) - 2, len(model.blocks) - 1}
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {opset}
    for i in removed:
        model.blocks[i] = nn.Identity()
    (got,) = run(out, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- every format, default options

DEFAULT_FORMATS = ["resnet", "bert", "llama", "bert.fp16", "resnet.onnxslim", "bert.int8"]


def format_model(staged: Staged, name: str) -> tuple[nn.Module, Path]:
    """The export `name` (ARCH or ARCH.PRODUCER) and its torch model, built on first use."""
    arch, _, producer = name.partition(".")
    torch_model, plain = getattr(staged, arch)()
    if not producer:
        return torch_model, plain
    path = staged.root / f"{name}.default.onnx"
    if not path.exists():
        if producer == "int8":
            quantization = pytest.importorskip("onnxruntime.quantization")
            quantization.quantize_dynamic(plain, path, weight_type=quantization.QuantType.QInt8)
        else:
            onnx.save({"fp16": fp16_ort, "onnxslim": slim}[producer](onnx.load(str(plain))), str(path))
    return torch_model, path


@pytest.mark.parametrize("side_by_side", [False, True], ids=["suffix-per-candidate", "candidates-side-by-side"])
@pytest.mark.parametrize("name", DEFAULT_FORMATS)
def test_every_format_prunes_with_the_default_options(staged, capsys, monkeypatch, name, side_by_side):
    """No budget, no criterion: what a new user types. The default criterion
    measures damage with one suffix session per candidate on small models and
    the candidates side by side in one session on large ones, and works on a
    large model that holds its weights from a temporary side file
    (files/working_weights.py); a weight budget and size thresholds of 0 make
    these tiny models take the large models' path too."""
    from sglp_onnx.cli import main
    from sglp_onnx.evidence import gated_runner
    from sglp_onnx.files import working_weights

    if side_by_side:
        monkeypatch.setattr(gated_runner, "SUFFIX_BUDGET_BYTES", 0)
        monkeypatch.setattr(working_weights, "SPILL_MIN_BYTES", 0)
        monkeypatch.setattr(working_weights, "SPILL_TENSOR_MIN_BYTES", 1024)
    torch_model, path = format_model(staged, name)
    arch = name.partition(".")[0]
    calib, feed = model_feed(arch)
    out = staged.root / f"{name}.{'side' if side_by_side else 'each'}.pruned.onnx"
    capsys.readouterr()
    code = main(["-q", "compress", str(path), "-o", str(out), "--calib", str(calib_for(path, calib)), "--force"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    validate_report(report)
    assert all(report["validation"][k] for k in VALIDATION), report["validation"]
    removed = removed_of(report)
    assert len(removed) == max(1, round(0.25 * len(report["units"])))  # the default ratio
    # Logits, also through a dynamically quantized head (MatMulInteger rescaled by run-time scales).
    assert report["fidelity"]["kind"] == "kl", report["fidelity"]["rule"]
    (got,) = run(plain_bypass(out, report), feed)[:1]
    if arch == "resnet":
        bypassed = copy.deepcopy(torch_model)
        for i in removed:
            bypassed.blocks[IDENTITY_BLOCKS[i]] = nn.Identity()
        with torch.no_grad():
            want = bypassed(torch.from_numpy(feed["x"])).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    elif not name.endswith(".int8"):  # = transformers with those layers deleted (int8: validation above)
        tolerance = FP16_TOLERANCE if name.endswith(".fp16") else 1e-4
        assert_close_on_tokens(got, hf_logits(delete_layers(torch_model, removed), feed), feed["attention_mask"],
                               tolerance)
