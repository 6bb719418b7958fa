"""The `sglp-onnx` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 an
internal error (a bug: the message asks for a report), 130 interrupted by
Ctrl-C (SIGINT), 143 terminated (SIGTERM); an interrupt leaves no partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Iterator

import click

from . import __version__
from .errors import UserError
from .options import (DEFAULT_CRITERION, CalibOptions, ExportOptions, OutputOptions, RuntimeOptions,
                      SelectionOptions, TrainingOptions)

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class _State:
    verbose = False
    quiet = False
    warnings = False  # --log-level warning: quiet, but the summary's warnings still shown


def _progress_factory(state: _State):
    """tqdm bars on a terminal (or with -v); in a pipe, a line at most every
    few seconds (`progress.LineProgress`); nothing with -q."""
    if state.quiet:
        return None
    if not (sys.stderr.isatty() or state.verbose):
        from .progress import LineProgress

        return LineProgress(sys.stderr)
    from tqdm import tqdm

    from .progress import terminal_stage

    def progress(iterable: Iterator, label: str) -> Iterator:
        return tqdm(iterable, desc=label, unit="batch", file=sys.stderr, leave=False)

    progress.stage = lambda label: terminal_stage(sys.stderr, label)
    return progress


VERBOSE_HELP = "Progress bars even in pipes; tracebacks on internal errors; ONNX Runtime's own error log."
QUIET_HELP = "Print nothing but errors."


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(_State).verbose = True
        from .graph.runtime import set_verbose

        set_verbose(True)


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(_State).quiet = True


LOG_LEVELS = ("error", "warning", "info", "debug")
LOG_LEVEL_HELP = ("What to print: error (= -q), warning (errors and warnings), info (the default: progress "
                  "and the summary), debug (= -v).")


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    state = ctx.ensure_object(_State)
    if value in ("error", "warning"):
        state.quiet, state.warnings = True, value == "warning"
    elif value == "debug":
        _set_verbose(ctx, param, True)


def _verbosity_options(f):
    """-v, -q and --log-level, accepted after the command too (`sglp-onnx compress M -q`), meaning what
    they mean before it."""
    f = click.option("--log-level", type=click.Choice(LOG_LEVELS), expose_value=False, callback=_set_log_level,
                     help=LOG_LEVEL_HELP)(f)
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet, help=QUIET_HELP)(f)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help=VERBOSE_HELP)(f)


def _echo_summary(state: _State, text: str, *, err: bool = False) -> None:
    """The run's summary on stdout (on stderr with `err`: stdout carries a
    report); with --log-level warning only its warnings, on stderr."""
    if not state.quiet:
        click.echo(text, err=err)
    elif state.warnings:
        for line in text.splitlines():
            if line.startswith("warning:"):
                click.echo(line, err=True)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None:
        from .graph.runtime import set_threads

        set_threads(value)  # refuses what the field's check refuses, with the same line


def _plot_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from .report.plots import plot_format

        try:
            plot_format(value)
        except UserError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While a command works, anything printed (a user's module, a library) goes
    to stderr: stdout carries only the command's result (--json, --report -)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="sglp-onnx")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help=LOG_LEVEL_HELP)
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, log_level: str | None) -> None:
    """Remove whole residual layers from ONNX models (SGLP and baselines).

    \b
    Examples:
      sglp-onnx analyze model.onnx --plot cka.png
      sglp-onnx compress model.onnx --ratio 0.3
      sglp-onnx compress model.onnx --torch-model pkg.mod:factory --torch-weights w.pt
      sglp-onnx eval model.onnx model.pruned.onnx --data test.npz
      sglp-onnx export pkg.mod:factory --torch-weights w.pt -o model.onnx
      sglp-onnx calib model.onnx images/ -o calib.npz

    Run 'sglp-onnx COMMAND --help' for the options and examples of each command.
    """
    state = ctx.ensure_object(_State)
    state.verbose, state.quiet = verbose, quiet
    _set_log_level(ctx, None, log_level)
    if verbose:
        from .graph.runtime import set_verbose

        set_verbose(True)


def _criterion_names() -> list[str]:
    from .selection.criteria import REGISTRY

    return [DEFAULT_CRITERION] + sorted(n for n in REGISTRY if n != DEFAULT_CRITERION)


class _LazyHelpOption(click.Option):
    """An option whose help is made when help is shown (the criterion names
    come from the registry, which imports onnx: not worth it for every run)."""

    def __init__(self, *args, help_factory=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._help_factory = help_factory

    def get_help_record(self, ctx: click.Context):
        if self._help_factory is not None:
            self.help, self._help_factory = self._help_factory(), None
        return super().get_help_record(ctx)


# The options made at parse time from a flag's value: --plot's suffix is
# checked before any work; --threads applies to the whole process.
_PARSED = {"plot": {"callback": _plot_path},
           "threads": {"callback": _set_threads, "expose_value": False}}


class ModelFile(click.Path):
    """A model file; a folder is refused in one line that names the .onnx
    files in it (an onnxruntime-genai or Optimum export folder)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx):
        if os.path.isdir(value):
            found = sorted(p.name for p in Path(value).glob("*.onnx"))
            hint = (f"; give the model file in it ({', '.join(str(Path(value) / f) for f in found[:3])}"
                    f"{', ...' if len(found) > 3 else ''})" if found else "; give the .onnx model file")
            self.fail(f"{value!r} is a folder{hint}", param, ctx)
        return super().convert(value, param, ctx)


