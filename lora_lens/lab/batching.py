"""How rows of different lengths are split into padded forward passes.

:func:`length_groups` (the short and the long rows of a training batch apart, where that pads fewer tokens) and
:func:`padded_chunks` (ranges of rows sorted by length under a row and a padded-token budget): used by
:class:`lora_lens.lab.lm_training.LMTrainer`'s passes and the batched input attribution of
:mod:`lora_lens.lens.attribution.tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

__all__ = ["length_groups", "padded_chunks"]


def length_groups(lengths: list[int], bucket: bool = True) -> list[list[int]]:
    """The rows of a batch in one or two padded forward passes: all rows in their order, or (``bucket``, when it
    pads at least a quarter fewer tokens) the shorter and the longer rows apart, split where the padded size is
    smallest (a few long replay lines among short ones need not pad every short line to their length)."""
    everything = list(range(len(lengths)))
    if not bucket or len(lengths) < 2:
        return [everything]
    order = sorted(everything, key=lambda i: lengths[i])
    best, cut = len(order) * lengths[order[-1]], None
    for k in range(1, len(order)):
        cost = k * lengths[order[k - 1]] + (len(order) - k) * lengths[order[-1]]
        if cost < best:
            best, cut = cost, k
    if cut is None or best > 0.75 * len(order) * lengths[order[-1]]:  # an extra pass for less than a quarter: no
        return [everything]
    return [sorted(order[:cut]), sorted(order[cut:])]


def padded_chunks(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None,
                  key: Sequence | None = None, fill: float = 0.0) -> Iterator[tuple[int, int]]:
    """``(start, end)`` ranges over items sorted by length (and ``key``): each at most ``max_rows`` items, at most
    ``max_tokens`` padded tokens, at least a share ``fill`` of them real, one ``key`` value per range."""
    start, n = 0, len(lengths)
    while start < n:
        end, real, width = start + 1, lengths[start], lengths[start]
        while end < n and end - start < max_rows and (key is None or key[end] == key[start]):
            width = max(width, lengths[end])
            if max_tokens is not None and (end - start + 1) * width > max_tokens:
                break
            if real + lengths[end] < fill * (end - start + 1) * width:
                break
            real += lengths[end]
            end += 1
        yield start, end
        start = end
