"""Decoder layers and their KV cache after pruning: the old -> new layer
numbers for the report, and an onnxruntime-genai `genai_config.json` updated
for the pruned model.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import InternalError, UserError, ValidationError
from ..units.discovery import PrunableUnit

GENAI_CONFIG = "genai_config.json"
# Keys that hold a decoder's layer count in genai_config.json (its own
# `num_hidden_layers`, and the spellings of configs copied from transformers).
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
# The Optimum / onnxruntime-genai cache naming that renumbering understands.
CACHE_NAME = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def layer_map(units: Sequence[PrunableUnit], removed: Collection[int]) -> dict[int, int | None] | None:
    """Old decoder layer number -> new one, None for a layer whose attention (or
    the unit owning its cache) is removed: with it goes its KV cache. None when
    the model has no transformer layers.

    New numbers count the layers that keep attention, in order: layer k of
    the pruned model is the k-th surviving cache.
    """
    layers = sorted({u.layer_index for u in units if u.layer_index is not None})
    if not layers:
        return None
    gone = {u.layer_index for i, u in enumerate(units)
            if i in removed and (u.has_attention or u.owned_outputs) and u.layer_index is not None}
    mapping: dict[int, int | None] = {}
    new = 0
    for old in layers:
        if old in gone:
            mapping[old] = None
        else:
            mapping[old] = new
            new += 1
    return mapping


def renumbering(layers: Mapping[str, int | None], names: Iterable[str]) -> dict[str, str]:
    """Cache tensor name -> the same name with the layer's new number.

    `layers` is the report's `layer_map`; names outside the
    `past_key_values.{i}.key|value` / `present.{i}.key|value` convention and
    removed layers are left out.
    """
    mapping = {}
    for name in names:
        match = CACHE_NAME.match(name)
        if match and layers.get(match.group(2)) is not None:
            new = f"{match.group(1)}.{layers[match.group(2)]}.{match.group(3)}"
            if new != name:
                mapping[name] = new
    return mapping


def rename_tensors(model: onnx.ModelProto, mapping: Mapping[str, str]) -> None:
    """Rename tensors everywhere in `model` (inputs, outputs, value infos,
    initializers, node inputs and outputs, subgraphs), in place.

    The mapping may permute names (`a -> b`, `b -> c`): every name is looked up
    once. A new name that already exists and is not itself renamed is refused.
    """
    if not mapping:
        return

    def graphs(graph):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from graphs(attr.g)
                for sub in attr.graphs:
                    yield from graphs(sub)

    every = list(graphs(model.graph))
    names = {n for g in every for n in [*(v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer)),
                                        *(t for node in g.node for t in (*node.input, *node.output))]}
    clash = (set(mapping.values()) - set(mapping)) & names
    if clash:
        raise UserError(f"cannot rename the cache tensors: {sorted(clash)[:4]} already exist in the model")
    for g in every:
        for v in (*g.input, *g.output, *g.value_info, *g.initializer):
            v.name = mapping.get(v.name, v.name)
        for node in g.node:
            node.input[:] = [mapping.get(t, t) for t in node.input]
            node.output[:] = [mapping.get(t, t) for t in node.output]


def kv_cache_record(units: Sequence[PrunableUnit], removed: Collection[int]) -> dict[str, Any] | None:
    """The report's `kv_cache` entry: layer map and the cache inputs/outputs that go."""
    mapping = layer_map(units, removed)
    if mapping is None:
        return None
    chosen = [units[i] for i in sorted(removed)]
    return {
        "layer_map": {str(k): v for k, v in mapping.items()},
        "layers_before": len(mapping),
        "layers_after": sum(v is not None for v in mapping.values()),
        "removed_inputs": sorted(i for u in chosen for i in u.owned_inputs),
        "removed_outputs": sorted(o for u in chosen for o in u.owned_outputs),
        "genai_config": None,
    }


def genai_config_source(model_path: Path) -> Path | None:
    """The `genai_config.json` beside the input model, if there is one."""
    path = model_path.with_name(GENAI_CONFIG)
    return path if path.is_file() else None


def genai_config_target(model_path: Path, output: Path) -> Path:
    """Where the updated config goes: `genai_config.json` beside the output, or
    `OUTPUT.genai_config.json` when the output shares the input's folder (whose
    files are never modified)."""
    if output.parent.resolve() != model_path.parent.resolve():
        return output.with_name(GENAI_CONFIG)
    from ..files.model_files import beside

    return beside(output, f".{GENAI_CONFIG}")


# What onnxruntime-genai reads beside genai_config.json other than the models:
# the tokenizer and processor files its model builder copies in. A pruned
# model written to another folder gets copies, so that folder is complete;
# models and their data files are never copied.
GENAI_SUPPORT_FILES = ("tokenizer*.json", "tokenizer.model", "*.tiktoken", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                       "sentencepiece*.model", "chat_template*.jinja", "chat_template*.json", "*processor*.json")
_MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin", ".safetensors", ".pt", ".pth")


