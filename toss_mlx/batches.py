"""Token-masked batches and loss: what `toss-mlx train` feeds mlx-lm's trainer.

1. `keep_of_mask` reads a mask file written by `toss-mlx select` and refuses it
   unless it was made for exactly this tokenized data (fingerprint, rows, offsets).
2. `KeepDataset` holds each sample's tokens and keep mask: the response tokens
   that the mask keeps (every response token when there is no mask). Removed
   tokens stay in the input as context; they are only dropped from the loss.
3. `epoch_batches` / `BatchPlan` / `iterate_batches` cut the data into batches from
   (seed, epoch) alone, grouped by length like mlx-lm's and padded the same way,
   every sample once per epoch. The batch of global step s is a pure function
   of s, so a resumed run sees exactly the batches the killed run would have.
4. `masked_loss` is the cross-entropy over kept targets, normalized per token
   (the paper's equation) or per sample (the official code), with the
   normalizer summed over all ranks so that N processes equal one process.
   Only the kept targets' hidden states meet the vocabulary projection
   (`kept_cross_entropy`, after `use_kept_head` checked the model once), with a
   hand-written gradient: no [B, L, V] logits, in time or in memory. The body
   before it is `lean_body.lean_hidden_states` where that equals the model's own
   (llama-like models): it keeps less for the backward pass.

A batch is the tuple `(tokens, lengths, keep)`; mlx-lm's compiled step passes
every element of it to the loss.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .data import TokenizedData
from .io import TossError
from .layout import load_mask

LOSS_NORMS = ("token", "sample")
PAD_TO = 32  # mlx-lm's padding step: few distinct shapes, so few recompiles
KEPT_PAD = 32  # kept-target rows are padded to a multiple of this, for the same reason


# ---------------------------------------------------------------- 1. masks


def keep_of_mask(path: str | os.PathLike, data: TokenizedData) -> np.ndarray:
    """The `keep` array (bool [T], aligned with `data.flat()`) of a mask made for `data`.

    Checked by `toss_mlx.layout.load_mask`: refused unless made for exactly this
    tokenized data (fingerprint, rows, offsets).
    """
    flat = data.flat()
    return load_mask(path, flat["offsets"], flat["row_index"], data.fingerprint,
                     "the tokenized data").keep


# ---------------------------------------------------------------- 2. samples


@dataclass
class KeepDataset:
    """Samples as token arrays plus keep masks; `keep[j]`: token j is a loss target."""

    tokens: list[np.ndarray]  # int32 [L]
    keep: list[np.ndarray]  # bool [L]
    response_targets: np.ndarray  # int64 [N]: response tokens that can be targets (j >= 1)

    @classmethod
    def build(cls, data: TokenizedData, mask_keep: np.ndarray | None = None) -> KeepDataset:
        """keep = response_mask AND the mask file's keep (no mask: every response token)."""
        flat = data.flat()
        tokens, keep = [], []
        for i, sample in enumerate(data.samples):
            k = sample.response_mask.astype(bool)
            if mask_keep is not None:
                k = k & mask_keep[flat["offsets"][i]:flat["offsets"][i + 1]]
            tokens.append(sample.tokens.astype(np.int32))
            keep.append(k)
        response = np.array([int(s.response_mask[1:].sum()) for s in data.samples], np.int64)
        return cls(tokens, keep, response)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], np.int64)

    @property
    def kept_targets(self) -> np.ndarray:
        return np.array([int(k[1:].sum()) for k in self.keep], np.int64)


