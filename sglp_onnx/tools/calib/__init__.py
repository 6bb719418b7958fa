"""`sglp-onnx calib`: a calibration `.npz` for a model from what users have,
a folder of images or text files, with the model's input layout and the
tokenizer beside the model read from what is there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ...errors import UserError
from ...files.calibration import check_calibration, format_shape, model_inputs
from ...files.model_files import atomic_paths, check_output_path, load_model
from ...options import CalibOptions
from . import images, text

# Fewer samples than this leave the held-out fidelity resting on a handful.
FEW_SAMPLES = 50
_IMAGE_FLAGS = ("size", "preset", "mean", "std", "layout")
_TEXT_FLAGS = ("seq_len", "tokenizer")
# Files that `compress --calib` makes a set from (any other file is read as an .npz).
SOURCE_SUFFIXES = images.IMAGE_SUFFIXES + text.TEXT_SUFFIXES


@dataclass
class CalibrationData:
    """The arrays of a calibration set and where they came from."""

    arrays: dict[str, np.ndarray]
    kind: str  # "images" or "text"
    sources: list[Path]
    details: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    preview: np.ndarray | None = None  # uint8 crops (samples, height, width, channels), images only

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.arrays.values())))


@dataclass
class CalibResult:
    data: CalibrationData
    output: Path
    preview: Path | None

    def summary(self) -> str:
        d = self.data
        names = ", ".join(str(p) for p in d.sources[:3]) + (f" and {len(d.sources) - 3} more"
                                                             if len(d.sources) > 3 else "")
        lines = [f"wrote {self.output}: {d.n_samples} samples from {len(d.sources)} {d.kind} file(s) ({names})"]
        lines += [f"  {line}" for line in d.details]
        empty = {n: a for n, a in d.arrays.items() if a.size == 0}
        for name, array in d.arrays.items():
            if name not in empty:
                lines.append(f"  {name}: {array.dtype.name} {list(array.shape)}")
        if empty:
            shapes = sorted({f"{a.dtype.name} {list(a.shape)}" for a in empty.values()})
            lines.append(f"  {len(empty)} empty past input(s) ({next(iter(empty))}, ...): {', '.join(shapes)} "
                         "(whole sequences, no cache)")
        if self.preview is not None:
            lines.append(f"  preview of what the model sees: {self.preview}")
        lines += [f"warning: {w}" for w in d.warnings]
        return "\n".join(lines)


def calibration_data(model_path: str | Path, inputs: list[str | Path], model: onnx.ModelProto | None = None,
                     **options) -> CalibrationData:
    """The calibration arrays for the model at `model_path` from `inputs` (image
    or text files and folders); keywords are the fields of `CalibOptions`."""
    opts = CalibOptions(**options).checked()
    model_path = Path(model_path)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("give at least one INPUT: a folder of images, or text files")
    for path in paths:
        if not path.exists():
            raise UserError(f"input not found: {path}")
    if model is None:
        model = load_model(model_path, load_external_data=False)
    specs = model_inputs(model)
    rng = np.random.default_rng(opts.seed)
    if text.token_input(model, specs) is not None:
        _refuse_flags(opts, _IMAGE_FLAGS, "images")
        data = _from_text(model, model_path, specs, paths, opts, rng)
    else:
        pictures = [s for s in specs if images.is_image_input(s)]
        if len(pictures) != 1 or len(specs) != 1:
            described = ", ".join(f"{s.name!r} ({np.dtype(s.dtype).name} {format_shape(s.shape)})" for s in specs)
            raise UserError(f"cannot build the inputs of {model_path} ({described}) from images or text: calib "
                            "makes one image input (rank 4) or token ids; write the .npz yourself (see README)")
        _refuse_flags(opts, _TEXT_FLAGS, "text")
        data = _from_images(pictures[0], paths, opts, rng)
    calib = check_calibration(data.arrays, model, source="the calibration data built")
    data.arrays = dict(calib.inputs)
    if data.n_samples < FEW_SAMPLES:
        data.warnings.append(f"only {data.n_samples} samples: fidelity is measured on a fifth of them; "
                             f"{FEW_SAMPLES} or more (128-512 is plenty) give steadier choices")
    return data


def make_calibration(model: str | Path, inputs: list[str | Path], output: str | Path, *, force: bool = False,
                     preview: str | Path | None = None, **options) -> CalibResult:
    """Write the calibration `.npz` (and the --preview PNG of what the model
    sees) for `model` from `inputs`; nothing is written on an error."""
    CalibOptions(**options).checked()
    output, model_path = Path(output), Path(model)
    if output.suffix != ".npz":
        raise UserError(f"the output {output} must end in .npz")
    sources = [model_path, *(Path(p) for p in inputs)]
    check_output_path(output, force=force, what="output", inputs=sources)
    if preview is not None:
        preview = Path(preview)
        if preview.suffix.lower() != ".png":
            raise UserError(f"--preview {preview} must end in .png")
        if preview.resolve() == output.resolve():
            raise UserError("--preview and -o name the same file")
        check_output_path(preview, force=force, what="preview", inputs=sources)
    data = calibration_data(model_path, list(inputs), **options)
    if preview is not None and data.preview is None:
        raise UserError("--preview shows images; the model reads text")
    targets = [output] + ([preview] if preview is not None else [])
    with atomic_paths(*targets, overwrite=force) as temps:
        buffer = io.BytesIO()
        np.savez(buffer, **data.arrays)
        temps[0].write_bytes(buffer.getvalue())
        if preview is not None:
            images.write_preview(data.preview, temps[1])
    return CalibResult(data=data, output=output, preview=preview)


def _from_text(model: onnx.ModelProto, model_path: Path, specs, paths: list[Path], opts: CalibOptions,
               rng: np.random.Generator) -> CalibrationData:
    roles = text.text_roles(model, specs)
    seq_len = text.default_seq_len(roles.tokens, opts.seq_len)
    documents: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in text.TEXT_SUFFIXES)
            if not inside:
                raise UserError(f"no text files found in {path} (looked for {', '.join(text.TEXT_SUFFIXES)})")
            documents.extend(inside)
        else:
            documents.append(path)
    tokenizer_path = text.find_tokenizer(model_path, None if opts.tokenizer is None else str(opts.tokenizer))
    tokenizer = text.load_tokenizer(tokenizer_path)
    stream = text.token_stream(tokenizer, documents)
    source = documents[0] if len(documents) == 1 else f"the {len(documents)} text files"
    windows = text.pack(stream, seq_len, samples=opts.samples, rng=rng, source=str(source))
    text.check_vocabulary(windows, roles.vocab, tokenizer_path)
    available = len(stream) // seq_len
    details = [f"tokenizer {tokenizer_path}: {len(stream)} tokens, {available} sequences of {seq_len} "
               f"({len(windows)} drawn with seed {opts.seed})" if available > len(windows) else
               f"tokenizer {tokenizer_path}: {len(stream)} tokens, {available} sequences of {seq_len} (all used)"]
    return CalibrationData(arrays=text.text_arrays(roles, windows), kind="text", sources=documents, details=details)


def _from_images(spec, paths: list[Path], opts: CalibOptions, rng: np.random.Generator) -> CalibrationData:
    target = images.image_input(spec, layout=opts.layout, size=opts.image_size())
    mean, std = opts.channel_stats()
    preset, mean_px, std_px = images.normalisation(target, opts.preset, mean, std)
    found = images.find_images(paths)
    chosen = found if len(found) <= opts.samples else \
        [found[k] for k in np.sort(rng.choice(len(found), opts.samples, replace=False))]
    crops = np.stack([images.load_crop(p, target, float(opts.crop_fraction)) for p in chosen])
    array = images.to_model(crops, target, mean_px, std_px, opts.channel_order)
    if preset == "raw":
        scaling = "raw 0..255"
    else:
        scaling = (f"preset {preset}: (x/255 - mean) / std, mean {_fmt(mean_px / 255)}, std {_fmt(std_px / 255)}")
    details = [f"model input {spec.name!r}: {target.describe()}, channel order "
               f"{opts.channel_order if target.channels == 3 else 'grey'}",
               f"short side resized to size / {opts.crop_fraction:g}, centre cropped; {scaling}",
               f"{len(found)} images found, {len(chosen)} used" + (f" (drawn with seed {opts.seed})"
                                                                    if len(chosen) < len(found) else "")]
    return CalibrationData(arrays={spec.name: array}, kind="image", sources=chosen, details=details, preview=crops)


def _refuse_flags(opts: CalibOptions, names: tuple[str, ...], kind: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(opts, n) is not None]
    if given:
        raise UserError(f"{', '.join(given)} go with {kind}, and this model takes "
                        f"{'token ids' if kind == 'images' else 'images'}")


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
