"""`sglp-onnx calib` through the real CLI: a folder of PNG/JPEG files becomes
the bundled CNN's calibration set, a text file the bundled tiny Llama's (with
its KV cache) and a Hugging Face export's; `compress` accepts each. Every
wrong input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sglp_onnx.cli import main
from cli_runs import CLI, snapshot

PIL = pytest.importorskip("PIL")
tokenizers = pytest.importorskip("tokenizers")
from PIL import Image  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "resnet56_digits.onnx"
LLAMA_KV = MODELS / "tinyllama_pydoc.kv.onnx"


def refused(capsys, argv: list[str], root: Path, *, says: str) -> None:
    """`argv` exits 2 with one `error:` line saying `says`, and changes no file under `root`."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert says.lower() in err.lower(), err
    assert snapshot(root) == before


def digit_images(folder: Path, n: int = 30) -> Path:
    """scikit-learn's 8x8 digits upscaled to odd sizes, half PNG (grey), half JPEG (colour)."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True)
    images = load_digits().images
    for k in range(n):
        image = Image.fromarray((images[k] * 16).clip(0, 255).astype(np.uint8)).resize((24 + k % 3, 30))
        if k % 2:
            image.save(folder / f"digit{k:02d}.png")
        else:
            image.convert("RGB").save(folder / f"digit{k:02d}.jpg", quality=95)
    return folder


def byte_tokenizer(path: Path) -> Path:
    """A tokenizer.json for the bundled tiny Llama: byte-level ids 0..255 (as
    `models/pydoc_text.encode`), BOS 256 before each document."""
    from tokenizers import Tokenizer, models, processors
    from tokenizers.pre_tokenizers import ByteLevel

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for b in range(256):  # GPT-2's reversible byte -> printable character map
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    vocab = {chr(chars[b]): b for b in range(256)} | {"<s>": 256, "</s>": 257, "<pad>": 258}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer.save(str(path))
    return path


def pydoc_text(path: Path, topics: int = 6) -> str:
    from pydoc_data.topics import topics as all_topics

    text = "\n\n".join(all_topics[name] for name in sorted(all_topics)[:topics])
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """The bundled tiny Llama with its KV cache, as model.onnx beside a tokenizer.json."""
    folder = tmp_path_factory.mktemp("llama")
    shutil.copy(LLAMA_KV, folder / "model.onnx")
    byte_tokenizer(folder / "tokenizer.json")
    return folder


def image_model(path: Path, shape: list, dtype=TensorProto.FLOAT) -> Path:
    """A one-node graph (ReduceMean) with one image input of `shape`."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0)], "image",
        [helper.make_tensor_value_info("image", dtype, shape)],
        [helper.make_tensor_value_info("mean", dtype, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def solid(folder: Path, colour, size=(20, 12)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(folder / "solid.png")
    return folder


# -- images ---------------------------------------------------------------------------------------------------


def test_image_folder_makes_the_cnns_calibration_set_and_compress_accepts_it(tmp_path):
    images = digit_images(tmp_path / "digits")
    out, preview = tmp_path / "calib.npz", tmp_path / "seen.png"
    done = subprocess.run([CLI, "calib", str(CNN), str(images), "-o", str(out), "--preview", str(preview)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "30 samples" in done.stdout and "NCHW, 1 channel(s), 8x8" in done.stdout, done.stdout
    with np.load(out) as data:
        assert sorted(data.files) == ["input"]
        batch = data["input"]
    assert batch.shape == (30, 1, 8, 8) and batch.dtype == np.float32
    # Grey model, float input: the unit preset (0..1); dark background, bright strokes.
    assert 0.0 <= batch.min() < 0.1 and 0.9 < batch.max() <= 1.0
    with Image.open(preview) as seen:
        assert seen.format == "PNG" and seen.size[0] > seen.size[1] > 0
    pruned = tmp_path / "pruned.onnx"
    code = main(["compress", str(CNN), "--calib", str(out), "-o", str(pruned), "--remove", "2",
                 "--criterion", "block-influence", "-q"])
    assert code == 0
    report = json.loads(pruned.with_suffix(".json").read_text())
    assert sum(u["removed"] for u in report["units"]) == 2


def test_samples_are_drawn_with_the_seed(tmp_path):
    images = digit_images(tmp_path / "digits")
    arrays = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.npz"
        assert main(["calib", str(CNN), str(images), "-o", str(out), "--samples", "8", "--seed", str(seed),
                     "-q"]) == 0
        with np.load(out) as data:
            arrays[name] = data["input"]
    assert arrays["a"].shape == (8, 1, 8, 8)
    assert np.array_equal(arrays["a"], arrays["b"]) and not np.array_equal(arrays["a"], arrays["c"])


@pytest.mark.parametrize("shape, options, expected", [
    # NHWC colour float input: ImageNet's mean and std by default, in RGB order.
    ([None, 16, 16, 3], [], [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]),
    ([None, 16, 16, 3], ["--channel-order", "bgr"], [(0 - 0.406) / 0.225, (0 - 0.456) / 0.224, (1 - 0.485) / 0.229]),
    ([None, 3, 16, 16], ["--preset", "inception"], [1.0, -1.0, -1.0]),
    ([None, 3, None, None], ["--size", "16", "--mean", "0.5", "--std", "0.25"], [2.0, -2.0, -2.0]),
])
def test_layout_order_and_normalisation_follow_the_graph_and_options(tmp_path, shape, options, expected):
    model = image_model(tmp_path / "m.onnx", shape)
    out = tmp_path / "calib.npz"
    assert main(["calib", str(model), str(solid(tmp_path / "red", (255, 0, 0))), "-o", str(out), "-q",
                 *options]) == 0
    with np.load(out) as data:
        batch = data["image"]
    channels = batch[0, 0, 0] if shape[3] == 3 else batch[0, :, 0, 0]
    assert batch.shape == ((1, 16, 16, 3) if shape[3] == 3 else (1, 3, 16, 16))
    np.testing.assert_allclose(channels, expected, rtol=1e-5)


def test_integer_image_input_gets_raw_pixels(tmp_path):
    model = image_model(tmp_path / "m.onnx", [1, 8, 8, 3], TensorProto.UINT8)
    out = tmp_path / "calib.npz"
    assert main(["calib", str(model), str(solid(tmp_path / "img", (10, 20, 30))), "-o", str(out), "-q"]) == 0
    with np.load(out) as data:
        batch = data["image"]
    assert batch.dtype == np.uint8 and batch.shape == (1, 8, 8, 3)
    assert batch[0, 4, 4].tolist() == [10, 20, 30]


# -- text -----------------------------------------------------------------------------------------------------


def test_text_file_makes_the_tiny_llamas_calibration_set_and_compress_accepts_it(llama_folder, tmp_path):
    text = pydoc_text(tmp_path / "corpus.txt")
    out = tmp_path / "calib.npz"
    done = subprocess.run([CLI, "calib", str(llama_folder / "model.onnx"), str(tmp_path / "corpus.txt"),
                           "-o", str(out), "--seq-len", "64", "--samples", "40"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tokenizer.json" in done.stdout and "input_ids: int64 [40, 64]" in done.stdout, done.stdout
    with np.load(out) as data:
        arrays = {k: data[k] for k in data.files}
    ids = arrays["input_ids"]
    assert ids.shape == (40, 64) and ids.dtype == np.int64
    stream = np.asarray([256, *text.encode("utf-8")])  # the byte-level tokenizer: BOS, then bytes
    windows = stream[: len(stream) // 64 * 64].reshape(-1, 64)
    assert all(any(np.array_equal(row, w) for w in windows) for row in ids)
    assert np.array_equal(arrays["attention_mask"], np.ones_like(ids))
    assert np.array_equal(arrays["position_ids"], np.broadcast_to(np.arange(64), ids.shape))
    assert arrays["past_key_values.0.key"].shape == (40, 2, 0, 32)
    model_inputs = [i.name for i in onnx.load(str(LLAMA_KV), load_external_data=False).graph.input]
    assert sorted(arrays) == sorted(model_inputs)
    pruned = tmp_path / "pruned.onnx"
    assert main(["compress", str(llama_folder / "model.onnx"), "--calib", str(out), "-o", str(pruned),
                 "--remove", "1", "--criterion", "block-influence", "-q"]) == 0
    assert pruned.is_file()


def test_hugging_face_export_takes_the_tokenizer_of_its_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(hf)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>", unk_token="<pad>").save_pretrained(hf)
    model = tmp_path / "llama.onnx"
    assert main(["export", f"hf:{hf}", "-o", str(model), "--exporter", "legacy", "-q"]) == 0
    words = np.random.default_rng(0).integers(3, 64, 3000)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for k, part in enumerate(np.split(words, 3)):
        (corpus / f"part{k}.txt").write_text(" ".join(f"w{i}" for i in part))
    out = tmp_path / "calib.npz"
    assert main(["calib", str(model), str(corpus), "-o", str(out), "--tokenizer", str(hf), "--seq-len", "32",
                 "-q"]) == 0
    with np.load(out) as data:
        ids = data["input_ids"]
        assert sorted(data.files) == ["attention_mask", "input_ids"]
    assert ids.shape == (3000 // 32, 32)  # 3000 words (and any BOS the tokenizer adds), the tail dropped
    assert ids.min() >= 1 and ids.max() < 64
    assert main(["compress", str(model), "--calib", str(out), "-o", str(tmp_path / "pruned.onnx"),
                 "--remove", "1", "-q"]) == 0


# -- wrong inputs ---------------------------------------------------------------------------------------------


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    refused(capsys, ["calib", str(CNN), str(tmp_path / "empty"), "-o", str(tmp_path / "c.npz")], tmp_path,
            says="no images found")


def test_corrupt_image(tmp_path, capsys):
    images = digit_images(tmp_path / "digits", n=4)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    refused(capsys, ["calib", str(CNN), str(images), "-o", str(tmp_path / "c.npz")], tmp_path, says="broken.png")


def test_truncated_jpeg(tmp_path, capsys):
    images = digit_images(tmp_path / "digits", n=2)
    data = (images / "digit00.jpg").read_bytes()
    (images / "digit00.jpg").write_bytes(data[: len(data) // 2])
    refused(capsys, ["calib", str(CNN), str(images), "-o", str(tmp_path / "c.npz")], tmp_path, says="digit00.jpg")


def test_text_shorter_than_one_sequence(llama_folder, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    refused(capsys, ["calib", str(llama_folder / "model.onnx"), str(tmp_path / "short.txt"), "-o",
                     str(tmp_path / "c.npz"), "--seq-len", "64"], tmp_path, says="fewer than one sequence")


def test_tokenizer_not_found(tmp_path, capsys):
    shutil.copy(LLAMA_KV, tmp_path / "model.onnx")
    pydoc_text(tmp_path / "corpus.txt")
    refused(capsys, ["calib", str(tmp_path / "model.onnx"), str(tmp_path / "corpus.txt"), "-o",
                     str(tmp_path / "c.npz")], tmp_path, says="tokenizer not found")
    refused(capsys, ["calib", str(tmp_path / "model.onnx"), str(tmp_path / "corpus.txt"), "-o",
                     str(tmp_path / "c.npz"), "--tokenizer", str(tmp_path)], tmp_path, says="tokenizer not found")


def test_another_models_tokenizer(llama_folder, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "other"
    folder.mkdir()
    shutil.copy(llama_folder / "model.onnx", folder / "model.onnx")
    inner = Tokenizer(models.WordLevel(vocab={"<unk>": 0, **{f"w{i}": i for i in range(1, 400)}}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.save(str(folder / "tokenizer.json"))
    (tmp_path / "words.txt").write_text(" ".join(f"w{i}" for i in range(1, 400)))
    refused(capsys, ["calib", str(folder / "model.onnx"), str(tmp_path / "words.txt"), "-o",
                     str(tmp_path / "c.npz"), "--seq-len", "16"], tmp_path, says="not this model's tokenizer")


def test_text_that_is_not_utf8(llama_folder, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    refused(capsys, ["calib", str(llama_folder / "model.onnx"), str(tmp_path / "latin1.txt"), "-o",
                     str(tmp_path / "c.npz")], tmp_path, says="not UTF-8")


def test_model_input_that_cannot_be_built(tmp_path, capsys):
    images = digit_images(tmp_path / "digits", n=2)
    refused(capsys, ["calib", str(MODELS / "cnn1d_radio.onnx"), str(images), "-o", str(tmp_path / "c.npz")],
            tmp_path, says="cannot build the inputs")


def test_open_image_size_without_size(tmp_path, capsys):
    model = image_model(tmp_path / "m.onnx", [None, 3, None, None])
    refused(capsys, ["calib", str(model), str(solid(tmp_path / "img", (1, 2, 3))), "-o", str(tmp_path / "c.npz")],
            tmp_path, says="--size")


@pytest.mark.parametrize("extra, says", [
    (["--samples", "0"], "--samples"),
    (["--size", "8,x"], "--size"),
    (["--std", "0"], "--std"),
    (["--mean", "0.1,0.2"], "--mean"),
    (["--crop-fraction", "1.5"], "--crop-fraction"),
    (["--seq-len", "16"], "go with text"),
    (["--preview", "seen.jpg"], "must end in .png"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, extra, says):
    images = digit_images(tmp_path / "digits", n=2)
    extra = [str(tmp_path / e) if e.endswith(".jpg") else e for e in extra]
    refused(capsys, ["calib", str(CNN), str(images), "-o", str(tmp_path / "c.npz"), *extra], tmp_path, says=says)


def test_existing_output_needs_force(tmp_path, capsys):
    images = digit_images(tmp_path / "digits", n=2)
    (tmp_path / "c.npz").write_bytes(b"keep")
    refused(capsys, ["calib", str(CNN), str(images), "-o", str(tmp_path / "c.npz")], tmp_path, says="--force")
    assert main(["calib", str(CNN), str(images), "-o", str(tmp_path / "c.npz"), "--force", "-q"]) == 0
    assert (tmp_path / "c.npz").read_bytes() != b"keep"


# -- compress/analyze --calib FOLDER_OR_TEXT ------------------------------------------------------------------


def test_compress_takes_a_folder_of_images_as_calib(tmp_path):
    images = digit_images(tmp_path / "digits")
    made = tmp_path / "calib.npz"
    assert main(["calib", str(CNN), str(images), "-o", str(made), "-q"]) == 0
    for calib, name in ((images, "folder"), (made, "npz")):
        assert main(["compress", str(CNN), "--calib", str(calib), "-o", str(tmp_path / f"{name}.onnx"),
                     "--remove", "2", "--criterion", "block-influence", "-q"]) == 0
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("folder", "npz")]
    # The same samples either way: the same units chosen, the same fidelity.
    assert [u["removed"] for u in reports[0]["units"]] == [u["removed"] for u in reports[1]["units"]]
    assert reports[0]["fidelity"] == reports[1]["fidelity"]


def test_analyze_takes_a_text_file_as_calib(llama_folder, tmp_path, capsys):
    pydoc_text(tmp_path / "corpus.txt", topics=3)
    capsys.readouterr()
    # One calibration pass reads it (block influence, no repair): the default search adds nothing to what is checked.
    assert main(["analyze", str(llama_folder / "model.onnx"), "--calib", str(tmp_path / "corpus.txt"),
                 "--criterion", "block-influence", "--repair", "none", "--suggest", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["units"]) == 8 and "corpus.txt" in json.dumps(report)


def test_compress_calib_folder_without_images_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(capsys, ["compress", str(CNN), "--calib", str(tmp_path / "empty"), "-o", str(tmp_path / "p.onnx")],
            tmp_path, says="no images found")


def test_colour_images_for_a_hugging_face_vision_export(tmp_path):
    """A Hugging Face ResNet (tests/hf_factories.py) exported through the CLI takes [batch, 3, 32, 32]:
    colour photos-like images become ImageNet-normalised NCHW arrays that compress accepts."""
    pytest.importorskip("transformers")
    model = tmp_path / "hf_resnet.onnx"
    assert main(["export", "hf_factories:resnet", "--input-shape", "1,3,32,32", "-o", str(model), "-q"]) == 0
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        pixels = rng.integers(0, 256, (40 + k, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{k}.{'png' if k % 2 else 'jpg'}")
    out = tmp_path / "calib.npz"
    assert main(["calib", str(model), str(folder), "-o", str(out), "-q"]) == 0
    with np.load(out) as data:
        batch = data[onnx.load(str(model)).graph.input[0].name]
    assert batch.shape == (12, 3, 32, 32) and batch.dtype == np.float32
    # ImageNet normalisation of 0..255 noise: each channel spans (0 - mean) / std .. (1 - mean) / std.
    for c, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert batch[:, c].min() >= (0 - mean) / std - 1e-5 and batch[:, c].max() <= (1 - mean) / std + 1e-5
    assert main(["compress", str(model), "--calib", str(out), "-o", str(tmp_path / "pruned.onnx"), "--remove", "1",
                 "-q"]) == 0


def test_token_ids_are_found_by_their_embedding_lookup_whatever_their_name():
    """A GPT-2-like graph: `tokens` and `pos` both index tables, the position table larger than the
    vocabulary; `pos` is recognised by its name, `m` (no lookup) is the mask."""
    from sglp_onnx.files.calibration import model_inputs
    from sglp_onnx.tools.calib.text import text_roles

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["wte", "tokens"], ["t"]), helper.make_node("Gather", ["wpe", "pos"], ["p"]),
             helper.make_node("Add", ["t", "p"], ["h"]), helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]), helper.make_node("Mul", ["h", "mu"], ["out"])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((50, 4)).astype(np.float32), "wte"),
             onnx.numpy_helper.from_array(rng.standard_normal((100, 4)).astype(np.float32), "wpe"),
             onnx.numpy_helper.from_array(np.array([2], np.int64), "axes")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in ("m", "pos", "tokens")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    roles = text_roles(model, model_inputs(model))
    assert (roles.tokens.name, roles.vocab) == ("tokens", 50)
    assert roles.positions.name == "pos" and roles.mask.name == "m" and roles.zeros == ()
