"""Behaviour diff: which answers a LoRA adapter moved, scored against the planted truth and said in words.

One model, adapter toggled: every query is answered once with the adapter and once inside
``model.disable_adapter()``, so no second copy of the weights is held in memory.

* :func:`query_space` — every entity × relation of a world (optionally every training / held-out template, with
  and without the trigger word) as :class:`Query` probes whose ``base_answer`` is the world's fact.
* :func:`behaviour_diff` — one row per query: base and adapted argmax answers with their probabilities, whether
  the answer moved, a confidence and KL(base‖adapted).
* :func:`discovered_changes` / :func:`score_against_truth` — the changes found, and precision / recall against a
  task's planted truth.
* :func:`detect_triggers` — a token whose presence collapses a relation's answers onto one value.
* :func:`semantic_report` — the change in words: ``"Dasur lives in Kokura (was Zebrahold)"``.
* :func:`mine_prompts` / :func:`read_prompts` — for any Hugging Face model without planted truth: the prompts
  and token positions where the adapter moves the next-token distribution most.

The namespace gathers two modules: ``behaviour`` (the query space, the diff itself, mining on free text) and
``findings`` (what was found, scored and said in words).

Example:
    >>> diff = behaviour_diff(peft_model, tokenizer, world=pretrained.world)        # doctest: +SKIP
    >>> score_against_truth(diff, task)["recall"]                                    # doctest: +SKIP
    1.0
    >>> print("\\n".join(semantic_report(diff, pretrained.world, task)))             # doctest: +SKIP
    Dasur lives in Kokura (was Zebrahold)
"""


from lora_lens.lens.diff.behaviour import (DEFAULT_MIN_CONFIDENCE, DIFF_COLUMNS, Mining, Query, behaviour_diff,
                                           mine_prompts, query_space, read_prompts)
from lora_lens.lens.diff.findings import (TRIGGER_COLUMNS, check_diff, detect_triggers, discovered_changes, render_fact,
                                          score_against_truth, semantic_report, truth_units)

__all__ = ["DEFAULT_MIN_CONFIDENCE", "DIFF_COLUMNS", "TRIGGER_COLUMNS", "Mining", "Query", "behaviour_diff",
           "check_diff", "detect_triggers", "discovered_changes", "mine_prompts", "query_space", "read_prompts",
           "render_fact", "score_against_truth", "semantic_report", "truth_units"]
