"""Per-token cross-entropy at chosen positions, with no vocabulary projection elsewhere.

`response_losses(model, inputs, rows, targets)` runs the transformer body once
over a right-padded batch, gathers the hidden states of the rows that need a
loss (the positions that predict a response token), and projects only those
onto the vocabulary, in chunks of rows so memory stays bounded for large
vocabularies. Prompt positions never see the language-model head.

Three ways to get the final hidden states, picked once per model by
`pick_path`, which checks each against the model's own full logits on a real
input and takes the fastest that agrees:

- `cpu-fast`: llama-style blocks (llama, mistral, qwen2, smollm...) run
  module by module, with the exp-heavy steps (attention softmax, SiLU, the
  cross-entropy's log-sum-exp) done by numpy. MLX's x86 CPU backend computes
  `exp` one element at a time (about 12 ns per float32 on the 2-core
  reference machine), numpy's SIMD `exp` about 0.5 ns; for a 135M model those
  exps cost more than the matmuls. Only used on Linux CPUs. The causal
  attention skips key blocks above the diagonal.
- `body`: `model.model(inputs)` (mlx-lm's own forward) then the tied
  embedding (`as_linear`) or `lm_head`.
- `full`: `model(inputs)` one sample at a time, for architectures whose head
  does more than a projection (logit scaling, soft-capping).

Right padding is safe without an attention mask: attention is causal, so a
position never sees the padding after it.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .io import TossError

PATHS = ("cpu-fast", "body", "full")
HEAD_CHUNK_BYTES = 256 << 20  # logits per chunk of rows: bounded memory for any vocabulary
ATTN_BLOCK = 64  # query block of the causal attention; keys above the diagonal are skipped

_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "rope"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------- numpy helpers


def _threads() -> int:
    """Threads for the numpy steps: $TOSS_MLX_NUM_THREADS, else the cores (at most 8)."""
    try:
        return max(1, int(os.environ.get("TOSS_MLX_NUM_THREADS", "")))
    except ValueError:
        return max(1, min(8, os.cpu_count() or 1))


_pool: ThreadPoolExecutor | None = None


def _parallel_rows(fn, n: int, min_rows: int = 1) -> None:
    """Run fn(start, stop) over row ranges of [0, n) on a few threads (numpy frees the GIL)."""
    global _pool
    k = min(_threads(), max(1, n // max(1, min_rows)))
    if k == 1:
        fn(0, n)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="toss-np")
    bounds = np.linspace(0, n, k + 1).astype(int)
    list(_pool.map(lambda i: fn(bounds[i], bounds[i + 1]), range(k)))


def _own_buffer(a: mx.array) -> tuple[np.ndarray, mx.array]:
    """A writeable numpy view of a freshly computed array that nothing else holds.

    Writing through the view changes the MLX array itself, which saves a copy
    of large blocks (attention scores, logits). If MLX hands out no writeable
    contiguous view, work on a copy and return it as a new MLX array.
    """
    mx.eval(a)
    view = np.asarray(a)
    if view.flags.c_contiguous and view.flags.writeable:
        return view, a
    copy = np.array(view, dtype=np.float32, order="C")
    return copy, None  # the caller converts the copy back when it needs an MLX array


def _exp_scores_np(scores: mx.array, start: int, rep: int) -> tuple[mx.array, mx.array]:
    """(exp(scores - row max), row sums), causal mask from key `start` on.

    scores: [B, KV, rep * n, start + n], the query block's rows stacked per kv
    head (rep query heads of n rows each): the fresh output of the QK matmul,
    normalized in place; the division by the sums is left for after the PV
    matmul (fewer passes over the block).
    """
    s, same = _own_buffer(scores)
    n = s.shape[-1] - start
    flat = s.reshape(-1, rep, n, s.shape[-1])
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    sums = np.empty(flat.shape[:-1] + (1,), np.float32)

    def work(a, b):
        x = flat[a:b]
        x[..., start:] += mask
        x -= x.max(-1, keepdims=True)
        np.exp(x, out=x)
        sums[a:b] = x.sum(-1, keepdims=True)

    _parallel_rows(work, flat.shape[0])
    return (same if same is not None else mx.array(s)), mx.array(sums.reshape(*scores.shape[:-1], 1))


CHUNK_ROWS = 32  # rows per step of the elementwise numpy work: the temporaries stay in cache


def _swiglu_np(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up = gate * up / (1 + exp(-gate)), by numpy in gate's own buffer."""
    mx.eval(gate, up)
    g, same = _own_buffer(gate)
    g2 = g.reshape(-1, g.shape[-1])
    u2 = np.asarray(up).reshape(g2.shape)

    def work(a, b):
        for c in range(a, b, CHUNK_ROWS):
            d = min(b, c + CHUNK_ROWS)
            x = g2[c:d]
            t = np.negative(x)
            np.exp(t, out=t)
            t += 1.0
            x /= t
            x *= u2[c:d]

    _parallel_rows(work, g2.shape[0], min_rows=64)
    return same if same is not None else mx.array(g)