# ---------------------------------------------------------------- 3. batches


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int | None, epoch: int = 0,
                  group_by_length: bool = True) -> np.ndarray:
    """Sample indices of every batch of one epoch: int64 [n_batches, batch_size], -1 = empty row.

    With a seed: shuffled from (seed, epoch), then (stably) grouped by length so that
    equal-length ties differ between epochs, and the batch order shuffled. Without a
    seed (validation): a fixed order. The last batch is filled with empty rows (no
    tokens, nothing kept), which add nothing to either normalization.
    """
    n = len(lengths)
    if seed is None:
        order = np.arange(n)
        rng = None
    else:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
    if group_by_length:
        order = order[np.argsort(lengths[order], kind="stable")]
    n_batches = -(-n // batch_size)
    padded = np.full(n_batches * batch_size, -1, np.int64)
    padded[:n] = order
    batches = padded.reshape(n_batches, batch_size)
    return batches if rng is None else batches[rng.permutation(n_batches)]


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return -(-n_samples // batch_size)


def kept_rows(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, samples) int32 [K]: the kept targets of a batch's bool keep [B, W].

    Row b * (W - 1) + j of the flattened [B, W - 1] input positions predicts target
    keep[b, j + 1]; `samples` is b. Padded with -1 to a multiple of KEPT_PAD (at least
    one block), so that batches take few distinct shapes (each is one compile).
    """
    B, W = keep.shape
    b, j = np.nonzero(keep[:, 1:])
    k = max(KEPT_PAD, KEPT_PAD * -(-len(b) // KEPT_PAD))
    rows, samples = np.full(k, -1, np.int32), np.full(k, -1, np.int32)
    rows[:len(b)] = b * (W - 1) + j
    samples[:len(b)] = b
    return rows, samples


def make_batch(dataset: KeepDataset, indices: np.ndarray, max_seq_length: int
               ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
    """Pad the samples `indices` (-1: empty row) into (tokens, lengths, keep, rows, samples);
    rows and samples locate the kept targets (`kept_rows`)."""
    lengths = [len(dataset.tokens[i]) if i >= 0 else 0 for i in indices]
    width = 1 + PAD_TO * (-(-max(lengths) // PAD_TO))  # like mlx-lm: one plus a multiple of 32
    width = max(2, min(width, max_seq_length), max(lengths))
    tokens = np.zeros((len(indices), width), np.int32)
    keep = np.zeros((len(indices), width), bool)
    for row, i in enumerate(indices):
        if i >= 0:
            tokens[row, :lengths[row]] = dataset.tokens[i]
            keep[row, :lengths[row]] = dataset.keep[i]
    rows, samples = kept_rows(keep)
    return (mx.array(tokens), mx.array(np.array(lengths, np.int32)), mx.array(keep),
            mx.array(rows), mx.array(samples))


class BatchPlan:
    """The training batches of every global step: epoch after epoch, from (seed, epoch)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int,
                 group_by_length: bool = True):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length = group_by_length
        self.per_epoch = steps_per_epoch(len(lengths), batch_size)
        self._epoch, self._batches = -1, None

    def step(self, step: int) -> np.ndarray:
        """The sample indices (-1: empty row) of global step `step` (0-based)."""
        epoch = step // self.per_epoch
        if epoch != self._epoch:  # one shuffle per epoch, not per step
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch,
                                          self.group_by_length)
        return self._batches[step % self.per_epoch]


def iterate_batches(dataset: KeepDataset, batch_size: int, max_seq_length: int,
                    loop: bool = False, seed: int | None = None, comm_group=None, *,
                    start_step: int = 0, group_by_length: bool = True
                    ) -> Iterator[tuple[mx.array, ...]]:
    """mlx-lm's `iterate_batches` hook: yields `make_batch`'s arrays for this rank.

    `batch_size` is the global batch; rank r of W takes rows r, r+W, ... of each.
    loop=True (training): global steps start_step, start_step+1, ... forever,
    epoch after epoch. loop=False (validation): every sample once, fixed order.
    """
    rank, world = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % world:
        raise TossError(f"the batch size ({batch_size}) must be divisible by the number of processes ({world})")
    if not loop:
        for indices in epoch_batches(dataset.lengths, batch_size, None, 0, group_by_length):
            yield make_batch(dataset, indices[rank::world], max_seq_length)
        return
    plan = BatchPlan(dataset.lengths, batch_size, seed or 0, group_by_length)
    for step in itertools.count(start_step):
        yield make_batch(dataset, plan.step(step)[rank::world], max_seq_length)


# ---------------------------------------------------------------- 4. loss


def masked_cross_entropy(logits: mx.array, targets: mx.array, keep: mx.array,
                         norm: str = "token") -> tuple[mx.array, mx.array]:
    """(numerator, denominator) of the masked loss; loss = numerator / max(denominator, 1).

    token:  sum of CE over kept targets / number of kept targets.
    sample: sum over samples with >= 1 kept target of their mean CE / number of such samples.
    A sample (or batch) with nothing kept adds exactly 0 to both: no NaN, zero gradient.
    """
    if norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss norm {norm!r} (expected one of {', '.join(LOSS_NORMS)})")
    keep = keep.astype(mx.bool_)
    # `where` (not multiply) so that a removed target's gradient is exactly zero.
    ce = mx.where(keep, nn.losses.cross_entropy(logits, targets), 0).astype(mx.float32)
    if norm == "token":
        return ce.sum(), keep.sum().astype(mx.float32)
    per_sample = keep.sum(axis=1)
    means = ce.sum(axis=1) / mx.maximum(per_sample, 1).astype(mx.float32)
    return means.sum(), (per_sample > 0).sum().astype(mx.float32)


