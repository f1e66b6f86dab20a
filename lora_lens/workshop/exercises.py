"""Checks for the notebooks' "Try it" exercises.

Every check of the series lives here, named after its notebook and exercise (``Exercise 02-1`` …). Each returns a
one-line message that starts with ``"correct"``, ``"not yet"`` or ``"not attempted"``: it says whether the
participant's answer holds and, if not, where to look — never the answer itself. The journal's exercises (07) build
their practice ledgers in scratch files of their own, never in the participant's ledger. The checks that read a model
import the lab inside the check, so that importing this module (notebook 07 does) loads no torch.

Example:
    >>> from lora_lens.workshop import exercises
    >>> exercises.check_verdicts(None).split(":")[0]
    'not attempted'

"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lora_lens import ledger
from lora_lens.errors import ConfigError, LoraLensError, NotFoundError

__all__ = ["PRACTICE_STEPS", "check_best_rank", "check_collateral", "check_confidence_threshold", "check_deletion_k",
           "check_direction_reads_edit", "check_fastest_family", "check_own_hypothesis", "check_paraphrase_gap",
           "check_retraction", "check_seed_vs_rank", "check_trigger_token", "check_universal_pattern",
           "check_verdicts", "practice_ledger"]

# Notebook 07, exercise 1: the practice hypothesis and the five steps whose verdicts the participant predicts.
PRACTICE_STEPS = (("record", 0, 0.96), ("record", 1, 0.93), ("record", 2, 0.97), ("record", 3, 0.85),
                  ("retract", 3, None))
"""(action, seed, efficacy): four records, then the retraction of the seed-3 record."""
_HINTS = {"min_runs": "how many live records does the rule need before it says anything?",
          "fail": "what does the rule say about a single failing record?",
          "retract": "a retracted record no longer counts: which records are live afterwards?"}

# Notebook 07, exercise 3: a practice ledger with one documented mistake among four records (seed, value, notes).
_FORGET = (("practice-forgetting", "Higher rank forgets more: rank 16 loses more general accuracy than rank 2",
            "forgetting_gap", ">", 0.0),
           dict(falsifier="rank 16 forgets no more than rank 2 on any seed", min_runs=3))
_FORGET_RECORDS = ((0, 0.031, "seed 0"), (1, -0.006, "seed 1"),
                   (2, 0.044, "seed 2; NOTE added later: the rank-2 run crashed, so this gap compares rank 16 "
                              "with the rank-2 adapter of seed 0"),
                   (3, 0.027, "seed 3"))


def _steps_to(curves: dict, level: float) -> int | None:
    return next((s for s, a in zip(curves["eval_step"], curves["fact_accuracy"]) if a >= level), None)


def check_fastest_family(pretrained: dict, answer: str, level: float = 0.95) -> str:
    """Exercise 00-1: which family first reached ``level`` fact accuracy (fewest training steps)?

    Args:
        pretrained: ``{family: Pretrained}`` as built in notebook 00.
        answer: The family the participant names.
    """
    steps = {f: _steps_to(p.curves, level) for f, p in pretrained.items()}
    reached = {f: s for f, s in steps.items() if s is not None}
    if answer not in pretrained:
        return f"not yet: {answer!r} is not one of the families you pretrained ({', '.join(pretrained)})"
    if not reached:
        return f"not yet: no family reached {level} here; pretrain longer (pretrain_steps) and look again"
    best = min(reached.values())
    if steps[answer] == best:
        return f"correct: {answer} reached {level} fact accuracy after {best} steps, no family was faster"
    return "not yet: read the accuracy curves again — which line crosses the dashed target line first?"


def check_paraphrase_gap(pre, entity: str, relation: str) -> str:
    """Exercise 00-2: find a fact the model answers with a training template but not with a held-out one.

    Args:
        pre: A :class:`lora_lens.lab.zoo.Pretrained`.
        entity: Entity of the fact.
        relation: Relation of the fact (a pretraining relation).
    """
    from lora_lens.lab.probes import next_token_logits
    from lora_lens.lab.tokenizer import token_id

    world = pre.world
    if relation not in world.facts or entity not in world.facts[relation]:
        return f"not yet: ({entity!r}, {relation!r}) is not a fact of this world; see world.facts_frame()"
    want = token_id(pre.tokenizer, world.facts[relation][entity])
    prompts = [world.query(entity, relation), world.query(entity, relation, heldout=True)]
    seen, held = (next_token_logits(pre.model, pre.tokenizer, prompts).argmax(-1) == want).tolist()
    if seen and not held:
        return "correct: known with the training template, missed with the held-out one"
    if not seen:
        return "not yet: the model does not even know this fact with a training template"
    return "not yet: the model answers this fact with the held-out template too; try another"


def check_best_rank(table, answer: int, tolerance: float = 0.02) -> str:
    """Exercise 01-1: the smallest swept rank whose efficacy is within ``tolerance`` of the best one.

    Args:
        table: The sweep table of notebook 01 (columns ``rank``, ``targets``, ``efficacy``).
        answer: The rank the participant names.
    """
    rows = table[table["targets"] == "all"]
    if answer not in set(rows["rank"]):
        return f"not yet: rank {answer} is not in the sweep ({sorted(rows['rank'])})"
    good = rows[rows["efficacy"] >= rows["efficacy"].max() - tolerance]["rank"]
    if answer == good.min():
        return f"correct: rank {answer} is within {tolerance} of the best efficacy, and no smaller rank is"
    if answer in set(good):
        return "not yet: this rank is good enough, but a smaller one is too"
    return "not yet: this rank's efficacy is more than the tolerance below the best; look at the table again"


def check_collateral(fit, entity: str) -> str:
    """Exercise 01-3: is ``entity`` one whose untouched facts changed although only other facts were edited?

    Args:
        fit: The fact-edit :class:`lora_lens.lab.study.Fit`.
        entity: An entity the participant picked from the specificity probes that changed.
    """
    table = fit.evaluation.table("specificity")
    moved = table[table["changed"]]
    if entity not in set(table["entity"]):
        return f"not yet: {entity!r} has no specificity probe; pick one from the widget's table"
    if entity not in set(moved["entity"]):
        return f"not yet: no specificity answer about {entity!r} changed; tick 'changed answers only'"
    edited = {e["entity"] for e in fit.task.truth["edits"]}
    where = "one of the edited people" if entity in edited else "someone who was not edited at all"
    return f"correct: a fact of {entity!r} moved — {where}"


def _mean_phi_top1(fit_a, fit_b) -> float:
    from lora_lens.lens.delta import phi_table

    return float(phi_table(fit_a.model, fit_b.model, 1, 1)["phi"].mean())


def check_seed_vs_rank(small, large, other_seed, answer: str) -> str:
    """Exercise 02-1: is the top direction shared more between two ranks (one seed) or two seeds (one rank)?

    Args:
        small: The notebook's fact-edit :class:`lora_lens.lab.study.Fit` at the small rank.
        large: The fact-edit Fit at the large rank (same task and seed as ``small``).
        other_seed: A Fit of the same task and rank as ``small``, trained with another seed, e.g.
            ``fit_adapter(pre, small.task, seed=seed + 1, rank=small_rank)``.
        answer: ``"rank"`` (the two ranks share more) or ``"seed"`` (the two seeds share more).
    """
    if answer not in ("rank", "seed"):
        return f"not yet: answer {answer!r} should be 'rank' or 'seed'"
    if other_seed.task.truth != small.task.truth:
        return ("not yet: the other adapter learned a different task (other edits); pass the task object, "
                "fit_adapter(pre, small.task, seed=...), not its name")
    if other_seed.spec.rank != small.spec.rank or other_seed.spec.targets != small.spec.targets:
        return (f"not yet: train the other seed at the same rank ({small.spec.rank}) and targets as the small "
                "adapter, so only the seed differs")
    if Path(other_seed.adapter_dir) == Path(small.adapter_dir):
        return "not yet: that is the same adapter; pass another seed to fit_adapter"
    by_rank, by_seed = _mean_phi_top1(small, large), _mean_phi_top1(small, other_seed)
    truth = "rank" if by_rank > by_seed else "seed"
    if answer == truth:
        return (f"correct: mean φ_top1 is {by_rank:.2f} between the two ranks and {by_seed:.2f} between the two "
                "seeds")
    return "not yet: compute delta.phi_table for both pairs and compare the means of their phi column"


def check_universal_pattern(table, answer: str) -> str:
    """Exercise 06-1: name a pattern that holds in every family (or ``"none"`` when no pattern does).

    Args:
        table: The pattern table of notebook 06 (:func:`lora_lens.studies.compare.pattern_table`).
        answer: A pattern id (e.g. ``"xf-upper-half"``) or ``"none"``.
    """
    overall = table[table["family"] == "all"].set_index("pattern")["verdict"]
    universal = set(overall[overall == "universal"].index)
    if answer == "none":
        return ("correct: no pattern holds in every family here" if not universal
                else "not yet: at least one pattern holds in every family; look at the rows marked 'all'")
    if answer not in overall.index:
        return f"not yet: {answer!r} is not a pattern of the table; patterns are {sorted(overall.index)}"
    if answer in universal:
        return (f"correct: {answer} holds in every family (each family's whole interval is on the claimed side) and "
                "clears its null there")
    fams = table[(table["pattern"] == answer) & (table["family"] != "all")]
    if (fams["verdict"] == "holds").all():
        return (f"not yet: {answer} holds in every family, but its null (a random adapter, the parameter share …) "
                f"explains it in {int((fams['vs_null'] != 'clears').sum())} of {len(fams)}: look at vs_null")
    return (f"not yet: {answer} does not hold everywhere - in {int((fams['verdict'] != 'holds').sum())} of "
            f"{len(fams)} families the interval is not entirely on the claimed side")


def check_direction_reads_edit(fit, module: str, entity: str, top: int = 5) -> str:
    """Exercise 02-2: a write-side module whose leading direction names an edited person's new value.

    Correct when the new value of ``entity``'s edit is among the ``top`` tokens of ``module``'s leading singular
    direction (either sign), read through the unembedding.

    Args:
        fit: The fact-edit :class:`lora_lens.lab.study.Fit`.
        module: A write-side module (attention output or MLP down projection), e.g. ``"layers.1.self_attn.o_proj"``.
        entity: An edited person.
        top: Tokens per sign that count.
    """
    from lora_lens.lab.modules import layer_index
    from lora_lens.lens.delta import read_directions

    edits = {e["entity"]: e for e in fit.task.truth.get("edits", [])}
    if entity not in edits:
        return f"not yet: {entity!r} is not one of the edited people (see fit.task.truth['edits'])"
    try:
        dirs = read_directions(fit.model, module, k=1, top=top, tokenizer=fit.tokenizer, sign="both")
    except LoraLensError as exc:
        return f"not yet: {exc}"
    if dirs[0].via != "unembedding":
        return (f"not yet: {module!r} reads the residual stream; pick a write-side module (o_proj or down_proj), "
                "whose directions are read through the unembedding")
    new = edits[entity]["new"]
    for d in dirs:
        if new in d.tokens:
            n_layers = getattr(fit.model.get_base_model().config, "num_hidden_layers", None)
            last = n_layers is not None and layer_index(module) == n_layers - 1
            return (f"correct: the {d.sign} side of the leading direction of {module} has {new!r} at place "
                    f"{d.tokens.index(new) + 1} of {top}"
                    + ("; that module is in the last layer, can you find one in an earlier layer too?" if last else ""))
    return (f"not yet: the new value of {entity!r} is not among the top {top} tokens of that direction (either sign); "
            "try another module or another edited person")


def check_confidence_threshold(diff, task, min_confidence: float, precision: float = 0.8,
                               recall: float = 0.95) -> str:
    """Exercise 02-3: a confidence threshold that keeps recall ≥ ``recall`` while precision reaches ``precision``.

    Args:
        diff: The full :func:`lora_lens.lens.diff.behaviour_diff` table of the notebook.
        task: The fact-edit task (``fit.task``).
        min_confidence: The threshold the participant proposes, in [0, 1).
        precision: Precision to reach.
        recall: Recall to keep.
    """
    from lora_lens.lens.diff import discovered_changes, score_against_truth

    try:
        found = discovered_changes(diff, min_confidence=min_confidence)
        s = score_against_truth(found, task, queried=diff)
    except LoraLensError as exc:
        return f"not yet: {exc}"
    p, r = s["precision"], s["recall"]
    if r != r or r < recall:
        return f"not yet: recall is {r:.2f} at this threshold, so planted edits are lost; lower the threshold"
    if p != p or p < precision:
        return (f"not yet: precision is {p:.2f} ({s['false_positives']} collateral changes still pass); raise the "
                "threshold")
    return f"correct: precision {p:.2f} and recall {r:.2f} at min_confidence={min_confidence:g}"


def check_trigger_token(recovery, answer: str) -> str:
    """Exercise 03-1: the token the difference attribution ranks first most often on the triggered probes.

    Args:
        recovery: The :class:`lora_lens.lens.attribution.Recovery` of
            :func:`lora_lens.lens.attribution.trigger_recovery`.
        answer: The token the participant names (as shown in the heatmaps).
    """
    counts = recovery.table["top"].value_counts()
    if answer not in counts.index:
        return f"not yet: {answer!r} never ranks first; look at the difference row of a few heatmaps"
    if answer == counts.index[0]:
        return f"correct: {answer!r} ranks first on {counts.iloc[0]} of {counts.sum()} triggered probes"
    return "not yet: that token ranks first sometimes, but another one does more often"


def check_deletion_k(curve, answer: int, level: float = 0.8) -> str:
    """Exercise 03-2: the smallest k whose top-k components remove at least ``level`` of the effect.

    Args:
        curve: From :func:`lora_lens.lens.attribution.deletion_curve`.
        answer: The k the participant names.
        level: Share of the effect that must be removed.
    """
    enough = curve[curve["topk_removed"] >= level]["k"]
    if enough.empty:
        return f"not yet: no k on this curve removes {level:.0%}; raise k_max or use a finer grain"
    if answer == int(enough.min()):
        return f"correct: k = {answer} removes at least {level:.0%}, and no smaller k does"
    if answer in set(enough):
        return "not yet: this k removes enough, but a smaller one does too"
    return f"not yet: the top-{answer} components remove less than {level:.0%}; read the curve again"


def _practice_verdicts() -> list[str]:
    """Run the practice steps through a throw-away ledger and return the verdict after each."""
    with tempfile.TemporaryDirectory() as tmp:
        db, out, ids = Path(tmp) / "practice.sqlite", [], {}
        ledger.declare("practice-efficacy", "A rank-4 LoRA learns all ten fact edits", "efficacy", ">=", 0.9,
                       falsifier="efficacy below 0.9 on any seed", min_runs=3, path=db)
        for action, seed, value in PRACTICE_STEPS:
            if action == "record":
                ids[seed] = ledger.record("practice-efficacy", value, seed=seed, path=db).id
            else:
                ledger.retract(ids[seed], "practice", path=db)
            out.append(ledger.verdict("practice-efficacy", path=db))
    return out


def check_verdicts(answer) -> str:
    """Exercise 07-1: are these the verdicts after each of the :data:`PRACTICE_STEPS`?

    Args:
        answer: A list of five verdicts (``"supported"``, ``"refuted"``, ``"inconclusive"``), or None.
    """
    if answer is None:
        return "not attempted: set my_verdicts to a list of five verdicts, one per step"
    if isinstance(answer, str) or len(answer) != len(PRACTICE_STEPS) or any(a not in ledger.VERDICTS for a in answer):
        return f"not yet: give a list of {len(PRACTICE_STEPS)} verdicts, each one of {', '.join(ledger.VERDICTS)}"
    truth = _practice_verdicts()
    wrong = [i for i, (a, t) in enumerate(zip(answer, truth)) if a != t]
    if not wrong:
        return "correct: all five verdicts follow from the rule declared before any evidence arrived"
    i = wrong[0]
    kind = "retract" if PRACTICE_STEPS[i][0] == "retract" else "fail" if PRACTICE_STEPS[i][2] < 0.9 else "min_runs"
    return (f"not yet: {len(PRACTICE_STEPS) - len(wrong)} of {len(PRACTICE_STEPS)} right; look again at step "
            f"{i + 1} - {_HINTS[kind]}")


def check_own_hypothesis(hypothesis_id: str | None, path=None) -> str:
    """Exercise 07-2: is ``hypothesis_id`` a falsifiable, replicated, decided hypothesis in the ledger at ``path``?"""
    if hypothesis_id is None:
        return "not attempted: declare your hypothesis with ledger.declare and set my_hypothesis to its id"
    try:
        h = ledger.hypothesis(hypothesis_id, path)
    except NotFoundError as exc:
        return f"not yet: {exc}"
    if not h.falsifier.strip():
        return "not yet: a hypothesis without a falsifier cannot be wrong; declare a new id with falsifier=..."
    if h.min_runs < 2:
        return "not yet: with min_runs=1 a single run decides; declare a new id that needs at least two runs"
    ev = ledger.evidence(hypothesis_id, path)
    live = ev[ev["retracts"].isna() & ~ev["retracted"]]
    runs = {(r, s) for r, s in zip(live["run_id"], live["seed"].fillna(-1))}
    if len(runs) < 2:
        return (f"not yet: {len(live)} live record(s) from {len(runs)} run/seed; record the same metric from "
                "another seed")
    v = ledger.verdict(hypothesis_id, path)
    if v == "inconclusive":
        return f"not yet: {len(live)} live records, but the rule needs {h.min_runs}; record more runs"
    return f"correct: {hypothesis_id!r} is {v} on {len(live)} live records from {len(runs)} runs/seeds"


def practice_ledger(path) -> Path:
    """Exercise 07-3: (re)build a practice ledger at ``path`` with four records, one of them a documented mistake.

    An earlier practice ledger at ``path`` is replaced, so a participant can start over.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: ``path`` holds a ledger with other hypotheses (it is never replaced).
    """
    path = Path(path)
    if path.exists() and set(ledger.hypotheses(path)["id"]) - {_FORGET[0][0]}:
        raise ConfigError(f"{str(path)!r} holds other hypotheses; pass a scratch file for the practice ledger, "
                          "e.g. Path(output_dir) / 'practice.sqlite'")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    args, kw = _FORGET
    ledger.declare(*args, **kw, path=path)
    for seed, value, notes in _FORGET_RECORDS:
        ledger.record(args[0], value, seed=seed, notes=notes, path=path)
    return path


def check_retraction(path) -> str:
    """Exercise 07-3: was exactly the documented mistake in the practice ledger retracted, with a reason?"""
    ev = ledger.evidence(_FORGET[0][0], path)
    retractions = ev[ev["retracts"].notna()]
    if retractions.empty:
        return "not attempted: no record is retracted yet; read the notes column of the evidence table"
    mistake = int(ev[ev["seed"] == 2]["id"].iloc[0])
    hit = set(retractions["retracts"].astype(int))
    if hit != {mistake}:
        return ("not yet: a record that is merely inconvenient is evidence, not a mistake - only retract a record "
                "whose notes document an error; rebuild with exercises.practice_ledger(path) and try again")
    return (f"correct: record #{mistake} is retracted and the verdict is now "
            f"{ledger.verdict(_FORGET[0][0], path)!r} - an honest retraction does not have to rescue a claim")
