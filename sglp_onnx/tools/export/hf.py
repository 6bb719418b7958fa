"""Export a Hugging Face decoder-only causal LM to ONNX, with or without a KV cache.

The graph follows the Optimum / onnxruntime-genai convention: inputs
`input_ids`, `attention_mask` (+ `position_ids`, `past_key_values.{i}.key|value`
with a cache), outputs `logits` (+ `present.{i}.key|value`).

The default exporter is `dynamo` (torch.export + onnxscript): it records
every node's module scope in the `pkg.torch.onnx.name_scopes` metadata that
unit discovery reads, and it keeps sequence lengths symbolic instead of
baking the branches taken on the example input into the graph. `legacy`
(the deprecated TorchScript tracer) is kept as a fallback: it exports
several times faster and encodes scopes in node names (`/model/layers.0/...`)
instead. Both give the same graph signature and are tested against
transformers on Llama, Qwen2, Mistral and GPT-2.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import onnx
import torch

from ...errors import UserError
from .torch_export import EXPORTERS, first_line, quiet_output, root_cause, verbose_requested, weight_bytes
from ...paired.hf_model import load_hf_model
from ...files.model_files import EXTERNAL_DATA_THRESHOLD, save_model

# Symbolic dimension names, as Optimum writes them.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"

# Example sizes for export. All differ and all exceed 1: torch.export
# specialises dimensions of size 0 or 1, and equal example sizes can be
# mistaken for one shared dimension.
_EXAMPLE_BATCH = 2
_EXAMPLE_SEQUENCE = 5
_EXAMPLE_PAST = 3


def input_names(num_layers: int, *, with_cache: bool) -> list[str]:
    """Graph input names for a model with `num_layers` decoder layers."""
    if not with_cache:
        return ["input_ids", "attention_mask"]
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int, *, with_cache: bool) -> list[str]:
    """Graph output names for a model with `num_layers` decoder layers."""
    if not with_cache:
        return ["logits"]
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _ExportView(torch.nn.Module):
    """Base of the export wrappers: the language model's children, re-registered.

    Registering the children (not the model itself) makes module scopes and
    parameter names in the ONNX graph read exactly as in the Hugging Face
    model (`model.layers.0.self_attn`, not `lm.model.layers.0...`), which is
    what pairs ONNX units with torch modules later.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        # Kept out of the module tree on purpose (see the class docstring).
        object.__setattr__(self, "_lm", lm)


class _LogitsOnly(_ExportView):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _LogitsAndPresent(_ExportView):
    """Flat past tensors in, flat present tensors out.

    The cache object is rebuilt inside `forward` from plain tensors, so the
    exporters only ever see tensors. A plain `DynamicCache` (no config) keeps
    every past position even for sliding-window models; their attention
    masks still apply the window, so logits are unchanged and the caller
    simply feeds back a longer cache.
    """

    def __init__(self, lm: torch.nn.Module, num_layers: int):
        super().__init__(lm)
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self._lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)



