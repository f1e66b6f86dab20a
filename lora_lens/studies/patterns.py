"""Claims over seeds: the candidate universal patterns, their verdicts and ledger records.

A pattern (:class:`Pattern`) is a per-run statistic of :attr:`lora_lens.studies.compare.Study.runs` with a threshold
and a null (what the statistic would be by chance, per run: a random adapter of the same shapes, the parameter
share, the Marchenko–Pastur expectation; see :mod:`lora_lens.studies.nulls`). :func:`pattern_table` gives its mean
per family with a seeded bootstrap interval over seeds (:func:`bootstrap_ci`, whose home is :mod:`lora_lens.stats`),
a verdict against the threshold and one against the null, and pools the families with a stratified bootstrap
(:func:`pooled_ci`, also from :mod:`lora_lens.stats`; both re-exported here); :func:`declare_patterns`
and :func:`record_patterns` carry them into the hypothesis ledger, :func:`pattern_records` into a summary.
:mod:`lora_lens.studies.compare` (which runs the study) re-exports these names: notebook 06 reads them there.

Example:
    >>> m, lo, hi = bootstrap_ci([0.2, 0.4, 0.6])
    >>> lo <= m <= hi
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lora_lens import ledger
from lora_lens.errors import ConfigError
from lora_lens.stats import bootstrap_ci, pooled_ci

if TYPE_CHECKING:  # a Study is only read here; compare (which makes it) imports this module
    from lora_lens.studies.compare import Study

__all__ = ["PATTERNS", "Pattern", "bootstrap_ci", "declare_patterns", "null_id", "pattern_prose", "pattern_records",
           "pattern_table", "pooled_ci", "record_patterns"]


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
        nulls: What the statistic would be by chance, as ``(label, source)`` pairs: ``source`` is a column of
            ``Study.runs`` (one null value per run, e.g. the run's random adapter or its parameter share) or a
            constant. The pattern clears its null when it is beyond the strictest of them (the largest for ``>``,
            the smallest for ``<``, per run). Empty: no null (its verdict then rests on the threshold alone).
    """

    id: str
    name: str
    claim: str
    column: str
    comparator: str
    threshold: float
    falsifier: str
    nulls: tuple = ()

    def passes(self, value: float) -> bool:
        """Whether ``value`` is on the claimed side of the threshold."""
        return value > self.threshold if self.comparator == ">" else value < self.threshold


PATTERNS = (
    Pattern("xf-upper-half", "updates concentrate in the upper half",
            "A fact-edit LoRA puts most of its update energy in the upper half of the network (relative depth > 0.5)",
            "upper_share", ">", 0.5, "half or less of the update energy lies above relative depth 0.5",
            (("random adapter", "null_upper_share"), ("parameter share", "upper_param_share"))),
    Pattern("xf-mlp-over-attention", "MLP carries more update energy than attention",
            "MLP modules carry more of a fact-edit LoRA's update energy than attention modules",
            "mlp_share", ">", 0.5, "the MLP modules hold half of the update energy or less",
            (("random adapter", "null_mlp_share"), ("parameter share", "mlp_param_share"))),
    Pattern("xf-effective-rank-low", "effective rank far below nominal",
            "The entropy effective rank of a LoRA update is below half its nominal rank, in every architecture",
            "eff_rank_ratio", "<", 0.5, "the mean effective rank of the modules is half the nominal rank or more",
            (("random adapter", "null_eff_rank_ratio"), ("Marchenko–Pastur", "mp_eff_rank_ratio"))),
    Pattern("xf-energy-in-few-directions", "energy in few directions (stable rank)",
            "Most of a LoRA update's energy sits in a few directions: stable rank below a quarter of the rank",
            "stable_rank_ratio", "<", 0.25, "the mean stable rank of the modules is a quarter of the rank or more",
            (("random adapter", "null_stable_rank_ratio"), ("Marchenko–Pastur", "mp_stable_rank_ratio"))),
    Pattern("xf-seeds-share-direction", "seeds share the top output direction",
            "Adapters trained with different seeds on the same base write along the same top direction",
            "phi_seeds", ">", 0.5, "mean phi(1,1) of the output singular vectors between seeds is 0.5 or less",
            (("random adapters", "null_phi_seeds"), ("random directions", "phi_chance"))),
    Pattern("xf-attribution-mlp", "MLP modules carry the edit (attribution)",
            "Switching modules off one at a time, MLP modules carry most of the edit",
            "attr_mlp_share", ">", 0.5, "the MLP modules hold half or less of the positive ablation attribution",
            (("parameter share", "mlp_param_share"),)),
    Pattern("xf-same-input-tokens", "the same input tokens drive the change",
            "The input tokens that drive a fact edit rank alike in every architecture (same probes, same tokens)",
            "token_agreement", ">", 0.5,
            "the mean Spearman correlation with the other families' input attributions is 0.5 or less",
            (("independent rankings", 0.0),)),
)
"""The candidate patterns of notebook 06."""


