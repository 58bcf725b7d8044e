"""The model body for training, with memory-lean gradients (llama-like models).

`mx.value_and_grad` of mlx-lm's layers keeps, per layer and token, everything its
backward pass reads: the SwiGLU's gate, up, SiLU and sigmoid (4 x 4,864 floats for
Qwen2.5-0.5B) and, on the CPU (no fused attention kernel), the attention scores and
probabilities (heads x length floats each). The body here computes the same function
with two hand-written gradients that keep less and recompute the rest:

- `swiglu`: keeps gate and up only (what the output is made of); its backward pass
  recomputes the sigmoid in one fused elementwise pass.
- `causal_attention` (CPU): keeps q, k, v, the output and one log-sum-exp per query,
  as flash attention's backward does; the probabilities are recomputed from q and k a
  block of queries at a time. Keys above the diagonal are skipped (half the work of
  a full L x L product at long lengths), and no [L, L] array outlives its block. On a
  GPU MLX's fused `scaled_dot_product_attention` is used instead.

Measured on Qwen2.5-0.5B's layer shape, 2 x 512 tokens, LoRA on q and v: 184 MB of
saved activations per layer with mlx-lm's layers, 115 MB here (bench/RESULTS.md).
exp is taken as 2^(y log2 e), 6 ns an element on this CPU against MLX's 14 ns `exp`
(same float32 value to rounding; see `batches._ce_keeping_probs`), so the recomputed
sigmoid costs less than the forward pass saves.

`lean_matches` checks once, on a probe batch, that these hidden states equal the
model's own (`token_loss.llama_like` picks the candidates); `batches.use_kept_head`
takes this body for training only then. The gradients are checked against autodiff
of mlx-lm's layers in tests/test_lean_body.py.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOG2_E = 1.4426950408889634
ATTN_BLOCK = 128  # queries per block: [B, kv heads, rep x 128, keys] scores at a time


def _exp(y: mx.array) -> mx.array:
    return mx.power(2.0, y * LOG2_E)


# ---------------------------------------------------------------- SwiGLU


@mx.compile
def _swiglu_forward(gate: mx.array, up: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g * mx.reciprocal(1 + _exp(-g)) * up.astype(mx.float32)).astype(up.dtype)


@mx.compile
def _swiglu_backward(gate: mx.array, up: mx.array, d: mx.array) -> tuple[mx.array, mx.array]:
    g, u, d32 = gate.astype(mx.float32), up.astype(mx.float32), d.astype(mx.float32)
    # Written unlike the forward's 1 / (1 + 2^(-g log2 e)) on purpose: mx.compile merges
    # identical expressions of the same inputs, which would keep the forward's sigmoid alive
    # until the backward pass instead of recomputing it (+1.2 GB on Qwen2.5-0.5B at 1 x 1024).
    sig = mx.reciprocal(1 + mx.power(2.0, g * -LOG2_E))
    silu = g * sig
    # d silu(g) / dg = sig + g sig (1 - sig) = sig + silu (1 - sig)
    return (d32 * u * (sig + silu * (1 - sig))).astype(gate.dtype), (d32 * silu).astype(up.dtype)


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, whose backward pass keeps only gate and up."""
    return _swiglu_forward(gate, up)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    return _swiglu_backward(gate, up, cotangent)


# ---------------------------------------------------------------- causal attention


def _blocks(length: int):
    for start in range(0, length, ATTN_BLOCK):
        yield start, min(length, start + ATTN_BLOCK)


def _allowed(start: int, stop: int, rep: int) -> mx.array:
    """[rep x n, stop] bool: row r (query start + r % n, its rep query heads stacked) sees
    keys up to its own position."""
    n = stop - start
    position = start + mx.arange(rep * n) % n
    return position[:, None] >= mx.arange(stop)[None]


def _rows(x: mx.array, start: int, stop: int) -> mx.array:
    """[B, KV, rep, L, d] -> the block's queries as rows [B, KV, rep x n, d]."""
    B, KV, rep, _, d = x.shape
    return x[:, :, :, start:stop].reshape(B, KV, rep * (stop - start), d)


