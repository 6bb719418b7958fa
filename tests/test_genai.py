"""onnxruntime-genai end to end.

A tiny random Llama goes through onnxruntime-genai's own model builder
(`python -m onnxruntime_genai.models.builder`, fp32 and int4, CPU); the
builder's folder is compressed with `sglp-onnx compress`, and the pruned
folder must be complete (model, external data, genai_config.json,
tokenizer) and generate, in onnxruntime-genai, token for token what the
builder's folder of the Hugging Face model with the same layers deleted
generates.

Skipped where onnxruntime-genai is not installed; `make test` installs it
(without its dependencies, so that it binds to onnxruntime-gpu).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")  # the builder imports it (an undeclared dependency)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sglp_onnx import validate_report  # noqa: E402
from sglp_onnx.cli import main  # noqa: E402
from sglp_onnx.files.model_files import external_locations  # noqa: E402

LAYERS = 4
# The builder takes any Linear with vocab_size outputs for the LM head, so the
# MLP width must differ from the vocabulary (192 vs 128).
VOCAB = 128
PROMPT = [1, 5, 9, 17, 33]
MAX_LENGTH = 14
MODEL_FILES = {"model.onnx", "model.onnx.data"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def build(hf_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """Run onnxruntime-genai's model builder offline on a local Hugging Face folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
         "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # One intra-op thread, like every other session of the test suite.
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=4))
    return out


def tokenizer():
    """An offline word-level tokenizer over the model's vocabulary: the
    builder loads one from the input folder (generation itself needs none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<pad>")


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def without_layers(model, layers: set[int], folder: Path) -> Path:
    """A Hugging Face folder of `model` with `layers` deleted."""
    config = copy.deepcopy(model.config)  # a shared config would truncate `model` too
    smaller = transformers.LlamaForCausalLM(config).eval()
    smaller.load_state_dict(model.state_dict())
    for i in sorted(layers, reverse=True):
        del smaller.model.layers[i]
    smaller.config.num_hidden_layers = len(smaller.model.layers)
    if getattr(smaller.config, "layer_types", None):
        smaller.config.layer_types = [t for i, t in enumerate(smaller.config.layer_types) if i not in layers]
    for i, layer in enumerate(smaller.model.layers):
        layer.self_attn.layer_idx = i
    return save_hf(smaller, folder)


def generate(folder: Path, prompt=PROMPT, max_length: int = MAX_LENGTH) -> list[int]:
    """Greedy generation in onnxruntime-genai from token ids."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=192, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.1)  # wider weights: fewer near ties between greedy candidates
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # distinct norm weights per layer (random init makes them all ones)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    hf = save_hf(model, root / "hf")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (10, 12))
    calib = root / "calib.npz"
    np.savez(calib, input_ids=ids, attention_mask=np.ones_like(ids))  # no past: whole sequences
    return SimpleNamespace(root=root, model=model, hf=hf, fp32=build(hf, root / "fp32"), calib=calib, built={})


def reference(llama, layers: set[int], precision: str = "fp32") -> Path:
    """The builder's folder of the Hugging Face model with `layers` deleted (built once)."""
    key = (tuple(sorted(layers)), precision)
    if key not in llama.built:
        tag = f"{precision}-without-{'-'.join(map(str, key[0]))}"
        hf = without_layers(llama.model, layers, llama.root / f"hf-{tag}")
        llama.built[key] = build(hf, llama.root / tag, precision)
    return llama.built[key]


def compress(source: Path, out: Path, *extra: str, calib: Path) -> int:
    return main(["compress", str(source / "model.onnx"), "-o", str(out / "model.onnx"), "--calib", str(calib),
                 "--renumber-cache", *extra])


def removed_layers(report: dict) -> set[int]:
    return {int(k) for k, v in report["kv_cache"]["layer_map"].items() if v is None}


def graph_io(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return [v.name for v in (*model.graph.input, *model.graph.output)]


def test_pruned_folder_is_complete_and_generates_like_the_builder(llama, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    # The builder's folder without that layer is the plain bypass (repair: test below).
    assert compress(llama.fp32, out, "--remove", "1", "--criterion", "last", "--repair", "none",
                    calib=llama.calib) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "model.json").read_text())
    validate_report(report)
    assert all(report["validation"][k] for k in ("checker", "runs", "signature", "finite", "opset_ir_kept"))
    assert removed_layers(report) == {LAYERS - 1}

    # (a) weights external like the input's; (c) tokenizer copied; nothing else.
    assert {p.name for p in out.iterdir()} == MODEL_FILES | TOKENIZER_FILES | {"genai_config.json", "model.json"}
    assert set(external_locations(onnx.load(str(out / "model.onnx"), load_external_data=False))) == \
        {"model.onnx.data"}
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (llama.fp32 / name).read_bytes()
    # (b) sizes count the external data on both sides.
    assert report["before"]["file_size"] == sum((llama.fp32 / f).stat().st_size for f in MODEL_FILES)
    assert report["after"]["file_size"] == sum((out / f).stat().st_size for f in MODEL_FILES)
    # (d) with --renumber-cache the names are consecutive and no note says they were kept.
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == LAYERS - 1
    assert report["kv_cache"]["renamed"] == {}  # removing the last layer leaves 0..n-1 as they were
    assert not any("keep their names" in note for note in report["notes"])
    assert "keep their names" not in printed
    cache = sorted(n for n in graph_io(out / "model.onnx") if n.startswith(("past_key_values.", "present.")))
    assert cache == sorted(f"{p}.{i}.{kv}" for p in ("past_key_values", "present") for i in range(LAYERS - 1)
                           for kv in ("key", "value"))

    assert generate(out) == generate(reference(llama, {LAYERS - 1}))


