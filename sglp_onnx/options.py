"""Every option of the commands, declared once, in dataclasses by concern.

Each field holds its default, its command-line flag and help, and the check
every value must pass; `cli` makes each command's flags from these fields
and the API's keywords are the field names, so the two cannot drift apart.
Where a command uses a flag for something more particular (the seed of
`calib` draws samples, that of `finetune` orders batches) the field says so
in `helps`, by command; `required` names the commands that need the flag.
Checks run before any work (`checked`).

- `RuntimeOptions`: how the work runs (provider, batch size, seed, sequential,
  activation budget, threads);
- `OutputOptions`: what is written where (output, report, plot, force, dry
  run, --json);
- `TrainingOptions`: what `finetune` trains on and how;
- `ExportOptions`: how a torch model becomes ONNX (`export`, `finetune`);
- `SelectionOptions`: how `analyze` and `compress` measure and choose units,
  the API's combined view: its runtime fields are `RuntimeOptions`' own;
- `CalibOptions`: how `calib` builds a calibration set.
"""

from __future__ import annotations

import math
import os
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Callable

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
EXPORTERS = ("dynamo", "legacy")

Check = Callable[[str, Any], None]  # (flag, value) -> None, or a UserError naming the flag


def _option(flag: str, help: str, *, kind: type | str = str, choices: tuple[str, ...] | None = None,
            metavar: str | None = None, default: Any = None, cli: bool = True, check: Check | None = None,
            short: str | None = None, helps: dict[str, str] | None = None, required: tuple[str, ...] = ()):
    """A dataclass field carrying its flag (and `short` one), its help (`helps`:
    a command's own words), its click type (`kind`: a type, 'file', 'file-or-dash',
    'path' or 'criterion'; `choices`), the commands that require it and its check
    (run on values other than None; `choices` are checked too)."""
    return field(default=default, metadata={
        "flag": flag, "help": help, "kind": kind, "choices": choices, "metavar": metavar, "cli": cli,
        "check": check, "short": short, "helps": helps or {}, "required": required})


def _same(options: type, name: str):
    """A field of another options class, declared there (its default, flag, help and check)."""
    spec = next(f for f in fields(options) if f.name == name)
    return field(default=spec.default, metadata=spec.metadata)


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _whole(low: int) -> Check:
    """A whole number (a bool is not one) >= `low`."""
    def check(flag: str, value: Any) -> None:
        if isinstance(value, bool) or not _is_whole(value) or value < low:
            raise UserError(f"{flag} must be a whole number >= {low}, got {_shown(value)}")
    return check


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True) -> Check:
    """A finite number between `low` and `high` (NaN is refused: no comparison holds)."""
    if high == math.inf:
        says = "a positive number" if low_open and low == 0 else f"a number >= {low:g}"
    else:
        says = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(flag: str, value: Any) -> None:
        if isinstance(value, bool) or not _is_number(value):
            raise UserError(f"{flag} must be {says}, got {_shown(value)}")
        v = float(value)
        above = low < v if low_open else low <= v
        below = v < high if high_open else v <= high
        if not (above and below and math.isfinite(v)):
            raise UserError(f"{flag} must be {says}, got {_shown(value)}")
    return check


def _count(flag: str, value: Any) -> None:
    """--remove: a count of units (3.0 is one)."""
    if isinstance(value, bool) or not _is_number(value) or int(value) != value or value < 0:
        raise UserError(f"{flag} must be a whole number >= 0, got {_shown(value)}")


def _size(flag: str, value: Any) -> None:
    from .evidence.budget import parse_size

    parse_size(value)


def _check_field(spec: Field, value: Any) -> None:
    meta = spec.metadata
    if value is None and spec.default is None and not meta["required"]:  # an optional value not given
        return
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{meta['flag']} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["check"] is not None:
        meta["check"](meta["flag"], value)


