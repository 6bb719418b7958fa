"""The torch model paired with the ONNX graph: loading it, matching its
modules to units, and GradNorm."""

from ..lazy import lazy_exports

# `gradnorm` itself is not re-exported: the name is its module's.
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "pairing": ["PairedModel", "cache_inputs", "check_empty_cache", "pair"],
    "hf_model": ["HF_PREFIX", "is_hf_spec", "load_hf_model"],
    "gradnorm": ["TOLERANCE", "first_tensor", "is_causal_lm", "next_token_rows", "relative_error", "run_torch"],
})