@pytest.mark.parametrize("extra, criterion", [
    ([], "damage"),  # every option at its default: a quarter of the layers
    (["--remove", "2"], "damage"),  # the default criterion
    (["--remove", "1", "--criterion", "random", "--seed", "1"], "random"),  # layer 1: the cache renumbered
], ids=["default-options", "damage-remove-2", "middle-layer"])
def test_chosen_layers_generate_like_the_builder(llama, tmp_path, extra, criterion):
    out = tmp_path / "pruned"
    out.mkdir()
    assert compress(llama.fp32, out, *extra, calib=llama.calib) == 0
    report = json.loads((out / "model.json").read_text())
    assert report["criterion"] == criterion
    gone = removed_layers(report)
    assert len(gone) == (int(extra[1]) if extra else max(1, round(LAYERS / 4)))
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == LAYERS - len(gone)
    if criterion == "random":
        assert gone == {1} and report["kv_cache"]["renamed"]["present.2.key"] == "present.1.key"
    assert not any("keep their names" in note for note in report["notes"])
    if report["repair"] and report["repair"]["applied"]:
        # Repaired (the default): closer to the original on held-out tokens than the bypass the builder's
        # folder computes, and still generates (its maps: test_repair.py).
        assert report["fidelity"]["score"] < report["repair"]["fidelity_without_repair"]["score"]
        assert len(generate(out)) > 0
    else:
        assert generate(out) == generate(reference(llama, gone))


def test_int4_prunes_and_counts_parameters_like_fp32(llama, tmp_path):
    """MatMulNBits weights count as the K x N values they pack: the int4
    folder reports the fp32 folder's parameters, before and after."""
    int4 = build(llama.hf, llama.root / "int4", "int4")
    reports = {}
    for precision, source in (("fp32", llama.fp32), ("int4", int4)):
        out = tmp_path / precision
        out.mkdir()
        assert compress(source, out, "--remove", "1", "--criterion", "last", "--repair", "none",
                        calib=llama.calib) == 0
        reports[precision] = json.loads((out / "model.json").read_text())
    for side in ("before", "after"):
        assert reports["int4"][side]["params"] == reports["fp32"][side]["params"]
    assert [u["params"] for u in reports["int4"]["units"]] == [u["params"] for u in reports["fp32"]["units"]]
    assert reports["int4"]["before"]["file_size"] == sum((int4 / f).stat().st_size for f in MODEL_FILES)
    # Block-wise symmetric quantization treats every weight alike: the pruned
    # int4 model is the int4 build of the model without that layer.
    assert generate(tmp_path / "int4") == generate(reference(llama, {LAYERS - 1}, "int4"))


def test_output_in_the_input_folder_copies_nothing_and_keeps_its_data_external(llama, tmp_path):
    source = tmp_path / "genai"
    source.mkdir()
    for f in llama.fp32.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    assert main(["compress", str(source / "model.onnx"), "--calib", str(llama.calib), "--remove", "1",
                 "--criterion", "last", "--renumber-cache"]) == 0
    new = {f.name for f in source.iterdir()} - set(before)
    assert new == {"model.pruned.onnx", "model.pruned.onnx.data", "model.pruned.genai_config.json",
                   "model.pruned.json"}
    assert all((source / name).read_bytes() == data for name, data in before.items())  # the input is untouched
    stub = onnx.load(str(source / "model.pruned.onnx"), load_external_data=False)
    assert set(external_locations(stub)) == {"model.pruned.onnx.data"}


def test_copies_are_never_overwritten_without_force(llama, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "tokenizer.json").write_text("mine")
    args = ["--remove", "1", "--criterion", "last"]
    assert compress(llama.fp32, out, *args, calib=llama.calib) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.json exists; pass --force" in err
    assert {p.name for p in out.iterdir()} == {"tokenizer.json"} and (out / "tokenizer.json").read_text() == "mine"
    assert compress(llama.fp32, out, *args, "--force", calib=llama.calib) == 0
    assert (out / "tokenizer.json").read_bytes() == (llama.fp32 / "tokenizer.json").read_bytes()


def _bad_past(ids):
    # The past given explicitly, with a head size of 0 (the builder declares it symbolic).
    return {f"past_key_values.{i}.{kv}": np.zeros((len(ids), 2, 0, 0), np.float32)
            for i in range(LAYERS) for kv in ("key", "value")}


