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

**Real bases.** ``run_study(base_models=[...], task=FILE)`` runs the same study on your models (hub names, folders,
``smollm2-135m``; or zoo family names with a zoo task) with a task from data: adapters fitted by
:func:`lora_lens.lab.study.fit_adapter` with ``default_spec("data")``, every behaviour score on full answers, the
module names of any architecture classified by :mod:`lora_lens.lab.modules`. Each base is loaded once before
anything trains (the task is checked against its tokenizer; its architecture, parameter shapes and the token ids
of the shared probes are noted). Input attributions are compared only between bases that read the probes as the
same tokens; a statistic no run can measure is left out with its reason (:attr:`Study.skipped`, and
``pattern_table(...).attrs["skipped"]`` for the patterns). :func:`portable_pairs` finds bases of one architecture
and config shape, between which :func:`portability` carries an adapter.

**Several processes.** ``run_study(..., workers=N)`` runs the base × seed runs N at once in worker processes
(:func:`lora_lens.workers.run_jobs`; ``devices=["cuda:0", "cuda:1"]`` pins them to GPUs in turn): each run is one
call of a module-level function that returns plain data (its rows, tables, tokens, attributions and the adapter
factors φ needs — not the base weights), so the study is the same with any number of workers.

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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import PeftModel

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError
from lora_lens.lab.modules import SHARED_TYPES, hf_model, shared_type
from lora_lens.lab.probes import evaluate
from lora_lens.lab.study import base_label, check_data_task, check_sources, fit_adapter, spec_kind
from lora_lens.lab.train import LoraSpec, check_spec, default_spec, train_lora
from lora_lens.lab.world import TASKS, Task, World, make_task, make_world
from lora_lens.lab.zoo import FAMILIES, PRETRAIN, SIZES, Pretrained, get_pretrained, load_model, pretrain
from lora_lens.lens import attribution as at
from lora_lens.lens import delta
from lora_lens.studies.nulls import SHUFFLED_STATS, shuffled_task, upper_weight, weight_nulls, weight_stats
from lora_lens.studies.patterns import (PATTERNS, Pattern, bootstrap_ci, declare_patterns, null_id, pattern_prose,
                                        pattern_records, pattern_table, pooled_ci, record_patterns)
from lora_lens.utils import stable_hash
from lora_lens.workers import check_devices, check_workers, run_jobs, worker_device

__all__ = ["DEFAULT_FAMILIES", "SHARED_TYPES", "Study", "attribution_agreement", "check_bases", "check_families",
           "check_seeds", "pair_matrix", "portability", "portability_prose", "portability_summary", "portable_pairs",
           "run_study", "shared_type",
           # re-exported from lora_lens.studies.patterns (notebook 06 reads the study's verdicts here)
           "PATTERNS", "Pattern", "bootstrap_ci", "declare_patterns", "null_id", "pattern_prose", "pattern_records",
           "pattern_table", "pooled_ci", "record_patterns"]

DEFAULT_FAMILIES = list(FAMILIES)
"""The families notebook 06 compares by default (every architecture of the zoo)."""


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


def check_base_models(base_models) -> list[str]:
    """Validate a list of bases (zoo family names or real models: hub names, folders, ``smollm2-135m``); return it
    as a list.

    Raises:
        ConfigError: One string instead of a list, an empty list, an entry that is not a non-empty string, a base
            listed twice or two bases with the same label (the last part of their name, which names their runs).
    """
    if isinstance(base_models, str):
        raise ConfigError(f"base_models={base_models!r} is one string: pass a list, e.g. [{base_models!r}]")
    if not isinstance(base_models, (list, tuple)) or not base_models:
        raise ConfigError(f"base_models={base_models!r} is empty or not a list: pass e.g. [\"smollm2-135m\", "
                          "\"path/to/another/model\"]")
    for b in base_models:
        if not isinstance(b, str) or not b.strip():
            raise ConfigError(f"base {b!r} in base_models is not a model name: give a hub name, a folder or "
                              "\"smollm2-135m\"")
    labels = [b if b in FAMILIES else base_label(b) for b in base_models]
    dup = sorted({f"{b!r}" for b, label in zip(base_models, labels) if labels.count(label) > 1})
    if dup:
        raise ConfigError(f"base_models={list(base_models)!r}: {', '.join(dup)} have the same name "
                          f"{[x for x in labels if labels.count(x) > 1][0]!r}: list each base once (rename a folder "
                          "whose last part repeats another's)")
    return list(base_models)