def _click_option(spec: dataclasses.Field, command: str, *, many: str | None = None):
    """The click option for one field of the `options` dataclasses, from its
    metadata, as `command` shows it; `many`: repeatable, into that parameter."""
    meta = spec.metadata
    kwargs: dict = {"help": meta["helps"].get(command, meta["help"]), **_PARSED.get(spec.name, {})}
    kind = meta["kind"]
    if kind is bool:
        kwargs["is_flag"] = True
    elif meta["choices"]:
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif kind in ("file", "file-or-dash"):
        kwargs["type"] = click.Path(dir_okay=False, allow_dash=kind == "file-or-dash")
    elif kind == "path":
        kwargs["type"] = click.Path()
    elif kind == "criterion":
        kwargs.update(cls=_LazyHelpOption, help_factory=lambda: f"{', '.join(_criterion_names())}. {meta['help']}")
    elif kind in (int, float):
        kwargs["type"] = kind
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if command in meta["required"]:
        kwargs["required"] = True
    if many is not None:
        kwargs["multiple"] = True
    elif spec.default is not None and kind is not bool:
        kwargs.update(default=spec.default, show_default=True)
    names = (meta["short"], meta["flag"]) if meta["short"] else (meta["flag"],)
    return click.option(*names, many or spec.name, **kwargs)


def _flags(command: str, options: type, *names: str, many: str | None = None):
    """The flags of `options`' fields `names` (default: every field with a
    flag), in that order, as `command` shows them; `many`: see `_click_option`."""
    specs = {spec.name: spec for spec in dataclasses.fields(options)}
    chosen = [specs[name] for name in names] if names else [s for s in specs.values() if s.metadata["cli"]]

    def add(f):
        for spec in reversed(chosen):
            f = _click_option(spec, command, many=many)(f)
        return f
    return add


def _selection_options(command: str):
    """The flags of `options.SelectionOptions`, then --json, --threads and -q/-v."""
    def add(f):
        f = _flags(command, SelectionOptions)(_flags(command, OutputOptions, "as_json")(f))
        return _verbosity_options(_flags(command, RuntimeOptions, "threads")(f))
    return add


def _api_options(kwargs: dict, state: _State) -> dict:
    """The selection keywords among the command's arguments, and the progress display."""
    return {**{name: kwargs[name] for name in SelectionOptions.names() if name in kwargs},
            "progress": _progress_factory(state)}