class _Declared:
    """What every options class has: its keywords and the checks of its fields."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def checked(self):
        """These options, each value checked by its field; one no run could
        use is refused, naming its flag, before anything is read."""
        for spec in fields(self):
            _check_field(spec, getattr(self, spec.name))
        return self


@dataclass(frozen=True)
class RuntimeOptions(_Declared):
    """How the work runs: where, in batches of what size, seeded how, within what memory."""

    batch_size: int = _option("--batch-size", "Calibration batch size.", kind=int, default=64, check=_whole(1),
                              helps={"eval": "Samples per ONNX Runtime run.",
                                     "finetune": "Training batch size (also of the metrics and --eval-data).",
                                     "bench": "Batch size; repeat for several (--batch-size 1 --batch-size 64). "
                                              "Default 1."})
    provider: str = _option("--provider", "ONNX Runtime execution provider.", choices=PROVIDERS, default="cpu",
                            helps={"finetune": "ONNX Runtime provider for the checks and --eval-data."})
    seed: int = _option("--seed", "Seed for random choices.", kind=int, default=0, check=_whole(0),
                        helps={"calib": "Seed for drawing the samples.",
                               "finetune": "Seed for the batch order and torch."})
    sequential: bool = _option(
        "--sequential", "Calibrate piece by piece (graph cut at unit boundaries, activations spilled to a "
                        "temporary folder) so ONNX Runtime holds one piece's weights at a time: for big models.",
        kind=bool, default=False)
    activation_budget: str = _option(
        "--activation-budget", "Activations any stage holds at once (calibration pass, damage search, fidelity, "
                               "repair fits, gradients): batches are cut into smaller runs to stay within it, so "
                               "peak memory is about the weights plus this. A size such as 512M or 2G.",
        metavar="SIZE", default=DEFAULT_ACTIVATION_BUDGET, check=_size)
    threads: int | None = _option(
        "--threads", "Threads for ONNX Runtime (intra-op; inter-op 1) and torch. Default: 1 on a machine with at "
                     "most 2 cores, else the libraries choose.", kind=int, check=_whole(1))


@dataclass(frozen=True)
class OutputOptions(_Declared):
    """What a command writes, where, and what it prints."""

    output: str | os.PathLike | None = _option(
        "--output", "Output model. Default: MODEL.pruned.onnx.", short="-o", kind="file",
        helps={"finetune": "Output model. Default: PRUNED.finetuned.onnx.", "export": "ONNX file to write.",
               "calib": "Calibration .npz to write."}, required=("export", "calib"))
    report: str | os.PathLike | None = _option(
        "--report", "JSON report; '-' prints it to stdout instead. Default: OUTPUT with .json, or stdout with "
                    "--json.", kind="file-or-dash")
    plot: str | os.PathLike | None = _option(
        "--plot", "Write the CKA heatmap and importances; .png, .svg or .pdf by the suffix.", kind="file")
    force: bool = _option("--force", "Overwrite an existing output or report.", kind=bool, default=False,
                          helps={"analyze": "Overwrite an existing --plot file.",
                                 "calib": "Overwrite an existing output or preview.",
                                 "export": "Overwrite an existing output."})
    dry_run: bool = _option(
        "--dry-run", "Choose the units, measure the fidelity and validate the pruned model in memory; write "
                     "nothing.", kind=bool, default=False)
    as_json: bool = _option(
        "--json", "Print the JSON report to stdout.", kind=bool, default=False,
        helps={"eval": "Print the metrics as JSON.", "bench": "Print the results as JSON.",
               "finetune": "Print the JSON report to stdout too (only there when stdout is redirected to the "
                           "report's path)."})


# Hinton, Vinyals, Dean, "Distilling the knowledge in a neural network" (2015):
# soft targets at temperature T, the KL term scaled by T^2 so that its
# gradients keep their size when T changes.
DEFAULT_TEMPERATURE = 2.0
DEFAULT_DISTILL_WEIGHT = 0.5
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class TrainingOptions(_Declared):
    """What `finetune` trains on, how, and the pruning report it heals (the
    keywords of `sglp_onnx.finetune` besides the torch model and the outputs)."""

    train_data: str | os.PathLike | None = _option(
        "--train-data", ".npz of training inputs (named after the model inputs) and 'labels'.", kind="file",
        required=("finetune",))
    epochs: int | None = _option("--epochs", "Passes over the training data.", kind=int, check=_whole(1),
                                 required=("finetune",))
    lr: float = _option("--lr", "AdamW learning rate (cosine decay to 0).", kind=float, default=DEFAULT_LR,
                        check=_number(0, low_open=True))
    batch_size: int = _same(RuntimeOptions, "batch_size")
    seed: int = _same(RuntimeOptions, "seed")
    distill_weight: float = _option(
        "--distill-weight", "Weight w of the distillation term: (1-w) CE + w T^2 KL(teacher || student), in [0, 1].",
        kind=float, default=DEFAULT_DISTILL_WEIGHT, check=_number(0, 1, high_open=False))
    temperature: float = _option("--temperature", "Distillation temperature T (> 0).", kind=float,
                                 default=DEFAULT_TEMPERATURE, check=_number(0, low_open=True))
    eval_data: str | os.PathLike | None = _option("--eval-data", ".npz to report metrics on before and after.",
                                                  kind="file")
    report: str | os.PathLike | None = _option(
        "--report", "The pruning report of PRUNED.onnx. Default: PRUNED.json beside it.", kind="file")


@dataclass(frozen=True)
class ExportOptions(_Declared):
    """How a torch model becomes ONNX."""

    exporter: str = _option("--exporter", "The torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript).",
                            choices=EXPORTERS, default="dynamo")


@dataclass(frozen=True)
class SelectionOptions(_Declared):
    """How units are measured and chosen (the keywords of `analyze` and `compress`);
    its runtime fields are `RuntimeOptions`' own."""

    calib: str | os.PathLike | None = _option(
        "--calib", "Calibration .npz (arrays named after the model inputs, optional 'labels'), or a folder of "
                   "images or a text file made into one as `sglp-onnx calib` does with its defaults. "
                   "Default: MODEL.calib.npz beside the model.", kind="path")
    remove: int | None = _option("--remove", "Number of units to remove.", kind=int, check=_count)
    ratio: float | None = _option("--ratio", "Fraction of units to remove, in (0, 1). Default 0.25.", kind=float,
                                  check=_number(0, 1, low_open=True))
    target_flops: float | None = _option("--target-flops", "Remove units until this fraction of FLOPs is gone.",
                                         kind=float, check=_number(0, 1, low_open=True))
    max_loss: float | None = _option(
        "--max-loss", "Remove as many units as possible while the held-out fidelity score stays at most X "
                      "(logits: mean KL divergence from the original's outputs in nats per sample or token, "
                      "e.g. 0.05; hidden states: mean cosine distance; else relative L2 error). "
                      "--remove/--ratio/--target-flops then cap it.", kind=float, check=_number(0))
    fidelity_output: str | None = _option(
        "--fidelity-output", "The graph output the fidelity and the measured damage compare. Default: the first "
                             "output, or the first float distribution (logits, probabilities) when the first is "
                             "integer (class ids).", metavar="NAME")
    criterion: str = _option("--criterion", "Layer-selection criterion (see README: Criteria).", kind="criterion",
                             default=DEFAULT_CRITERION)
    segments: int | None = _option("--segments", "Number of Fisher segments K (default: automatic).", kind=int,
                                   check=_whole(1))
    torch_model: str | None = _option(
        "--torch-model", "Factory of the torch model the ONNX file was exported from, or hf:DIR for a "
                         "Hugging Face folder (enables GradNorm).", metavar="MODULE:FACTORY|hf:DIR",
        helps={"finetune": "Factory of the torch model the unpruned ONNX file was exported from, or hf:DIR for a "
                           "Hugging Face causal LM folder (its removed decoder layers are deleted)."},
        required=("finetune",))
    torch_weights: str | os.PathLike | None = _option(
        "--torch-weights", "Weights for --torch-model (.pt state_dict or .safetensors).", kind="file",
        helps={"export": "Weights to load into the model."})
    granularity: str = _option("--granularity", "Prune whole transformer layers, or attention and MLP separately.",
                               choices=GRANULARITIES, default="layer")
    batch_size: int = _same(RuntimeOptions, "batch_size")
    provider: str = _same(RuntimeOptions, "provider")
    seed: int = _same(RuntimeOptions, "seed")
    sequential: bool = _same(RuntimeOptions, "sequential")
    repair: str = _option(
        "--repair", "Closed-form repair at every cut: 'full' fits a least-squares linear map (with bias) from the "
                    "cut's entry to the original's exit on the selection samples and inserts it (1x1 Conv or "
                    "MatMul + Add); 'diagonal' a per-channel scale and bias; 'none' bypasses only. Kept only where "
                    "it improves the held-out fidelity.", choices=REPAIR_FORMS, default=DEFAULT_REPAIR)
    activation_budget: str = _same(RuntimeOptions, "activation_budget")
    max_calib_samples: int | None = _option("--max-calib-samples", "Use at most N calibration samples.", kind=int,
                                            cli=False)

    def checked(self) -> "SelectionOptions":
        """These options with the default budget filled in (a quarter of the
        units when no budget is given), each value checked by its field; a
        value no run could use is refused, naming its flag, before anything is read."""
        budget = [x is not None for x in (self.remove, self.ratio, self.target_flops)]
        if sum(budget) > 1:
            raise UserError("give only one of --remove, --ratio and --target-flops")
        ratio = DEFAULT_RATIO if sum(budget) == 0 and self.max_loss is None else self.ratio
        return super(SelectionOptions, replace(self, ratio=ratio)).checked()

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


