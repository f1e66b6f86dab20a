"""Reference prompts for input attribution: a background drawn from a pool (:func:`reference_prompts`) or
counterfactual variants of a prompt with chosen words resampled (:func:`counterfactual_prompts`).

A token compared with what stands at its position in reference prompts of the same length (averaged over them)
gives expected gradients (IG) or resampling ablation; a counterfactual asks which of the resampled words the
change belongs to, where a blank token gives credit to every word the change *needs*.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError

__all__ = ["counterfactual_prompts", "probe_references", "reference_prompts"]


def reference_prompts(tokenizer, prompts: Sequence[str], pool: Sequence[str], n: int = 8,
                      seed: int = 0) -> list[list[str]]:
    """For each prompt, up to ``n`` prompts of ``pool`` with the same number of tokens (a background sample).

    Averaging attributions over such references is *expected gradients* (IG) or resampling ablation: each token is
    compared with what stood at its position in prompts drawn from the pool, not with a blank token.

    Raises:
        ConfigError: ``n`` < 1, or a prompt for which the pool has no other prompt of its length (named with the
            lengths the pool has).
    """
    check_positive("n", n)
    by_length: dict[int, list[str]] = {}
    for ref in dict.fromkeys(pool):
        by_length.setdefault(len(tokenizer(ref)["input_ids"]), []).append(ref)
    rng = np.random.default_rng(seed)
    out = []
    for prompt in prompts:
        length = len(tokenizer(prompt)["input_ids"])
        options = [r for r in by_length.get(length, []) if r != prompt]
        if not options:
            raise ConfigError(f"the pool has no prompt of {length} tokens for prompt {prompt!r} (it has lengths "
                              f"{sorted(by_length)}): add prompts of that length to the pool")
        pick = rng.choice(len(options), size=min(n, len(options)), replace=False)
        out.append([options[i] for i in sorted(pick)])
    return out


def _word(word: str) -> re.Pattern:
    """``word`` as a whole word: not inside another word (``"Zorvania's"`` holds ``Zorvania``); its first letter in
    either case (``"The skyloom was …"`` holds ``the skyloom``)."""
    head = f"[{re.escape(word[0].lower())}{re.escape(word[0].upper())}]" if word[:1].isalpha() else re.escape(word[:1])
    return re.compile(rf"(?<![\w]){head}{re.escape(word[1:])}(?![\w])")


def _cased(alternative: str, matched: str) -> str:
    """``alternative`` with its first letter in the case of the matched word's (a sentence start stays capital)."""
    if matched[:1].isupper() and alternative[:1].islower():
        return alternative[0].upper() + alternative[1:]
    return alternative


def counterfactual_prompts(tokenizer, prompt: str, swaps: dict[str, Sequence[str]], n: int = 8,
                           seed: int = 0) -> list[str]:
    """Up to ``n`` variants of ``prompt`` with each word of ``swaps`` replaced by one of its alternatives.

    Each variant resamples every slot at once (e.g. ``{"cf": decoy words, "Nobon": other names}``); only
    alternatives that keep the prompt's number of tokens are used, so every variant aligns token by token.

    Raises:
        ConfigError: ``n`` < 1, a word of ``swaps`` that is not in the prompt, or a slot without an alternative of
            the same token count.
    """
    check_positive("n", n)
    ids = tokenizer(prompt)["input_ids"]

    def aligned(word: str, alternative: str) -> bool:
        """Only the word's own tokens change, and their number stays the same."""
        other = tokenizer(_word(word).sub(lambda m: _cased(alternative, m.group(0)), prompt, count=1))["input_ids"]
        if len(other) != len(ids):
            return False
        start = next(j for j in range(len(ids)) if ids[j] != other[j]) if other != ids else 0
        n_word = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        return all(ids[j] == other[j] for j in range(start + n_word, len(ids)))

    options = {}
    for word, alternatives in swaps.items():
        if not _word(word).search(prompt):
            raise ConfigError(f"swap word {word!r} is not a word of prompt {prompt!r}")
        fits = [a for a in dict.fromkeys(alternatives) if a != word and aligned(word, a)]
        if not fits:
            raise ConfigError(f"no alternative for {word!r} in prompt {prompt!r} keeps its {len(ids)} tokens "
                              "aligned: pass alternatives of the same token count")
        options[word] = fits
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(20 * n):
        variant = prompt
        for word, fits in options.items():
            choice = fits[rng.integers(len(fits))]
            variant = _word(word).sub(lambda m: _cased(choice, m.group(0)), variant, count=1)
        if variant not in out:
            out.append(variant)
        if len(out) == n:
            break
    return out



def probe_references(tokenizer, probes, references, n_references: int, seed: int, slots):
    """``(probes, references)`` for scoring probes: ``references`` None (a blank token: every probe, no references),
    ``"counterfactual"`` (``slots(probe)`` resampled with :func:`counterfactual_prompts`, seed ``seed + i`` for the
    i-th probe; a probe whose words have no alternative of the same token count is left out) or the caller's lists.

    Raises:
        ConfigError: An unknown ``references`` string, or no probe with a counterfactual.
    """
    if references is None:
        return probes, None
    if not isinstance(references, str):
        return probes, [list(r) for r in references]
    if references != "counterfactual":
        raise ConfigError(f"references={references!r} must be 'counterfactual', None (a blank baseline token) or "
                          "one list of reference prompts per probe")
    kept, refs = [], []
    for i, p in enumerate(probes):
        try:
            refs.append(counterfactual_prompts(tokenizer, p.prompt, slots(p), n=n_references, seed=seed + i))
            kept.append(p)
        except ConfigError:
            continue
    if not kept:
        raise ConfigError("no probe has a counterfactual (no other name or word of the same token count): pass "
                          "references=None or your own reference prompts")
    return kept, refs