@mx.custom_function
def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """softmax(q k^T + causal mask) v for grouped-query attention, q already scaled.

    q: [B, KV, rep, L, d] (rep query heads per kv head), k, v: [B, KV, L, d].
    Returns o [B, KV, rep, L, d] and lse [B, KV, rep, L, 1], each query's log-sum-exp,
    which the backward pass reads to recompute the probabilities.
    """
    B, KV, rep, L, d = q.shape
    outs, lses = [], []
    for start, stop in _blocks(L):
        n = stop - start
        s = (_rows(q, start, stop) @ k[:, :, :stop].swapaxes(-1, -2)).astype(mx.float32)
        s = mx.where(_allowed(start, stop, rep), s, -mx.inf)
        top = s.max(axis=-1, keepdims=True)  # finite: every query sees itself
        e = _exp(s - top)
        total = e.sum(axis=-1, keepdims=True)
        o = (e.astype(v.dtype) @ v[:, :, :stop]).astype(mx.float32) / total
        outs.append(o.astype(q.dtype).reshape(B, KV, rep, n, d))
        lses.append((top + mx.log(total)).reshape(B, KV, rep, n, 1))
    cat = (lambda xs: xs[0]) if len(outs) == 1 else (lambda xs: mx.concatenate(xs, axis=3))
    return cat(outs), cat(lses)


@causal_attention.vjp
def _attention_vjp(primals, cotangents, outputs):
    q, k, v = primals
    do, (o, lse) = cotangents[0], outputs
    B, KV, rep, L, d = q.shape
    dq_parts = []
    dk = mx.zeros(k.shape, mx.float32)
    dv = mx.zeros(v.shape, mx.float32)
    for start, stop in _blocks(L):
        n = stop - start
        qb, dob = _rows(q, start, stop), _rows(do, start, stop)
        kb, vb = k[:, :, :stop], v[:, :, :stop]
        # The scores again, as (k q^T)^T: the forward's q k^T would be merged with this one by
        # mx.compile (same op, same inputs) and every layer's scores kept until here.
        s = (kb @ qb.swapaxes(-1, -2)).swapaxes(-1, -2).astype(mx.float32)
        p = mx.where(_allowed(start, stop, rep), _exp(s - _rows(lse, start, stop)), 0)
        dob32 = dob.astype(mx.float32)
        # D = rowsum(dO * O): the softmax backward's correction term, one per query
        D = (dob32 * _rows(o, start, stop).astype(mx.float32)).sum(axis=-1, keepdims=True)
        ds = p * ((dob @ vb.swapaxes(-1, -2)).astype(mx.float32) - D)
        dq_parts.append((ds @ kb.astype(mx.float32)).astype(q.dtype).reshape(B, KV, rep, n, d))
        pad = [(0, 0), (0, 0), (0, L - stop), (0, 0)]
        dv = dv + mx.pad(p.swapaxes(-1, -2) @ dob32, pad)
        dk = dk + mx.pad(ds.swapaxes(-1, -2) @ qb.astype(mx.float32), pad)
    dq = dq_parts[0] if len(dq_parts) == 1 else mx.concatenate(dq_parts, axis=3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------- the body


def _attention(at: nn.Module, x: mx.array, lean: bool) -> mx.array:
    B, L, _ = x.shape
    H, KV = at.n_heads, at.n_kv_heads
    q = at.rope(at.q_proj(x).reshape(B, L, H, -1).transpose(0, 2, 1, 3))
    k = at.rope(at.k_proj(x).reshape(B, L, KV, -1).transpose(0, 2, 1, 3))
    v = at.v_proj(x).reshape(B, L, KV, -1).transpose(0, 2, 1, 3)
    d = q.shape[-1]
    if lean:
        o, _ = causal_attention((q * at.scale).reshape(B, KV, H // KV, L, d), k, v)
        o = o.reshape(B, H, L, d)
    else:
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=at.scale, mask="causal")
    return at.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


def lean_hidden_states(model: nn.Module, inputs: mx.array) -> mx.array:
    """Final-norm hidden states [B, L, D] of a llama-like body (`token_loss.llama_like`),
    equal to `model.model(inputs)`, with the memory-lean gradients above. Right padding
    needs no mask: attention is causal."""
    inner = model.model
    lean_attention = mx.default_device() == mx.cpu
    h = inner.embed_tokens(inputs)
    for layer in inner.layers:
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), lean_attention)
        mlp = layer.mlp
        x = layer.post_attention_layernorm(h)
        h = h + mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
    return inner.norm(h)


def lean_matches(model: nn.Module, probe: mx.array) -> tuple[bool, str]:
    """Whether `lean_hidden_states` equals the model's own body on `probe` [B, L] (a
    float32 bound of 1e-4 or a bfloat16 one of 3e-2, relative to the largest value), and
    the figures."""
    from .token_loss import agreement, llama_like

    if not llama_like(model):
        return False, "not a llama-like body"
    diff, bound = agreement(model, lean_hidden_states(model, probe), model.model(probe))
    return diff <= bound, f"max difference {diff:.2g} (bound {bound:.2g})"
