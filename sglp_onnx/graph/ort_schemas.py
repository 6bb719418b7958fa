"""ONNX Runtime's own ops in the default domain, made known to onnx.checker.

ONNX Runtime registers `SimplifiedLayerNormalization` (RMS norm) in the
ONNX domain, which ONNX itself does not define at any opset. Its
transformer optimizer and the onnxruntime-genai builder emit it (the
builder's Llama graphs normalise layer 0's input with one), and
`onnx.checker` refuses every such model ("No Op registered for
SimplifiedLayerNormalization with domain_version of 22"), although ONNX
Runtime runs it. `register()` copies ONNX Runtime's schema of this op into
onnx's schema registry, once per process, so the checker checks those nodes
(inputs, attributes, types) like any other.

ONNX Runtime also runs `LayerNormalization` below opset 17, where ONNX has
none; that stays refused (a standard op used before its opset), as the
input check has always done.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

# Default-domain ops ONNX Runtime defines and ONNX does not, that exporters and optimizers emit.
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)

_registered = False


def register() -> None:
    """Make onnx.checker accept ONNX Runtime's default-domain RMS norm (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return
    for schema in ort_c.get_all_operator_schema():
        if schema.domain not in ("", "ai.onnx") or schema.name not in ORT_ONNX_DOMAIN_OPS:
            continue
        if onnx.defs.has(schema.name, schema.since_version, ""):
            continue
        try:
            onnx.defs.register_schema(_onnx_schema(schema))
        except Exception:  # an onnx without this registry API: the checker stays as strict as it was
            continue


def _onnx_schema(schema) -> OpSchema:
    def parameters(items):
        return [OpSchema.FormalParameter(p.name, p.typeStr, p.description or "",
                                         param_option=OpSchema.FormalParameterOption(int(p.option.value)),
                                         is_homogeneous=p.isHomogeneous)
                for p in items]

    attributes = []
    for name, attribute in schema.attributes.items():
        default = onnx.AttributeProto()
        raw = attribute._default_value
        if raw:
            default.ParseFromString(raw)
        if default.name:
            attributes.append(OpSchema.Attribute(name, default, attribute.description or ""))
        else:
            attributes.append(OpSchema.Attribute(name, OpSchema.AttrType(int(attribute.type.value)),
                                                 attribute.description or "", required=attribute.required))
    return OpSchema(
        schema.name, "", schema.since_version, doc=schema.doc or "",
        inputs=parameters(schema.inputs), outputs=parameters(schema.outputs),
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description or "")
                          for t in schema.type_constraints],
        attributes=attributes,
    )