_KEPT_HEAD: dict[int, tuple] = {}  # id(model) -> (weakref, head(body) is the model, lean body)


def use_kept_head(model: nn.Module, tokens: np.ndarray, lean_body: bool = True) -> bool:
    """Check once (eagerly, before training) that the model's logits are its vocabulary
    projection of its body's hidden states (`token_loss.pick_path`); then the losses
    project only the kept targets' hidden states. Otherwise (or never checked) they use
    the model's full logits.

    `lean_body`: also run the body as `lean_body.lean_hidden_states` (less memory for the
    backward pass) where it equals the model's own body on the same probe; off with
    gradient checkpointing (mlx-lm's checkpointed layers are then the body) or with
    TOSS_MLX_LEAN_BODY=0.
    """
    import weakref

    from .lean_body import lean_matches
    from .token_loss import pick_path, probe_batch

    ok = pick_path(model, tokens)[0] != "full"
    lean = (ok and lean_body and os.environ.get("TOSS_MLX_LEAN_BODY", "1") != "0"
            and lean_matches(model, mx.array(probe_batch([tokens])))[0])
    _KEPT_HEAD[id(model)] = (weakref.ref(model), ok, lean)
    return ok


def _checked(model: nn.Module) -> tuple | None:
    entry = _KEPT_HEAD.get(id(model))
    return entry if entry is not None and entry[0]() is model else None


def _kept_head(model: nn.Module):
    entry = _checked(model)
    if entry is None or not entry[1]:
        return None
    from .token_loss import head

    return head(model)


def _body(model: nn.Module, inputs: mx.array) -> mx.array:
    entry = _checked(model)
    if entry is not None and entry[2]:
        from .lean_body import lean_hidden_states

        return lean_hidden_states(model, inputs)
    return model.model(inputs)


LOG2_E = 1.4426950408889634
KEEP_PROBS_BYTES = 1 << 30  # kept targets' probabilities held for the backward pass, at most
TRAIN_CHUNK_BYTES = 64 << 20  # logits of one chunk of kept targets: few transient [k, V] buffers


def _ce_keeping_probs(proj, targets: mx.array):
    """Cross-entropy of `targets` under the logits `proj(x)`, as a function of x [k, D] with a
    hand-written gradient: the forward pass keeps the softmax (float32 [k, V]) and the backward
    pass is one matmul, (softmax - onehot) x the projection's transpose (`mx.vjp` of `proj`, so a
    quantized or tied head works alike). Autodiff would keep the logits instead and take a
    second exp pass over them for the softmax; on this CPU an exp costs ~15 ns, as much as the
    head's matmul per element (SmolLM2: 49,152 per target).
    """

    @mx.custom_function
    def ce(x: mx.array):
        logits = proj(x).astype(mx.float32)
        top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
        # exp(y) as 2^(y log2 e): the same value to float32 rounding (max 6e-8 on [0, 1]) and,
        # compiled on this CPU, 6 ns an element instead of 14 (V of them per kept target).
        e = mx.power(2.0, (logits - top) * LOG2_E)
        total = e.sum(axis=-1, keepdims=True)
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
        # softmax = e / total, left unnormalized here: the backward pass folds the division
        # into its one elementwise pass (one pass over [k, V] fewer).
        return (mx.log(total) + top - picked)[:, 0], e, mx.reciprocal(total)

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        # One input: mlx passes it (and takes its gradient) as a bare array.
        x, g, (_, e, inverse) = primals, cotangents[0], outputs
        # (softmax - onehot(target)) * g as one elementwise expression (fused when compiled:
        # one [k, V] buffer, no scatter copy).
        is_target = mx.arange(e.shape[-1])[None] == targets[:, None]
        probs = e * inverse
        d = mx.where(is_target, probs - 1, probs) * g[:, None]
        return mx.vjp(proj, [x], [d.astype(x.dtype)])[1][0]

    return lambda x: ce(x)[0]


