"""Pairing the ONNX graph with the torch model it was exported from: loading
the model (`MODULE:FACTORY` or `hf:DIR`), the feed without the past KV cache,
and each unit's torch modules (checked against the ONNX activations)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx

from ..errors import UserError
from ..evidence.activations import probe
from ..files.calibration import CalibrationSet, model_inputs
from ..graph.index import GraphIndex
from ..units.discovery import PrunableUnit

# Samples run through the ONNX model and the paired torch model to match units to modules.
PAIRING_SAMPLES = 8


def load_paired_model(spec: str, weights: str | None):
    """`MODULE:FACTORY` (with optional weights), or `hf:DIR` for a Hugging Face folder."""
    from .hf_model import HF_PREFIX, is_hf_spec, load_hf_model

    if is_hf_spec(spec):
        if weights is not None:
            raise UserError("--torch-weights goes with --torch-model MODULE:FACTORY; an hf:DIR folder holds "
                            "its own weights")
        return load_hf_model(spec[len(HF_PREFIX):])
    from ..tools.export.torch_export import load_torch_model

    return load_torch_model(spec, weights)


def cache_inputs(model: onnx.ModelProto, units: Sequence[PrunableUnit]) -> set[str]:
    """Graph inputs that are a decoder layer's past KV cache: owned by a unit and cache-shaped."""
    from ..files.calibration import is_cache_input

    specs = model_inputs(model)
    owned = {i for u in units for i in u.owned_inputs}
    return {s.name for s in specs if s.name in owned and is_cache_input(s, specs)}


def torch_feed(feed: dict[str, np.ndarray], cache_inputs: set[str]) -> dict[str, np.ndarray]:
    """The ONNX feed without the past KV cache: the paired model runs each
    calibration sequence whole (past length 0), which is what an ONNX model
    with a cache computes from the empty past its calibration gets."""
    return {k: v for k, v in feed.items() if k not in cache_inputs}


def check_empty_cache(data: CalibrationSet, cache_inputs: set[str]) -> None:
    """The paired model runs without a cache, so the ONNX model's past must be empty to compare."""
    filled = [k for k in sorted(cache_inputs) if k in data.inputs and data.inputs[k].ndim >= 3
              and 0 not in data.inputs[k].shape[1:]]
    if filled:
        raise UserError(f"the calibration data holds a non-empty past KV cache ({filled[0]} has shape "
                        f"{data.inputs[filled[0]].shape}); with --torch-model, leave the past_* arrays out of the "
                        ".npz (they are then empty: whole sequences, as the paired model runs them)")


def pair(model, paired, units, data: CalibrationSet, provider: str, *, batch_size: int | None = None):
    """Match each unit to the torch modules that compute it (see `gradnorm.pair_units`),
    and the report's record of that match."""
    from .gradnorm import pair_units

    feed = data.first(min(PAIRING_SAMPLES, batch_size or PAIRING_SAMPLES))
    names = list(dict.fromkeys(t for u in units for t in (u.entry, u.exit)))
    values = probe(model, feed, names, provider=provider)
    outputs = [values[o.name] for o in model.graph.output]
    index = GraphIndex(model)
    scopes = {n.name: s for n, s in zip(index.nodes, index.scopes) if n.name}
    cache = cache_inputs(model, units)
    pairing = pair_units(paired, units, torch_feed(feed, cache), values, outputs,
                         [s.name for s in model_inputs(model) if s.name not in cache], scopes)
    info = {
        "method": sorted(set(pairing.method)),
        "output_relative_error": pairing.output_error,
        "units": [{"unit": u.name, "modules": m, "relative_error": None if math.isnan(e) else e}
                  for u, m, e in zip(units, pairing.modules, pairing.max_error)],
    }
    return pairing, info


class PairedModel:
    """The torch model paired with an ONNX graph's units: what GradNorm runs on."""

    def __init__(self, module, pairing, info: dict, input_order: list[str], cache: set[str]) -> None:
        self.module = module
        self.pairing = pairing
        self.info = info
        self.input_order = input_order
        self.cache = cache

    @classmethod
    def load(cls, spec: str, weights, model: onnx.ModelProto, units: Sequence[PrunableUnit],
             data: CalibrationSet, *, provider: str, batch_size: int | None = None) -> "PairedModel":
        """Load `spec` (`MODULE:FACTORY` or `hf:DIR`), check the calibration suits
        it, and pair its modules with `units` (on at most `batch_size` samples)."""
        cache = cache_inputs(model, units)
        module = load_paired_model(spec, None if weights is None else str(weights))
        check_empty_cache(data, cache)
        pairing, info = pair(model, module, units, data, provider, batch_size=batch_size)
        order = [s.name for s in model_inputs(model) if s.name not in cache]
        return cls(module, pairing, info, order, cache)

    def loss_description(self, data: CalibrationSet) -> str:
        from .gradnorm import loss_description

        return loss_description(self.module, data)

    def gradnorm(self, batches) -> np.ndarray:
        """GradNorm per unit over `batches` of (ONNX feed, labels)."""
        from .gradnorm import gradnorm

        return gradnorm(self.module, self.pairing,
                        ((torch_feed(feed, self.cache), labels) for feed, labels in batches), self.input_order)


def pair_units_of(model_path, module, arrays: dict, *, granularity: str, provider: str = "cpu") -> dict:
    """The pairing record (a report's `pairing`) of the units of the model at
    `model_path` with the torch `module`, matched on the calibration `arrays`:
    what `compress --torch-model` records, for a report written without it."""
    from pathlib import Path

    from ..files.calibration import check_calibration
    from ..files.model_files import external_data_folder, load_model_files
    from ..units.discovery import discover
    from ..units.patterns import prepare

    with external_data_folder(Path(model_path).parent):
        source_model, _ = load_model_files(model_path, defer=True)
        model, _ = prepare(source_model)
        data = check_calibration(arrays, model, source=f"the data checked against {model_path}")
        units, _ = discover(model, data, granularity=granularity, provider=provider)
        if not units:
            raise UserError(f"no prunable unit in {model_path}, the model the report was made from")
        check_empty_cache(data, cache_inputs(model, units))
        return pair(model, module, units, data, provider)[1]
