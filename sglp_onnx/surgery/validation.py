"""The gate every output passes before it is written: full ONNX check, an
ONNX Runtime run, the input/output signature, finite outputs, and exact
reproduction of the input model when nothing was removed.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..errors import UserError, ValidationError
from ..evidence.executor import Executor
from ..graph.index import declared_dims
from ..files.model_files import checkable
from ..graph.runtime import make_session


@dataclass
class ValidationResult:
    checker: bool = False
    runs: bool = False
    signature: bool = False
    finite: bool = False
    opset_ir_kept: bool = False
    exact_when_nothing_removed: bool | None = None
    top1_agreement: float | None = None
    max_abs_output_diff: float | None = None
    removed_outputs: list[str] = field(default_factory=list)
    removed_inputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _signature(model: onnx.ModelProto) -> tuple[dict, dict]:
    """Every graph input (those with an initializer too: an overridable
    weight is part of what callers may feed) and output, with its declared
    type: a sequence or map output by its whole type, a tensor by its element
    type and dims."""

    def describe(vi):
        if not vi.type.HasField("tensor_type"):
            return vi.type.SerializeToString(), None
        return vi.type.tensor_type.elem_type, declared_dims(vi)

    inputs = {i.name: describe(i) for i in model.graph.input}
    outputs = {o.name: describe(o) for o in model.graph.output}
    return inputs, outputs


def full_check(model: onnx.ModelProto) -> None:
    from ..graph.ort_schemas import register as register_ort_schemas

    register_ort_schemas()  # ONNX Runtime's SimplifiedLayerNormalization (the genai builder's RMS norm)
    with _without_contradicted_constant_types(model), checkable(model) as source:
        onnx.checker.check_model(source if isinstance(source, onnx.ModelProto) else str(source), full_check=True)


@contextlib.contextmanager
def _without_contradicted_constant_types(model: onnx.ModelProto):
    """`model` without the value_info of Constant outputs whose declared shape
    contradicts the constant itself, while the block runs (restored after).

    The onnxruntime-genai builder declares its 1-element constant `[1]` as a
    scalar; ONNX Runtime uses the constant, but the checker's shape inference
    refuses the declaration (and so every model the builder writes)."""
    constants = {n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                 for a in n.attribute if a.name == "value"}
    if not constants:
        yield
        return
    kept, dropped = [], False
    original = list(model.graph.value_info)
    for vi in original:
        dims = declared_dims(vi) if vi.name in constants else None
        actual = tuple(constants[vi.name].dims) if dims is not None else ()
        if dims is not None and (len(dims) != len(actual) or any(
                isinstance(d, int) and d != a for d, a in zip(dims, actual))):
            dropped = True
            continue
        kept.append(vi)
    if not dropped:
        yield
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    try:
        yield
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(original)


def check_standalone(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, provider: str = "cpu",
                     what: str = "the model") -> dict[str, bool]:
    """Full checker, one ONNX Runtime run on `feed` (inputs the model lacks are
    ignored) and finite float outputs, for a model with no reference to compare
    against; ValidationError names the first failed check."""
    try:
        full_check(model)
    except Exception as exc:
        raise ValidationError(f"{what} fails onnx.checker: {exc}") from exc
    try:
        session = make_session(model, provider)
        names = {i.name for i in session.get_inputs()}
        values = session.run(None, {k: v for k, v in feed.items() if k in names})
    except UserError:  # an unusable provider is the caller's to fix
        raise
    except Exception as exc:
        raise ValidationError(f"ONNX Runtime cannot run {what}: {exc}") from exc
    bad = [o.name for o, v in zip(model.graph.output, values)
           if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if bad:
        raise ValidationError(f"{what} outputs NaN/Inf in {', '.join(bad)}")
    return {"checker": True, "runs": True, "finite": True}


def _check_signature(original: onnx.ModelProto, pruned: onnx.ModelProto, removed_inputs: set[str],
                     removed_outputs: set[str]) -> tuple[dict, dict]:
    """The pruned model's inputs and outputs: exactly the original's, in order,
    minus the KV-cache entries of removed layers (the report's removed_*)."""
    in_orig, out_orig = _signature(original)
    in_new, out_new = _signature(pruned)
    expected_in = {k: v for k, v in in_orig.items() if k not in removed_inputs}
    expected_out = {k: v for k, v in out_orig.items() if k not in removed_outputs}
    if in_new != expected_in or list(in_new) != [k for k in in_orig if k not in removed_inputs] \
            or list(out_new) != [k for k in out_orig if k not in removed_outputs] or out_new != expected_out:
        raise ValidationError(
            f"signature changed: inputs {sorted(in_new)} vs {sorted(expected_in)}, "
            f"outputs {list(out_new)} vs {list(expected_out)}"
        )
    return in_new, out_new


def _closeness(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """(largest absolute difference, top-1 agreement) of two float outputs of one shape; None where not defined."""
    if a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
        return None, None
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf where both overflowed
        diff = float(np.abs(a.astype(np.float64) - b).max(initial=0.0))
    agreement = float(np.mean(a.argmax(-1) == b.argmax(-1))) if a.ndim >= 2 else None
    return (diff if np.isfinite(diff) else None), agreement


def validate(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    *,
    removed_outputs: set[str],
    removed_inputs: set[str],
    nothing_removed: bool,
    provider: str = "cpu",
    reference: dict[str, np.ndarray] | None = None,
    scored_output: str | None = None,
) -> ValidationResult:
    """Check `pruned` against `original` on one batch; raise ValidationError on any failure.

    `scored_output`: the output the agreement and largest difference are
    measured on (the fidelity's, `fidelity.output_kind`; default the first).

    `reference`: the original's outputs on `feed` when the caller computed
    them already (piece by piece, `--sequential`); else a session on
    `original` computes them once the pruned model's session is closed."""
    result = ValidationResult()
    try:
        full_check(pruned)
    except Exception as exc:
        raise ValidationError(f"onnx.checker rejected the pruned model: {exc}") from exc
    result.checker = True

    if pruned.ir_version != original.ir_version or {(o.domain, o.version) for o in pruned.opset_import} != {
        (o.domain, o.version) for o in original.opset_import
    }:
        raise ValidationError("the pruned model's opset or IR version differs from the input's")
    result.opset_ir_kept = True

    in_new, out_new = _check_signature(original, pruned, removed_inputs, removed_outputs)
    result.signature = True
    result.removed_inputs = sorted(removed_inputs)
    result.removed_outputs = sorted(removed_outputs)

    try:
        session = make_session(pruned, provider)
        new_values = dict(zip([o.name for o in session.get_outputs()],
                              session.run(None, {k: v for k, v in feed.items() if k in in_new})))
    except Exception as exc:
        raise ValidationError(f"ONNX Runtime cannot run the pruned model: {exc}") from exc
    result.runs = True
    del session  # one model's weights in ONNX Runtime at a time: matters for big models

    if reference is None:
        reference_session = make_session(original, provider)
        ref_values = dict(zip([o.name for o in reference_session.get_outputs()], reference_session.run(None, feed)))
        del reference_session
    else:
        ref_values = reference
    for name, value in new_values.items():
        ref = ref_values[name]
        if np.issubdtype(value.dtype, np.floating) and np.all(np.isfinite(ref)) and not np.all(np.isfinite(value)):
            raise ValidationError(f"the pruned model produced NaN/Inf in output {name!r}")
    result.finite = True

    first = scored_output if scored_output in new_values else next(iter(out_new))
    result.max_abs_output_diff, result.top1_agreement = _closeness(new_values[first], ref_values[first])
    if nothing_removed:
        exact = all(np.array_equal(new_values[k], ref_values[k]) for k in new_values)
        if not exact:
            raise ValidationError("with nothing removed the output differs from the input model's")
        result.exact_when_nothing_removed = True
    return result


def validation_reference(model: onnx.ModelProto, units, removed: list[int], feed: dict[str, np.ndarray], *,
                         rewritten: bool, first_outputs: dict | None, executor: Executor,
                         provider: str) -> dict | None:
    """The original's outputs on the validation batch without a session on the
    whole original: from the calibration pass (`first_outputs`), which ran
    that very batch first; with a piecewise `executor` and no calibration
    pass, piece by piece. None (validation then runs the original itself)
    when nothing was removed (the output must be bit-identical to the
    input's, so both come from plain sessions), when the patterns `rewritten`
    the file, or with neither a piecewise executor nor a calibration pass."""
    if not removed or rewritten:
        return None
    rows = next(iter(feed.values())).shape[0]
    if first_outputs is not None and all(v.ndim and v.shape[0] == rows for v in first_outputs.values()):
        return first_outputs
    if not executor.piecewise:
        return None
    from ..evidence.sequential import probe_sequential, residual_boundaries

    return probe_sequential(model, feed, [], provider=provider,
                            boundaries=[u.exit for u in units] + residual_boundaries(model))


def validate_pruned(analysis, pruned: onnx.ModelProto, *, executor: Executor, provider: str):
    """`validate` the `pruned` model of an `analysis` (`pipeline.Analysis`)
    against its input on the validation batch, and return the result and that
    batch; a failure is a bug (InternalError): nothing is written."""
    from ..errors import InternalError
    from ..files.model_files import initializer_bytes
    from ..graph.runtime import release_memory
    from .remove import dropped_weight_inputs

    # The stages' sessions are closed: the pruned model's opens next.
    release_memory(initializer_bytes(analysis.model))
    removed = analysis.removed_units
    feed = analysis.calib.first(min(analysis.validation_rows, analysis.calib.n_samples))
    original = analysis.source_model or analysis.model
    reference = validation_reference(analysis.model, analysis.units, analysis.selection.removed, feed,
                                     rewritten=analysis.source_model is not None,
                                     first_outputs=analysis.first_outputs, executor=executor,
                                     provider=provider)
    try:
        return validate(
            original, pruned, feed, reference=reference,
            removed_outputs={o for u in removed for o in u.owned_outputs},
            removed_inputs={i for u in removed for i in u.owned_inputs} | dropped_weight_inputs(original, pruned),
            nothing_removed=not removed, provider=provider,
            scored_output=analysis.report["fidelity"]["output"] if analysis.report.get("fidelity") else None,
        ), feed
    except ValidationError as exc:
        raise InternalError(f"the pruned model failed validation, so nothing was written: {exc}") from exc