def kept_cross_entropy(model: nn.Module, tokens: mx.array, keep: mx.array, rows: mx.array | None,
                       samples: mx.array | None, norm: str = "token") -> tuple[mx.array, mx.array]:
    """(numerator, denominator) of the masked loss over the kept targets (see
    `masked_cross_entropy`), computed at the kept positions only.

    The body runs over the batch; only the hidden states of the kept targets
    (`rows`, from `kept_rows`) meet the vocabulary projection, in chunks. With a frozen
    head, each chunk's gradient is hand-written (`_ce_keeping_probs`: its softmax is kept,
    float32 [K, V], no logits) while K x V x 4 bytes stay under KEEP_PROBS_BYTES; above
    that the chunks' logits are recomputed in the backward pass (`mx.checkpoint`) instead
    of kept. Memory grows with the kept targets, never with batch x length x vocabulary.
    """
    if norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss norm {norm!r} (expected one of {', '.join(LOSS_NORMS)})")
    proj = _kept_head(model)
    if proj is None:  # the model's own logits, all positions
        return masked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], keep[:, 1:], norm)
    if rows is None:
        rows, samples = (mx.array(a) for a in kept_rows(np.array(keep.astype(mx.bool_))))
    h = _body(model, tokens[:, :-1])
    valid = rows >= 0
    index = mx.stop_gradient(mx.maximum(rows, 0))  # indices carry no gradient
    hidden = mx.take(h.reshape(-1, h.shape[-1]), index, axis=0)  # [K, D]
    targets = mx.stop_gradient(mx.take(tokens[:, 1:].reshape(-1), index))  # [K]
    vocab = proj.weight.shape[0] if hasattr(proj, "weight") else model.model.embed_tokens.weight.shape[0]
    step = max(1, TRAIN_CHUNK_BYTES // (4 * vocab))
    # mx.checkpoint and the hand-written gradient pass no gradient to the weights they
    # capture: only a frozen head (always, for LoRA/DoRA) takes them.
    head_module = model.lm_head if hasattr(model, "lm_head") and not getattr(
        model.args, "tie_word_embeddings", False) else model.model.embed_tokens
    frozen_head = not tree_flatten(head_module.trainable_parameters())
    k = hidden.shape[0]
    keep_probs = frozen_head and k * vocab * 4 <= KEEP_PROBS_BYTES

    def chunk_ce(t: mx.array):
        if keep_probs:
            return _ce_keeping_probs(proj, t)

        # The targets are captured, not arguments: the checkpoint differentiates its arguments.
        def ce(x: mx.array) -> mx.array:
            logits = proj(x).astype(mx.float32)
            return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]

        return mx.checkpoint(ce) if frozen_head else ce

    parts = [chunk_ce(targets[a:a + step])(hidden[a:a + step]) for a in range(0, k, step)]
    ce = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    # `where` (not multiply) so that a padding row's gradient is exactly zero.
    ce = mx.where(valid, ce, 0).astype(mx.float32)
    if norm == "token":
        return ce.sum(), valid.sum().astype(mx.float32)
    owner = (samples[:, None] == mx.arange(tokens.shape[0])[None]) & valid[:, None]  # [K, B]
    per_sample = owner.sum(axis=0)
    sums = (mx.where(owner, ce[:, None], 0)).sum(axis=0)
    means = sums / mx.maximum(per_sample, 1).astype(mx.float32)
    return means.sum(), (per_sample > 0).sum().astype(mx.float32)


def masked_loss(model: nn.Module, tokens: mx.array, lengths: mx.array, keep: mx.array,
                rows: mx.array | None = None, samples: mx.array | None = None,
                norm: str = "token") -> tuple[mx.array, mx.array]:
    """Training loss for mlx-lm's trainer: (loss, tokens in the batch).

    Under W processes the denominator is summed over all ranks and the loss scaled
    by W, so that the mean of the ranks' gradients (mlx-lm's average_gradients)
    equals the gradient of one process holding the whole global batch.
    """
    numerator, denominator = kept_cross_entropy(model, tokens, keep, rows, samples, norm)
    world = mx.distributed.init().size()
    if world > 1:
        denominator = mx.distributed.all_sum(mx.stop_gradient(denominator))
    return numerator * world / mx.maximum(denominator, 1), lengths.sum()


def masked_eval_loss(model: nn.Module, tokens: mx.array, lengths: mx.array, keep: mx.array,
                     rows: mx.array | None = None, samples: mx.array | None = None,
                     norm: str = "token") -> tuple[mx.array, mx.array]:
    """Validation loss for mlx-lm's `evaluate`: (this batch's loss, its weight).

    `evaluate` sums loss * weight and weight over all batches and ranks, which gives
    the same normalization over the whole validation set.
    """
    numerator, denominator = kept_cross_entropy(model, tokens, keep, rows, samples, norm)
    return numerator / mx.maximum(denominator, 1), denominator
