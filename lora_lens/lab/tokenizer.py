"""A word-piece-free BPE tokenizer trained locally on the world, wrapped as a transformers fast tokenizer; and the
checks every room makes of a tokenizer (single-token answers, vocabulary vs model, context length).

Words are split on spaces (SentencePiece-style ``▁`` marker) and the BPE vocabulary is large enough that every word
of the world — entities, values, template words, the trigger — is one token, so every fact answer is exactly one
next token. Text outside the world still tokenizes (into characters, or ``<unk>`` for unseen characters).

Example:
    >>> from lora_lens.lab.world import make_world
    >>> tok = build_tokenizer(make_world(n_entities=20))
    >>> len(tok("Kokura", add_special_tokens=False)["input_ids"])
    1
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.world import World

__all__ = ["SPECIALS", "build_tokenizer", "check_tokenizer", "max_length", "token_id"]

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(world: World, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on the world's text (deterministic).

    Args:
        world: The world whose text the tokenizer must cover.
        vocab_size: Upper bound on the vocabulary; training stops earlier when every word is one token.

    Returns:
        A fast tokenizer with ``<s>`` prepended to every encoded text, and pad/eos/unk set.

    Raises:
        ConfigError: ``vocab_size`` is too small for every world word to be one token.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1,
                                  show_progress=False)
    tok.train_from_iterator(world.vocabulary_text(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="right", model_max_length=64)
    words = {w for line in world.vocabulary_text() for w in line.split()}
    split = sorted(w for w in words if len(fast(w, add_special_tokens=False)["input_ids"]) != 1)
    if split:
        raise ConfigError(f"vocab_size={vocab_size} is too small: {len(split)} world words (e.g. {split[:5]}) "
                          "split into several tokens; raise vocab_size")
    return fast


def token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as a single answer token (as it appears after a space).

    Raises:
        ConfigError: ``word`` is empty or is not exactly one token (the message says how it splits).
    """
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"] if word.strip() else []
    # tokenizers without a space marker (GPT-2 style) keep the leading space inside the token
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"answer {word!r} tokenizes to {len(ids)} tokens {pieces}; a single-token answer is "
                          "required here: choose a word that is one token, or pass its first token")
    return ids[0]


def check_tokenizer(model, tokenizer) -> None:
    """Raise :class:`MismatchError` when ``tokenizer`` produces ids the model's embedding cannot hold."""
    n_model = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_model:
        raise MismatchError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_model} rows: "
                            "load the tokenizer saved with this model (same directory), or resize the model with "
                            "model.resize_token_embeddings(len(tokenizer))")


def max_length(model, tokenizer) -> int | None:
    """The longest sequence the model and tokenizer accept: the smallest of the model config's position limits
    (``max_position_embeddings``, ``n_positions``, ``max_sequence_length``) and a real ``model_max_length`` of
    the tokenizer; None when neither says."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    return min(limits) if limits else None
