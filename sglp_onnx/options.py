"""The selection options of `analyze` and `compress`, declared once.

`SelectionOptions` holds each option's default, its command-line flag and
help, and the checks every value must pass; `cli` makes its flags from these
fields and the API's keywords are the field names, so the two cannot drift
apart. Checks run before any work (`SelectionOptions.check`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import UserError

PROVIDERS = ("cpu", "cuda", "tensorrt")
GRANULARITIES = ("layer", "sublayer")
DEFAULT_CRITERION = "damage"
DEFAULT_RATIO = 0.25
# Repair maps at the cuts (sglp_onnx.repair): a full linear map, a per-channel
# scale and bias, or none; the default is what won `make bench-quality`.
REPAIR_FORMS = ("full", "diagonal", "none")
DEFAULT_REPAIR = "full"
# --activation-budget: with the interpreter and its libraries (about 0.4 GiB)
# and the weights, a ResNet-50 at batch 64 then peaks within 2x its weights + 1.2 GiB.
DEFAULT_ACTIVATION_BUDGET = "768M"


def _option(flag: str, help: str, *, kind: type | str = str, choices: tuple[str, ...] | None = None,
            metavar: str | None = None, default: Any = None, cli: bool = True):
    """A dataclass field carrying its flag, its help and its click type."""
    return field(default=default, metadata={"flag": flag, "help": help, "kind": kind, "choices": choices,
                                            "metavar": metavar, "cli": cli})


@dataclass(frozen=True)
class SelectionOptions:
    """How units are measured and chosen (the keywords of `analyze` and `compress`)."""

    calib: str | os.PathLike | None = _option(
        "--calib", "Calibration .npz (arrays named after the model inputs, optional 'labels'), or a folder of "
                   "images or a text file made into one as `sglp-onnx calib` does with its defaults. "
                   "Default: MODEL.calib.npz beside the model.", kind="path")
    remove: int | None = _option("--remove", "Number of units to remove.", kind=int)
    ratio: float | None = _option("--ratio", "Fraction of units to remove, in (0, 1). Default 0.25.", kind=float)
    target_flops: float | None = _option("--target-flops", "Remove units until this fraction of FLOPs is gone.",
                                         kind=float)
    max_loss: float | None = _option(
        "--max-loss", "Remove as many units as possible while the held-out fidelity score stays at most X "
                      "(logits: mean KL divergence from the original's outputs in nats per sample or token, "
                      "e.g. 0.05; hidden states: mean cosine distance; else relative L2 error). "
                      "--remove/--ratio/--target-flops then cap it.", kind=float)
    fidelity_output: str | None = _option(
        "--fidelity-output", "The graph output the fidelity and the measured damage compare. Default: the first "
                             "output, or the first float distribution (logits, probabilities) when the first is "
                             "integer (class ids).", metavar="NAME")
    criterion: str = _option("--criterion", "Layer-selection criterion (see README: Criteria).", kind="criterion",
                             default=DEFAULT_CRITERION)
    segments: int | None = _option("--segments", "Number of Fisher segments K (default: automatic).", kind=int)
    torch_model: str | None = _option(
        "--torch-model", "Factory of the torch model the ONNX file was exported from, or hf:DIR for a "
                         "Hugging Face folder (enables GradNorm).", metavar="MODULE:FACTORY|hf:DIR")
    torch_weights: str | os.PathLike | None = _option(
        "--torch-weights", "Weights for --torch-model (.pt state_dict or .safetensors).", kind="file")
    granularity: str = _option("--granularity", "Prune whole transformer layers, or attention and MLP separately.",
                               choices=GRANULARITIES, default="layer")
    batch_size: int = _option("--batch-size", "Calibration batch size.", kind=int, default=64)
    provider: str = _option("--provider", "ONNX Runtime execution provider.", choices=PROVIDERS, default="cpu")
    seed: int = _option("--seed", "Seed for random choices.", kind=int, default=0)
    sequential: bool = _option(
        "--sequential", "Calibrate piece by piece (graph cut at unit boundaries, activations spilled to a "
                        "temporary folder) so ONNX Runtime holds one piece's weights at a time: for big models.",
        kind=bool, default=False)
    repair: str = _option(
        "--repair", "Closed-form repair at every cut: 'full' fits a least-squares linear map (with bias) from the "
                    "cut's entry to the original's exit on the selection samples and inserts it (1x1 Conv or "
                    "MatMul + Add); 'diagonal' a per-channel scale and bias; 'none' bypasses only. Kept only where "
                    "it improves the held-out fidelity.", choices=REPAIR_FORMS, default=DEFAULT_REPAIR)
    activation_budget: str = _option(
        "--activation-budget", "Activations any stage holds at once (calibration pass, damage search, fidelity, "
                               "repair fits, gradients): batches are cut into smaller runs to stay within it, so "
                               "peak memory is about the weights plus this. A size such as 512M or 2G.",
        metavar="SIZE", default=DEFAULT_ACTIVATION_BUDGET)
    max_calib_samples: int | None = _option("--max-calib-samples", "Use at most N calibration samples.", kind=int,
                                            cli=False)

    def checked(self) -> "SelectionOptions":
        """These options with the default budget filled in (a quarter of the
        units when no budget is given); a value no run could use is refused,
        naming its flag, before anything is read."""
        budget = [x is not None for x in (self.remove, self.ratio, self.target_flops)]
        if sum(budget) > 1:
            raise UserError("give only one of --remove, --ratio and --target-flops")
        max_loss = self.max_loss
        if max_loss is not None and (isinstance(max_loss, bool) or not _is_number(max_loss)
                                     or not math.isfinite(float(max_loss)) or float(max_loss) < 0):
            raise UserError(f"--max-loss must be a number >= 0, got {max_loss}")
        remove = self.remove
        if remove is not None and (isinstance(remove, bool) or int(remove) != remove or remove < 0):
            raise UserError(f"--remove must be a whole number >= 0, got {remove}")
        ratio = DEFAULT_RATIO if sum(budget) == 0 and max_loss is None else self.ratio
        if ratio is not None and not (0.0 < float(ratio) < 1.0):
            raise UserError(f"--ratio must be in (0, 1), got {ratio}")
        if self.target_flops is not None and not (0.0 < float(self.target_flops) < 1.0):
            raise UserError(f"--target-flops must be in (0, 1), got {self.target_flops}")
        if isinstance(self.batch_size, bool) or not _is_whole(self.batch_size) or self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if isinstance(self.seed, bool) or not _is_whole(self.seed) or self.seed < 0:
            raise UserError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        if self.segments is not None and self.segments < 1:
            raise UserError(f"--segments must be at least 1, got {self.segments}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.repair not in REPAIR_FORMS:
            raise UserError(f"--repair must be one of {', '.join(REPAIR_FORMS)}, got {self.repair!r}")
        from .evidence.budget import parse_size

        parse_size(self.activation_budget)
        if self.provider not in PROVIDERS:
            raise UserError(f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        return replace(self, ratio=ratio)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any], caller: str) -> "SelectionOptions":
        """The checked options an API call's `keywords` give; an unknown one
        is the TypeError Python raises for an unexpected keyword."""
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**keywords).checked()

    @classmethod
    def split(cls, keywords: dict[str, Any]) -> tuple["SelectionOptions", dict[str, Any]]:
        """The selection options among `keywords`, and the other keywords."""
        names = set(cls.names())
        return cls(**{k: v for k, v in keywords.items() if k in names}), \
            {k: v for k, v in keywords.items() if k not in names}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_whole(value: Any) -> bool:
    try:
        import numpy as np

        return isinstance(value, (int, np.integer))
    except ImportError:  # pragma: no cover - numpy is a dependency
        return isinstance(value, int)


PRESETS = ("imagenet", "inception", "unit", "raw")
LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
DEFAULT_CALIB_SAMPLES = 256


@dataclass(frozen=True)
class CalibOptions:
    """How `sglp-onnx calib` turns images or text into a calibration set (the
    keywords of `sglp_onnx.make_calibration`)."""

    samples: int = _option("--samples", "Samples to write (at most; drawn at random with --seed when there are "
                                        "more). 128-512 is plenty for selection; a fifth is held out for fidelity.",
                           kind=int, default=DEFAULT_CALIB_SAMPLES)
    seed: int = _option("--seed", "Seed for drawing the samples.", kind=int, default=0)
    seq_len: int | None = _option("--seq-len", "Text: tokens per sequence. Default: the model's fixed length, "
                                                "else 128.", kind=int)
    tokenizer: str | os.PathLike | None = _option(
        "--tokenizer", "Text: tokenizer.json, or a folder holding one. Default: tokenizer.json beside the model.",
        metavar="PATH")
    size: str | None = _option("--size", "Images: HEIGHT,WIDTH (or one number) of the model input when the graph "
                                         "leaves it open.", metavar="H,W")
    preset: str | None = _option(
        "--preset", "Images: normalisation. imagenet: (x/255 - mean) / std with ImageNet's mean and std; "
                    "inception: x/127.5 - 1; unit: x/255; raw: 0..255. Default: raw for integer inputs, imagenet "
                    "for 3-channel float inputs, unit for the others.", choices=PRESETS)
    mean: str | None = _option("--mean", "Images: per-channel mean on the 0..1 scale (one value or one per "
                                         "channel), replacing the preset's.", metavar="M[,M,M]")
    std: str | None = _option("--std", "Images: per-channel std on the 0..1 scale, replacing the preset's.",
                              metavar="S[,S,S]")
    channel_order: str = _option("--channel-order", "Images: colour order of the model's channels.",
                                 choices=CHANNEL_ORDERS, default="rgb")
    layout: str | None = _option("--layout", "Images: the input's layout when the graph does not tell it "
                                             "(the axis of 1 or 3 channels).", choices=LAYOUTS)
    crop_fraction: float = _option(
        "--crop-fraction", "Images: the short side is resized to SIZE / F, then the centre SIZE is cropped "
                           "(0.875: 256 -> 224).", kind=float, default=0.875)

    def checked(self) -> "CalibOptions":
        """A value no run could use is refused, naming its flag, before anything is read."""
        for flag, value, low in (("--samples", self.samples, 1), ("--seed", self.seed, 0),
                                 ("--seq-len", self.seq_len, 1)):
            if value is not None and (isinstance(value, bool) or not _is_whole(value) or value < low):
                raise UserError(f"{flag} must be a whole number >= {low}, got {value!r}")
        if not (_is_number(self.crop_fraction) and 0.0 < float(self.crop_fraction) <= 1.0):
            raise UserError(f"--crop-fraction must be in (0, 1], got {self.crop_fraction!r}")
        self.image_size()
        for flag, value in (("--mean", self.mean), ("--std", self.std)):
            _floats(flag, value)
        if any(v <= 0 for v in _floats("--std", self.std) or ()):
            raise UserError(f"--std values must be > 0, got {self.std}")
        for flag, value, allowed in (("--preset", self.preset, PRESETS), ("--layout", self.layout, LAYOUTS),
                                     ("--channel-order", self.channel_order, CHANNEL_ORDERS)):
            if value is not None and value not in allowed:
                raise UserError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        return self

    def image_size(self) -> tuple[int, int] | None:
        """--size as (height, width)."""
        if self.size is None:
            return None
        try:
            dims = tuple(int(d) for d in str(self.size).split(","))
        except ValueError:
            dims = ()
        if len(dims) == 1:
            dims = dims * 2
        if len(dims) != 2 or min(dims) < 1:
            raise UserError(f"--size must be HEIGHT,WIDTH or one number (whole numbers >= 1), got {self.size!r}")
        return dims

    def channel_stats(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(--mean, --std) as numbers, None where not given."""
        return _floats("--mean", self.mean), _floats("--std", self.std)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _floats(flag: str, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in str(value).split(","))
    except ValueError:
        numbers = ()
    if len(numbers) not in (1, 3) or not all(math.isfinite(v) for v in numbers):
        raise UserError(f"{flag} must be one number or three, comma-separated (0..1 scale), got {value!r}")
    return numbers