def _side(p: Pattern, lo: float, hi: float, threshold: float, yes: str, no: str) -> str:
    """``yes`` when the whole interval is on the claimed side of ``threshold``, ``no`` when on the other side."""
    check = Pattern(p.id, p.name, p.claim, p.column, p.comparator, threshold, p.falsifier)
    if check.passes(lo) and check.passes(hi):
        return yes
    if not check.passes(lo) and not check.passes(hi):
        return no
    return "unclear"


def _verdict(p: Pattern, lo: float, hi: float) -> str:
    return _side(p, lo, hi, p.threshold, "holds", "fails")


def _overall(verdicts: list[str], vs_null: list[str] | None = None) -> str:
    """The verdict over families: ``universal`` only where every family holds *and* clears its null."""
    if verdicts and all(v == "holds" for v in verdicts):
        return "universal" if vs_null is None or all(v == "clears" for v in vs_null) else "explained by null"
    if verdicts and all(v == "fails" for v in verdicts):
        return "none"
    if any(v == "holds" for v in verdicts):
        return "some families"
    return "unclear"


def _overall_null(vs_null: list[str]) -> str:
    for v in ("clears", "explained"):
        if all(x == v for x in vs_null):
            return v
    return "some families" if "clears" in vs_null else "unclear"


def null_id(p: Pattern) -> str:
    """Ledger id of the claim that ``p`` holds beyond its null (``<id>-beyond-null``)."""
    return f"{p.id}-beyond-null"


