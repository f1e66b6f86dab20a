"""Hypothesis ledger: claims before tests, evidence from every run, verdicts by rule.

A hypothesis is declared *before* the test: a claim, a prediction ``metric comparator threshold``, the result that
would falsify it, and the verdict rule. Every run then attaches evidence — a measured value whose pass/fail is
computed here from the comparator, never passed in — and the verdict follows from the declared rule.

Verdict rule (``rule="all"``, the default, with ``min_runs`` n ≥ 1): only *live* evidence counts — records that
are not retractions and have not been retracted. **refuted** as soon as any live record fails (every record is
pre-registered, because the API only accepts evidence for an already declared hypothesis); **supported** when at
least n live records exist and all pass; **inconclusive** otherwise. With ``rule="majority"`` and a ``fraction``
f in (0, 1] (default 0.5): **inconclusive** below n live records, else **supported** when the pass share is ≥ f,
else **refuted**. With ``rule="interval"`` (for a headline number over seeds; ``level`` default 0.95, ``min_runs``
default 3) the pooled live values decide: their seeded bootstrap interval of the mean
(:func:`lora_lens.stats.bootstrap_ci`) makes the hypothesis **supported** when it clears the threshold on the
predicted side (``>=``/``>``: low end ≥/> threshold; ``<=``/``<``: high end ≤/< threshold; ``between (a, b)``:
a ≤ low and high ≤ b), **refuted** when it lies entirely on the other side, **inconclusive** otherwise and below
``min_runs`` distinct measurements. A rerun of the same notebook parameters and seed repeats a measurement
rather than adding one: repeats count once, at their mean (:func:`~lora_lens.ledger.api.measurements`), so that
running a series twice does not narrow an interval over seeds. A rule that cannot be evaluated (``==``/``!=``
or a ``level`` outside (0, 1) with ``rule="interval"``, a ``fraction`` or ``level`` with a rule that does not
read it) raises :class:`~lora_lens.errors.ConfigError` at declaration. :func:`hypotheses` shows the mean and its
interval (``mean``, ``ci_low``, ``ci_high``, over the ``n_measured`` distinct measurements) beside the verdict
for every rule.

Comparators: ``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=`` (equality within ``math.isclose(rel_tol=1e-9,
abs_tol=1e-12)``) and ``between`` (threshold ``(lo, hi)``, both ends included).

Storage: one SQLite file (WAL, 30 s busy timeout, every write a single ``BEGIN IMMEDIATE`` transaction, so
concurrent runs and killed processes leave it consistent). Evidence is append-only; a mistake is retracted by a
new record (:func:`retract`), never edited. Every change of verdict is logged with the evidence that caused it
(:func:`history`). Re-declaring an id with the same claim, falsifier, prediction and rule is a no-op (method,
tags and author of the first declaration are kept); a changed one is an error.

Location: ``path`` argument > ``$LORA_LENS_LEDGER`` > ``<parent of $LORA_LENS_RUN_DIR>/ledger.sqlite`` >
``<project>/runs/ledger.sqlite`` inside a checkout (from any subfolder, e.g. ``notebooks/``) >
``./runs/ledger.sqlite``. Run context comes from ``$LORA_LENS_RUN_ID``, ``$LORA_LENS_NOTEBOOK`` and
``$LORA_LENS_PARAMS`` (JSON) set by the runner; outside a run the run id is ``interactive-<pid>-<time>``. Every
record also keeps the machine (architecture, CPU model, CPU count) and the thread count (``torch.get_num_threads()``
when torch is imported, else ``$OMP_NUM_THREADS``), so that a verdict that differs between two machines can be traced.

Example:
    >>> import tempfile
    >>> from lora_lens import ledger
    >>> db = tempfile.mkdtemp() + "/ledger.sqlite"
    >>> h = ledger.declare("rank-low", "The adapter's update is low rank", "effective_rank", "<=", 4,
    ...                    falsifier="effective rank above 4 on any seed", min_runs=2, path=db)
    >>> ledger.record("rank-low", 2.7, seed=0, path=db).verdict
    'inconclusive'
    >>> ledger.record("rank-low", 3.1, seed=1, path=db).verdict
    'supported'
    >>> ledger.verdict("rank-low", path=db)
    'supported'
    >>> h = ledger.declare("eff-high", "The edit lands on every seed", "efficacy", ">=", 0.8, rule="interval",
    ...                    path=db)
    >>> [ledger.record("eff-high", v, seed=s, path=db).verdict for s, v in enumerate([0.9, 0.95, 0.85])]
    ['inconclusive', 'inconclusive', 'supported']

Modules: :mod:`~lora_lens.ledger.store` (records, SQLite schema, run context, location), :mod:`~.api` (declare,
record, retract, queries, the verdict rule), :mod:`~.export` (md/html/jsonl, import), :mod:`~.plots` (figures),
:mod:`~.command` (``lora-lens ledger [--ledger PATH] list | show ID | export --format md|jsonl|html [--out FILE] |
import FILE``) and :mod:`~.journal` (what notebook 07 shows). This package re-exports the API, so
``from lora_lens import ledger; ledger.declare(...)`` is all a notebook needs. The two figures load matplotlib and
seaborn on first use, so that the ledger's command line and the run report start without them.
"""


from lora_lens.ledger.api import (VERDICTS, declare, evidence, history, hypotheses, hypothesis, record, retract,
                                  verdict, verdict_text)
from lora_lens.ledger.export import export, export_hypothesis, import_jsonl
from lora_lens.ledger.store import (COMPARATORS, RULES, SCHEMA_VERSION, Evidence, Hypothesis, RunContext, git_commit,
                                    ledger_path, machine, run_context, thread_count)

__all__ = ["COMPARATORS", "RULES", "SCHEMA_VERSION", "VERDICTS", "Evidence", "Hypothesis", "RunContext", "declare",
           "evidence", "export", "export_hypothesis", "git_commit", "history", "hypotheses", "hypothesis",
           "import_jsonl", "ledger_path", "machine", "plot_evidence", "plot_timeline", "record", "retract",
           "run_context", "thread_count", "verdict", "verdict_text"]


def __getattr__(name: str):
    if name in ("plot_evidence", "plot_timeline"):  # the figures, loaded when first asked for
        from lora_lens.ledger import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
