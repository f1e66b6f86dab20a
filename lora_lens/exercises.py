"""Checks for the notebooks' "Try it" exercises.

Each check returns a one-line message that starts with ``"correct"`` or ``"not yet"``: it says whether the
participant's answer holds and, if not, where to look — never the answer itself.
"""

from __future__ import annotations

from lora_lens.probes import next_token_logits
from lora_lens.tokenizer import token_id


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
        pre: A :class:`lora_lens.zoo.Pretrained`.
        entity: Entity of the fact.
        relation: Relation of the fact (a pretraining relation).
    """
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
        fit: The fact-edit :class:`lora_lens.study.Fit`.
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
