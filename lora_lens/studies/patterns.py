"""Claims over seeds: the candidate universal patterns, their verdicts and ledger records.

A pattern (:class:`Pattern`) is a per-run statistic of :attr:`lora_lens.studies.compare.Study.runs` with a threshold.
:func:`pattern_table` gives its mean per family with a seeded bootstrap interval over seeds (:func:`bootstrap_ci`,
whose home is :mod:`lora_lens.stats`) and a verdict, and pools the families with a stratified bootstrap
(:func:`pooled_ci`, also from :mod:`lora_lens.stats`; both re-exported here); :func:`declare_patterns`
and :func:`record_patterns` carry them into the hypothesis ledger, :func:`pattern_records` into a summary.
:mod:`lora_lens.studies.compare` (which runs the study) re-exports these names: notebook 06 reads them there.

Example:
    >>> m, lo, hi = bootstrap_ci([0.2, 0.4, 0.6])
    >>> lo <= m <= hi
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from lora_lens import ledger
from lora_lens.errors import ConfigError
from lora_lens.stats import bootstrap_ci, pooled_ci

if TYPE_CHECKING:  # a Study is only read here; compare (which makes it) imports this module
    from lora_lens.studies.compare import Study

__all__ = ["PATTERNS", "Pattern", "bootstrap_ci", "declare_patterns", "pattern_records", "pattern_table",
           "pooled_ci", "record_patterns"]


# ---------------------------------------------------------------------------------------------------------------
# Universal patterns


@dataclass(frozen=True)
class Pattern:
    """A candidate universal pattern: a per-run statistic (a column of :attr:`Study.runs`) and a threshold.

    Attributes:
        id: Ledger id (``xf-…``).
        name: Short name for tables.
        claim: The claim in words.
        column: Column of ``Study.runs`` holding the per-run statistic.
        comparator: ``">"`` or ``"<"``.
        threshold: The threshold.
        falsifier: What would refute it.
    """

    id: str
    name: str
    claim: str
    column: str
    comparator: str
    threshold: float
    falsifier: str

    def passes(self, value: float) -> bool:
        """Whether ``value`` is on the claimed side of the threshold."""
        return value > self.threshold if self.comparator == ">" else value < self.threshold


PATTERNS = (
    Pattern("xf-upper-half", "updates concentrate in the upper half",
            "A fact-edit LoRA puts most of its update energy in the upper half of the network (relative depth > 0.5)",
            "upper_share", ">", 0.5, "half or less of the update energy lies above relative depth 0.5"),
    Pattern("xf-mlp-over-attention", "MLP carries more update energy than attention",
            "MLP modules carry more of a fact-edit LoRA's update energy than attention modules",
            "mlp_share", ">", 0.5, "the MLP modules hold half of the update energy or less"),
    Pattern("xf-effective-rank-low", "effective rank far below nominal",
            "The entropy effective rank of a LoRA update is below half its nominal rank, in every architecture",
            "eff_rank_ratio", "<", 0.5, "the mean effective rank of the modules is half the nominal rank or more"),
    Pattern("xf-energy-in-few-directions", "energy in few directions (stable rank)",
            "Most of a LoRA update's energy sits in a few directions: stable rank below a quarter of the rank",
            "stable_rank_ratio", "<", 0.25, "the mean stable rank of the modules is a quarter of the rank or more"),
    Pattern("xf-seeds-share-direction", "seeds share the top output direction",
            "Adapters trained with different seeds on the same base write along the same top direction",
            "phi_seeds", ">", 0.5, "mean phi(1,1) of the output singular vectors between seeds is 0.5 or less"),
    Pattern("xf-attribution-mlp", "MLP modules carry the edit (attribution)",
            "Switching modules off one at a time, MLP modules carry most of the edit",
            "attr_mlp_share", ">", 0.5, "the MLP modules hold half or less of the positive ablation attribution"),
    Pattern("xf-same-input-tokens", "the same input tokens drive the change",
            "The input tokens that drive a fact edit rank alike in every architecture (same probes, same tokens)",
            "token_agreement", ">", 0.5,
            "the mean Spearman correlation with the other families' input attributions is 0.5 or less"),
)
"""The candidate patterns of notebook 06."""


def _verdict(p: Pattern, lo: float, hi: float) -> str:
    if p.passes(lo) and p.passes(hi):
        return "holds"
    if not p.passes(lo) and not p.passes(hi):
        return "fails"
    return "unclear"


def _overall(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "universal"
    if verdicts and all(v == "fails" for v in verdicts):
        return "none"
    if any(v == "holds" for v in verdicts):
        return "some families"
    return "unclear"


def pattern_table(study: Study, patterns=PATTERNS, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> pd.DataFrame:
    """Each pattern's statistic per family (mean over seeds, bootstrap interval, verdict) and over all families.

    A family's verdict is ``holds`` when its whole interval is on the claimed side of the threshold, ``fails``
    when it is on the other side, else ``unclear``. The row ``family == "all"`` pools the families (mean of family
    means, stratified bootstrap) and carries the overall verdict: ``universal`` (holds in every family), ``none``
    (fails in every family), ``some families`` (holds in some) or ``unclear``. A pattern without values (e.g.
    agreement with other families in a one-family study) is left out.

    Returns:
        DataFrame ``pattern, name, family, statistic, ci_low, ci_high, threshold, comparator, verdict, n``.

    Raises:
        ConfigError: A pattern's column is missing from ``study.runs``.
    """
    rows = []
    for p in patterns:
        if p.column not in study.runs.columns:
            raise ConfigError(f"pattern {p.id!r} reads column {p.column!r}, which study.runs lacks; columns: "
                              f"{list(study.runs.columns)}")
        groups = {f: g[p.column].dropna().to_numpy(float) for f, g in study.runs.groupby("family", sort=False)}
        groups = {f: v for f, v in groups.items() if v.size}
        if not groups:
            continue
        fam_rows = []
        for f, v in groups.items():
            m, lo, hi = bootstrap_ci(v, n_boot, level, seed)
            fam_rows.append({"pattern": p.id, "name": p.name, "family": f, "statistic": m, "ci_low": lo,
                             "ci_high": hi, "threshold": p.threshold, "comparator": p.comparator,
                             "verdict": _verdict(p, lo, hi), "n": int(v.size)})
        m, lo, hi = pooled_ci(groups, n_boot, level, seed)
        rows += fam_rows + [{"pattern": p.id, "name": p.name, "family": "all", "statistic": m, "ci_low": lo,
                             "ci_high": hi, "threshold": p.threshold, "comparator": p.comparator,
                             "verdict": _overall([r["verdict"] for r in fam_rows]),
                             "n": int(sum(v.size for v in groups.values()))}]
    return pd.DataFrame(rows)


def declare_patterns(patterns=PATTERNS, path=None) -> None:
    """Pre-register every pattern in the hypothesis ledger (idempotent).

    Each is a claim of universality: evidence is one record per family, the interval bound nearest the threshold
    (``ci_low`` for ``>``, ``ci_high`` for ``<``), so a family passes only when its whole interval does, and the
    ledger's default rule (refuted by one failing record) calls a pattern supported only where it is universal.
    """
    for p in patterns:
        bound = "ci_low" if p.comparator == ">" else "ci_high"
        ledger.declare(p.id, p.claim, metric=f"{p.column} ({bound} of the 95% bootstrap interval over seeds, per "
                       "family)", comparator=p.comparator, threshold=p.threshold,
                       falsifier=f"in some family {p.falsifier}", tags=["06", "across-families"], path=path)


def record_patterns(table: pd.DataFrame, patterns=PATTERNS, path=None) -> dict[str, str]:
    """Record each family's interval bound for each pattern of ``table`` (from :func:`pattern_table`).

    Returns:
        ``{pattern id: ledger verdict}``.
    """
    by_id = {p.id: p for p in patterns}
    verdicts = {}
    for r in table[table["family"] != "all"].itertuples(index=False):
        p = by_id[r.pattern]
        value = r.ci_low if p.comparator == ">" else r.ci_high
        verdicts[p.id] = ledger.record(p.id, float(value), notes=f"{r.family}: mean {r.statistic:.3f}, 95% CI "
                                       f"[{r.ci_low:.3f}, {r.ci_high:.3f}] over {r.n} seeds", path=path).verdict
    return verdicts


def pattern_records(table: pd.DataFrame) -> list[dict]:
    """The pattern table as JSON-ready records: the pooled row of each pattern plus its per-family rows.

    Returns:
        ``[{"id", "name", "statistic", "ci_low", "ci_high", "verdict", "threshold", "comparator",
        "by_family": {family: {"statistic", "ci_low", "ci_high", "verdict"}}}]``.
    """
    out = []
    for pid, t in table.groupby("pattern", sort=False):
        pooled = t[t["family"] == "all"].iloc[0]
        out.append({"id": pid, "name": pooled["name"], "statistic": float(pooled["statistic"]),
                    "ci_low": float(pooled["ci_low"]), "ci_high": float(pooled["ci_high"]),
                    "verdict": pooled["verdict"], "threshold": float(pooled["threshold"]),
                    "comparator": pooled["comparator"],
                    "by_family": {r.family: {"statistic": float(r.statistic), "ci_low": float(r.ci_low),
                                             "ci_high": float(r.ci_high), "verdict": r.verdict}
                                  for r in t[t["family"] != "all"].itertuples(index=False)}})
    return out