def _null_values(p: Pattern, g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-run strictest null of ``p`` over the runs ``g``, per-run margin (statistic − null), its label."""
    values = np.column_stack([g[src].to_numpy(float) if isinstance(src, str) else np.full(len(g), float(src))
                              for _, src in p.nulls])
    pick = np.argmax if p.comparator == ">" else np.argmin
    label = p.nulls[int(pick(values.mean(axis=0)))][0]
    strictest = values.max(axis=1) if p.comparator == ">" else values.min(axis=1)
    return strictest, g[p.column].to_numpy(float) - strictest, label


def pattern_table(study: Study, patterns=PATTERNS, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> pd.DataFrame:
    """Each pattern's statistic per family (mean over seeds, bootstrap interval, verdict) against its threshold and
    its null, and over all families.

    A family's verdict is ``holds`` when its whole interval is on the claimed side of the threshold, ``fails``
    when it is on the other side, else ``unclear``. Against the null (:attr:`Pattern.nulls`, the strictest per run),
    the margin statistic − null is bootstrapped over the same seeds (paired): ``vs_null`` is ``clears`` when its
    whole interval is on the claimed side of 0, ``explained`` when it is on the other side (chance does as well),
    else ``unclear``. The row ``family == "all"`` pools the families (mean of family means, stratified bootstrap)
    and carries the overall verdict: ``universal`` (holds *and* clears its null in every family), ``explained by
    null`` (holds in every family, but does not clear its null in all), ``none`` (fails in every family), ``some
    families`` (holds in some) or ``unclear``. A pattern without values (e.g. agreement with other families in a
    one-family study, or between bases whose tokenizers differ) is left out, with its reason in
    ``table.attrs["skipped"]`` (``{pattern id: {"name", "reason"}}``, the reason from ``study.skipped``).

    Returns:
        DataFrame ``pattern, name, family, statistic, ci_low, ci_high, threshold, comparator, verdict, n, null,
        null_statistic, null_ci_low, null_ci_high, margin, margin_ci_low, margin_ci_high, vs_null`` (the null
        columns NaN / empty for a pattern without nulls) and ``shuffled_statistic, shuffled_ci_low,
        shuffled_ci_high, vs_shuffled`` (``beyond``, ``not beyond``, ``unclear``: the same statistic of adapters
        trained on shuffled answers, a reference beside the null, when ``study.runs`` has ``shuffled_<column>``).

    Raises:
        ConfigError: A pattern's column, or one of its null columns, is missing from ``study.runs``.
    """
    rows, skipped = [], {}
    for p in patterns:
        cols = [p.column] + [src for _, src in p.nulls if isinstance(src, str)]
        for c in cols:
            if c not in study.runs.columns:
                what = "reads column" if c == p.column else "compares with the null column"
                raise ConfigError(f"pattern {p.id!r} {what} {c!r}, which study.runs lacks; columns: "
                                  f"{list(study.runs.columns)}")
        groups = {f: g.dropna(subset=cols) for f, g in study.runs.groupby("family", sort=False)}
        groups = {f: g for f, g in groups.items() if len(g)}
        if not groups:
            skipped[p.id] = {"name": p.name, "reason": getattr(study, "skipped", {}).get(
                p.column, f"no run has a value of {p.column!r}")}
            continue
        base = {"pattern": p.id, "name": p.name, "threshold": p.threshold, "comparator": p.comparator}
        fam_rows, nulls, margins = [], {}, {}
        for f, g in groups.items():
            v = g[p.column].to_numpy(float)
            m, lo, hi = bootstrap_ci(v, n_boot, level, seed)
            row = {**base, "family": f, "statistic": m, "ci_low": lo, "ci_high": hi,
                   "verdict": _verdict(p, lo, hi), "n": int(v.size), **_null_entry(p, g, n_boot, level, seed)}
            if p.nulls:
                nulls[f], margins[f], _ = _null_values(p, g)
            fam_rows.append(row)
        for row, g in zip(fam_rows, groups.values()):
            row.update(_shuffled_entry(p, g, n_boot, level, seed))
        m, lo, hi = pooled_ci({f: g[p.column].to_numpy(float) for f, g in groups.items()}, n_boot, level, seed)
        pooled = {**base, "family": "all", "statistic": m, "ci_low": lo, "ci_high": hi,
                  "verdict": _overall([r["verdict"] for r in fam_rows],
                                      [r["vs_null"] for r in fam_rows] if p.nulls else None),
                  "n": int(sum(len(g) for g in groups.values())), **_null_entry(p, None, n_boot, level, seed)}
        if p.nulls:
            nm, nlo, nhi = pooled_ci(nulls, n_boot, level, seed)
            mm, mlo, mhi = pooled_ci(margins, n_boot, level, seed)
            pooled.update(null=" / ".join(dict.fromkeys(r["null"] for r in fam_rows)), null_statistic=nm,
                          null_ci_low=nlo, null_ci_high=nhi, margin=mm, margin_ci_low=mlo, margin_ci_high=mhi,
                          vs_null=_overall_null([r["vs_null"] for r in fam_rows]))
        pooled.update(_shuffled_entry(p, None, n_boot, level, seed))
        shuffled = f"shuffled_{p.column}"
        if all(np.isfinite(r["shuffled_statistic"]) for r in fam_rows):
            ref = {f: g[shuffled].to_numpy(float) for f, g in groups.items()}
            sm, slo, shi = pooled_ci(ref, n_boot, level, seed)
            dm, dlo, dhi = pooled_ci({f: g[p.column].to_numpy(float) - ref[f] for f, g in groups.items()}, n_boot,
                                     level, seed)
            vs = [r["vs_shuffled"] for r in fam_rows]
            pooled.update(shuffled_statistic=sm, shuffled_ci_low=slo, shuffled_ci_high=shi,
                          vs_shuffled=next((v for v in ("beyond", "not beyond") if all(x == v for x in vs)),
                                           "some families" if "beyond" in vs else "unclear"))
        rows += fam_rows + [pooled]
    table = pd.DataFrame(rows)
    table.attrs["skipped"] = skipped
    return table


def _null_entry(p: Pattern, g: pd.DataFrame | None, n_boot: int, level: float, seed: int) -> dict:
    """The null columns of one family's row (NaN when ``p`` has no null or ``g`` is None)."""
    out = {"null": "", "null_statistic": math.nan, "null_ci_low": math.nan, "null_ci_high": math.nan,
           "margin": math.nan, "margin_ci_low": math.nan, "margin_ci_high": math.nan, "vs_null": ""}
    if not p.nulls or g is None:
        return out
    null, margin, label = _null_values(p, g)
    nm, nlo, nhi = bootstrap_ci(null, n_boot, level, seed)
    mm, mlo, mhi = bootstrap_ci(margin, n_boot, level, seed)
    return {"null": label, "null_statistic": nm, "null_ci_low": nlo, "null_ci_high": nhi, "margin": mm,
            "margin_ci_low": mlo, "margin_ci_high": mhi, "vs_null": _side(p, mlo, mhi, 0.0, "clears", "explained")}


def _shuffled_entry(p: Pattern, g: pd.DataFrame | None, n_boot: int, level: float, seed: int) -> dict:
    """The shuffled-answers reference of one family's row: the same statistic of the adapters trained on shuffled
    answers (``shuffled_<column>`` of the runs), and whether the pattern is beyond it (paired margin over seeds)."""
    out = {"shuffled_statistic": math.nan, "shuffled_ci_low": math.nan, "shuffled_ci_high": math.nan,
           "vs_shuffled": ""}
    col = f"shuffled_{p.column}"
    if g is None or col not in g.columns or not g[col].notna().all():
        return out
    ref = g[col].to_numpy(float)
    sm, slo, shi = bootstrap_ci(ref, n_boot, level, seed)
    _, dlo, dhi = bootstrap_ci(g[p.column].to_numpy(float) - ref, n_boot, level, seed)
    return {"shuffled_statistic": sm, "shuffled_ci_low": slo, "shuffled_ci_high": shi,
            "vs_shuffled": _side(p, dlo, dhi, 0.0, "beyond", "not beyond")}


def declare_patterns(patterns=PATTERNS, path=None) -> None:
    """Pre-register every pattern in the hypothesis ledger (idempotent), and, for a pattern with a null, the claim
    that it holds beyond that null (:func:`null_id`).

    Each is a claim of universality: evidence is one record per family, the interval bound nearest the threshold
    (``ci_low`` for ``>``, ``ci_high`` for ``<``), so a family passes only when its whole interval does, and the
    ledger's default rule (refuted by one failing record) calls a pattern supported only where it is universal.
    The beyond-null claim reads the margin statistic − strictest null in the same way, against 0.
    """
    for p in patterns:
        bound = "ci_low" if p.comparator == ">" else "ci_high"
        ledger.declare(p.id, p.claim, metric=f"{p.column} ({bound} of the 95% bootstrap interval over seeds, per "
                       "family)", comparator=p.comparator, threshold=p.threshold,
                       falsifier=f"in some family {p.falsifier}", tags=["06", "across-families"], path=path)
        if p.nulls:
            labels = ", ".join(label for label, _ in p.nulls)
            ledger.declare(null_id(p), f"{p.claim}, beyond what chance predicts ({labels})",
                           metric=f"{p.column} − its strictest null per run ({bound} of the 95% bootstrap interval "
                           "over seeds, per family)", comparator=p.comparator, threshold=0.0,
                           falsifier=f"in some family the {p.column} is not clearly beyond its null ({labels})",
                           tags=["06", "across-families", "null"], path=path)


def record_patterns(table: pd.DataFrame, patterns=PATTERNS, path=None) -> dict[str, str]:
    """Record each family's interval bound for each pattern of ``table`` (from :func:`pattern_table`), and of its
    margin over the null for the beyond-null claim.

    Returns:
        ``{pattern id: ledger verdict}``, with ``<id>-beyond-null`` keys for patterns with a null.
    """
    by_id = {p.id: p for p in patterns}
    verdicts = {}
    for r in table[table["family"] != "all"].itertuples(index=False):
        p = by_id[r.pattern]
        low = p.comparator == ">"
        value = r.ci_low if low else r.ci_high
        verdicts[p.id] = ledger.record(p.id, float(value), notes=f"{r.family}: mean {r.statistic:.3f}, 95% CI "
                                       f"[{r.ci_low:.3f}, {r.ci_high:.3f}] over {r.n} seeds", path=path).verdict
        if p.nulls:
            margin = r.margin_ci_low if low else r.margin_ci_high
            verdicts[null_id(p)] = ledger.record(
                null_id(p), float(margin), notes=f"{r.family}: {r.statistic:.3f} against {r.null} "
                f"{r.null_statistic:.3f} [{r.null_ci_low:.3f}, {r.null_ci_high:.3f}]; margin {r.margin:.3f}, 95% CI "
                f"[{r.margin_ci_low:.3f}, {r.margin_ci_high:.3f}] over {r.n} seeds", path=path).verdict
    return verdicts


def _null_record(r) -> dict | None:
    if not r.null:
        return None
    shuffled = None
    if getattr(r, "vs_shuffled", ""):
        shuffled = {"statistic": float(r.shuffled_statistic), "ci_low": float(r.shuffled_ci_low),
                    "ci_high": float(r.shuffled_ci_high), "vs_shuffled": r.vs_shuffled}
    return {"kind": r.null, "statistic": float(r.null_statistic), "ci_low": float(r.null_ci_low),
            "ci_high": float(r.null_ci_high), "margin": float(r.margin), "margin_ci_low": float(r.margin_ci_low),
            "margin_ci_high": float(r.margin_ci_high), "vs_null": r.vs_null, "clears": r.vs_null == "clears",
            "shuffled": shuffled}


def pattern_records(table: pd.DataFrame, patterns=PATTERNS) -> list[dict]:
    """The pattern table as JSON-ready records: the pooled row of each pattern plus its per-family rows.

    Returns:
        ``[{"id", "name", "statistic", "ci_low", "ci_high", "verdict", "threshold", "comparator", "null",
        "by_family": {family: {"statistic", "ci_low", "ci_high", "verdict", "null"}}}]``. ``null`` is None for a
        pattern without one, else ``{"kind"`` (the strictest null), ``"nulls"`` (all its nulls, pooled row only),
        ``"statistic", "ci_low", "ci_high"`` (the null's mean and interval), ``"margin", "margin_ci_low",
        "margin_ci_high"`` (statistic − null), ``"vs_null"`` and ``"clears"`` (True when the pattern clears it),
        ``"shuffled"``: the shuffled-answers reference ``{"statistic", "ci_low", "ci_high", "vs_shuffled"}`` or None}.
    """
    labels = {p.id: [label for label, _ in p.nulls] for p in patterns}
    out = []
    for pid, t in table.groupby("pattern", sort=False):
        pooled = t[t["family"] == "all"].iloc[0]
        null = _null_record(pooled)
        if null is not None:
            null["nulls"] = labels.get(pid, [])
        out.append({"id": pid, "name": pooled["name"], "statistic": float(pooled["statistic"]),
                    "ci_low": float(pooled["ci_low"]), "ci_high": float(pooled["ci_high"]),
                    "verdict": pooled["verdict"], "threshold": float(pooled["threshold"]),
                    "comparator": pooled["comparator"], "null": null,
                    "by_family": {r.family: {"statistic": float(r.statistic), "ci_low": float(r.ci_low),
                                             "ci_high": float(r.ci_high), "verdict": r.verdict,
                                             "null": _null_record(r)}
                                  for r in t[t["family"] != "all"].itertuples(index=False)}})
    return out


def _names(rows) -> str:
    return ", ".join(f"*{r['name']}*" for r in rows) if rows else "none"


def pattern_prose(table: pd.DataFrame) -> str:
    """The verdicts of a pattern table in words (Markdown), every number read from ``table``: which patterns are
    universal against their null, which hold but are explained by it, one line per pattern with its null, and one
    line per pattern this run could not measure (``table.attrs["skipped"]``) with the reason.

    Returns:
        Markdown text (a lead paragraph and a bullet per pattern).
    """
    pooled = [r for _, r in table[table["family"] == "all"].iterrows()]
    fams = table[table["family"] != "all"]
    beyond = [r for r in pooled if r["vs_null"] == "clears" and r["verdict"] != "universal"]
    universal = [r for r in pooled if r["verdict"] == "universal"]
    explained = [r for r in pooled if r["verdict"] == "explained by null"]
    lead = (f"**Universal against its null** (holds and clears its null in every family): {_names(universal)}. "
            f"**Holds in every family but explained by its null**: {_names(explained)}. "
            f"**Beyond its null in every family without passing its threshold everywhere**: {_names(beyond)}.")
    lines = [lead, ""]
    for r in pooled:
        t = fams[fams["pattern"] == r["pattern"]]
        line = (f"- **{r['name']}** (`{r['pattern']}`, {r['comparator']} {r['threshold']:g}): {r['statistic']:.2f} "
                f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] over all families — *{r['verdict']}*")
        if r["null"]:
            clear = list(t.loc[t["vs_null"] == "clears", "family"])
            explained = list(t.loc[t["vs_null"] == "explained", "family"])
            detail = {"clears": "the pattern clears it in every family",
                      "explained": "chance does as well in every family: the null explains it"}.get(
                r["vs_null"], f"it clears it in {len(clear)} of {len(t)} families ({', '.join(clear) or 'none'}"
                f"{'; explained in ' + ', '.join(explained) if explained else ''})")
            line += (f"; its null ({r['null']}) is {r['null_statistic']:.2f} [{r['null_ci_low']:.2f}, "
                     f"{r['null_ci_high']:.2f}], margin {r['margin']:+.2f} [{r['margin_ci_low']:+.2f}, "
                     f"{r['margin_ci_high']:+.2f}]: {detail}.")
            if r["vs_shuffled"]:
                said = {"beyond": "the pattern is beyond it in every family: specific to what the edits teach",
                        "not beyond": "the pattern is no larger in any family: training on these prompts shows it "
                                      "whatever the answers",
                        "some families": "the pattern is beyond it in some families only"}.get(
                    r["vs_shuffled"], "not clearly different")
                line += (f" Trained on shuffled answers: {r['shuffled_statistic']:.2f} [{r['shuffled_ci_low']:.2f}, "
                         f"{r['shuffled_ci_high']:.2f}] — {said}.")
        else:
            line += "; no null."
        lines.append(line)
    for pid, s in table.attrs.get("skipped", {}).items():
        lines.append(f"- **{s['name']}** (`{pid}`): not measured in this run — {s['reason']}.")
    return "\n".join(lines)