@pytest.mark.parametrize("bad, message", [
    (lambda ids: {"input_ids": ids, "attention_mask": np.ones_like(ids), **_bad_past(ids)},
     "input 'past_key_values.0.key' has shape (10, 2, 0, 0); the attention that reads it expects [samples, 2, "
     "past length, 16]"),
    (lambda ids: {"input_ids": ids.astype(np.float32), "attention_mask": np.ones_like(ids)},
     "input 'input_ids' has dtype float32; the model expects int64"),
], ids=["zero-head-size-past", "float-input-ids"])
def test_bad_calibration_exits_2_with_one_line(llama, tmp_path, capsys, bad, message):
    ids = np.load(llama.calib)["input_ids"]
    np.savez(tmp_path / "bad.npz", **bad(ids))
    out = tmp_path / "pruned"
    out.mkdir()
    assert compress(llama.fp32, out, "--remove", "1", "--criterion", "last", calib=tmp_path / "bad.npz") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not any(out.iterdir())


def test_calib_reads_the_folders_tokenizer_and_compress_accepts_its_set(llama, tmp_path, capsys):
    """A plain text file and the builder's folder (tokenizer.json, a GroupQueryAttention past whose head
    size is not declared) make a calibration set without writing an .npz by hand."""
    words = np.random.default_rng(1).integers(3, VOCAB, 600)
    (tmp_path / "corpus.txt").write_text(" ".join(f"t{i}" for i in words))
    calib = tmp_path / "calib.npz"
    assert main(["calib", str(llama.fp32 / "model.onnx"), str(tmp_path / "corpus.txt"), "-o", str(calib),
                 "--seq-len", "12"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    assert arrays["input_ids"].shape[1] == 12 and len(arrays["input_ids"]) >= 600 // 12 - 1
    inputs = [v.name for v in onnx.load(str(llama.fp32 / "model.onnx"), load_external_data=False).graph.input]
    assert sorted(arrays) == sorted(inputs)
    assert arrays["past_key_values.0.key"].shape[1:] == (2, 0, 16)
    out = tmp_path / "pruned"
    out.mkdir()
    assert compress(llama.fp32, out, "--remove", "1", "--criterion", "block-influence", calib=calib) == 0


def test_support_files_are_the_tokenizer_and_processor_files_only(tmp_path):
    from sglp_onnx.surgery.kv_cache import genai_support_files

    source, out, elsewhere = tmp_path / "genai", tmp_path / "out", tmp_path / "elsewhere"
    for folder in (source, out, elsewhere):
        folder.mkdir()
    wanted = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "processor_config.json"}
    for name in wanted | {"model.onnx", "model.onnx.data", "vision.onnx", "genai_config.json", "model.calib.npz",
                          "notes.txt", "tokenizer.onnx"}:
        (source / name).write_text(name)
    (elsewhere / "secret").write_text("not yours")
    (source / "tokenizer_extra.json").symlink_to(elsewhere / "secret")
    pairs, notes = genai_support_files(source / "model.onnx", out / "model.onnx")
    assert {s.name for s, _ in pairs} == wanted
    assert all(t == out / s.name for s, t in pairs)
    assert len(notes) == 1 and "tokenizer_extra.json" in notes[0] and "outside the model's folder" in notes[0]
    assert genai_support_files(source / "model.onnx", source / "small.onnx") == ([], [])


def test_other_models_a_config_names_are_pointed_out():
    from sglp_onnx.surgery.kv_cache import other_model_files

    config = {"model": {"decoder": {"filename": "small.onnx"}, "vision": {"filename": "vision.onnx"},
                        "embedding": {"filename": "embedding.onnx"}, "speech": [{"filename": "vision.onnx"}]}}
    assert other_model_files(config, "small.onnx") == ["vision.onnx", "embedding.onnx"]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_repair_on_a_genai_folder_keeps_it_loadable_and_never_worse(llama, tmp_path, precision):
    """The default repair on onnxruntime-genai's graphs (fused SkipSimplifiedLayerNormalization joins,
    GroupQueryAttention, MatMulNBits for int4): a float MatMul + Add on the hidden state at each cut,
    written only where it improves the held-out fidelity; the folder still generates."""
    source = llama.fp32 if precision == "fp32" else build(llama.hf, llama.root / "int4", "int4")
    out = tmp_path / "pruned"
    out.mkdir()
    assert compress(source, out, "--remove", "2", "--criterion", "last", "--repair", "full", calib=llama.calib) == 0
    report = json.loads((out / "model.json").read_text())
    validate_report(report)
    repair = report["repair"]
    assert repair["cuts"] and all(c["nodes"] == "MatMul + Add" and c["channels"] == 64 for c in repair["cuts"])
    assert report["fidelity"]["score"] <= repair["fidelity_without_repair"]["score"]
    written = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(n.name.startswith("sglp_repair/") for n in written.graph.node) == repair["applied"]
    assert len(generate(out)) > 0
