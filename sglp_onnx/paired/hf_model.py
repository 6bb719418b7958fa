"""The paired torch model from a local Hugging Face folder (`--torch-model hf:DIR`).

The class is the one the folder's config names in `architectures` (what
`save_pretrained` wrote); without one, a causal LM, masked LM or bare encoder
Auto class is tried in that order. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError

HF_PREFIX = "hf:"


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def load_hf_model(directory: str | os.PathLike, *, causal_lm: bool = False) -> torch.nn.Module:
    """The model saved in `directory`, in float32 and eval mode; any failure is a UserError.

    With `causal_lm`, only `AutoModelForCausalLM` is tried (what the LM
    exporter needs); otherwise the classes the config's `architectures` name.
    """
    from ..tools.export.torch_export import first_line, quiet_output

    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"Hugging Face model folder not found: {path} (give a folder written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; it is not a Hugging Face model folder")
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face models need transformers: pip install 'sglp-onnx[llm]'") from None
    if causal_lm:
        classes = [transformers.AutoModelForCausalLM]
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many unrelated types for a bad folder
            raise UserError(f"cannot load a model from {path}: its config does not read "
                            f"({first_line(exc)[:300]})") from None
        classes = [getattr(transformers, name) for name in (config.architectures or [])
                   if isinstance(getattr(transformers, name, None), type)]
        if not classes:
            classes = [transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoModel]
    errors = []
    for cls in classes:
        try:
            with quiet_output(True):
                model = cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        except Exception as exc:  # transformers raises many unrelated types for a bad folder
            errors.append(f"{cls.__name__}: {first_line(exc)[:200]}")
            continue
        from ..graph.runtime import apply_torch_threads

        apply_torch_threads()
        return model.float().eval()
    raise UserError(f"cannot load a model from {path} ({'; '.join(errors)})")
