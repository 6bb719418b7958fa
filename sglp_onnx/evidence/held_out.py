"""The held-out fidelity of removal sets, as the report and --max-loss read
it: of the input's gated graph, of the input with repair maps added, or
piece by piece with --sequential."""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class HeldOut:
    """Fidelity records on `data` (the held-out samples, else the selection
    samples) of removal sets of `model`'s `units`, measured through `ctx`
    (`context.Context`: its executor, runner, output kind and batch rows)."""

    ctx: object
    model: onnx.ModelProto
    units: list
    data: object
    batch_size: int
    provider: str

    def records(self, *removal_sets, network=None) -> list[dict]:
        """Held-out fidelity records of `removal_sets` of the input, or of
        `network` = (model, units) (the input with repair maps added)."""
        from .fidelity import measure_sets, measure_sets_sequential
        from .gated_runner import GatedRunner

        ctx = self.ctx
        net_model, net_units = network or (self.model, self.units)
        if ctx.executor.piecewise:
            return measure_sets_sequential(net_model, net_units, ctx.output_kind(), self.data, removal_sets,
                                           batch_size=self.batch_size, provider=self.provider)
        runner = ctx.output_runner() if network is None else GatedRunner(
            net_model, net_units, [ctx.output_kind().output], provider=self.provider, entries=False)
        return measure_sets(runner, ctx.output_kind(), self.data, removal_sets, batch_size=ctx.output_rows())

    def repaired(self, removed, plain: dict, *, form: str, fit_data, progress=None):
        """The repair of `removed` (`repair.repair_removal`) fitted on
        `fit_data`, measured against `plain`, its unrepaired record."""
        from ..repair.stage import repair_removal

        units = self.units
        return repair_removal(self.model, units, removed, fit_data, form=form, plain=plain,
                              measure=lambda m, u, r: self.records(r, network=(m, u))[0],
                              batch_size=self.ctx.rows([u.entry for u in units] + [u.exit for u in units]),
                              provider=self.provider, progress=progress)

    def loss_of(self, removed, *, form: str, fit_data, progress=None) -> dict:
        """What --max-loss reads: the held-out record of the model compress
        would write (repaired where `form` repairs and the repair helps)."""
        plain = self.records(removed)[0]
        if form == "none" or self.ctx.executor.piecewise or not removed:
            return plain
        outcome = self.repaired(removed, plain, form=form, fit_data=fit_data, progress=progress)
        return outcome.fidelity if outcome.applied else plain