def genai_support_files(model_path: Path, output: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(source, target) pairs of the tokenizer and processor files beside the
    input model to copy beside the output, and notes on files left behind.

    Empty when the output shares the input's folder. A file that is a link
    to somewhere outside the input's folder is not copied (a note says so),
    as external data outside it is never read.
    """
    folder = model_path.parent
    if output.parent.resolve() == folder.resolve():
        return [], []
    base = folder.resolve()
    pairs: list[tuple[Path, Path]] = []
    notes: list[str] = []
    names = sorted({p.name for pattern in GENAI_SUPPORT_FILES for p in folder.glob(pattern)})
    for name in names:
        source = folder / name
        if name.lower().endswith(_MODEL_FILE_SUFFIXES) or not source.is_file():
            continue
        if base not in source.resolve().parents:
            notes.append(f"{source} was not copied beside the output: it is a link to a file outside the model's "
                         "folder")
            continue
        pairs.append((source, output.with_name(name)))
    return pairs, notes


def other_model_files(config: Any, output_name: str) -> list[str]:
    """File names other than `output_name` that a genai config gives as a
    `filename` (the other models of a multi-model pipeline: vision, embedding...)."""
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filename" and isinstance(value, str) and value != output_name and value not in names:
                    names.append(value)
                else:
                    visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return names


def updated_genai_config(source: Path, *, layers_before: int, layers_after: int, model_name: str,
                         output_name: str) -> tuple[dict | None, list[str]]:
    """The config of `source` with its decoder layer count set to `layers_after`.

    Only counts equal to `layers_before` change (another number under one of
    those keys is not this decoder's), and a `filename` equal to the input
    model's file name is pointed at the output. Returns the config and what
    changed, in words; the config is None (and the words say why) when no
    layer count was found.
    """
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {source} ({exc}); fix or remove it (it is rewritten for the pruned model)")
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a JSON object; fix or remove it")
    config = copy.deepcopy(config)
    changes: list[str] = []
    counts: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else key
                if key in LAYER_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool) \
                        and value == layers_before:
                    node[key] = layers_after
                    counts.append(where)
                    changes.append(f"{where} {layers_before} -> {layers_after}")
                elif key == "filename" and value == model_name:
                    node[key] = output_name
                    if output_name != model_name:
                        changes.append(f"{where} {model_name} -> {output_name}")
                else:
                    visit(value, where)
        elif isinstance(node, list):
            for k, value in enumerate(node):
                visit(value, f"{path}[{k}]")

    visit(config, "")
    if not counts:
        return None, [f"{source} has no decoder layer count equal to the model's {layers_before} layers "
                      f"(looked for {', '.join(LAYER_COUNT_KEYS)}), so no updated copy was written"]
    return config, changes


def renumber_kept_cache(pruned: onnx.ModelProto, rep: dict, feed: dict[str, np.ndarray], *, provider: str) -> None:
    """Rename the kept cache tensors to consecutive layer numbers, in place, and
    check the renamed model (a pure renaming, so checker and one run suffice)."""
    from .validation import check_standalone

    kv = rep.get("kv_cache")
    io_names = [i.name for i in pruned.graph.input] + [o.name for o in pruned.graph.output]
    if not kv or not any(CACHE_NAME.match(n) for n in io_names):
        raise UserError("--renumber-cache needs a model with a KV cache named past_key_values.{i}.key/value "
                        "and present.{i}.key/value")
    mapping = renumbering(kv["layer_map"], io_names)
    rename_tensors(pruned, mapping)
    try:
        check_standalone(pruned, {mapping.get(k, k): v for k, v in feed.items()}, provider=provider,
                         what="the model with renumbered cache tensors")
    except ValidationError as exc:
        raise InternalError(f"{exc}; nothing was written") from exc
    kv["renamed"] = dict(sorted(mapping.items()))


def genai_config_for_output(rep: dict, source: Path, target: Path, copies: Sequence[tuple[Path, Path]],
                            copy_notes: Sequence[str], *, model_path: Path, output: Path,
                            dry_run: bool) -> dict | None:
    """The onnxruntime-genai config `source` rewritten for the pruned model
    (None: nothing to write), with what it changed, how the kept cache tensors
    are named and which files go beside it added to the report's notes."""
    kv = rep.get("kv_cache")
    if not kv:
        return None
    config, changes = updated_genai_config(source, layers_before=kv["layers_before"], layers_after=kv["layers_after"],
                                           model_name=model_path.name, output_name=output.name)
    if config is None:
        rep["notes"].extend(changes)
        return None
    kv["genai_config"] = str(target)
    if "renamed" not in kv:
        naming = ("the kept cache tensors keep their names (see kv_cache.layer_map; --renumber-cache "
                  "renames them 0..n-1 as onnxruntime-genai expects)")
    elif kv["renamed"]:
        naming = "the kept cache tensors are renumbered 0..n-1"
    else:
        naming = "the kept cache tensors are numbered 0..n-1 already"
    wrote = "a real run writes" if dry_run else "wrote"
    if copies:
        copied = "a real run copies" if dry_run else "copied"
        naming += f"; {copied} {', '.join(source.name for source, _ in copies)} beside it"
    rep["notes"].append(f"{wrote} {target} for the pruned model: {'; '.join(changes)}; {naming}")
    rep["notes"].extend(copy_notes)
    others = other_model_files(config, output.name)
    if others and output.parent.resolve() != model_path.parent.resolve():
        rep["notes"].append(f"{target.name} also names {', '.join(others)}, not copied beside the output "
                            f"(models are never copied): copy {'them' if len(others) > 1 else 'it'} from "
                            f"{model_path.parent} for onnxruntime-genai to load the folder")
    return config
