"""The memory-lean training body: its hand-written gradients equal autodiff of mlx-lm's layers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import toss_mlx.lean_body as lean


def _close(a: mx.array, b: mx.array, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)),
                               rtol=rtol, atol=atol)


def _close_grad(a: mx.array, b: mx.array) -> None:
    """Float32 sums in another order: within 1e-4 relative, or 1e-6 of the array's largest value."""
    _close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, mx.abs(b).max().item()))


def test_swiglu_value_and_gradient_equal_autodiff_of_silu_times_up():
    mx.random.seed(0)
    # wide range: the sigmoid saturates (2^(-y log2 e) overflows to inf below -88: sigmoid 0)
    gate = mx.concatenate([mx.random.normal((3, 50)) * 4, mx.array([[-100.0, -90.0, 0.0, 30.0, 100.0] * 10])])
    up = mx.random.normal(gate.shape)
    w = mx.random.normal(gate.shape)

    def plain(g, u):
        return (nn.silu(g) * u * w).sum()

    def ours(g, u):
        return (lean.swiglu(g, u) * w).sum()

    _close(lean.swiglu(gate, up), nn.silu(gate) * up)
    want = mx.grad(plain, argnums=(0, 1))(gate, up)
    got = mx.grad(ours, argnums=(0, 1))(gate, up)
    for a, b in zip(got, want, strict=True):
        assert not mx.isnan(a).any().item()
        _close(a, b)
    # bfloat16 inputs: computed in float32, returned in bfloat16, within bf16 rounding
    g16, u16 = gate.astype(mx.bfloat16), up.astype(mx.bfloat16)
    out = lean.swiglu(g16, u16)
    assert out.dtype == mx.bfloat16
    _close(out, nn.silu(g16.astype(mx.float32)) * u16.astype(mx.float32), rtol=1e-2, atol=1e-2)