def _image_size(size: str | None) -> tuple[int, int] | None:
    """--size as (height, width)."""
    if size is None:
        return None
    try:
        dims = tuple(int(d) for d in str(size).split(","))
    except ValueError:
        dims = ()
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise UserError(f"--size must be HEIGHT,WIDTH or one number (whole numbers >= 1), got {size!r}")
    return dims


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


def _positive_floats(flag: str, value: str) -> None:
    if any(v <= 0 for v in _floats(flag, value)):
        raise UserError(f"{flag} values must be > 0, got {value}")


@dataclass(frozen=True)
class CalibOptions(_Declared):
    """How `sglp-onnx calib` turns images or text into a calibration set (the
    keywords of `sglp_onnx.make_calibration`)."""

    samples: int = _option("--samples", "Samples to write (at most; drawn at random with --seed when there are "
                                        "more). 128-512 is plenty for selection; a fifth is held out for fidelity.",
                           kind=int, default=DEFAULT_CALIB_SAMPLES, check=_whole(1))
    seed: int = _same(RuntimeOptions, "seed")
    seq_len: int | None = _option("--seq-len", "Text: tokens per sequence. Default: the model's fixed length, "
                                                "else 128.", kind=int, check=_whole(1))
    tokenizer: str | os.PathLike | None = _option(
        "--tokenizer", "Text: tokenizer.json, or a folder holding one. Default: tokenizer.json beside the model.",
        metavar="PATH")
    size: str | None = _option("--size", "Images: HEIGHT,WIDTH (or one number) of the model input when the graph "
                                         "leaves it open.", metavar="H,W", check=lambda flag, size: _image_size(size))
    preset: str | None = _option(
        "--preset", "Images: normalisation. imagenet: (x/255 - mean) / std with ImageNet's mean and std; "
                    "inception: x/127.5 - 1; unit: x/255; raw: 0..255. Default: raw for integer inputs, imagenet "
                    "for 3-channel float inputs, unit for the others.", choices=PRESETS)
    mean: str | None = _option("--mean", "Images: per-channel mean on the 0..1 scale (one value or one per "
                                         "channel), replacing the preset's.", metavar="M[,M,M]", check=_floats)
    std: str | None = _option("--std", "Images: per-channel std on the 0..1 scale, replacing the preset's.",
                              metavar="S[,S,S]", check=_positive_floats)
    channel_order: str = _option("--channel-order", "Images: colour order of the model's channels.",
                                 choices=CHANNEL_ORDERS, default="rgb")
    layout: str | None = _option("--layout", "Images: the input's layout when the graph does not tell it "
                                             "(the axis of 1 or 3 channels).", choices=LAYOUTS)
    crop_fraction: float = _option(
        "--crop-fraction", "Images: the short side is resized to SIZE / F, then the centre SIZE is cropped "
                           "(0.875: 256 -> 224).", kind=float, default=0.875, check=_number(0, 1, low_open=True,
                                                                                             high_open=False))

    def image_size(self) -> tuple[int, int] | None:
        """--size as (height, width)."""
        return _image_size(self.size)

    def channel_stats(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(--mean, --std) as numbers, None where not given."""
        return _floats("--mean", self.mean), _floats("--std", self.std)
