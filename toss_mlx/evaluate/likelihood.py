"""Likelihood of reference answers: the negative log-likelihood of their tokens.

(The deep-safety metrics, which also score given answers token by token, belong here.)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def reference_nll(model: nn.Module, sequences: list[tuple[np.ndarray, np.ndarray]],
                  batch_tokens: int = 2048) -> list[tuple[float, int]]:
    """(sum of -log p, token count) of each sequence's masked tokens, each predicted from the ones before.

    Sequences are sorted by length and batched under a token budget; right padding
    never changes the logits of earlier positions in a causal model.
    """
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))

    def run(batch: list[int]) -> None:
        length = max(len(sequences[i][0]) for i in batch)
        ids = np.zeros((len(batch), length), np.int32)
        mask = np.zeros((len(batch), length), np.float32)
        for row, i in enumerate(batch):
            tokens, answer = sequences[i]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = answer
        logits = model(mx.array(ids[:, :-1])).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array(ids[:, 1:])
        nll = -mx.take_along_axis(logprobs, target[..., None], axis=-1)[..., 0]
        sums = (nll * mx.array(mask[:, 1:])).sum(axis=1)
        mx.eval(sums)
        for row, i in enumerate(batch):
            results[i] = (float(sums[row].item()), int(mask[row, 1:].sum()))

    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * len(sequences[i][0]) > batch_tokens:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
    return results