@cli.command()
@click.argument("models", nargs=-1, required=True, type=ModelFile(), metavar="MODEL...")
@_flags("compress", OutputOptions, "output")
@click.option("-O", "--output-dir", type=click.Path(file_okay=False),
              help="Write each MODEL's MODEL.pruned.onnx and report into DIR (created if missing); for several "
                   "models in one call.")
@_selection_options("compress")
@_flags("compress", OutputOptions, "report", "plot", "force", "dry_run")
@click.option("--renumber-cache", is_flag=True,
              help="Rename the kept KV-cache inputs/outputs to consecutive layer numbers "
                   "(past_key_values.0..n-1, present.0..n-1), as onnxruntime-genai expects. "
                   "Changes those input/output names.")
@click.pass_obj
def compress(state: _State, models: tuple[str, ...], output: str | None, output_dir: str | None,
             report: str | None, plot: str | None, force: bool, dry_run: bool, renumber_cache: bool,
             as_json: bool, **kwargs) -> None:
    """Remove residual units from MODEL and write a validated, smaller ONNX file.

    With several models (or -O DIR), each is compressed in turn with the same
    options into DIR; the first failure stops the run (the models before it are
    written, whole).

    \b
    Examples:
      sglp-onnx compress model.onnx --ratio 0.3
      sglp-onnx compress model.onnx --target-flops 0.5 --criterion block-influence -o small.onnx
      sglp-onnx compress model.onnx --max-loss 0.05 --dry-run
      sglp-onnx compress a.onnx b.onnx -O pruned/ --remove 4
      sglp-onnx compress resnet.onnx --torch-model models.resnet_cifar:resnet56_digits \\
          --torch-weights resnet56.pt --remove 8 --plot cka.png
    """
    from .pipeline import compress as run, default_output

    several = len(models) > 1
    if several or output_dir is not None:
        for flag, value in (("-o/--output", output), ("--plot", plot)):
            if value is not None:
                raise click.UsageError(f"{flag} names one file: with several models or -O DIR, each model's "
                                       "outputs go into DIR")
        if report is not None and report != "-":
            raise click.UsageError("--report FILE names one file: with several models or -O DIR each report goes "
                                   "beside its model in DIR ('--report -' or --json print them to stdout)")
    if several and output_dir is None:
        raise click.UsageError("several models need -O DIR for their outputs")
    outputs: list[str | None] = [output]
    if output_dir is not None:
        outputs = [str(Path(output_dir) / default_output(Path(m)).name) for m in models]
        from .files.model_files import refuse_inputs

        seen: dict[str, str] = {}
        for model, out in zip(models, outputs):
            # Each run reads every later model: none may be another's output.
            refuse_inputs(Path(out), what=f"output of {model}", inputs=[Path(m) for m in models])
            if out in seen:
                raise UserError(f"{seen[out]} and {model} would both write {out}; compress them in two calls")
            seen[out] = model
        if not dry_run:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
    # The report goes to stdout for '--report -', and for --json unless a file is named.
    to_stdout = report == "-" or (as_json and report is None)
    reports, done = [], []
    for model, out in zip(models, outputs):
        try:
            result = _compress_one(run, state, model, out, None if to_stdout else report, plot, force, dry_run,
                                   renumber_cache, to_stdout, kwargs)
        except UserError as exc:
            if not several:
                raise
            written = f"; written before it: {', '.join(done)}" if done else ""
            raise UserError(f"{model}: {exc}{written}") from None
        done.append(model)
        reports.append(result.report)
        if not as_json:
            # With several models (or -O) each block says which model it is about; with
            # '--report -' stdout carries the report, so the summary goes to stderr.
            text = result.summary()
            if several or output_dir is not None:
                gap = "\n" if len(done) > 1 else ""
                text = f"{gap}== {model} ==\n{text}"
            _echo_summary(state, text, err=to_stdout)
    if as_json or to_stdout:
        from .report.summary import to_json

        if several:
            click.echo(json.dumps([json.loads(to_json(r)) for r in reports], indent=2))
        else:
            click.echo(to_json(reports[0]), nl=False)