def check_bases(families=None, base_models=(), task_file: str = "", default_families=None) -> bool:
    """Check notebook 06's model parameters before anything runs; True when the study is on your models.

    Args:
        families: The zoo families parameter.
        base_models: Your models (hub names, folders, ``smollm2-135m``); empty for the zoo ``families``.
        task_file: The JSONL task of your models; "" for the synthetic world's fact-edit task.
        default_families: The notebook's default ``families`` (default :data:`DEFAULT_FAMILIES`).

    Raises:
        ConfigError: Both ``base_models`` and a non-default ``families``; ``base_models`` without a ``task_file``
            or ``task_file`` without ``base_models``; a zoo family in ``base_models``; bad lists
            (:func:`check_base_models`, :func:`check_families`).
        NotFoundError: A model folder or the task file does not exist (named).
    """
    default = DEFAULT_FAMILIES if default_families is None else default_families
    if not base_models and not isinstance(base_models, str):
        check_sources(task_file=task_file, base_name="base_models")
        check_families(families)
        return False
    for b in check_base_models(base_models):
        if b in FAMILIES:
            raise ConfigError(f"base {b!r} in base_models is a zoo family, which cannot read the words of a task "
                              "file: list it in families (with base_models=[]) or give real models")
        check_sources(base_model=b, family=families, task_file=task_file, default_family=default,
                      family_name="families")
    return True


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
        families: The bases studied, in order, by label: a zoo family's name, or a real model's short name
            (:func:`lora_lens.lab.study.base_label`, e.g. ``smollm2-135m``). The ``family`` column of every table.
        seeds: Adapter seeds (the base of each family is the same for all seeds).
        size: Size preset of the zoo bases (None for a study of real models).
        task: The task (the same planted truth for every run, or the same task from data).
        spec: The adapter spec (the same for every run).
        runs: One row per (family, seed): behaviour (``efficacy``, ``paraphrase``, ``specificity``: full answers
            for a task from data), weight space
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
        bases: ``{family: what it is}``: the zoo family name, or the hub name / folder / ``smollm2-135m`` given.
        architectures: ``{family: model_type}`` of each base's config (``llama``, ``qwen2`` …).
        shapes: ``{family: key}``: bases with the same key have the same parameter names and shapes (an adapter of
            one loads onto the other; :func:`portable_pairs`).
        tokenizers: ``{family: key}``: bases with the same key read the shared probes as the same token ids (their
            input attributions compare token by token).
        skipped: ``{statistic or section: reason}`` for what this study could not measure (e.g. ``token_agreement``
            when no two bases share a tokenizer, ``entity_top1`` when the task's probes name no entity).
    """

    families: list[str]
    seeds: list[int]
    size: str | None
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
    bases: dict = field(default_factory=dict)
    architectures: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)


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
    # runs compare token by token); hit = the edited entity ranks first (only where the probes name an entity)
    first = _first(task, n_probes)
    if any(p.entity for p in first.probes["efficacy"]):
        rec = at.entity_recovery(fit.model, fit.tokenizer, first, n_steps=ig_steps, references=None)
        row["entity_top1"], attributions = float(rec.score), rec.attributions
    else:
        probes = first.probes["efficacy"]
        attributions = at.batch_token_attributions(fit.model, fit.tokenizer, [p.prompt for p in probes],
                                                   [p.answer for p in probes], n_steps=ig_steps, output="prob",
                                                   chat=task.chat)
        row["entity_top1"] = math.nan
    # the leading write-side direction of the last layer's modules, read as tokens (both signs)
    dirs = delta.directions_table(fit.model, fit.tokenizer, k=1, top=top_tokens, role="write", sign="both")
    last = dirs[dirs["layer"] == dirs["layer"].max()]
    extra = {"summary": summ, "tokens": set(last["token"].astype(str)),
             "attributions": [ta.difference.numpy() for ta in attributions], "modules": mods,
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


def _resolve_bases(families, base_models, task, world: World | None, task_seed: int, size: str):
    """``(bases, task, world)``: ``[(label, source, is_zoo)]`` and the task resolved, checked before any training."""
    if base_models is not None and (not isinstance(base_models, (list, tuple)) or len(base_models)):
        if families:
            raise ConfigError(f"families={families!r} and base_models={base_models!r} are both given: study the "
                              "zoo (families) or your models (base_models), not both")
        names = check_base_models(base_models)
    else:
        names = check_families(families)
    zoo = [n in FAMILIES for n in names]
    if isinstance(task, Path) or (isinstance(task, str) and task not in TASKS):
        task = Task.load(task)
    elif isinstance(task, str):
        if not all(zoo):
            raise ConfigError(f"task={task!r} is a zoo task kind, which only zoo families can read; for "
                              f"{[n for n, z in zip(names, zoo) if not z]} pass a task file or a Task from data "
                              "(e.g. examples/smollm2_facts.jsonl)")
        world = world or make_world(seed=0)
        task = make_task(world, task, seed=task_seed)
    elif not isinstance(task, Task):
        raise ConfigError(f"task={task!r} must be a zoo task kind, a task file or a Task")
    data = task.world_fingerprint is None
    if data and any(zoo):
        raise ConfigError(f"zoo families {[n for n, z in zip(names, zoo) if z]} cannot read the task from data "
                          f"{task.name!r} (a zoo model knows only its world's words): give real models in base_models")
    if not data and not all(zoo):
        raise ConfigError(f"the world task {task.name!r} belongs to the zoo; real bases "
                          f"{[n for n, z in zip(names, zoo) if not z]} need a task from data (a task file)")
    if any(zoo):
        if size not in SIZES:
            raise ConfigError(f"size={size!r} is unknown; use one of {list(SIZES)}")
        world = world or make_world(seed=0)
    bases = [(n if z else base_label(n), n, z) for n, z in zip(names, zoo)]
    return bases, task, world


def _token_key(tokenizer, task: Task, n_probes: int) -> str:
    """Which token ids a tokenizer reads the shared probes as (prompt and prompt + answer)."""
    return stable_hash([[tokenizer(p.prompt)["input_ids"], tokenizer(f"{p.prompt} {p.answer}")["input_ids"]]
                        for p in task.probes.get("efficacy", [])[:n_probes]])


def _shape_key(model) -> str:
    """The parameter names and shapes of a base (LoRA wrappers and factors ignored)."""
    return stable_hash([(n.replace(".base_layer", ""), list(p.shape)) for n, p in hf_model(model).named_parameters()
                        if "lora_" not in n])


def _check_real_base(source: str, task: Task, n_probes: int, device: str) -> dict:
    """Load a real base once before anything trains: the task must suit its tokenizer; its architecture, shape and
    token keys."""
    model, tokenizer = load_model(source, device=device)
    check_data_task(task, tokenizer, base=source)
    facts = {"architecture": model.config.model_type, "shape": _shape_key(model),
             "tokens": _token_key(tokenizer, task, n_probes)}
    del model
    return facts


def _records(mods: list) -> list[dict]:
    """What :func:`_phi_rows` reads of each module (names, depth, factors and their SVD) as plain arrays: no base
    weight W, so that a run's result sent back from a worker stays small."""
    return [{"name": d.name, "layer": d.layer, "module_type": d.module_type, "depth": d.depth,
             "B": d.B.numpy(), "A": d.A.numpy(), "scaling": d.scaling, "adapter": d.adapter,
             "fan_in_fan_out": d.fan_in_fan_out, "dora": d.dora, "svd": [x.numpy() for x in d.svd()]}
            for d in mods]


def _deltas(records: list[dict]) -> list:
    """:class:`~lora_lens.lens.delta.ModuleDelta` again from :func:`_records` (an empty W: not for W's statistics)."""
    return [delta.ModuleDelta(name=r["name"], layer=r["layer"], module_type=r["module_type"], depth=r["depth"],
                              B=torch.from_numpy(r["B"]), A=torch.from_numpy(r["A"]), scaling=r["scaling"],
                              W=torch.empty(0), adapter=r["adapter"], fan_in_fan_out=r["fan_in_fan_out"],
                              dora=r["dora"], _svd=tuple(torch.from_numpy(x) for x in r["svd"]))
            for r in records]


_BASE: dict = {}
"""The zoo base this process loaded last (one at a time): the seeds of a family load it once."""


def _zoo_base(family: str, size: str, world: World, cache, device: str) -> Pretrained:
    key = (family, size, world.fingerprint(), str(cache), device)
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = get_pretrained(family, size, world=world, cache=cache, device=device)
    return _BASE[key]


def _study_run(family: str, base, seed: int, task: Task, spec: LoraSpec, options: dict) -> dict:
    """One run of :func:`run_study` (one base × one seed), in this process or in a worker (:mod:`lora_lens.workers`).

    Args:
        family: The base's label (the ``family`` column).
        base: A real model's name or folder, or ``(family, size, world)`` of a zoo base (from the cache, pretrained
            when absent; the runs of one base in one process share one load).
        seed: The adapter seed.
        task: The task (resolved).
        spec: The adapter spec.
        options: ``n_probes, ig_steps, top_tokens, null_samples, shuffled, cache, device`` of :func:`run_study`
            (the device is the worker's when the pool was given devices: :func:`lora_lens.workers.worker_device`).

    Returns:
        Plain data: ``family, seed``, ``row`` (the run's row of :attr:`Study.runs` before the cross-run columns),
        ``energy`` and ``types`` rows, ``tokens``, ``attributions``, and ``modules`` / ``random`` (the trained
        adapter's and its random twin's factors, for φ between seeds).
    """
    o = options
    cache, device = o["cache"], worker_device(o["device"])
    if isinstance(base, tuple):
        base = _zoo_base(*base, cache=cache, device=device)
    fit = fit_adapter(base, task, seed=seed, spec=spec, cache=cache, device=device)
    m = fit.evaluation.metrics
    row, extra = _measure(fit, fit.task, o["n_probes"], o["ig_steps"], o["top_tokens"], seed, o["null_samples"])
    row = {"family": family, "seed": seed, "efficacy": m["efficacy"], "paraphrase": m["paraphrase"],
           "specificity": m["specificity"], "perplexity_ratio": m["perplexity_ratio"], **row,
           "train_seconds": fit.train["train_seconds"], "adapter_dir": str(fit.adapter_dir)}
    summ = extra["summary"]
    by_layer = delta.energy_by(summ, "layer").dropna(subset=["layer"])
    energy = [{"family": family, "seed": seed, "layer": int(r.layer), "depth": float(r.depth),
               "share": float(r.share)} for r in by_layer.itertuples()]
    g = summ.groupby("shared_type")
    types = [{"family": family, "seed": seed, "shared_type": t, "energy_share": float(e), "param_share": float(p)}
             for t, e, p in zip(g.groups, g["energy_share"].sum(), g["params"].sum() / summ["params"].sum())]
    if o["shuffled"]:
        sfit = fit_adapter(base, shuffled_task(task, seed=seed), seed=seed, spec=spec, cache=cache, device=device)
        sstats = weight_stats(delta.summary(delta.lora_modules(sfit.model), intruders=False))
        row |= {f"shuffled_{k}": sstats[k] for k in SHUFFLED_STATS}
        row["shuffled_efficacy"] = sfit.evaluation.metrics["efficacy"]
        del sfit
    return {"family": family, "seed": seed, "row": row, "energy": energy, "types": types,
            "tokens": extra["tokens"], "attributions": extra["attributions"],
            "modules": _records(extra["modules"]), "random": _records(extra["random"])}


def run_study(families=None, seeds=3, size: str = "small", world: World | None = None,
              task: str | Path | Task = "fact_edit", task_seed: int = 0, spec: LoraSpec | None = None,
              n_probes: int = 16, ig_steps: int = 16, top_tokens: int = 10, null_samples: int = 32,
              shuffled: bool = False, cache=None, device: str = "cpu", base_models=None, workers: int = 1,
              devices=None, **spec_overrides) -> Study:
    """Train and measure the same adapter on every base × seed (bases and adapters come from the cache).

    Args:
        families: Zoo families, e.g. ``["llama", "qwen2", "mistral", "yi", "phi3", "gpt2", "gpt_neox"]``.
        seeds: Number of adapter seeds (≥ 2; seeds 0 … n−1) or a list of seeds. The base is seed 0 for all.
        size: Size preset of the zoo bases.
        world: The world (default ``make_world(seed=0)``); every family is pretrained on the same world, so all
            share its tokenizer.
        task: Task name (built once from ``world`` with ``task_seed``: the same planted truth for every run), a
            :class:`Task`, or a JSONL task file (a task from data, for real bases).
        task_seed: Seed of the task when ``task`` is a name.
        spec: Adapter spec (default ``default_spec(task kind, **spec_overrides)``; kind ``data`` for a task from
            data: :func:`lora_lens.lab.study.spec_kind`).
        n_probes: Efficacy probes used for component and input attribution.
        ig_steps: Integration steps of the input attribution.
        top_tokens: Tokens read per leading direction and sign.
        null_samples: Random rank-r products per module shape for the Marchenko–Pastur expectation.
        shuffled: Also train, per family and seed, an adapter on the task with its answers shuffled
            (:func:`lora_lens.studies.nulls.shuffled_task`; one more training per run, cached like the others) and
            add its weight statistics as ``shuffled_…`` columns and its ``shuffled_efficacy``.
        cache: Cache root (default as :func:`lora_lens.lab.zoo.cache_dir`).
        device: Torch device.
        base_models: Instead of ``families``: a list of bases, each a zoo family name or a real model (a hub name,
            a local folder, ``"smollm2-135m"``; with a task from data). Real bases are loaded once first: the task
            is checked against each tokenizer before anything trains. Input attributions are compared only between
            bases that read the probes as the same tokens (:attr:`Study.tokenizers`).
        workers: Processes the runs (base × seed) are spread over (:func:`lora_lens.workers.run_jobs`): 1 runs them
            here one after another; N > 1 pretrains every zoo base here first, then runs N at once, each worker
            with CPUs // N threads and its own copy of a base (N times the memory). The numbers are the same as
            with 1 (every run is seeded) up to float rounding of other thread counts.
        devices: With ``workers > 1``, torch devices the workers take in turn (e.g. ``["cuda:0", "cuda:1"]``);
            default every run on ``device``.
        **spec_overrides: :class:`LoraSpec` fields (``rank``, ``steps`` …).

    Returns:
        A :class:`Study`.

    Raises:
        ConfigError: Unknown family or size, both ``families`` and ``base_models``, a zoo task for a real base or a
            task from data for a zoo family, a task with problems for a base's tokenizer, fewer than two seeds, a
            bad spec or count, bad ``workers`` or ``devices`` — all before any training.
        WorkerError: With ``workers > 1``, a run failed in its worker (named, with the worker's traceback).
        NotFoundError: A base or task file that does not exist.
    """
    t0 = time.perf_counter()
    seeds = check_seeds(seeds)
    for name, value in (("n_probes", n_probes), ("ig_steps", ig_steps), ("top_tokens", top_tokens),
                        ("null_samples", null_samples)):
        check_positive(name, value)
    if not isinstance(shuffled, bool):
        raise ConfigError(f"shuffled={shuffled!r} must be True or False (train a shuffled-answers adapter per run)")
    check_workers(workers)
    check_devices(devices)
    bases, task, world = _resolve_bases(families, base_models, task, world, task_seed, size)
    spec = check_spec(spec) if spec is not None else default_spec(spec_kind(task), **spec_overrides)
    facts = {label: (_check_real_base(source, task, n_probes, device) if not is_zoo else
                     {"architecture": source, "shape": stable_hash([source, size]), "tokens": "world"})
             for label, source, is_zoo in bases}
    options = {"n_probes": n_probes, "ig_steps": ig_steps, "top_tokens": top_tokens, "null_samples": null_samples,
               "shuffled": shuffled, "cache": cache, "device": device}
    if workers > 1:     # every zoo base pretrained here once (on all CPUs); the workers load it from the cache
        for _, source, is_zoo in bases:
            if is_zoo:
                get_pretrained(source, size, world=world, cache=cache, device=device)
    jobs = [(family, (source, size, world) if is_zoo else source, seed, task, spec, options)
            for family, source, is_zoo in bases for seed in seeds]
    try:
        results = run_jobs(_study_run, jobs, workers=workers, devices=devices, desc="runs")
    finally:
        _BASE.clear()
    rows, energy, types, phis, tokens, attrs = [], [], [], [], {}, {}
    for family, _, _ in bases:
        mods, random = {}, {}
        for r in (r for r in results if r["family"] == family):
            rows.append(r["row"])
            energy += r["energy"]
            types += r["types"]
            tokens[(family, r["seed"])] = r["tokens"]
            attrs[(family, r["seed"])] = r["attributions"]
            mods[r["seed"]], random[r["seed"]] = _deltas(r["modules"]), _deltas(r["random"])
        phis += _phi_rows(family, mods, random)
    runs = pd.DataFrame(rows)
    phi = pd.DataFrame(phis)
    token_keys = {label: f["tokens"] for label, f in facts.items()}
    _cross_run_columns(runs, phi, tokens, attrs, token_keys)
    probes = [p.prompt for p in task.probes["efficacy"][:n_probes]]
    labels = [label for label, _, _ in bases]
    return Study(labels, seeds, size if any(z for _, _, z in bases) else None, task, spec, runs, pd.DataFrame(energy),
                 pd.DataFrame(types), phi, tokens, attrs, probes, time.perf_counter() - t0,
                 bases={label: source for label, source, _ in bases},
                 architectures={label: f["architecture"] for label, f in facts.items()},
                 shapes={label: f["shape"] for label, f in facts.items()}, tokenizers=token_keys,
                 skipped=_skipped(runs, labels, token_keys, task, n_probes))


def _skipped(runs: pd.DataFrame, labels: list[str], token_keys: dict, task: Task, n_probes: int) -> dict:
    """Why a per-run statistic is missing from this study (NaN in every run)."""
    out = {}
    if runs["token_agreement"].isna().all():
        out["token_agreement"] = (
            "one base only: agreement with the other bases' input attributions needs two" if len(labels) < 2 else
            "no two bases read the shared probes as the same tokens (different tokenizers), so their input "
            "attributions cannot be compared token by token")
    if runs["entity_top1"].isna().all():
        out["entity_top1"] = (f"the task's first {n_probes} efficacy probes name no entity" if not any(
            p.entity for p in task.probes.get("efficacy", [])[:n_probes]) else
            "no probe's answer was changed by the adapter, so no entity ranking was scored")
    return out


def _cross_run_columns(runs: pd.DataFrame, phi: pd.DataFrame, tokens: dict, attrs: dict,
                       token_keys: dict | None = None) -> None:
    """Add the per-run columns that compare a run with others: φ with its family's other seeds, input-attribution
    agreement and top-token overlap with the runs of the *other* families (NaN with a single family; agreement
    only with families whose tokenizer reads the probes as the same tokens, ``token_keys``)."""
    token_keys = token_keys or {}
    for col, side in (("phi_seeds", "phi_left"), ("phi_seeds_right", "phi_right"), ("null_phi_seeds",
                                                                                      "null_phi_left")):
        runs[col] = [float(phi.loc[(phi["family"] == f) & ((phi["seed_a"] == s) | (phi["seed_b"] == s)), side].mean())
                     for f, s in zip(runs["family"], runs["seed"])]
    runs["phi_chance"] = [float(phi.loc[phi["family"] == f, "chance_left"].mean()) for f in runs["family"]]
    keys = list(zip(runs["family"], runs["seed"]))
    agree, overlap = [], []
    for f, s in keys:
        others = [k for k in keys if k[0] != f]
        same = [k for k in others if token_keys.get(k[0]) == token_keys.get(f)]
        agree.append(float(np.nanmean([attribution_agreement(attrs[(f, s)], attrs[k]) for k in same]))
                     if same else math.nan)
        overlap.append(float(np.mean([_jaccard(tokens[(f, s)], tokens[k]) for k in others])) if others else math.nan)
    runs["token_agreement"] = agree
    runs["vocab_overlap"] = overlap


def pair_matrix(study: Study, what: str = "attribution") -> pd.DataFrame:
    """Family × family mean agreement: ``"attribution"`` (Spearman of input attributions on the shared probes) or
    ``"vocabulary"`` (Jaccard overlap of the top tokens of the last layer's leading directions).

    The diagonal compares a family's runs of *different* seeds (NaN with one seed); off-diagonal cells average
    every pair of runs of the two families (attribution: NaN for two bases whose tokenizers read the probes as
    different tokens).

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
        if what == "attribution" and study.tokenizers.get(fa) != study.tokenizers.get(fb):
            continue
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


def portable_pairs(study: Study) -> dict[str, list[str]]:
    """``{source: [targets]}``: among a study of real bases, each group of bases with the same parameter names and
    shapes (:attr:`Study.shapes`) as its first base and the others, in study order (an adapter of the first loads
    unchanged onto the others). Zoo families are left out (their portability is :func:`portability` on a
    :class:`Pretrained`: another seed, continued pretraining). Empty when no two real bases share a shape."""
    groups: dict[str, list[str]] = {}
    for label in study.families:
        if study.bases.get(label, label) in FAMILIES:
            continue
        groups.setdefault(study.shapes[label], []).append(label)
    return {g[0]: g[1:] for g in groups.values() if len(g) > 1}


def _port_real(source, task: Task, spec: LoraSpec | None, seed: int, targets, cache, device: str) -> pd.DataFrame:
    """:func:`portability` for a real base: the adapter carried to ``targets`` of the same shapes."""
    targets = check_base_models(targets) if targets else []
    if not targets:
        raise ConfigError(f"the base {source!r} is not a zoo model: give targets, other bases of its architecture "
                          "and shapes to carry its adapter to (e.g. targets=[\"path/to/another/checkpoint\"])")
    fit = fit_adapter(source, task, seed=seed, spec=spec, cache=cache, device=device)
    shape = _shape_key(fit.model)
    rows = [{"target": "same base", "how": "original", **_evaluate_on(fit.model, fit.tokenizer, fit.task)}]
    for target in targets:
        model, tok = load_model(target, device=device)
        if _shape_key(model) != shape:
            raise ConfigError(f"target {target!r} has other parameter names or shapes than {source!r} "
                              f"({model.config.model_type}): an adapter carries only to a base of the same "
                              "architecture and config shape")
        refit = fit_adapter(target, task, seed=seed, spec=spec, cache=cache, device=device)  # its own base answers
        label = base_label(target)
        rows.append({"target": label, "how": "ported", **_port(fit.adapter_dir, model, tok, refit.task)[0]})
        rows.append({"target": label, "how": "retrained", **_evaluate_on(refit.model, refit.tokenizer, refit.task)})
        del model, refit
    df = pd.DataFrame(rows)
    df.insert(0, "family", base_label(source))
    df["efficacy_ratio"] = df["efficacy"] / rows[0]["efficacy"] if rows[0]["efficacy"] > 0 else math.nan
    df["drift"] = math.nan
    return df


def portability(pre: Pretrained | str | Path, task: Task | str | Path, spec: LoraSpec | None = None, seed: int = 0,
                other_seed: int = 1, continue_steps: int = 100, cache=None, device: str = "cpu",
                targets=()) -> pd.DataFrame:
    """How much of an adapter's effect survives on another base of its family, against training it there anew.

    For a real base (a hub name, a folder, ``smollm2-135m``; ``task`` from data) the other bases are ``targets``:
    other checkpoints of the same architecture and config shape (e.g. :func:`portable_pairs` of a study); each gets
    a ``ported`` and a ``retrained`` row (target = its label), scored with its own base answers as specificity;
    there is no ``continued`` row (continued pretraining needs the zoo's world corpus), ``drift`` is NaN.
    ``other_seed`` and ``continue_steps`` are then unused.

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
        ConfigError: ``continue_steps`` < 1 or ``other_seed`` equal to the base's seed; for a real base, no
            ``targets`` or a target of other shapes.
    """
    if isinstance(pre, (str, Path)):
        return _port_real(pre, task, spec, seed, targets, cache, device)
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
    "ported_specificity"}, "continued_drift"}}`` from :func:`portability` tables (concatenated); ``<target>`` is
    each target of the table with spaces as underscores (``other_seed``, ``continued`` on the zoo, a base's label
    for real bases); ``continued_drift`` only where there is a continued base."""
    out = {}
    for fam, t in table.groupby("family", sort=False):
        t = t.set_index(["target", "how"])
        entry = {"original_efficacy": float(t.loc[("same base", "original"), "efficacy"])}
        for target in dict.fromkeys(t.index.get_level_values("target")):
            if target == "same base":
                continue
            entry[target.replace(" ", "_")] = {
                "ported_efficacy": float(t.loc[(target, "ported"), "efficacy"]),
                "efficacy_ratio": float(t.loc[(target, "ported"), "efficacy_ratio"]),
                "ported_specificity": float(t.loc[(target, "ported"), "specificity"]),
                "retrained_efficacy": float(t.loc[(target, "retrained"), "efficacy"])}
        if "drift" in t.columns and t["drift"].notna().any():
            entry["continued_drift"] = float(t["drift"].dropna().iloc[0])
        out[fam] = entry
    return out


_TARGETS = {"other seed": "a base of the same family pretrained from another seed",
            "continued": "the same base pretrained further"}


def portability_prose(table: pd.DataFrame | None, continue_steps: int | None = None,
                      skipped: str | None = None) -> str:
    """What a :func:`portability` table (concatenated) shows, in words (Markdown), every number read from it.

    Args:
        table: The table, or None when the section was skipped.
        continue_steps: The continued pretraining steps (for the sentence about the ``continued`` base).
        skipped: Why there is no table (rendered when ``table`` is None).
    """
    if table is None or table.empty:
        return f"**Portability was not measured in this run**: {skipped or 'no table'}."
    paras, kept, lost = [], set(), set()
    for fam, t in table.groupby("family", sort=False):
        t = t.set_index(["target", "how"])
        orig = float(t.loc[("same base", "original"), "efficacy"])
        parts = [f"**{fam}**: the adapter reaches efficacy {orig:.2f} on its own base."]
        for target in dict.fromkeys(t.index.get_level_values("target")):
            if target == "same base":
                continue
            ported, retrained = t.loc[(target, "ported")], t.loc[(target, "retrained")]
            where = _TARGETS.get(target, f"`{target}` (same architecture and config shape)")
            if target == "continued":
                steps = f"{continue_steps} steps further" if continue_steps else "further"
                where = f"the same base pretrained {steps} (weights moved by {float(ported['drift']):.0%})"
            ratio = float(ported["efficacy_ratio"])
            (kept if ratio >= 0.5 else lost).add(target)
            parts.append(f"On {where} the unchanged adapter reaches {float(ported['efficacy']):.2f} "
                         f"({ratio:.2f} of it; specificity {float(ported['specificity']):.2f}), against "
                         f"{float(retrained['efficacy']):.2f} for an adapter trained anew there through the same data.")
        paras.append(" ".join(parts))
    if lost and not kept:
        end = ("The adapter keeps less than half of its effect on every other base: it is tied to the *weights* it "
               "was trained on. To move a change to another model, go through data (distillation, notebook 04), not "
               "through weights.")
    elif kept and not lost:
        end = "The adapter keeps at least half of its effect on every other base here."
    elif "continued" in kept and "other seed" in lost:
        end = ("An adapter is tied to the *weights* it was trained on, not to the architecture: it survives a base "
               "that drifts a little, not a base that learned the same facts from another start. To move a change "
               "to another model, go through data (distillation), not through weights.")
    else:
        end = (f"It keeps half or more of its effect on {', '.join(sorted(kept))} and less on "
               f"{', '.join(sorted(lost))}.")
    return "\n\n".join(paras + [end])
