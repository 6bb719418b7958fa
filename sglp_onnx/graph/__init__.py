"""The graph as data: an index of producers, consumers and constants, the op
tables, ONNX Runtime sessions, and FLOPs and parameter counts."""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "index": ["GraphIndex", "NAME_SCOPES_KEY", "declared_dims", "is_weighted_head", "subgraph_references",
              "walk_back"],
    "ops": [
        "ATTENTION_OPS", "CONTRIB_DOMAIN", "CONV_OPS", "FEATURE_NORM_OPS", "LINEAR_OPS", "ONNX_DOMAINS",
        "PASS_THROUGH_OPS", "QUANTIZATION_PRESERVING_OPS", "SHAPE_DETERMINED_OPS", "SHAPE_ONLY_OPS", "is_contrib",
        "is_onnx", "quantized_operands",
    ],
    "flops": ["model_params", "node_flops", "packed_weights", "quantization_roles", "tensors_needed"],
    "runtime": [
        "InputSession", "apply_torch_threads", "blas_threads", "check_thread_count", "input_model_errors",
        "make_session", "provider_chain", "release_memory", "session_with_outputs", "set_threads", "set_verbose",
    ],
})
