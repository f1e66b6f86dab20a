"""Across families: the same LoRA study on several architectures, and which adaptation patterns are universal.

:func:`run_study` trains the same task with the same adapter spec on every family of the zoo (one cached base per
family, several adapter seeds) and measures every run in a space the architectures share:

* **relative depth** (layer / (layers − 1)) instead of layer index, since the families differ in depth;
* **shared module types** (:func:`shared_type`): ``attn_in`` (q/k/v, fused ``qkv_proj``/``c_attn``/
  ``query_key_value``), ``attn_out`` (``o_proj``/``c_proj``/``dense``), ``mlp_in`` (gate/up, fused
  ``gate_up_proj``, ``c_fc``/``dense_h_to_4h``) and ``mlp_out`` (``down_proj``/``c_proj``/``dense_4h_to_h``);
* **behaviour on the same probes** and **input attributions on the same prompts** (every zoo family uses the
  world's tokenizer, so a prompt has the same tokens in every family and attributions compare token by token);
* **vocabulary**: the leading write-side directions of the last layer read as tokens (same vocabulary for all).

Each candidate pattern (:data:`PATTERNS`) is a per-run statistic with a threshold and a null measured in the same
run with the same shapes (a random adapter, the parameter share, the Marchenko–Pastur expectation:
:mod:`lora_lens.studies.nulls`). :func:`pattern_table` gives its mean per family with a seeded bootstrap 95%
interval over seeds, a per-family verdict (``holds`` when the whole interval is on the claimed side, ``fails`` when
it is on the other side, ``unclear`` otherwise), whether it clears its null, and an overall verdict (``universal``
only when it holds and clears its null in every family; ``explained by null``, ``some families``, ``none``,
``unclear``); :func:`record_patterns` writes them to
the hypothesis ledger. The patterns, intervals and verdicts live in :mod:`lora_lens.studies.patterns` and are
re-exported here, so notebook 06 reads the whole study from ``compare``. :func:`portability` asks whether an
adapter still works on another base of its family.

With three seeds a bootstrap interval is coarse (there are only ten distinct resamples): it shows the spread
over seeds, not a precise coverage guarantee.

Example:
    >>> study = run_study(["llama", "gpt2"], seeds=2, size="tiny", world=make_world(n_entities=24))  # doctest: +SKIP
    >>> pattern_table(study)                                                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from peft import PeftModel

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError
from lora_lens.lab.modules import SHARED_TYPES, shared_type
from lora_lens.lab.probes import evaluate
from lora_lens.lab.study import fit_adapter
from lora_lens.lab.train import LoraSpec, check_spec, default_spec, train_lora
from lora_lens.lab.world import Task, World, make_task, make_world
from lora_lens.lab.zoo import FAMILIES, PRETRAIN, SIZES, Pretrained, get_pretrained, load_model, pretrain
from lora_lens.lens import attribution as at
from lora_lens.lens import delta
from lora_lens.studies.nulls import SHUFFLED_STATS, shuffled_task, upper_weight, weight_nulls, weight_stats
from lora_lens.studies.patterns import (PATTERNS, Pattern, bootstrap_ci, declare_patterns, null_id, pattern_prose,
                                        pattern_records, pattern_table, pooled_ci, record_patterns)
from lora_lens.utils import progress_bar

__all__ = ["SHARED_TYPES", "Study", "attribution_agreement", "check_families", "check_seeds", "pair_matrix",
           "portability", "portability_summary", "run_study", "shared_type",
           # re-exported from lora_lens.studies.patterns (notebook 06 reads the study's verdicts here)
           "PATTERNS", "Pattern", "bootstrap_ci", "declare_patterns", "null_id", "pattern_prose", "pattern_records",
           "pattern_table", "pooled_ci", "record_patterns"]

def check_families(families) -> list[str]:
    """Validate a list of zoo families; return it as a list.

    Raises:
        ConfigError: Not a non-empty list of distinct known family names (the message names the bad value).
    """
    if isinstance(families, str):
        raise ConfigError(f"families={families!r} is one string: pass a list, e.g. [{families!r}, 'gpt2']")
    families = list(families) if isinstance(families, (list, tuple)) else families
    if not isinstance(families, list) or not families:
        raise ConfigError(f"families={families!r} is empty or not a list: pass some of {list(FAMILIES)}")
    for f in families:
        if f not in FAMILIES:
            raise ConfigError(f"family {f!r} in families is unknown; use some of {list(FAMILIES)}")
    dup = sorted({f for f in families if families.count(f) > 1})
    if dup:
        raise ConfigError(f"families={families!r} repeats {dup}: list each family once")
    return families


def check_seeds(seeds) -> list[int]:
    """Validate adapter seeds: a count ≥ 2 (seeds 0 … n−1) or a list of ≥ 2 distinct integers.

    Raises:
        ConfigError: Fewer than two seeds, or not integers (an interval over seeds needs at least two).
    """
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds={seeds!r} is not a number of seeds: pass an integer ≥ 2, e.g. 3")
    if isinstance(seeds, int):
        if seeds < 2:
            raise ConfigError(f"seeds={seeds} is too few: an interval over seeds needs at least 2 (use 3)")
        return list(range(seeds))
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                       for s in seeds):
        raise ConfigError(f"seeds={seeds!r} must be an integer ≥ 2 or a list of integer seeds, e.g. [0, 1, 2]")
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={list(seeds)!r} needs at least 2 distinct seeds, each listed once, e.g. [0, 1, 2]")
    return list(seeds)


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Study:
    """Everything :func:`run_study` measured.

    Attributes:
        families: Families studied, in order.
        seeds: Adapter seeds (the base of each family is the same for all seeds).
        size: Size preset of the bases.
        task: The task (the same planted truth for every run).
        spec: The adapter spec (the same for every run).
        runs: One row per (family, seed): behaviour (``efficacy``, ``paraphrase``, ``specificity``), weight space
            (``upper_share``, ``mlp_share``, ``eff_rank_ratio``, ``stable_rank_ratio``) and their nulls
            (:data:`lora_lens.studies.nulls.NULL_COLUMNS`, the parameter shares ``upper_param_share`` and
            ``mlp_param_share``), φ with the other seeds (``phi_seeds`` output side, ``phi_seeds_right`` input side,
            ``null_phi_seeds`` between the random adapters of the seeds, ``phi_chance``), with ``shuffled=True``
            the same weight statistics of an adapter trained on shuffled answers (``shuffled_…``), component
            attribution
            (``attr_mlp_share``, ``attr_upper_share``, ``top_component``), input attribution (``entity_top1``,
            ``token_agreement`` with the other families, ``vocab_overlap`` with the other families), training
            time and the adapter folder.
        energy: Long table ``family, seed, layer, depth, share``: update energy per layer at its relative depth.
        types: Long table ``family, seed, shared_type, energy_share, param_share``.
        phi: One row per seed pair of a family: ``family, seed_a, seed_b, phi_left, phi_right, null_phi_left``
            (between the two seeds' random adapters), ``chance_left, chance_right``.
        tokens: ``{(family, seed): set of tokens}`` read from the last layer's leading write-side directions.
        attributions: ``{(family, seed): [difference attribution per shared probe]}``.
        probes: The shared efficacy probe prompts the attributions are about.
        seconds: Wall time of the study.
    """

    families: list[str]
    seeds: list[int]
    size: str
    task: Task
    spec: LoraSpec
    runs: pd.DataFrame
    energy: pd.DataFrame
    types: pd.DataFrame
    phi: pd.DataFrame
    tokens: dict = field(repr=False)
    attributions: dict = field(repr=False)
    probes: list[str] = field(repr=False)
    seconds: float = 0.0


def _first(task: Task, n: int) -> Task:
    return dataclasses.replace(task, probes={s: ps[:n] for s, ps in task.probes.items()})


def _measure(fit, task: Task, n_probes: int, ig_steps: int, top_tokens: int, seed: int,
             null_samples: int) -> tuple[dict, dict]:
    """Per-run numbers of one fitted adapter (weights and their nulls, components, input attribution, vocabulary)."""
    mods = delta.lora_modules(fit.model)
    summ = delta.summary(mods, intruders=False)
    summ["shared_type"] = summ["module_type"].map(shared_type)
    summ["params"] = summ["rank"] * (summ["in_features"] + summ["out_features"])
    nulls, random = weight_nulls(mods, seed=seed, n_samples=null_samples)
    row = {**weight_stats(summ), **nulls, "n_modules": len(summ), "n_layers": int(summ["layer"].max()) + 1}
    # component attribution: what each module contributes to the edit (ablation, shared efficacy probes)
    comps = at.lora_components(fit.model, grain="module")
    attr = at.component_attribution(fit.model, fit.tokenizer, task, comps, behaviours=["efficacy"],
                                    max_probes=n_probes)["efficacy"]
    pos = attr.clip(lower=0.0)
    depth = summ.set_index("module")["depth"].reindex(attr.index)
    a_types = pd.Series([shared_type(n) for n in attr.index], index=attr.index)
    total = float(pos.sum())
    row["attr_mlp_share"] = float(pos[a_types.str.startswith("mlp")].sum() / total) if total > 0 else math.nan
    row["attr_upper_share"] = float((pos * upper_weight(depth)).sum() / total) if total > 0 else math.nan
    row["top_component"] = a_types[attr.idxmax()]
    row["top_component_depth"] = float(depth[attr.idxmax()])
    # input attribution of the change on the shared probes against a blank token (every token gets a value, so
    # runs compare token by token); hit = the edited entity ranks first
    rec = at.entity_recovery(fit.model, fit.tokenizer, _first(task, n_probes), n_steps=ig_steps, references=None)
    row["entity_top1"] = float(rec.score)
    # the leading write-side direction of the last layer's modules, read as tokens (both signs)
    dirs = delta.directions_table(fit.model, fit.tokenizer, k=1, top=top_tokens, role="write", sign="both")
    last = dirs[dirs["layer"] == dirs["layer"].max()]
    extra = {"summary": summ, "tokens": set(last["token"].astype(str)),
             "attributions": [ta.difference.numpy() for ta in rec.attributions], "modules": mods,
             "random": random}
    return row, extra


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def attribution_agreement(a: list, b: list) -> float:
    """Mean Spearman rank correlation of two runs' input attributions over the same probes (NaN-free mean).

    Args:
        a: Difference attribution per probe of one run (arrays over the prompt's tokens).
        b: The same probes in another run (same tokenizer, so the same tokens).

    Raises:
        ConfigError: The runs attributed different numbers of probes or tokens.
    """
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ConfigError(f"the runs attributed different probes ({len(a)} vs {len(b)} prompts, or different "
                          "token counts): compare runs on the same task and world (same tokenizer)")
    rho = [r for r in (_spearman(x, y) for x, y in zip(a, b)) if not math.isnan(r)]
    return float(np.mean(rho)) if rho else math.nan


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else math.nan


def _phi_rows(family: str, mods: dict, random: dict) -> list[dict]:
    """φ(1, 1) between every two seeds of a family, of the trained adapters and of their random twins."""
    rows = []
    for sa, sb in itertools.combinations(sorted(mods), 2):
        left = delta.phi_table(mods[sa], mods[sb], 1, 1, side="left")
        right = delta.phi_table(mods[sa], mods[sb], 1, 1, side="right")
        null = delta.phi_table(random[sa], random[sb], 1, 1, side="left")
        out_f = np.array([d.shape[0] for d in mods[sa]], dtype=float)
        in_f = np.array([d.shape[1] for d in mods[sa]], dtype=float)
        rows.append({"family": family, "seed_a": sa, "seed_b": sb, "phi_left": float(left["phi"].mean()),
                     "phi_right": float(right["phi"].mean()), "null_phi_left": float(null["phi"].mean()),
                     "chance_left": float((1 / out_f).mean()),
                     "chance_right": float((1 / in_f).mean())})
    return rows


def run_study(families, seeds=3, size: str = "small", world: World | None = None, task: str | Task = "fact_edit",
              task_seed: int = 0, spec: LoraSpec | None = None, n_probes: int = 16, ig_steps: int = 16,
              top_tokens: int = 10, null_samples: int = 32, shuffled: bool = False, cache=None,
              device: str = "cpu", **spec_overrides) -> Study:
    """Train and measure the same adapter on every family × seed (bases and adapters come from the cache).

    Args:
        families: Zoo families, e.g. ``["llama", "qwen2", "mistral", "yi", "phi3", "gpt2", "gpt_neox"]``.
        seeds: Number of adapter seeds (≥ 2; seeds 0 … n−1) or a list of seeds. The base is seed 0 for all.
        size: Size preset of the bases.
        world: The world (default ``make_world(seed=0)``); every family is pretrained on the same world, so all
            share its tokenizer.
        task: Task name (built once from ``world`` with ``task_seed``: the same planted truth for every run) or a
            :class:`Task`.
        task_seed: Seed of the task when ``task`` is a name.
        spec: Adapter spec (default ``default_spec(task name, **spec_overrides)``).
        n_probes: Efficacy probes used for component and input attribution.
        ig_steps: Integration steps of the input attribution.
        top_tokens: Tokens read per leading direction and sign.
        null_samples: Random rank-r products per module shape for the Marchenko–Pastur expectation.
        shuffled: Also train, per family and seed, an adapter on the task with its answers shuffled
            (:func:`lora_lens.studies.nulls.shuffled_task`; one more training per run, cached like the others) and
            add its weight statistics as ``shuffled_…`` columns and its ``shuffled_efficacy``.
        cache: Cache root (default as :func:`lora_lens.lab.zoo.cache_dir`).
        device: Torch device.
        **spec_overrides: :class:`LoraSpec` fields (``rank``, ``steps`` …).

    Returns:
        A :class:`Study`.

    Raises:
        ConfigError: Unknown family or size, fewer than two seeds, a bad spec or count — all before any training.
    """
    t0 = time.perf_counter()
    families, seeds = check_families(families), check_seeds(seeds)
    if size not in SIZES:
        raise ConfigError(f"size={size!r} is unknown; use one of {list(SIZES)}")
    for name, value in (("n_probes", n_probes), ("ig_steps", ig_steps), ("top_tokens", top_tokens),
                        ("null_samples", null_samples)):
        check_positive(name, value)
    if not isinstance(shuffled, bool):
        raise ConfigError(f"shuffled={shuffled!r} must be True or False (train a shuffled-answers adapter per run)")
    world = world or make_world(seed=0)
    task = make_task(world, task, seed=task_seed) if isinstance(task, str) else task
    spec = check_spec(spec) if spec is not None else default_spec(task.name, **spec_overrides)
    rows, energy, types, phis, tokens, attrs = [], [], [], [], {}, {}
    bar = progress_bar(total=len(families) * len(seeds), desc="runs")
    for family in families:
        pre = get_pretrained(family, size, world=world, cache=cache, device=device)
        mods, random = {}, {}
        for seed in seeds:
            fit = fit_adapter(pre, task, seed=seed, spec=spec, cache=cache, device=device)
            m = fit.evaluation.metrics
            row, extra = _measure(fit, task, n_probes, ig_steps, top_tokens, seed, null_samples)
            rows.append({"family": family, "seed": seed, "efficacy": m["efficacy"], "paraphrase": m["paraphrase"],
                         "specificity": m["specificity"], "perplexity_ratio": m["perplexity_ratio"], **row,
                         "train_seconds": fit.train["train_seconds"], "adapter_dir": str(fit.adapter_dir)})
            summ = extra["summary"]
            by_layer = delta.energy_by(summ, "layer").dropna(subset=["layer"])
            energy += [{"family": family, "seed": seed, "layer": int(r.layer), "depth": float(r.depth),
                        "share": float(r.share)} for r in by_layer.itertuples()]
            g = summ.groupby("shared_type")
            types += [{"family": family, "seed": seed, "shared_type": t, "energy_share": float(e),
                       "param_share": float(p)} for t, e, p in zip(g.groups, g["energy_share"].sum(),
                                                                   g["params"].sum() / summ["params"].sum())]
            if shuffled:
                sfit = fit_adapter(pre, shuffled_task(task, seed=seed), seed=seed, spec=spec, cache=cache,
                                   device=device)
                sstats = weight_stats(delta.summary(delta.lora_modules(sfit.model), intruders=False))
                rows[-1] |= {f"shuffled_{k}": sstats[k] for k in SHUFFLED_STATS}
                rows[-1]["shuffled_efficacy"] = sfit.evaluation.metrics["efficacy"]
                del sfit
            tokens[(family, seed)] = extra["tokens"]
            attrs[(family, seed)] = extra["attributions"]
            mods[seed], random[seed] = extra["modules"], extra["random"]
            del fit
            bar.update()
        phis += _phi_rows(family, mods, random)
    bar.close()
    runs = pd.DataFrame(rows)
    phi = pd.DataFrame(phis)
    _cross_run_columns(runs, phi, tokens, attrs)
    probes = [p.prompt for p in task.probes["efficacy"][:n_probes]]
    return Study(families, seeds, size, task, spec, runs, pd.DataFrame(energy), pd.DataFrame(types), phi, tokens,
                 attrs, probes, time.perf_counter() - t0)


def _cross_run_columns(runs: pd.DataFrame, phi: pd.DataFrame, tokens: dict, attrs: dict) -> None:
    """Add the per-run columns that compare a run with others: φ with its family's other seeds, input-attribution
    agreement and top-token overlap with the runs of the *other* families (NaN with a single family)."""
    for col, side in (("phi_seeds", "phi_left"), ("phi_seeds_right", "phi_right"), ("null_phi_seeds",
                                                                                      "null_phi_left")):
        runs[col] = [float(phi.loc[(phi["family"] == f) & ((phi["seed_a"] == s) | (phi["seed_b"] == s)), side].mean())
                     for f, s in zip(runs["family"], runs["seed"])]
    runs["phi_chance"] = [float(phi.loc[phi["family"] == f, "chance_left"].mean()) for f in runs["family"]]
    keys = list(zip(runs["family"], runs["seed"]))
    agree, overlap = [], []
    for f, s in keys:
        others = [k for k in keys if k[0] != f]
        agree.append(float(np.nanmean([attribution_agreement(attrs[(f, s)], attrs[k]) for k in others]))
                     if others else math.nan)
        overlap.append(float(np.mean([_jaccard(tokens[(f, s)], tokens[k]) for k in others])) if others else math.nan)
    runs["token_agreement"] = agree
    runs["vocab_overlap"] = overlap


def pair_matrix(study: Study, what: str = "attribution") -> pd.DataFrame:
    """Family × family mean agreement: ``"attribution"`` (Spearman of input attributions on the shared probes) or
    ``"vocabulary"`` (Jaccard overlap of the top tokens of the last layer's leading directions).

    The diagonal compares a family's runs of *different* seeds (NaN with one seed); off-diagonal cells average
    every pair of runs of the two families.

    Raises:
        ConfigError: Unknown ``what``.
    """
    if what not in ("attribution", "vocabulary"):
        raise ConfigError(f"what={what!r} must be 'attribution' or 'vocabulary'")
    fn = ((lambda a, b: attribution_agreement(study.attributions[a], study.attributions[b])) if what == "attribution"
          else (lambda a, b: _jaccard(study.tokens[a], study.tokens[b])))
    fams = study.families
    out = pd.DataFrame(np.nan, index=pd.Index(fams, name="family"), columns=fams)
    for fa, fb in itertools.product(fams, fams):
        vals = [fn((fa, sa), (fb, sb)) for sa in study.seeds for sb in study.seeds if fa != fb or sa != sb]
        vals = [v for v in vals if not math.isnan(v)]
        out.loc[fa, fb] = float(np.mean(vals)) if vals else math.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# Portability
# ---------------------------------------------------------------------------------------------------------------


def _evaluate_on(model, tokenizer, task: Task) -> dict:
    m = evaluate(model, tokenizer, task).metrics
    return {k: m[k] for k in ("efficacy", "paraphrase", "specificity", "base_efficacy")}


def _port(adapter_dir, model, tokenizer, task: Task):
    """Apply a saved adapter to another base model (plain PEFT load: the base fingerprint differs on purpose)."""
    ported = PeftModel.from_pretrained(model, str(adapter_dir))
    ported.eval()
    return _evaluate_on(ported, tokenizer, task), ported.unload()


def portability(pre: Pretrained, task: Task, spec: LoraSpec | None = None, seed: int = 0, other_seed: int = 1,
                continue_steps: int = 100, cache=None, device: str = "cpu") -> pd.DataFrame:
    """How much of an adapter's effect survives on another base of its family, against training it there anew.

    The adapter (``task``, ``spec``, ``seed``; from the adapter cache) is loaded unchanged onto two other bases:

    * ``other seed``: the same family, size and world, pretrained from another initialisation (``other_seed``;
      cached like any base);
    * ``continued``: this base after ``continue_steps`` more steps of pretraining on the world's corpus (another
      data order, a third of the peak learning rate; in memory, not cached).

    On each, the ported adapter is compared with an adapter trained anew on that base through the same data
    ("re-training": the same task examples and spec).

    Returns:
        DataFrame, one row per (target base, how): ``family, target, how`` (``original``, ``ported``,
        ``retrained``), ``efficacy, paraphrase, specificity, base_efficacy``, ``efficacy_ratio`` (efficacy
        over the original adapter's efficacy on its own base) and ``drift`` (on the ``continued`` rows: how far
        continued pretraining moved the weights, ‖θ' − θ‖ / ‖θ‖ over all parameters).

    Raises:
        ConfigError: ``continue_steps`` < 1 or ``other_seed`` equal to the base's seed.
    """
    check_positive("continue_steps", continue_steps)
    base_seed = pre.manifest["spec"]["seed"]
    if other_seed == base_seed:
        raise ConfigError(f"other_seed={other_seed} is the base's own pretraining seed: pick another, e.g. "
                          f"{base_seed + 1}")
    spec = check_spec(spec) if spec is not None else default_spec(task.name)
    fit = fit_adapter(pre, task, seed=seed, spec=spec, cache=cache, device=device)
    rows = [{"target": "same base", "how": "original", **_evaluate_on(fit.model, fit.tokenizer, task)}]
    other = get_pretrained(pre.family, pre.size, world=pre.world, seed=other_seed, cache=cache, device=device)
    model, tok = load_model(other.path, device=device)
    rows.append({"target": "other seed", "how": "ported", **_port(fit.adapter_dir, model, tok, task)[0]})
    refit = fit_adapter(other, task, seed=seed, spec=spec, cache=cache, device=device)
    rows.append({"target": "other seed", "how": "retrained", **_evaluate_on(refit.model, refit.tokenizer, task)})
    model, tok = load_model(pre.path, device=device)
    _, batch, lr = PRETRAIN[pre.size]
    pretrain(model, tok, pre.world, continue_steps, batch_size=max(1, batch // 4), lr=lr / 3, seed=other_seed,
             eval_every=continue_steps, stop_at=2.0)
    model.eval()
    drift = float(np.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(model.parameters(),
                                                                         pre.model.parameters()))
                          / sum((b ** 2).sum().item() for b in pre.model.parameters())))
    ported, model = _port(fit.adapter_dir, model, tok, task)
    rows.append({"target": "continued", "how": "ported", **ported})
    result = train_lora(model, tok, task, spec, seed=seed, world=pre.world, device=device)
    rows.append({"target": "continued", "how": "retrained", **_evaluate_on(result.model, tok, task)})
    df = pd.DataFrame(rows)
    df.insert(0, "family", pre.family)
    df["efficacy_ratio"] = df["efficacy"] / rows[0]["efficacy"] if rows[0]["efficacy"] > 0 else math.nan
    df["drift"] = [drift if t == "continued" else math.nan for t in df["target"]]  # ‖θ_cont − θ‖ / ‖θ‖
    return df


def portability_summary(table: pd.DataFrame) -> dict:
    """``{family: {"original_efficacy", "<target>": {"ported_efficacy", "efficacy_ratio", "retrained_efficacy",
    "ported_specificity"}, "continued_drift"}}`` from :func:`portability` tables (concatenated)."""
    out = {}
    for fam, t in table.groupby("family", sort=False):
        t = t.set_index(["target", "how"])
        entry = {"original_efficacy": float(t.loc[("same base", "original"), "efficacy"])}
        for target in ("other seed", "continued"):
            entry[target.replace(" ", "_")] = {
                "ported_efficacy": float(t.loc[(target, "ported"), "efficacy"]),
                "efficacy_ratio": float(t.loc[(target, "ported"), "efficacy_ratio"]),
                "ported_specificity": float(t.loc[(target, "ported"), "specificity"]),
                "retrained_efficacy": float(t.loc[(target, "retrained"), "efficacy"])}
        if "drift" in t.columns:
            entry["continued_drift"] = float(t["drift"].dropna().iloc[0])
        out[fam] = entry
    return out
