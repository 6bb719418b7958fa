"""Where a run writes: its outputs by name (the model, the report, the plot,
the onnxruntime-genai config and the files copied beside it), checked before
any work against each other, the run's inputs and the file system, then
written all or nothing. `compress_plan` and `finetune_plan` make the plans of
the two commands that write a model and its report."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import onnx

from ..errors import UserError
from .calibration import sidecar_path
from .model_files import atomic_paths, beside, check_name_length, check_output_path, model_files_for, refuse_inputs

# What compress's pruned model is called in messages.
OUTPUT_MODEL = "output model"


def default_output(model_path: Path) -> Path:
    return beside(model_path, ".pruned.onnx")


def default_report(output: Path) -> Path:
    return beside(output, ".json")


def finetuned_output(pruned: Path) -> Path:
    return beside(pruned, ".finetuned.onnx")


def torch_model_files(torch_model: str | None, torch_weights: str | os.PathLike | None) -> list[Path]:
    """The files a paired torch model is read from: the weights, and the files of an `hf:DIR` folder."""
    paths = [Path(torch_weights)] if torch_weights is not None else []
    if torch_model is not None:
        from ..paired.hf_model import HF_PREFIX, is_hf_spec

        if is_hf_spec(torch_model):
            folder = Path(torch_model[len(HF_PREFIX):])
            if folder.is_dir():
                paths.extend(p for p in folder.iterdir() if p.is_file())
    return paths


def run_inputs(model_path: Path, *, calib: str | os.PathLike | None, torch_model: str | None = None,
               torch_weights: str | os.PathLike | None = None, extra: Sequence[Path] = ()) -> list[Path]:
    """Every file a run on `model_path` reads that is known before the model
    is loaded: the model, the calibration file (`calib`, else the sidecar
    `MODEL.calib.npz`), the torch model's files (`torch_model_files`) and
    `extra` (the genai config and tokenizer files it copies). The model's
    external data files are added once it is loaded (`OutputPlan.refuse`).
    No output of any kind may be one of them (`check_output_path`)."""
    paths = [model_path]
    if calib is not None:
        paths.append(Path(calib))
    elif sidecar_path(model_path).is_file():
        paths.append(sidecar_path(model_path))
    return paths + torch_model_files(torch_model, torch_weights) + list(extra)


@dataclass
class Written:
    """The temporary files of one write, by target (renamed into place when the write ends)."""

    model_files: list[Path]  # the model's files as planned (`model_files_for`)
    model: list[Path]  # their temporary files
    report: Path | None
    plot: Path | None
    genai_config: Path | None
    copies: list[tuple[Path, Path]]  # (source, temporary file)


@dataclass
class OutputPlan:
    """The files a run writes, by name; None: not written. `inputs` are the
    files it reads (`run_inputs`), none of which may be an output."""

    model: Path
    inputs: list[Path]
    report: Path | None = None
    plot: Path | None = None
    genai_config: Path | None = None
    copies: list[tuple[Path, Path]] = field(default_factory=list)  # (source, target)
    model_what: str = OUTPUT_MODEL  # what messages call the model

    def named(self) -> list[tuple[str, Path]]:
        """(what, path) of every output, as messages name them."""
        named = {self.model_what: self.model, "report": self.report, "plot": self.plot,
                 "genai config": self.genai_config,
                 **{f"copy of {source.name}": target for source, target in self.copies}}
        return [(what, path) for what, path in named.items() if path is not None]

    def check(self, *, force: bool, writable: bool = True) -> None:
        """Refuse, before any work, two outputs on one file (the last rename
        would silently win) and, when `writable` (not a dry run), an output
        that is an input, exists without `force` or cannot be written."""
        named = self.named()
        for i, (what, path) in enumerate(named):
            for other, other_path in named[:i]:
                if path.resolve() == other_path.resolve():
                    raise UserError(f"the {other} and the {what} must be different files (both are {path})")
        if writable:
            for what, path in named:
                check_output_path(path, force=force, what=what, inputs=self.inputs)

    def refuse(self, input_files: Sequence[Path]) -> None:
        """Refuse outputs on the input model's files (its external data, known
        once it is loaded), the model's weights file (OUTPUT.data, where the
        input kept its weights apart) included."""
        for what, path in self.named():
            refuse_inputs(path, what=what, inputs=input_files)
        if len(input_files) > 1:
            data_path = self.model.with_name(self.model.name + ".data")
            refuse_inputs(data_path, what="output's weights file", inputs=input_files)
            check_name_length(data_path, what="output's weights file")

    def without_genai(self) -> OutputPlan:
        """The plan without the genai config and its copies (no config to write)."""
        return OutputPlan(model=self.model, inputs=self.inputs, report=self.report, plot=self.plot,
                          model_what=self.model_what)

    @contextmanager
    def writing(self, model: onnx.ModelProto, *, force: bool, external: bool = False,
                input_files: Sequence[Path] = ()) -> Iterator[Written]:
        """Temporary files for every output, renamed into place together when
        the block ends without an exception (`atomic_paths`). The model's
        weights go to OUTPUT.data when `external` (the input kept its own
        apart) or the model is near the protobuf limit. A write the
        environment refuses (disk full, quota, a folder gone) is a UserError."""
        try:
            model_paths = model_files_for(model, self.model, force=force, external=external,
                                          inputs=[*input_files, *self.inputs])
            optional = [self.report, self.plot, self.genai_config]
            targets = model_paths + [p for p in optional if p is not None] + [target for _, target in self.copies]
            with atomic_paths(*targets, overwrite=force) as temps:
                rest = iter(temps[len(model_paths):])
                named = [next(rest) if p is not None else None for p in optional]
                yield Written(model_paths, temps[:len(model_paths)], *named,
                              copies=[(source, next(rest)) for source, _ in self.copies])
        except OSError as exc:
            where = exc.filename or self.model.parent
            raise UserError(f"cannot write the output ({exc.strerror or exc}: {where}); nothing was written; "
                            "free some space or choose another folder with -o") from None


def compress_plan(model_path: Path, output, report, plot, *, calib, torch_model, torch_weights):
    """compress's outputs (`report` True: beside the output; None: none),
    the genai config beside the input (None: none) and notes on the files
    copied beside the output."""
    from ..surgery.kv_cache import genai_config_source, genai_config_target, genai_support_files

    out = Path(output) if output is not None else default_output(model_path)
    if not model_path.exists():
        raise UserError(f"model file not found: {model_path}")
    # An onnxruntime-genai config beside the input is rewritten for the output; written to another
    # folder, the pruned model gets the tokenizer files onnxruntime-genai reads beside it.
    genai_source = genai_config_source(model_path)
    copies, copy_notes = genai_support_files(model_path, out) if genai_source is not None else ([], [])
    plot_path = Path(plot) if plot is not None else None
    if plot_path is not None:
        from ..report.plots import plot_format

        plot_format(plot_path)
    inputs = run_inputs(model_path, calib=calib, torch_model=torch_model, torch_weights=torch_weights,
                        extra=[p for p in (genai_source,) if p is not None] + [source for source, _ in copies])
    plan = OutputPlan(model=out, inputs=inputs, plot=plot_path, copies=copies,
                      report=None if report is None or report is False else
                      default_report(out) if report is True else Path(report),
                      genai_config=genai_config_target(model_path, out) if genai_source is not None else None)
    return plan, genai_source, copy_notes


def finetune_plan(pruned: Path, output, *, inputs: Sequence[Path], write_report: bool = True) -> OutputPlan:
    """finetune's outputs: the fine-tuned model (`output`, default
    PRUNED.finetuned.onnx; "output" in messages) and its report beside it
    (not written unless `write_report`: --json prints it instead)."""
    out = Path(output) if output is not None else finetuned_output(pruned)
    return OutputPlan(model=out, inputs=list(inputs), report=default_report(out) if write_report else None,
                      model_what="output")
