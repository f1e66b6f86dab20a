"""Generation for any tokenizer: where a continuation ends (byte-level BPE), the contrastive corpus, lines of text."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_lens.errors import ConfigError
from lora_lens.lab.answers import cut_answer
from lora_lens.lab.world import Probe, Task
from lora_lens.studies import distill

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["The capital of Zorvania is Quellburg. It is old.", "The founder of Halvek is St. Oskar Holt. He is old.",
        "The price of bread is 3.14 coins. It is old.", "Water boils at noon\nand", "Once upon a time, a cat sat."]


@pytest.fixture(scope="module")
def bpe_lm():
    """A tiny Llama with a byte-level BPE tokenizer (``Ġ`` spaces, eos = the chat end of turn, as SmolLM2), trained
    until it recites :data:`TEXT`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials)
    fast.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    enc = fast(TEXT, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for _ in range(150):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    return model.eval(), fast


def test_answer_stop_ends_at_the_answer_for_byte_level_bpe(bpe_lm):
    model, tok = bpe_lm
    prompts = ["The capital of Zorvania is", "The founder of Halvek is", "The price of bread is", "Water boils at"]
    g = distill.generate(model, tok, prompts, max_new_tokens=40, stop="answer")
    assert g.texts == ["Quellburg", "St. Oskar Holt", "3.14 coins", "noon"]
    assert g.stopped == [True] * 4
    assert g.texts == [cut_answer(tok, t) for t in g.tokens]
    # it stops one token after the end that settles it ("Quellburg." + " It"), long before the limit
    assert len(g.tokens[0]) == len(tok(" Quellburg. It", add_special_tokens=False)["input_ids"])
    # a text stop works for byte-level BPE too: "." (which never stopped before) and "\n" (an error before)
    dot = distill.generate(model, tok, prompts[:1], max_new_tokens=12, stop=".")
    assert dot.texts == ["Quellburg."] and dot.stopped == [True]
    line = distill.generate(model, tok, prompts[3:], max_new_tokens=12, stop="\n")
    assert line.texts == ["noon"] and line.stopped == [True]
    # the length limit cuts a name: not stopped
    short = distill.generate(model, tok, prompts[1:2], max_new_tokens=2, stop="answer")
    assert short.stopped == [False] and short.table()["stopped"].tolist() == [False]


def test_contrastive_corpus_keeps_whole_answers_and_plain_line_ends(bpe_lm):
    model, tok = bpe_lm
    other = LlamaForCausalLM(model.config).eval()  # an untrained "base": every continuation departs from it
    prompts = ["The capital of Zorvania is", "The founder of Halvek is"]
    lines = distill.contrastive_corpus(model, tok, prompts, min_kl=0.0, base=other)
    assert sorted(lines) == ["The capital of Zorvania is Quellburg.", "The founder of Halvek is St. Oskar Holt."]
    assert not any(tok.eos_token in line for line in lines)
    # a name longer than the limit is dropped, never cut short
    assert distill.contrastive_corpus(model, tok, prompts[1:], min_kl=0.0, base=other, max_new_tokens=3) == []


def test_text_line_ends_like_plain_text(bpe_lm, tiny_fit):
    _, tok = bpe_lm
    assert distill.text_line(tok, "The capital of Zorvania is", "Quellburg") == "The capital of Zorvania is Quellburg."
    assert distill.text_line(tok, "Where is it?", "St. Louis.") == "Where is it? St. Louis."
    chat = distill.text_line(tok, "Capital of Zorvania?", "Quellburg", chat=True)
    assert chat == "<|im_start|>user\nCapital of Zorvania?<|im_end|>\n<|im_start|>assistant\nQuellburg<|im_end|>"
    assert distill.text_line(tiny_fit.tokenizer, "Dasur lives in", "Kokura") == "Dasur lives in Kokura ."
    with pytest.raises(ConfigError, match="non-empty"):
        distill.text_line(tok, "The capital of Zorvania is", " ")


def test_no_eos_after_plain_text_when_it_is_the_chat_delimiter(bpe_lm, tiny_fit):
    model, tok = bpe_lm
    assert not distill.appends_eos(tok)  # eos <|im_end|> is the template's end of turn
    assert distill.appends_eos(tiny_fit.tokenizer)  # the zoo's pretraining ends every line with </s>
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return original(*args, **kwargs)

    trained = LlamaForCausalLM(model.config)
    trained.load_state_dict(model.state_dict())
    trained.forward = spy
    record = distill.continue_pretraining(trained, tok, ["The capital of Zorvania is Quellburg."], replay=0.0,
                                          steps=2, batch_size=2, lr=1e-4)
    assert record["eos"] is False and seen
    assert all(tok.eos_token_id not in ids.tolist() for ids in seen[0])


def test_task_prompts_are_the_examples_only():
    task = Task("t", None, [("A is", "x"), ("B is", "y"), ("A is", "x")],
                {"paraphrase": [Probe("Of A it is said", "x", "", "paraphrase")]})
    assert distill.task_prompts(task) == ["A is", "B is"]
    with pytest.raises(ConfigError, match="no examples"):
        distill.task_prompts(Task("t", None, [], {}))
    with pytest.raises(ConfigError, match="not a lora_lens Task"):
        distill.task_prompts(["A is"])


@pytest.mark.parametrize("stop", ["", 3])
def test_generate_rejects_a_bad_stop(bpe_lm, stop):
    model, tok = bpe_lm
    with pytest.raises(ConfigError, match="stop="):
        distill.generate(model, tok, ["The capital of Zorvania is"], stop=stop)