def _compress_one(run, state: _State, model: str, output: str | None, report: str | None, plot: str | None,
                  force: bool, dry_run: bool, renumber_cache: bool, to_stdout: bool, kwargs: dict):
    # A report for stdout is no file; a dry run still says where a real run would write one.
    report_file = None if to_stdout and not dry_run else True if to_stdout or report is None else report
    with _stdout_to_stderr():
        result = run(model, output, report=report_file, plot=plot, force=force, renumber_cache=renumber_cache,
                     dry_run=dry_run, **_api_options(kwargs, state))
    if to_stdout and not dry_run:
        result.report["report_path"] = "-"
    return result


def _fractions(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None or value.strip().lower() in ("", "none"):
        return None
    try:
        fractions = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fractions such as 0.1,0.25,0.5, got {value!r}") from None
    if not all(0.0 < f < 1.0 for f in fractions):
        raise click.BadParameter(f"every fraction must be in (0, 1), got {value!r}")
    return fractions


@cli.command()
@click.argument("model", type=ModelFile())
@_selection_options("analyze")
@click.option("--suggest", default="0.1,0.25,0.5", show_default=True, callback=_fractions, metavar="F1,F2,...",
              help="FLOPs fractions to suggest removal sets for ('none': no suggestions).")
@_flags("analyze", OutputOptions, "plot", "force")
@click.pass_obj
def analyze(state: _State, model: str, as_json: bool, suggest: tuple[float, ...] | None, plot: str | None,
            force: bool, **kwargs) -> None:
    """Show the units of MODEL with their cost, CKA segments and importance,
    and which units the criterion would remove for a few FLOPs targets.
    Writes nothing (except the --plot PNG when asked).

    \b
    Examples:
      sglp-onnx analyze model.onnx
      sglp-onnx analyze model.onnx --calib calib.npz --suggest 0.2,0.4 --plot cka.png
      sglp-onnx analyze resnet.onnx --torch-model models.resnet_cifar:resnet56_digits \\
          --torch-weights resnet56.pt --json > analysis.json
    """
    from .pipeline import analyze as run

    with _stdout_to_stderr():
        result = run(model, suggest=suggest, plot=plot, force=force, **_api_options(kwargs, state))
    if as_json:
        from .report.summary import to_json

        click.echo(to_json(result.report), nl=False)
    else:
        _echo_summary(state, result.summary())


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=ModelFile())
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help=".npz with the model inputs and optional 'labels'.")
@_flags("eval", RuntimeOptions, "batch_size", "provider")
@_flags("eval", OutputOptions, "as_json")
@_flags("eval", RuntimeOptions, "threads")
@_verbosity_options
@click.pass_obj
def eval_(state: _State, models: tuple[str, ...], data: str, batch_size: int, provider: str, as_json: bool) -> None:
    """Accuracy (with labels), perplexity (causal LMs) and agreement with the first MODEL.

    \b
    Example:
      sglp-onnx eval model.onnx model.pruned.onnx --data test.npz
    """
    from .evidence.metrics import evaluate, format_metrics

    RuntimeOptions(batch_size=batch_size, provider=provider).checked()
    with _stdout_to_stderr():
        results = evaluate(models, data, provider=provider, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in results], indent=2))
    else:
        _echo_summary(state, format_metrics(results))


@cli.command()
@click.argument("models", nargs=-1, required=True, type=ModelFile())
@_flags("bench", RuntimeOptions, "batch_size", many="batch_sizes")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per model and batch size.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs before timing.")
# bench's own --threads: the timed sessions' threads (0: ONNX Runtime's choice), not the process's.
@click.option("--threads", type=int, default=1, show_default=True,
              help="ONNX Runtime intra-op threads; 1 gives repeatable CPU numbers, 0 lets ONNX Runtime choose.")
@_flags("bench", RuntimeOptions, "provider")
@click.option("--data", type=click.Path(dir_okay=False),
              help="Inputs .npz (default: MODEL.calib.npz of the first model that has one, else synthetic).")
