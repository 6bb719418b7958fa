"""The paired torch model from a local Hugging Face folder (`--torch-model hf:DIR`).

The class is the one the folder's config names in `architectures` (what
`save_pretrained` wrote); without one, a causal LM, masked LM or bare encoder
Auto class is tried in that order. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

HF_PREFIX = "hf:"


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def load_hf_model(directory: str | os.PathLike) -> torch.nn.Module:
    """The model saved in `directory`, in float32 and eval mode; any failure is a UserError."""
    from .export import _first_line, _quiet

    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"--torch-model hf:{directory}: folder not found (give a folder written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise UserError(f"--torch-model hf:{directory}: no config.json there; it is not a Hugging Face model folder")
    try:
        import transformers
    except ImportError:
        raise UserError("--torch-model hf:DIR needs transformers: pip install 'sglp-onnx[llm]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many unrelated types for a bad folder
        raise UserError(f"cannot read the config in {path}: {_first_line(exc)[:300]}") from None
    classes = [getattr(transformers, name) for name in (config.architectures or [])
               if isinstance(getattr(transformers, name, None), type)]
    if not classes:
        classes = [transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoModel]
    errors = []
    for cls in classes:
        try:
            with _quiet(True):
                model = cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        except Exception as exc:
            errors.append(f"{cls.__name__}: {_first_line(exc)[:200]}")
            continue
        return model.float().eval()
    raise UserError(f"cannot load a model from {path} ({'; '.join(errors)})")
