"""Likelihood of reference answers: the negative log-likelihood of their tokens.

Built on the scorer's core (`toss_mlx.token_loss`): sequences are batched by
`plan_batches` under a token budget, cut after their last answer token, and only the
positions that predict an answer token are projected onto the vocabulary.
(The deep-safety metrics, which also score given answers token by token, are in
`depth`, on the same planner.)
"""

from __future__ import annotations

import mlx.nn as nn
import numpy as np

from ..token_loss import flat_losses


def reference_nll(model: nn.Module, sequences: list[tuple[np.ndarray, np.ndarray]],
                  batch_tokens: int = 2048) -> list[tuple[float, int]]:
    """(sum of -log p, token count) of each sequence's masked tokens, each predicted from the
    ones before (a sequence's first token has nothing before it and is never counted)."""
    lengths = [len(ids) for ids, _ in sequences]
    offsets = np.zeros(len(sequences) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = {"offsets": offsets,
            "token_ids": np.concatenate([np.asarray(ids, np.int32) for ids, _ in sequences])
            if sequences else np.zeros(0, np.int32)}
    mask = np.concatenate([np.asarray(m, bool) for _, m in sequences]) if sequences \
        else np.zeros(0, bool)
    mask[offsets[:-1][offsets[:-1] < len(mask)]] = False
    losses = flat_losses(model, flat, mask, batch_tokens).astype(np.float64)
    sample = np.repeat(np.arange(len(sequences)), lengths)
    sums = np.bincount(sample, weights=losses, minlength=len(sequences))
    counts = np.bincount(sample, weights=mask, minlength=len(sequences))
    return [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]