@_flags("bench", OutputOptions, "as_json")
@_verbosity_options
@click.pass_obj
def bench(state: _State, models: tuple[str, ...], batch_sizes: tuple[int, ...], runs: int, warmup: int,
          threads: int, provider: str, data: str | None, as_json: bool) -> None:
    """Latency (p50/p90/p99), throughput, params, FLOPs and size of MODELS side by side.

    Models run interleaved; each is compared with the first (latency and
    FLOPs ratios).

    \b
    Example:
      sglp-onnx bench model.onnx model.pruned.onnx --batch-size 1 --batch-size 64
    """
    from .tools.bench import bench as run, format_results

    with _stdout_to_stderr():
        results = run(models, batch_sizes=batch_sizes or (1,), runs=runs, warmup=warmup, provider=provider,
                      threads=threads, data=data)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        _echo_summary(state, format_results(results))


@cli.command()
@click.argument("model", type=ModelFile())
@click.argument("inputs", nargs=-1, required=True, type=click.Path(), metavar="INPUT...")
@_flags("calib", OutputOptions, "output")
@_verbosity_options
@_flags("calib", CalibOptions)
@click.option("--preview", type=click.Path(dir_okay=False),
              help="Images: write a PNG grid of the crops the model will see.")
@_flags("calib", OutputOptions, "force")
@click.pass_obj
def calib(state: _State, model: str, inputs: tuple[str, ...], output: str, preview: str | None, force: bool,
          **kwargs) -> None:
    """Make a calibration .npz for MODEL from a folder of images or from text files.

    Images are resized, centre-cropped, laid out and normalised as the model's
    input declares (grey or colour, NCHW or NHWC, size); text is tokenised with
    the tokenizer.json beside the model (an onnxruntime-genai or Hugging Face
    folder) and packed into sequences with their attention mask (and position
    ids and an empty past where the model takes them).

    \b
    Examples:
      sglp-onnx calib model.onnx photos/ -o calib.npz --samples 256 --preview seen.png
      sglp-onnx calib genai_folder/model.onnx corpus.txt -o calib.npz --seq-len 256
      sglp-onnx calib model.onnx docs/ --tokenizer hf_folder/ -o calib.npz
    """
    from .tools.calib import make_calibration

    with _stdout_to_stderr():
        result = make_calibration(model, list(inputs), output, force=force, preview=preview, **kwargs)
    _echo_summary(state, result.summary())


def _input_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(d) for d in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers such as 1,3,32,32, got {value!r}") from None
    if not all(d >= 1 for d in dims):
        raise click.BadParameter(f"every dimension must be at least 1, got {value!r}")
    return dims


@cli.command()
@click.argument("factory", metavar="MODULE:FACTORY|hf:DIR")
@_flags("export", OutputOptions, "output")
@_flags("export", SelectionOptions, "torch_weights")
@_flags("export", ExportOptions, "exporter")
@click.option("--input-shape", callback=_input_shape,
              help="Example input shape such as 1,3,32,32 when the model has no example_inputs().")
@click.option("--with-cache", is_flag=True,
              help="hf:DIR only: add past_key_values.{i}.key|value inputs and present.{i}.key|value outputs.")
@_flags("export", OutputOptions, "force")
@_verbosity_options
@click.pass_obj
def export(state: _State, factory: str, output: str, torch_weights: str | None, exporter: str,
           input_shape: tuple[int, ...] | None, with_cache: bool, force: bool) -> None:
    """Export a torch model to a single-file ONNX model with a dynamic batch.

    hf:DIR exports a Hugging Face folder (save_pretrained) with inputs
    input_ids and attention_mask and output logits, batch and sequence
    length dynamic; --with-cache adds the KV cache of a causal LM.

    \b
    Examples:
      sglp-onnx export models.resnet_cifar:resnet56_digits --torch-weights models/resnet56_digits.pt -o r56.onnx
      sglp-onnx export hf:models/tinyllama_pydoc --with-cache --exporter legacy -o llama.kv.onnx
    """
    from .progress import stage

    with _stdout_to_stderr(), stage(_progress_factory(state), f"exporting {factory} with the {exporter} exporter"):
        _export(factory, Path(output), torch_weights, exporter, input_shape, with_cache, force)
    _echo_summary(state, f"wrote {output}")