def cache_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache, read from one tiny forward pass.

    Reading the cache the model really produces avoids guessing from config
    attribute names, which differ between architectures (n_head, num_key_value_heads, head_dim).
    """
    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad(), quiet_output(True):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or not all(torch.is_tensor(getattr(layer, "keys", None)) for layer in layers):
        raise UserError(
            f"{type(model).__name__} does not return a key/value cache with one tensor pair per layer; "
            "only decoder-only causal LMs with a standard KV cache can be exported with_cache=True"
        )
    keys = layers[0].keys
    return len(layers), int(keys.shape[1]), int(keys.shape[3])


def export_hf(
    model_dir_or_model: str | os.PathLike | torch.nn.Module,
    path: str | os.PathLike,
    *,
    with_cache: bool = False,
    exporter: str = "dynamo",
    opset: int | None = None,
    verbose: bool | None = None,
) -> onnx.ModelProto:
    """Export a decoder-only causal LM to `path` and return the written ONNX model.

    Keyword arguments:
        with_cache: add `position_ids` and `past_key_values.{i}.key|value`
            inputs of shape (batch, kv_heads, past_len, head_dim) and
            `present.{i}.key|value` outputs holding past_len + sequence_length
            positions (default False: `input_ids`, `attention_mask` -> `logits`).
        exporter: "dynamo" or "legacy" (TorchScript) (default "dynamo").
        opset: ONNX opset version; None lets torch choose (default None).
        verbose: show the exporter's own console output; None reads the
            SGLP_ONNX_VERBOSE environment variable (default None).

    `model_dir_or_model` is a local `save_pretrained` folder, loaded with
    `AutoModelForCausalLM` in float32, or an already loaded float32 model
    (its training flag is restored afterwards). Batch and sequence lengths
    are dynamic. Any export failure becomes a UserError. A model above 2 GB
    keeps its weights in `<path>.data` beside it; the returned model then
    references them (its weights are not loaded).
    """
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")
    if isinstance(model_dir_or_model, torch.nn.Module):
        model = model_dir_or_model
    else:
        model = load_hf_model(model_dir_or_model, causal_lm=True)
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise UserError(f"{type(model).__name__} is not a Hugging Face language model (no get_input_embeddings)")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes - {torch.float32}:
        raise UserError(f"the model has {sorted(map(str, dtypes))} parameters; convert it with model.float() first")
    # Above the protobuf limit the exporter writes the file itself, weights in `<name>.data`.
    large = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if large and exporter != "dynamo":
        raise UserError("a model above 2 GB exports with the dynamo exporter only (the default)")
    was_training = model.training
    model.eval()
    try:
        proto = _export(model, with_cache=with_cache, exporter=exporter, opset=opset, show=verbose_requested(verbose),
                        large_to=path if large else None)
    finally:
        model.train(was_training)
    if not large:
        save_model(proto, path)
    return proto


def _example_inputs(model, *, with_cache: bool) -> tuple[tuple[torch.Tensor, ...], int]:
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE), generator=generator)
    if not with_cache:
        return (ids, torch.ones_like(ids)), 0
    num_layers, kv_heads, head_dim = cache_geometry(model)
    total = _EXAMPLE_PAST + _EXAMPLE_SEQUENCE
    mask = torch.ones((_EXAMPLE_BATCH, total), dtype=torch.long)
    positions = torch.arange(_EXAMPLE_PAST, total).expand(_EXAMPLE_BATCH, -1).contiguous()
    past = tuple(
        torch.randn((_EXAMPLE_BATCH, kv_heads, _EXAMPLE_PAST, head_dim), generator=generator)
        for _ in range(2 * num_layers)
    )
    return (ids, mask, positions, *past), num_layers


def _export(model, *, with_cache: bool, exporter: str, opset: int | None, show: bool,
            large_to: Path | None = None) -> onnx.ModelProto:
    args, num_layers = _example_inputs(model, with_cache=with_cache)
    module = _LogitsAndPresent(model, num_layers) if with_cache else _LogitsOnly(model)
    names_in = input_names(num_layers, with_cache=with_cache)
    names_out = output_names(num_layers, with_cache=with_cache)
    token_axes = {0: BATCH, 1: SEQUENCE}
    mask_axes = {0: BATCH, 1: TOTAL if with_cache else SEQUENCE}
    past_axes = {0: BATCH, 2: PAST}
    try:
        with quiet_output(not show), torch.no_grad():
            if exporter == "dynamo":
                # Shapes mirror the forward signature: the past tensors arrive as one *args tuple.
                dynamic_shapes: tuple = (token_axes, mask_axes)
                if with_cache:
                    dynamic_shapes += (token_axes, tuple(past_axes for _ in range(2 * num_layers)))
                program = torch.onnx.export(
                    module,
                    args,
                    None,
                    input_names=names_in,
                    output_names=names_out,
                    opset_version=opset,
                    dynamic_shapes=dynamic_shapes,
                    dynamo=True,
                    optimize=True,
                    verbose=show,
                )
                if large_to is None:
                    proto = program.model_proto
                else:
                    program.save(str(large_to), external_data=True)
                    proto = onnx.load(str(large_to), load_external_data=False)
            else:
                axes = {"input_ids": token_axes, "attention_mask": mask_axes, "logits": token_axes}
                if with_cache:
                    axes["position_ids"] = token_axes
                    axes.update({name: past_axes for name in names_in[3:]})
                    axes.update({name: {0: BATCH, 2: TOTAL} for name in names_out[1:]})
                buffer = io.BytesIO()
                torch.onnx.export(
                    module,
                    args,
                    buffer,
                    input_names=names_in,
                    output_names=names_out,
                    opset_version=opset,
                    dynamic_axes=axes,
                    dynamo=False,
                )
                proto = onnx.load_from_string(buffer.getvalue())
    except Exception as exc:
        # Both exporters raise many unrelated types; every one means this
        # model cannot be exported this way as given.
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise UserError(
            f"exporting {type(model).__name__} with the {exporter} exporter failed: "
            f"{first_line(root_cause(exc))[:300]}; try exporter={other!r}"
        ) from None
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != names_in or got_out != names_out:
        raise RuntimeError(f"exported graph maps {got_in} -> {got_out}; expected {names_in} -> {names_out}")
    if with_cache:
        # dynamo names the grown cache length by expression, spelled differently
        # per output ("past_sequence_length + sequence_length" and the reverse);
        # one name, as the legacy exporter writes it, keeps the signature uniform.
        for output in proto.graph.output[1:]:
            output.type.tensor_type.shape.dim[2].dim_param = TOTAL
    if large_to is None:
        onnx.checker.check_model(proto)
    else:  # the graph rewritten beside its unchanged data file, checked from the path
        onnx.save(proto, str(large_to))
        onnx.checker.check_model(str(large_to))
    return proto
