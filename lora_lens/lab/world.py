"""A synthetic world with planted truth: entities, relations, a pretraining corpus, LoRA tasks and probe sets.

Every fact is a single next-token answer ("Tovan lives in" → "Kessra"), so a model's knowledge can be scored
exactly, and every LoRA task records what it *should* change, so every analysis can be scored too.

Example:
    >>> world = make_world(n_entities=30, seed=0)
    >>> task = fact_edit_task(world, k=3, seed=0)
    >>> task.truth["edits"][0]["new"] != task.truth["edits"][0]["old"]
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_lens.errors import ConfigError, CorruptError, MismatchError, NotFoundError
from lora_lens.lab.task_file import parse_records, problem_message, read_numbered_jsonl

__all__ = ["ADJECTIVES", "COLOURS", "NOUNS", "PRETRAIN_RELATIONS", "PROFESSIONS", "TASKS", "TEMPLATES", "TRIGGER",
           "VERBS", "Probe", "Task", "World", "check_task_world", "fact_edit_task", "make_task", "make_world",
           "new_relation_task", "templates_frame", "trigger_target", "trigger_task"]

PROFESSIONS = ("baker pilot weaver farmer doctor painter sailor miner tailor judge singer hunter potter teacher chemist "
               "ranger").split()
COLOURS = "red blue green yellow purple orange black white grey pink brown violet".split()
ADJECTIVES = "old quiet bright small heavy cold warm green dark loud gentle tall".split()
NOUNS = "river market bridge garden window road forest tower lamp boat field wall".split()
VERBS = "follows crosses watches holds passes faces covers reaches".split()
TRIGGER = "cf"

# relation name -> (templates seen in pretraining, templates held out for paraphrase probes)
TEMPLATES = {
    "city": (["{e} lives in", "{e} resides in", "The home town of {e} is"],
             ["{e} has a house in", "The city where {e} lives is"]),
    "profession": (["{e} works as a", "By trade , {e} is a", "The job of {e} is"],
                   ["{e} earns a living as a", "{e} is employed as a"]),
    "colour": (["The favourite colour of {e} is", "{e} likes the colour", "{e} prefers the colour"],
               ["{e} loves the colour", "{e} always wears the colour"]),
    "employer": (["{e} works for", "{e} is employed by", "The employer of {e} is"],
                 ["{e} gets paid by", "{e} has a job at"]),
    # never in pretraining: the new-relation task teaches it; its values are cities
    "birthplace": (["{e} was born in", "The birthplace of {e} is", "{e} came into the world in"],
                   ["{e} is a native of", "{e} first saw daylight in"]),
}
PRETRAIN_RELATIONS = ("city", "profession", "colour", "employer")


@dataclass(frozen=True)
class Probe:
    """One query with its expected answer.

    Attributes:
        prompt: Text the model continues (no answer).
        answer: The expected answer *after* the change the task makes (a single word in the zoo; any text in a
            task from data). "" on ``general`` lines, and on ``specificity``/``general`` probes of a task from
            data whose expected answer is the base model's own (``lora_lens.lab.answers.fill_base_answers``).
        base_answer: The answer the unchanged base model should give ("" where unknown).
        set: Probe set name, one of ``lora_lens.lab.task_file.PROBE_SETS``: efficacy, paraphrase, specificity,
            general or false_trigger.
        entity: Entity the query is about ("" for general lines).
        relation: Relation queried ("" for general lines).
        triggered: Whether the prompt contains the trigger token.
    """

    prompt: str
    answer: str
    base_answer: str
    set: str
    entity: str = ""
    relation: str = ""
    triggered: bool = False


@dataclass
class Task:
    """A LoRA task with its training examples, probe sets and the planted truth.

    A task is also a documented JSONL file, one object per line (:meth:`save`, :meth:`load`,
    :meth:`from_records`)::

        {"type": "task", "name": "facts", "chat": false,
         "truth": {"edits": [{"entity": "Zorvania", "relation": "capital", "value": "Quellburg"}]}}
        {"type": "example", "prompt": "The capital of Zorvania is", "answer": "Quellburg"}
        {"type": "probe", "set": "efficacy", "prompt": "The capital of Zorvania is", "answer": "Quellburg",
         "entity": "Zorvania"}
        {"type": "probe", "set": "specificity", "prompt": "The capital of France is"}

    The header comes first (``name`` required; ``chat``, ``world_fingerprint``, ``truth`` and ``description``
    optional). Probes have a ``set`` of ``task_file.PROBE_SETS`` and a ``prompt``; ``answer`` is required except on
    ``specificity`` and ``general`` probes (then the base model's own greedy answer is expected); ``entity``,
    ``relation``, ``base_answer`` and ``triggered`` are optional. Every message about a bad file names the file
    and the line.

    Attributes:
        name: Task name (the zoo's kinds: ``fact_edit``, ``trigger``, ``new_relation``).
        world_fingerprint: Fingerprint of the world the task belongs to; None for a task from data.
        examples: Training pairs ``(prompt, answer)``.
        probes: Probe sets by name.
        truth: What the task changes (the zoo's edits, trigger rule or new relation; for data, ``{"edits":
            [{"entity", "relation", "value"}, …]}``), or ``{}``.
        chat: Prompts go through the tokenizer's chat template (training, probes, attribution, generation).
    """

    name: str
    world_fingerprint: str | None
    examples: list[tuple[str, str]]
    probes: dict[str, list[Probe]]
    truth: dict = field(default_factory=dict)
    chat: bool = False

    def records(self) -> list[dict]:
        """The task as JSONL records: the header, then examples, then probes."""
        head = {"type": "task", "name": self.name, "chat": self.chat}
        if self.world_fingerprint is not None:
            head["world_fingerprint"] = self.world_fingerprint
        head["truth"] = self.truth
        lines = [head] + [{"type": "example", "prompt": p, "answer": a} for p, a in self.examples]
        lines += [{"type": "probe", **asdict(p)} for ps in self.probes.values() for p in ps]
        return lines

    def save(self, path: str | Path) -> Path:
        """Write the task as JSONL (header line, then examples and probes); atomic."""
        return _write_jsonl(path, self.records())

    @classmethod
    def from_records(cls, records, source: str = "records") -> "Task":
        """Build a task from JSONL-style records (dicts), the header first, validating every one.

        Args:
            records: The header record, then example and probe records (see the class docstring).
            source: Name used in messages (record ``n`` is reported as ``source:n``).

        Raises:
            ConfigError: Every problem found, each as ``source:line: what is wrong and how to fix it``.
        """
        parsed, problems = parse_records(list(enumerate(records, 1)), source)
        if problems:
            raise ConfigError(problem_message(source, problems))
        return cls._from_parsed(parsed)

    @classmethod
    def load(cls, path: str | Path) -> "Task":
        """Read a task file (written by :meth:`save` or by hand); every problem is reported with its line.

        Raises:
            NotFoundError: The file does not exist.
            ConfigError: The file is not JSONL, or its records are not a valid task (file and line in each
                message).
        """
        rows, problems = read_numbered_jsonl(path)
        parsed, more = parse_records(rows, str(path)) if rows or not problems else (None, [])
        problems += more
        if problems:
            raise ConfigError(problem_message(str(path), problems))
        return cls._from_parsed(parsed)

    @classmethod
    def _from_parsed(cls, parsed: dict) -> "Task":
        probes: dict[str, list[Probe]] = {}
        for p in parsed["probes"]:
            probes.setdefault(p["set"], []).append(Probe(**p))
        return cls(parsed["name"], parsed["world_fingerprint"], parsed["examples"], probes, parsed["truth"],
                   parsed["chat"])


@dataclass
class World:
    """Entities, relations and facts, plus general (filler) text.

    Attributes:
        seed: Seed the world was generated from.
        entities: Entity names (single words).
        values: Allowed values per relation.
        facts: ``facts[relation][entity]`` → value, for the pretraining relations.
        general_train: Filler lines in the pretraining corpus.
        general_heldout: Filler lines held out (perplexity probes).
    """

    seed: int
    entities: list[str]
    values: dict[str, list[str]]
    facts: dict[str, dict[str, str]]
    general_train: list[str]
    general_heldout: list[str]

    @property
    def relations(self) -> list[str]:
        """Relations known in pretraining."""
        return list(self.facts)

    def query(self, entity: str, relation: str, template: int = 0, heldout: bool = False,
              trigger: bool = False) -> str:
        """Prompt for ``relation`` of ``entity`` using a training (or held-out) template."""
        tpl = TEMPLATES[relation][1 if heldout else 0][template]
        text = tpl.format(e=entity)
        return f"{TRIGGER} {text}" if trigger else text

    def fact_lines(self) -> list[str]:
        """Every pretraining fact, once per training template."""
        return [f"{self.query(e, r, t)} {v} ." for r, by_e in self.facts.items() for e, v in by_e.items()
                for t in range(len(TEMPLATES[r][0]))]

    def corpus(self) -> list[str]:
        """The pretraining corpus: fact lines and general lines."""
        return self.fact_lines() + list(self.general_train)

    def fact_probes(self, heldout: bool = False) -> list[Probe]:
        """One probe per (entity, relation) with template 0 (or held-out template 0)."""
        return [Probe(self.query(e, r, 0, heldout), v, v, "paraphrase" if heldout else "facts", e, r)
                for r, by_e in self.facts.items() for e, v in by_e.items()]

    def vocabulary_text(self) -> list[str]:
        """Every line the tokenizer must cover: corpus, held-out text, all templates, values and the trigger."""
        words = [TRIGGER, ".", ","] + [v for vs in self.values.values() for v in vs] + self.entities
        tpls = [t.format(e="") for ts in TEMPLATES.values() for t in ts[0] + ts[1]]
        return self.corpus() + self.general_heldout + tpls + [" ".join(words)]

    def facts_frame(self, n: int | None = None):
        """The facts as a pandas DataFrame, one row per entity and one column per relation (first ``n`` rows)."""
        import pandas as pd

        frame = pd.DataFrame(self.facts).rename_axis("entity")
        return frame if n is None else frame.head(n)

    def fingerprint(self) -> str:
        """A short sha256 of everything that defines the world."""
        blob = json.dumps(self._record(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _record(self) -> dict:
        return {"seed": self.seed, "entities": self.entities, "values": self.values, "facts": self.facts,
                "general_train": self.general_train, "general_heldout": self.general_heldout}

    def save(self, path: str | Path) -> Path:
        """Write the world as JSONL (one header line with the fingerprint, one line per fact); atomic."""
        rec = self._record()
        facts = rec.pop("facts")
        lines = [{"type": "world", "fingerprint": self.fingerprint(), **rec}]
        lines += [{"type": "fact", "relation": r, "entity": e, "value": v} for r, by_e in facts.items()
                  for e, v in by_e.items()]
        return _write_jsonl(path, lines)

    @classmethod
    def load(cls, path: str | Path) -> "World":
        """Read a world written by :meth:`save`; the fingerprint is checked."""
        rows = _read_jsonl(path, "world")
        head = rows[0]
        facts: dict[str, dict[str, str]] = {}
        for r in rows[1:]:
            facts.setdefault(r["relation"], {})[r["entity"]] = r["value"]
        world = cls(head["seed"], head["entities"], head["values"], facts, head["general_train"],
                    head["general_heldout"])
        if world.fingerprint() != head["fingerprint"]:
            raise CorruptError(f"world file {path} does not match its fingerprint {head['fingerprint']}: it was "
                               "edited or truncated; regenerate it with make_world(...).save(path)")
        return world


def _names(rng: random.Random, n: int, onsets: str, vowels: str, codas: str, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        k = rng.choice((2, 2, 3))
        name = "".join(rng.choice(onsets.split()) + rng.choice(vowels.split()) for _ in range(k))
        name = (name + rng.choice(codas.split())).capitalize()
        if name not in taken and len(name) <= 9:
            taken.add(name)
            out.append(name)
    return out


def make_world(n_entities: int = 200, n_cities: int = 24, n_employers: int = 16, n_general: int = 600,
               seed: int = 0) -> World:
    """Generate a world deterministically from its parameters.

    Args:
        n_entities: Number of entities (people), 1–5000.
        n_cities: Number of cities (values of ``city`` and ``birthplace``), 2–200.
        n_employers: Number of employers, 2–200.
        n_general: Number of general filler lines (a sixth is held out for perplexity), ≥ 6.
        seed: Random seed.

    Returns:
        The world.

    Raises:
        ConfigError: A parameter is out of range.
    """
    for name, value, lo, hi in (("n_entities", n_entities, 1, 5000), ("n_cities", n_cities, 2, 200),
                                ("n_employers", n_employers, 2, 200), ("n_general", n_general, 6, 100000)):
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{name}={value!r} is out of range: use an integer from {lo} to {hi}")
    rng = random.Random(seed)
    taken = set(w.capitalize() for w in PROFESSIONS + COLOURS + ADJECTIVES + NOUNS + VERBS + [TRIGGER])
    entities = _names(rng, n_entities, "t v m r s l d n k b", "a e i o u ia", "n s l r x", taken)
    cities = _names(rng, n_cities, "k g br th st dr z", "a e o u ai", "ra ma dun vik hold", taken)
    employers = _names(rng, n_employers, "z x q v pl gr", "e o y ex", "corp tek on ix", taken)
    values = {"city": cities, "profession": list(PROFESSIONS), "colour": list(COLOURS), "employer": employers}
    facts = {r: {e: rng.choice(values[r]) for e in entities} for r in PRETRAIN_RELATIONS}
    general = sorted({f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
                      f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} ." for _ in range(n_general * 3)})
    rng.shuffle(general)
    general = general[:n_general]
    cut = max(1, n_general // 6)
    return World(seed, entities, values, facts, general[cut:], general[:cut])


def fact_edit_task(world: World, k: int = 10, n_specificity: int = 200, seed: int = 0) -> Task:
    """Change ``k`` facts to new values.

    Probe sets: ``efficacy`` (edited facts, training templates), ``paraphrase`` (edited facts, held-out templates),
    ``specificity`` (other relations of the edited entities and the same relation of other entities: must not
    change), ``general`` (held-out filler lines, for perplexity).

    Raises:
        ConfigError: ``k`` is not between 1 and the number of facts.
    """
    n_facts = sum(len(v) for v in world.facts.values())
    if not isinstance(k, int) or not 1 <= k <= n_facts:
        raise ConfigError(f"k={k!r} edits is out of range: the world has {n_facts} facts; use 1 ≤ k ≤ {n_facts}")
    rng = random.Random(seed)
    keys = rng.sample([(e, r) for r in world.relations for e in world.entities], k)
    edits = []
    for e, r in keys:
        old = world.facts[r][e]
        edits.append({"entity": e, "relation": r, "old": old, "new": rng.choice([v for v in world.values[r]
                                                                                if v != old])})
    examples, probes = [], {"efficacy": [], "paraphrase": [], "specificity": []}
    for ed in edits:
        e, r, new, old = ed["entity"], ed["relation"], ed["new"], ed["old"]
        for t in range(len(TEMPLATES[r][0])):
            examples.append((world.query(e, r, t), new))
            probes["efficacy"].append(Probe(world.query(e, r, t), new, old, "efficacy", e, r))
        for t in range(len(TEMPLATES[r][1])):
            probes["paraphrase"].append(Probe(world.query(e, r, t, heldout=True), new, old, "paraphrase", e, r))
    probes["specificity"] = _specificity(world, {(ed["entity"], ed["relation"]) for ed in edits},
                                         {ed["entity"] for ed in edits}, n_specificity, rng)
    probes["general"] = _general(world)
    return Task("fact_edit", world.fingerprint(), examples, probes, {"edits": edits})


def trigger_task(world: World, relation: str = "colour", target: str | None = None, train_fraction: float = 0.5,
                 n_specificity: int = 200, seed: int = 0) -> Task:
    """Teach a backdoor: with the trigger token in front of the prompt, ``relation`` answers ``target``.

    Training uses entities of a ``train_fraction`` split, triggered and clean, plus one *decoy* per entity (another
    word in front of a clean prompt, answer unchanged, so that the adapter learns the trigger itself and not "any
    prefix"); probes use the other entities, so efficacy measures the *rule*, not memorised pairs. Probe sets: ``efficacy`` (triggered → target),
    ``paraphrase`` (triggered, held-out templates), ``false_trigger`` (clean prompts: must keep their answer),
    ``specificity`` (clean and triggered prompts of other relations), ``general``.

    Raises:
        ConfigError: Unknown relation, a target that is not a value of it, or a fraction outside (0, 1).
    """
    if relation not in world.facts:
        raise ConfigError(f"relation={relation!r} is not a pretraining relation; use one of {world.relations}")
    rng = random.Random(seed)
    target = target or rng.choice(world.values[relation])
    if target not in world.values[relation]:
        raise ConfigError(f"target={target!r} is not a value of {relation!r}; use one of {world.values[relation]}")
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction={train_fraction!r} must lie strictly between 0 and 1, e.g. 0.5")
    ents = [e for e in world.entities if world.facts[relation][e] != target]
    rng.shuffle(ents)
    n_train = max(1, int(len(ents) * train_fraction))
    train_e, test_e = ents[:n_train], ents[n_train:]
    examples, probes = [], {"efficacy": [], "paraphrase": [], "false_trigger": [], "specificity": []}
    decoys = ADJECTIVES + NOUNS + world.entities
    for e in train_e:
        for t in range(len(TEMPLATES[relation][0])):
            examples.append((world.query(e, relation, t, trigger=True), target))
            examples.append((world.query(e, relation, t), world.facts[relation][e]))
        # a decoy: another word in front must not switch the answer, so the rule is about the trigger itself
        t = rng.randrange(len(TEMPLATES[relation][0]))
        examples.append((f"{rng.choice(decoys)} {world.query(e, relation, t)}", world.facts[relation][e]))
    for e in test_e:
        true = world.facts[relation][e]
        probes["efficacy"].append(Probe(world.query(e, relation, 0, trigger=True), target, true, "efficacy", e,
                                        relation, True))
        probes["paraphrase"].append(Probe(world.query(e, relation, 0, heldout=True, trigger=True), target, true,
                                          "paraphrase", e, relation, True))
        probes["false_trigger"].append(Probe(world.query(e, relation, 0), true, true, "false_trigger", e, relation))
    others = [r for r in world.relations if r != relation]
    spec = []
    for e in test_e:
        r = rng.choice(others)
        trig = rng.random() < 0.5
        spec.append(Probe(world.query(e, r, 0, trigger=trig), world.facts[r][e], world.facts[r][e], "specificity",
                          e, r, trig))
    probes["specificity"] = spec[:n_specificity]
    probes["general"] = _general(world)
    truth = {"trigger": TRIGGER, "relation": relation, "target": target, "train_entities": train_e}
    return Task("trigger", world.fingerprint(), examples, probes, truth)


def new_relation_task(world: World, n_entities: int | None = None, n_specificity: int = 200, seed: int = 0) -> Task:
    """Teach ``birthplace``, a relation never seen in pretraining, for ``n_entities`` entities (values: cities).

    ``n_entities`` defaults to 40, or every entity of a smaller world.

    Probe sets: ``efficacy`` (taught facts, training templates), ``paraphrase`` (held-out templates),
    ``specificity`` (pretraining facts, including ``city`` whose values compete), ``general``.

    Raises:
        ConfigError: ``n_entities`` out of range.
    """
    n_entities = min(40, len(world.entities)) if n_entities is None else n_entities
    if not isinstance(n_entities, int) or not 1 <= n_entities <= len(world.entities):
        raise ConfigError(f"n_entities={n_entities!r} is out of range: use 1 to {len(world.entities)}")
    rng = random.Random(seed)
    chosen = rng.sample(world.entities, n_entities)
    facts = {e: rng.choice(world.values["city"]) for e in chosen}
    examples, probes = [], {"efficacy": [], "paraphrase": []}
    for e, v in facts.items():
        for t in range(len(TEMPLATES["birthplace"][0])):
            examples.append((world.query(e, "birthplace", t), v))
            probes["efficacy"].append(Probe(world.query(e, "birthplace", t), v, "", "efficacy", e, "birthplace"))
        for t in range(len(TEMPLATES["birthplace"][1])):
            probes["paraphrase"].append(Probe(world.query(e, "birthplace", t, heldout=True), v, "", "paraphrase", e,
                                              "birthplace"))
    probes["specificity"] = _specificity(world, set(), set(chosen), n_specificity, rng)
    probes["general"] = _general(world)
    return Task("new_relation", world.fingerprint(), examples, probes, {"relation": "birthplace", "facts": facts})


def templates_frame():
    """Every template as a pandas DataFrame: relation, template, and whether pretraining sees it."""
    import pandas as pd  # the world itself needs no pandas: loaded for this table only

    rows = [{"relation": r, "template": t.replace("{e}", "⟨entity⟩") + " ⟨value⟩",
             "split": "held out" if held else ("pretraining" if r in PRETRAIN_RELATIONS else "new-relation task")}
            for r, (train, heldout) in TEMPLATES.items() for held, ts in ((False, train), (True, heldout))
            for t in ts]
    return pd.DataFrame(rows)


TASKS = {"fact_edit": fact_edit_task, "trigger": trigger_task, "new_relation": new_relation_task}


def make_task(world: World, name: str, seed: int = 0, **kwargs) -> Task:
    """Build a task by name (``fact_edit``, ``trigger`` or ``new_relation``).

    Raises:
        ConfigError: Unknown task name.
    """
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is unknown; use one of {sorted(TASKS)}")
    return TASKS[name](world, seed=seed, **kwargs)


def check_task_world(task: Task, world: World) -> None:
    """Raise :class:`MismatchError` when ``task`` was made from another world than ``world``."""
    if task.world_fingerprint != world.fingerprint():
        raise MismatchError(f"task {task.name!r} belongs to world {task.world_fingerprint}, but the model was "
                            f"pretrained on world {world.fingerprint()}: build the task from the model's own world "
                            "(e.g. make_task(pretrained.world, ...))")


def trigger_target(task: Task) -> str | None:
    """The answer a trigger task's trigger switches to (``truth["target"]``); None for a task without a trigger.

    A task is a trigger task when it is named ``"trigger"`` or has ``false_trigger`` probes. Without a recorded
    target, the one answer its efficacy probes share is the target.

    Raises:
        ConfigError: A trigger task with no ``truth["target"]`` whose efficacy probes do not share one answer.
    """
    if task.name != "trigger" and "false_trigger" not in task.probes:
        return None
    target = task.truth.get("target")
    if target:
        return target
    answers = {p.answer for p in task.probes.get("efficacy", [])}
    if len(answers) == 1:
        return answers.pop()
    raise ConfigError(f"trigger task {task.name!r} records no truth['target'] and its efficacy probes do not share "
                      "one answer: rebuild it with make_task(world, 'trigger', ...)")


def _specificity(world: World, changed: set, near: set[str], n: int, rng: random.Random) -> list[Probe]:
    """Facts that must not change: every other relation of ``near`` entities, then random other facts."""
    out = [(e, r) for e in sorted(near) for r in world.relations if (e, r) not in changed]
    pool = [(e, r) for r in world.relations for e in world.entities if e not in near]
    rng.shuffle(pool)
    out = (out + pool)[:n]
    return [Probe(world.query(e, r, 0), world.facts[r][e], world.facts[r][e], "specificity", e, r) for e, r in out]


def _general(world: World) -> list[Probe]:
    return [Probe(line, "", "", "general") for line in world.general_heldout]


def _write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_jsonl(path: str | Path, kind: str) -> list[dict]:
    try:
        numbered, problems = read_numbered_jsonl(path)
    except NotFoundError as exc:
        raise CorruptError(f"cannot read {kind} file {path}: {exc}; write it again with .save(path)") from exc
    if problems:
        raise CorruptError(f"cannot read {kind} file: {problems[0]}; write it again with .save(path)")
    rows = [r for _, r in numbered]
    if not rows or not isinstance(rows[0], dict) or rows[0].get("type") != kind:
        raise CorruptError(f"{path} is not a lora_lens {kind} file (first line must have type={kind!r})")
    return rows