def _export(factory: str, out: Path, torch_weights: str | None, exporter: str, input_shape: tuple[int, ...] | None,
            with_cache: bool, force: bool) -> None:
    import torch

    from .tools.export.torch_export import export_torch, load_torch_model
    from .files.model_files import check_output_path

    from .paired.hf_model import HF_PREFIX, is_hf_spec

    # The files the export reads: the weights, or the hf:DIR folder's files.
    inputs = [Path(torch_weights)] if torch_weights else []
    if is_hf_spec(factory) and Path(factory[len(HF_PREFIX):]).is_dir():
        inputs += [p for p in Path(factory[len(HF_PREFIX):]).iterdir() if p.is_file()]
    check_output_path(out, force=force, what="output", inputs=inputs)

    if is_hf_spec(factory):
        from .tools.export.hf import export_hf
        from .paired.hf_model import load_hf_model

        if torch_weights or input_shape:
            raise UserError("--torch-weights and --input-shape go with MODULE:FACTORY; an hf:DIR folder holds "
                            "its weights and the export takes token ids")
        export_hf(load_hf_model(factory[len(HF_PREFIX):]), out, with_cache=with_cache, exporter=exporter)
        return
    if with_cache:
        raise UserError("--with-cache exports the KV cache of a Hugging Face causal LM: give hf:DIR")
    model = load_torch_model(factory, torch_weights)
    if input_shape:
        example = (torch.zeros(input_shape),)
    elif hasattr(model, "example_inputs"):
        example = tuple(model.example_inputs())
    else:
        raise UserError("the model has no example_inputs() method; pass --input-shape such as 1,3,32,32")
    export_torch(model, example, out, exporter=exporter)


@cli.command()
@click.argument("model", metavar="PRUNED.onnx", type=click.Path(dir_okay=False))
@_flags("finetune", SelectionOptions, "torch_model", "torch_weights")
@_flags("finetune", TrainingOptions)
@_flags("finetune", OutputOptions, "output")
@_flags("finetune", ExportOptions, "exporter")
@_flags("finetune", RuntimeOptions, "provider")
@_flags("finetune", OutputOptions, "force", "as_json")
@_flags("finetune", RuntimeOptions, "threads")
@_verbosity_options
@click.pass_obj
def finetune(state: _State, model: str, as_json: bool, **kwargs) -> None:
    """Heal a pruned model: skip its removed units in the paired torch model,
    fine-tune with cross-entropy plus distillation from the unpruned model,
    and write the result as ONNX with the same inputs and outputs.

    \b
    Example:
      sglp-onnx finetune r56.pruned.onnx --torch-model models.resnet_cifar:resnet56_digits \\
          --torch-weights models/resnet56_digits.pt --train-data train.npz --epochs 3 --eval-data test.npz
      sglp-onnx finetune llama.kv.pruned.onnx --torch-model hf:models/tinyllama_pydoc --train-data tokens.npz --epochs 1
    """
    from .tools.finetune import finetune as run

    write_report = not (as_json and _stdout_is_report(model, kwargs.get("output")))
    with _stdout_to_stderr():
        result = run(model, progress=_progress_factory(state), write_report=write_report, **kwargs)
    if as_json:
        from .report.summary import to_json

        click.echo(to_json(result.report), nl=False)
    else:
        _echo_summary(state, result.summary())