def _cross_entropy_np(logits: mx.array, targets: np.ndarray) -> np.ndarray:
    """logsumexp(logits) - logits[target] per row, by numpy (row-parallel).

    `logits` must be a freshly evaluated array that nothing else holds: it is
    overwritten in place (no copy of a [rows, vocab] block).
    """
    z, _ = _own_buffer(logits)
    out = np.empty(z.shape[0], np.float32)

    def work(a, b):
        x = z[a:b]
        target = x[np.arange(b - a), targets[a:b]]
        m = x.max(-1, keepdims=True)
        x -= m
        np.exp(x, out=x)
        out[a:b] = np.log(x.sum(-1)) + m[:, 0] - target

    _parallel_rows(work, z.shape[0], min_rows=16)
    return out


# ---------------------------------------------------------------- the model's parts


def head(model: nn.Module):
    """The vocabulary projection: the tied embedding or lm_head, or None if unknown."""
    args = getattr(model, "args", None)
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    if getattr(args, "tie_word_embeddings", False) and hasattr(inner, "embed_tokens"):
        return inner.embed_tokens.as_linear
    if hasattr(model, "lm_head"):
        return model.lm_head
    return None


def _children(module: nn.Module) -> set[str]:
    return {k for k, v in module.children().items() if isinstance(v, nn.Module)}