def _naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Loop over heads and queries: softmax over the keys up to the query (grouped kv heads)."""
    B, H, L, d = q.shape
    rep = H // k.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                s = k[b, h // rep, : i + 1] @ q[b, h, i]
                p = np.exp(s - s.max())
                out[b, h, i] = (p / p.sum()) @ v[b, h // rep, : i + 1]
    return out


@pytest.mark.parametrize("length", [5, 70, 150])
def test_causal_attention_equals_a_naive_loop_and_sdpa_gradients(monkeypatch, length):
    """Several query blocks (ATTN_BLOCK 64 here), a ragged last one, 3 query heads per kv head."""
    monkeypatch.setattr(lean, "ATTN_BLOCK", 64)
    mx.random.seed(1)
    B, KV, rep, d = 2, 2, 3, 8
    q = mx.random.normal((B, KV * rep, length, d)) * 0.5
    k = mx.random.normal((B, KV, length, d))
    v = mx.random.normal((B, KV, length, d))
    w = mx.random.normal(q.shape)

    def ours(q, k, v):
        o, _ = lean.causal_attention(q.reshape(B, KV, rep, length, d), k, v)
        return o.reshape(B, KV * rep, length, d)

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")

    _close(ours(q, k, v), mx.array(_naive_attention(np.array(q), np.array(k), np.array(v)).astype(np.float32)))
    _close(ours(q, k, v), sdpa(q, k, v))
    want = mx.grad(lambda *a: (sdpa(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    got = mx.grad(lambda *a: (ours(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        _close(a, b, rtol=1e-4, atol=1e-5)


def _lora_model(tiny_model_dir, seed: int = 0):
    from toss_mlx.models.load import load_model
    from toss_mlx.models.lora import LoraSettings, add_lora

    model, _ = load_model(str(tiny_model_dir), quiet=True)
    add_lora(model, LoraSettings(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    mx.random.seed(seed)  # nonzero B matrices: gradients reach every layer through the adapters
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    return model


def test_lean_body_equals_the_model_body_in_value_and_lora_gradients(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    tokens = mx.array(np.random.default_rng(0).integers(0, 300, (2, 150)), mx.int32)
    w = mx.random.normal((2, 150, model.args.hidden_size))
    assert lean.lean_matches(model, tokens)[0]
    _close(lean.lean_hidden_states(model, tokens), model.model(tokens), rtol=1e-4, atol=1e-5)

    def loss(body):
        return lambda m: (body(m, tokens) * w).sum()

    _, want = nn.value_and_grad(model, loss(lambda m, x: m.model(x)))(model)
    _, got = nn.value_and_grad(model, loss(lean.lean_hidden_states))(model)
    want, got = dict(tree_flatten(want)), dict(tree_flatten(got))
    assert set(got) == set(want) and any("layers.0" in name for name in got)
    for name, g in want.items():
        _close_grad(got[name], g)


def test_lean_body_is_refused_where_it_differs(tiny_model_dir, monkeypatch):
    """A body that is llama-like in shape but computes something else fails the probe."""
    model = _lora_model(tiny_model_dir)
    tokens = mx.array(np.random.default_rng(0).integers(0, 300, (2, 40)), mx.int32)
    monkeypatch.setattr(lean, "swiglu", lambda g, u: nn.gelu(g) * u)
    ok, why = lean.lean_matches(model, tokens)
    assert not ok and "max difference" in why


def test_training_takes_the_lean_body_and_keeps_the_full_logits_loss(tiny_model_dir, monkeypatch):
    """`use_kept_head` picks the lean body for a llama-like model (not with TOSS_MLX_LEAN_BODY=0 or
    gradient checkpointing), and the training loss and gradients equal the full-logits ones."""
    import toss_mlx.batches as batches

    model = _lora_model(tiny_model_dir)
    rng = np.random.default_rng(2)
    tokens = mx.array(rng.integers(0, 300, (3, 97)), mx.int32)
    keep = mx.array(rng.random((3, 97)) < 0.5)
    lengths = mx.array([97, 97, 97])
    calls = []
    real = lean.lean_hidden_states
    monkeypatch.setattr(lean, "lean_hidden_states", lambda *a: calls.append(1) or real(*a))

    def grads():
        return nn.value_and_grad(model, lambda m: batches.masked_loss(m, tokens, lengths, keep)[0])(model)

    batches._KEPT_HEAD.clear()
    full_loss, full = grads()
    try:
        assert batches.use_kept_head(model, np.array(tokens[0]))
        assert batches._KEPT_HEAD[id(model)][2]  # the lean body
        loss, got = grads()
        assert calls
        monkeypatch.setenv("TOSS_MLX_LEAN_BODY", "0")
        batches.use_kept_head(model, np.array(tokens[0]))
        assert not batches._KEPT_HEAD[id(model)][2]
        monkeypatch.delenv("TOSS_MLX_LEAN_BODY")
        batches.use_kept_head(model, np.array(tokens[0]), lean_body=False)
        assert not batches._KEPT_HEAD[id(model)][2]
    finally:
        batches._KEPT_HEAD.clear()
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-5)
    full, got = dict(tree_flatten(full)), dict(tree_flatten(got))
    for name, g in full.items():
        _close_grad(got[name], g)


@pytest.mark.parametrize("compiled", [False, True])
def test_lean_body_keeps_less_for_the_backward_pass(compiled):
    """Peak memory of a training step through Qwen2.5-0.5B's layer shape (3 layers, 1 x 512
    tokens, LoRA on q and v): the lean body keeps neither the SwiGLU's SiLU and sigmoid nor
    the attention's scores and probabilities, ~0.6x of mlx-lm's layers. A deterministic count
    of allocated bytes, not a timing. Compiled too, as mlx-lm's trainer compiles its step:
    mx.compile merges identical expressions, and recomputations written like the forward's
    would keep the forward's sigmoid and scores alive (0.74x here, 1.2 GB more on the real
    model at 1 x 1024)."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=896, num_hidden_layers=3, intermediate_size=4864,
                           num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=64,
                           rope_theta=1e6, tie_word_embeddings=True)
    mx.random.seed(0)
    model = qwen2.Model(args)
    model.freeze()
    linear_to_lora_layers(model, 3, {"rank": 16, "scale": 1.0, "dropout": 0.0,
                                     "keys": ["self_attn.q_proj", "self_attn.v_proj"]})
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 64, (1, 512))
    w = mx.random.normal((896,))
    peaks = {}
    for name, body in (("mlx-lm", lambda m, x: m.model(x)), ("lean", lean.lean_hidden_states)):
        grad = nn.value_and_grad(model, lambda m, body=body: (body(m, tokens) * w).sum())

        def step(grad=grad):
            return grad(model)

        if compiled:
            step = mx.compile(step, inputs=[model.state], outputs=[model.state])
        mx.eval(step())  # warm: compiled kernels and cached buffers exist
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step())
        peaks[name] = mx.get_peak_memory() - before
    assert peaks["lean"] < 0.68 * peaks["mlx-lm"], peaks