def _stdout_is_report(model: str, output: str | None) -> bool:
    """Whether stdout is redirected to the file finetune's report would be
    written to (`finetune -o ft.onnx --json > ft.json`): the shell made that
    file, so it would be refused as existing; the report then goes to stdout only."""
    from .files.output_plan import finetune_plan

    report = finetune_plan(Path(model), output, inputs=[]).report
    try:
        if not report.is_file():
            return False
        ours, theirs = os.fstat(sys.stdout.fileno()), report.stat()
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # stdout is no file (pytest, closed)
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one clear line and exit 2 for anything the user can fix."""
    args = list(argv or sys.argv[1:])
    state_verbose = "-v" in args or "--verbose" in args or any(
        a == "--log-level=debug" or (a == "--log-level" and args[k + 1:k + 2] == ["debug"]) for k, a in enumerate(args))
    previous_sigterm = _handle_sigterm_as_interrupt()
    try:
        try:
            # Not cli.main(): on an interrupt it prints an empty line to stderr
            # before turning it into Abort; the one line below is all there is.
            with cli.make_context("sglp-onnx", list(sys.argv[1:] if argv is None else argv)) as ctx, \
                    warnings.catch_warnings():
                if not state_verbose:
                    # numpy's overflow/invalid-value warnings (a float16 model's
                    # activations, say) name a source line, not what to do: what
                    # matters reaches the report or the one error line.
                    warnings.simplefilter("ignore", RuntimeWarning)
                cli.invoke(ctx)
        finally:
            from .progress import clear_status

            clear_status()  # a stage label left by an error or an interrupt
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_USAGE
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return EXIT_USAGE
    except click.UsageError as exc:
        hint = f" (see 'sglp-onnx {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return EXIT_USAGE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:
        # click turns KeyboardInterrupt into Abort; the original is its cause.
        original = exc.__cause__ if isinstance(exc, click.exceptions.Abort) and exc.__cause__ else exc
        signum = getattr(original, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if getattr(original, "output_written", False):
            click.echo(f"interrupted ({name}) after every output file was written", err=True)
        else:
            click.echo(f"interrupted ({name}); nothing was written", err=True)
        return 128 + int(signum)
    except MemoryError:
        # A size the user chose (a batch, a sequence length) that this machine cannot hold.
        click.echo("error: out of memory: this machine cannot hold what the options ask for; choose a smaller "
                   "--batch-size or fewer calibration samples; nothing was written", err=True)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            # The reader of stdout went away (`... | head`): stop quietly, as a
            # process killed by SIGPIPE would (what click's own main did).
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")
            return 128 + signal.SIGPIPE
        if exc.errno not in _USER_OS_ERRORS:
            return _internal_error(exc, state_verbose)
        # The environment or a name the user gave, not a bug.
        where = f": {exc.filename}" if exc.filename else ""
        advice = _USER_OS_ERRORS[exc.errno]
        click.echo(f"error: {exc.strerror or exc}{where}; {advice}; nothing was written", err=True)
        return EXIT_USAGE
    except SystemExit as exc:
        # Only the user's code exits (click does not, outside standalone mode):
        # a torch model's forward() that calls sys.exit, say.
        click.echo(f"error: the run was stopped by SystemExit({exc.code!r}) from the user's code (the torch model "
                   "or its module must not call sys.exit or exit()); nothing was written", err=True)
        return EXIT_USAGE
    except Exception as exc:  # a bug: say so, keep the traceback for -v
        return _internal_error(exc, state_verbose)
    except BaseException as exc:  # raised by the user's code: neither an Exception nor an interrupt
        click.echo(f"error: the run was stopped by {type(exc).__name__}: {exc} from the user's code; "
                   "nothing was written", err=True)
        return EXIT_USAGE
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


# OS errors caused by what the user chose (a name, a folder, a disk), with what to change.
_USER_OS_ERRORS = {
    errno.ENAMETOOLONG: "choose a shorter file name",
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space (disk quota) or choose another folder",
    errno.EFBIG: "the file system cannot hold a file this large; choose another folder",
    errno.EROFS: "the folder is on a read-only file system; choose another folder",
    errno.EACCES: "check the file's permissions or choose another path",
}


def _internal_error(exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc)
    click.echo(f"internal error: {type(exc).__name__}: {exc} -- please report this with the output of -v", err=True)
    return EXIT_INTERNAL


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every atomic write removes its temporary files."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _handle_sigterm_as_interrupt():
    """Install the SIGTERM handler; return the previous one (None where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
