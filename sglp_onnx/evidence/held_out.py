"""The held-out fidelity of removal sets, as the report and --max-loss read
it: of the input's gated graph, of the input with repair maps added, or
piece by piece with --sequential."""

from __future__ import annotations

from dataclasses import dataclass, field

# Repair outcomes kept for a removal set asked again (analyze's selection
# and suggestions, --max-loss's last try): each holds its repaired model.
KEPT_REPAIRS = 4


@dataclass
class HeldOut:
    """Fidelity records on `data` (the held-out samples, else the selection
    samples) of removal sets of the context's units, measured through `ctx`
    (`context.Context`: its model, units, executor, runner, output kind,
    provider and batch rows). Repairs are fitted once per removal set and
    form, all reading one run of the original (`repair.plan.OriginalReference`)."""

    ctx: object
    data: object
    _repairs: dict = field(default_factory=dict, repr=False)
    _reference: object = field(default=None, repr=False)
    _outputs: object = field(default=None, repr=False)  # the original's scored output per batch, while kept

    def records(self, *removal_sets, network=None) -> list[dict]:
        """Held-out fidelity records of `removal_sets` of the input, or of
        `network` = (model, units) (the input with repair maps added)."""
        from .fidelity import measure_sets, measure_sets_sequential
        from .gated_runner import GatedRunner

        ctx = self.ctx
        net_model, net_units = network or (ctx.model, ctx.units)
        if ctx.executor.piecewise:
            return measure_sets_sequential(net_model, net_units, ctx.output_kind(), self.data, removal_sets,
                                           batch_size=ctx.batch_size, provider=ctx.provider)
        if network is None:  # the original's outputs are kept for the repaired records (`repaired_record`)
            return measure_sets(ctx.output_runner(), ctx.output_kind(), self.data, removal_sets,
                                batch_size=ctx.output_rows(), references=self._original_cache())
        runner = GatedRunner(net_model, net_units, [ctx.output_kind().output], provider=ctx.provider, entries=False)
        return measure_sets(runner, ctx.output_kind(), self.data, removal_sets, batch_size=ctx.output_rows())

    def repaired_record(self, model, units, removed) -> dict:
        """The held-out record of `removed` bypassed in `model` (the input with
        repair maps added, `units` reading them): one plain session on the
        pruned graph read through the removal's bypasses (`prefix_model`
        renames), against the original's output computed first and kept
        between removal sets (its session closed before the pruned one
        opens: never both sets of weights at once). The gated copy of `model`
        where the original's outputs exceed REFERENCE_CACHE_BYTES, a removed
        unit has companions or the graph cannot be cut."""
        from ..graph.runtime import session_with_outputs
        from ..surgery.remove import bypassed_prefix
        from .fidelity import FidelityMeter

        ctx = self.ctx
        output = ctx.output_kind().output
        batches = list(self.data.batches(ctx.output_rows()))
        pruned = None if ctx.executor.piecewise else bypassed_prefix(model, [units[k] for k in removed], [output])
        if pruned is None or not self._original_outputs(batches, output):
            return self.records(removed, network=(model, units))[0]
        session = session_with_outputs(pruned, [output], ctx.provider)
        meter = FidelityMeter(ctx.output_kind(), token_level=self.data.is_token_data)
        inputs = {i.name for i in session.get_inputs()}
        for b, (feed, _) in enumerate(batches):
            value = session.run([output], {k: v for k, v in feed.items() if k in inputs})[0]
            meter.update(self._outputs.kept[b], value, self.data.token_mask(feed))
        return meter.record()

    def _original_cache(self):
        """The original's scored output per batch index, kept while together they fit REFERENCE_CACHE_BYTES."""
        from .gated_runner import REFERENCE_CACHE_BYTES
        from .run_cache import RunCache

        if self._outputs is None:
            self._outputs = RunCache(REFERENCE_CACHE_BYTES, whole=True)
        return self._outputs

    def _original_outputs(self, batches, output: str) -> bool:
        """The original's `output` on every batch, kept (True) unless together
        they exceed the cache; computed here unless the plain records kept them."""
        from ..graph.runtime import prefix_session

        cache = self._original_cache()
        if not cache.closed and len(cache.kept) < len(batches):
            original = prefix_session(self.ctx.model, [output], self.ctx.provider)
            names = {i.name for i in original.get_inputs()}
            for b, (feed, _) in enumerate(batches):
                cache.get(b, lambda feed=feed: original.run([output], {
                    k: v for k, v in feed.items() if k in names})[0])
                if cache.closed:
                    break
        return not cache.closed

    def repaired(self, removed, plain: dict, *, form: str, fit_data, progress=None):
        """The repair of `removed` (`repair.repair_removal`) fitted on
        `fit_data`, measured against `plain`, its unrepaired record."""
        from ..repair.plan import original_reference
        from ..repair.stage import repair_removal

        ctx = self.ctx
        units = ctx.units
        key = (tuple(sorted(removed)), form, id(fit_data))
        if key not in self._repairs:
            while len(self._repairs) >= KEPT_REPAIRS:  # each holds its repaired model
                del self._repairs[next(iter(self._repairs))]
            if self._reference is None and self._shareable(fit_data):
                self._reference = original_reference(ctx.model, units, ctx.provider)
            self._repairs[key] = repair_removal(
                ctx.model, units, removed, fit_data, form=form, plain=plain,
                measure=self.repaired_record,
                batch_size=ctx.rows([u.entry for u in units] + [u.exit for u in units]),
                provider=ctx.provider, progress=progress, reference=self._reference)
        return self._repairs[key]

    def _shareable(self, fit_data) -> bool:
        """True when every unit's entry and exit on `fit_data` fit the
        reference's keep limit: one run of the original then serves every
        removal set. Else each set computes only its own cuts' values."""
        from ..repair.plan import REFERENCE_BYTES

        sizes = self.ctx.activation_budget().sizes
        names = dict.fromkeys(n for u in self.ctx.units for n in (u.entry, u.exit))
        return sum(sizes.get(n, 0) for n in names) * fit_data.n_samples <= REFERENCE_BYTES

    def release(self) -> None:
        """Drop the original's kept values and the repairs (their models)."""
        self._repairs.clear()
        self._reference = self._outputs = None

    def loss_of(self, removed, *, form: str, fit_data, progress=None) -> dict:
        """What --max-loss reads: the held-out record of the model compress
        would write (repaired where `form` repairs and the repair helps)."""
        plain = self.records(removed)[0]
        if form == "none" or self.ctx.executor.piecewise or not removed:
            return plain
        outcome = self.repaired(removed, plain, form=form, fit_data=fit_data, progress=progress)
        return outcome.fidelity if outcome.applied else plain