def llama_like(model: nn.Module) -> bool:
    """Pre-norm blocks of plain GQA attention + SwiGLU MLP, full causal attention, no extras."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        return False
    if getattr(inner, "sliding_window", None) or getattr(getattr(model, "args", None), "sliding_window", None):
        return False
    for layer in layers:
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if at is None or mlp is None or getattr(layer, "use_sliding", False):
            return False
        if _children(layer) != _LAYER_CHILDREN or _children(at) != _ATTN_CHILDREN:
            return False
        if _children(mlp) != _MLP_CHILDREN:
            return False
        if not all(hasattr(at, a) for a in ("n_heads", "n_kv_heads", "scale")):
            return False
    return True


def _attention_cpu(at: nn.Module, x: mx.array) -> mx.array:
    B, L, _ = x.shape
    H, KV = at.n_heads, at.n_kv_heads
    rep = H // KV
    q = at.rope(at.q_proj(x).reshape(B, L, H, -1).transpose(0, 2, 1, 3)) * at.scale
    k = at.rope(at.k_proj(x).reshape(B, L, KV, -1).transpose(0, 2, 1, 3))
    v = at.v_proj(x).reshape(B, L, KV, -1).transpose(0, 2, 1, 3)
    hd = q.shape[-1]
    # Grouped-query attention as one matmul per kv head: the rep query heads of
    # a kv head are stacked along the rows. Causal: a block of queries only
    # meets the keys up to its last position.
    q = q.reshape(B, KV, rep, L, hd)
    outs = []
    for start in range(0, L, ATTN_BLOCK):
        stop = min(L, start + ATTN_BLOCK)
        qb = q[:, :, :, start:stop].reshape(B, KV, rep * (stop - start), hd)
        kb, vb = k[:, :, :stop], v[:, :, :stop]
        probs, sums = _exp_scores_np(qb @ kb.swapaxes(-1, -2), start, rep)
        o = (probs @ vb) / sums
        outs.append(o.reshape(B, KV, rep, stop - start, hd))
    o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    o = o.reshape(B, H, L, hd).transpose(0, 2, 1, 3).reshape(B, L, -1)
    return at.o_proj(o)


def _mlp_cpu(mlp: nn.Module, x: mx.array) -> mx.array:
    return mlp.down_proj(_swiglu_np(mlp.gate_proj(x), mlp.up_proj(x)))


def _hidden_cpu_fast(model: nn.Module, inputs: mx.array) -> mx.array:
    inner = model.model
    h = inner.embed_tokens(inputs)
    for layer in inner.layers:
        h = h + _attention_cpu(layer.self_attn, layer.input_layernorm(h))
        h = h + _mlp_cpu(layer.mlp, layer.post_attention_layernorm(h))
    return inner.norm(h)


def hidden_states(model: nn.Module, inputs: mx.array, path: str) -> mx.array:
    """Final-norm hidden states (B, L, D) of the body, by the `cpu-fast` or `body` path."""
    if path == "cpu-fast":
        return _hidden_cpu_fast(model, inputs)
    return model.model(inputs)


def padding_changes_positions(model: nn.Module, short: int, long: int) -> bool:
    """True if the position encoding of a prefix depends on the whole length (dynamic NTK RoPE).

    Padding a sample to a batch's length must not change what the model
    computes for it; with such encodings only samples of equal length share
    a batch.
    """
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    rope = getattr(getattr(layers[0], "self_attn", None), "rope", None) if layers else None
    if rope is None or short >= long:
        return False
    args = getattr(model, "args", None)
    hd = getattr(rope, "dims", None) or getattr(args, "head_dim", None) or (
        args.hidden_size // args.num_attention_heads)
    probe = mx.random.normal((1, 1, long, hd), key=mx.random.key(0))
    return not mx.allclose(rope(probe)[:, :, :short], rope(probe[:, :, :short]), atol=1e-6).item()


def available_paths(model: nn.Module) -> tuple[list[str], list[str]]:
    """(paths worth trying for this model and device, fastest first; why others were left out)."""
    paths, skipped = [], []
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    has_head = head(model) is not None
    if not on_cpu:
        skipped.append("cpu-fast: not on a CPU")
    elif not sys.platform.startswith("linux"):
        skipped.append("cpu-fast: only on Linux")
    elif os.environ.get("TOSS_MLX_CPU_FAST", "1") == "0":
        skipped.append("cpu-fast: TOSS_MLX_CPU_FAST=0")
    elif _param_dtype(model) != mx.float32:
        # numpy has no bfloat16, and its exp/SiLU steps would compute in float32 what
        # the model computes in a 16-bit dtype: the model's own ops keep its numbers.
        skipped.append(f"cpu-fast: float32 only (the model computes in "
                       f"{str(_param_dtype(model)).removeprefix('mlx.core.')})")
    elif not llama_like(model):
        skipped.append("cpu-fast: not llama-style blocks")
    elif not has_head:
        skipped.append("cpu-fast: no known vocabulary projection")
    else:
        paths.append("cpu-fast")
    if has_head and callable(getattr(model, "model", None)):
        paths.append("body")
    else:
        skipped.append("body: no body + projection to call")
    paths.append("full")
    return paths, skipped


PROBE_LENGTH = ATTN_BLOCK + 8  # the probe spans two query blocks of the causal attention


def probe_batch(samples: Sequence[np.ndarray]) -> np.ndarray:
    """int32 [2, PROBE_LENGTH]: two rows of real tokens, the second shorter and right-padded.

    Rows are the given samples repeated up to their length, so that even short data
    exercises more than one attention block and a padded row, as real batches do.
    """
    rows = [np.asarray(t, np.int32) for t in samples if len(t)] or [np.zeros(1, np.int32)]
    first, second = rows[0], rows[1 % len(rows)]
    out = np.zeros((2, PROBE_LENGTH), np.int32)
    out[0] = np.resize(first, PROBE_LENGTH)
    short = (2 * PROBE_LENGTH) // 3
    out[1, :short] = np.resize(second[::-1], short)
    return out


def pick_path(model: nn.Module, samples: np.ndarray | Sequence[np.ndarray]) -> tuple[str, str]:
    """(the fastest path whose logits match the model's own on a probe batch, why).

    `samples`: one token array or a few; the probe is `probe_batch` of them (two rows,
    one right-padded, two attention blocks long). A path is taken when its logits are
    within a float32 (1e-4) or bfloat16 (3e-2) relative bound of `model(probe)`.
    """
    # The choice depends on the architecture, the parameters' dtype and the device, not on
    # the adapter applied or the tokens: made once per model object and device.
    key = (id(model), str(mx.default_device()), str(_param_dtype(model)),
           os.environ.get("TOSS_MLX_CPU_FAST", "1"))
    cached = _CHOICES.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    if isinstance(samples, np.ndarray) and samples.ndim == 1:
        samples = [samples]
    choice = _probe(model, list(samples))
    _CHOICES[key] = (weakref.ref(model), choice)
    return choice


_CHOICES: dict[tuple, tuple[weakref.ref, tuple[str, str]]] = {}


def agreement(model: nn.Module, got: mx.array, ref: mx.array) -> tuple[float, float]:
    """(max |got - ref|, the bound it must stay under): a float32 (1e-4) or bfloat16 (3e-2)
    relative bound by the model's parameter dtype, relative to ref's largest value."""
    ref = ref.astype(mx.float32)
    tol = 1e-4 if _param_dtype(model) == mx.float32 else 3e-2
    return (mx.abs(got.astype(mx.float32) - ref).max().item(),
            tol * (1.0 + mx.abs(ref).max().item()))


def _probe(model: nn.Module, samples: list[np.ndarray]) -> tuple[str, str]:
    x = mx.array(probe_batch(samples))
    ref = model(x).astype(mx.float32)
    paths, notes = available_paths(model)
    for path in paths:
        if path == "full":
            return path, "; ".join(notes + ["full: the model's own logits, one sample at a time"])
        logits = head(model)(hidden_states(model, x, path)).astype(mx.float32)
        if logits.shape != ref.shape:
            notes.append(f"{path}: logits of shape {logits.shape}, the model's {ref.shape}")
            continue
        diff, bound = agreement(model, logits, ref)
        if diff <= bound:
            return path, "; ".join(notes + [f"{path}: matches the model's logits on a padded "
                                            f"probe of 2 x {x.shape[1]} tokens (max difference "
                                            f"{diff:.2g}, bound {bound:.2g})"])
        notes.append(f"{path}: differs from the model's logits by {diff:.2g} (bound {bound:.2g})")
    return "full", "; ".join(notes)


def _param_dtype(model: nn.Module) -> mx.Dtype:
    """The compute dtype (a quantized embedding's packed weight is uint32: its scales')."""
    from .models.load import compute_dtype

    return compute_dtype(model)


# ---------------------------------------------------------------- batches of chosen positions


@dataclass
class Batch:
    index: int
    samples: np.ndarray  # sample ids, longest first
    length: int  # padded input length


def scored_mask(flat: dict[str, np.ndarray]) -> np.ndarray:
    """bool [T]: response tokens that can be scored (not the first token of a sample)."""
    mask = flat["response_mask"].astype(bool).copy()
    starts = flat["offsets"][:-1]
    mask[starts[starts < len(mask)]] = False
    return mask


def input_lengths(flat: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """int64 [N]: tokens each sample must feed the model (up to its last scored token, exclusive)."""
    offsets = flat["offsets"]
    n = len(offsets) - 1
    lengths = np.zeros(n, np.int64)
    pos = np.nonzero(mask)[0]
    if len(pos):
        sample = np.searchsorted(offsets, pos, side="right") - 1
        np.maximum.at(lengths, sample, pos - offsets[sample])
    return lengths


def plan_batches(lengths: np.ndarray, batch_tokens: int, same_length: bool = False) -> list[Batch]:
    """Pack samples (longest first) into batches of at most `batch_tokens` padded tokens.

    Deterministic for given lengths and budget, so a resumed run plans the
    same batches. Samples with nothing to score (length 0) are left out; a
    sample longer than the budget gets a batch of its own. `same_length`:
    no padding at all, for models whose positions depend on the length.
    """
    if batch_tokens < 1:
        raise TossError(f"batch_tokens must be at least 1, got {batch_tokens}")
    order = [int(i) for i in np.lexsort((np.arange(len(lengths)), -lengths)) if lengths[i] > 0]
    batches: list[Batch] = []
    k = 0
    while k < len(order):
        longest = int(lengths[order[k]])
        size = max(1, min(len(order) - k, batch_tokens // longest))
        if same_length:
            size = max(1, int(np.sum(lengths[order[k:k + size]] == longest)))
        batches.append(Batch(len(batches), np.array(order[k:k + size], np.int64), longest))
        k += size
    return batches


def batch_arrays(flat: dict[str, np.ndarray], mask: np.ndarray, batch: Batch
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [B, L] int32, rows [R], targets [R] int32, token positions [R] in the flat layout)."""
    offsets, tokens = flat["offsets"], flat["token_ids"]
    L = batch.length
    inputs = np.zeros((len(batch.samples), L), np.int32)
    rows, positions = [], []
    for b, s in enumerate(batch.samples):
        start, stop = int(offsets[s]), int(offsets[s + 1])
        n = min(L, stop - start)
        inputs[b, :n] = tokens[start:start + n]
        j = np.nonzero(mask[start:stop])[0]  # j >= 1, j <= L
        rows.append(b * L + j - 1)
        positions.append(start + j)
    positions = np.concatenate(positions).astype(np.int64)
    return inputs, np.concatenate(rows).astype(np.int64), tokens[positions].astype(np.int32), positions


def plan_for(model: nn.Module, flat: dict[str, np.ndarray], mask: np.ndarray,
             batch_tokens: int) -> list[Batch]:
    """`plan_batches` of a flat layout's samples, cut after their last chosen position.

    For models whose positions depend on the length (dynamic-NTK RoPE) samples are
    whole and never padded: only samples of equal length share a batch.
    """
    lengths = input_lengths(flat, mask)
    full = np.where(lengths > 0, np.diff(flat["offsets"]), 0)
    same_length = bool(lengths.any()) and padding_changes_positions(
        model, int(lengths[lengths > 0].min()), int(full.max()))
    return plan_batches(full if same_length else lengths, batch_tokens, same_length)


def flat_losses(model: nn.Module, flat: dict[str, np.ndarray], mask: np.ndarray,
                batch_tokens: int, path: str | None = None) -> np.ndarray:
    """float32 [T]: the cross-entropy of every token where `mask` is set (0 elsewhere).

    `flat` holds `offsets` and `token_ids`; token j of a sample is predicted from the
    tokens before it, so a sample's first token must not be in `mask`. Batches are
    planned by `plan_for`; `path` (default: `pick_path`'s choice) as in `response_losses`.
    """
    out = np.zeros(len(flat["token_ids"]), np.float32)
    batches = plan_for(model, flat, mask, batch_tokens)
    if not batches:
        return out
    if path is None:
        first = batches[0].samples[:2]
        path, _ = pick_path(model, [flat["token_ids"][flat["offsets"][i]:flat["offsets"][i + 1]]
                                    for i in first])
    for b in batches:
        inputs, rows, targets, positions = batch_arrays(flat, mask, b)
        out[positions] = response_losses(model, inputs, rows, targets, path)
    return out


# ---------------------------------------------------------------- losses


def _chunk_rows(vocab: int) -> int:
    return max(1, HEAD_CHUNK_BYTES // (4 * max(1, vocab)))


def _losses_from_logits_fn(logits_of, rows: int, targets: np.ndarray, vocab: int,
                           use_numpy: bool) -> np.ndarray:
    out = np.empty(rows, np.float32)
    step = _chunk_rows(vocab)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        logits = logits_of(a, b).astype(mx.float32)
        if use_numpy:
            mx.eval(logits)
            out[a:b] = _cross_entropy_np(logits, targets[a:b])
        else:
            t = mx.array(targets[a:b])
            ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
            out[a:b] = np.asarray(ce)
    return out


def response_losses(model: nn.Module, inputs: np.ndarray, rows: np.ndarray, targets: np.ndarray,
                    path: str) -> np.ndarray:
    """Cross-entropy (float32, nats) of `targets` at flat positions `rows` of the batch.

    inputs: int32 [B, L] right-padded token ids; rows: int64 [R] indexes into
    the flattened [B * L] positions (row b * L + j predicts the token after
    inputs[b, j]); targets: int32 [R] the token ids to score.
    """
    if len(rows) == 0:
        return np.zeros(0, np.float32)
    x = mx.array(inputs)
    if path == "full":
        return _losses_full(model, inputs, rows, targets)
    h = hidden_states(model, x, path)
    h = h.reshape(-1, h.shape[-1])[mx.array(rows)]
    mx.eval(h)
    proj = head(model)
    vocab = proj(h[:1]).shape[-1]
    return _losses_from_logits_fn(lambda a, b: proj(h[a:b]), len(rows), targets, vocab,
                                  use_numpy=path == "cpu-fast")


def _losses_full(model, inputs, rows, targets) -> np.ndarray:
    B, L = inputs.shape
    out = np.empty(len(rows), np.float32)
    for b in range(B):
        sel = np.nonzero((rows >= b * L) & (rows < (b + 1) * L))[0]
        if len(sel) == 0:
            continue
        logits = model(mx.array(inputs[b:b + 1]))[0]
        local = mx.array(rows[sel] - b * L)
        out[sel] = _losses_from_logits_fn(lambda a, c, lg=logits, lc=local: lg[lc[a:c]], len(sel),
                                          targets[sel], logits.shape[-1], use_numpy=False)
    return out
