"""The token-risk scorer: batched == naive full-logits computation, resume, file layout, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adapters import make_adapter, naive_losses

from toss_mlx import token_loss
from toss_mlx.cache import adapter_fingerprint
from toss_mlx.data import tokenize_dataset
from toss_mlx.io import TossError, load_arrays
from toss_mlx.layout import FORMAT_VERSION, META_KEYS, Scores, load_scores
from toss_mlx.score import ScoreSettings, score, score_tokens
from toss_mlx.token_loss import input_lengths, plan_batches, scored_mask


def score_data(model, utility, safety, data, out, tokenizer=None, model_name="", **settings):
    """Score a data file with a loaded model (`toss_mlx.score.score` from its settings)."""
    return score(ScoreSettings(model=model_name, utility=str(utility), safety=str(safety),
                               data=str(data), out=str(out), **settings), model=model,
                 tokenizer=tokenizer)


def score_loaded(model, data, utility, safety, path=None, **settings):
    """`score_tokens` of tokenized data, quiet."""
    return score_tokens(model, data, ScoreSettings(utility=str(utility), safety=str(safety),
                                                   quiet=True, **settings), path=path)

ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"prompt": "Hi", "completion": "Hello world!"},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "How many clips did Natalia sell altogether in April and May?"},
                  {"role": "assistant", "content": "Natalia sold 48 clips in April and half as many, 24, "
                                                   "in May: 48 + 24 = 72. #### 72"},
                  {"role": "user", "content": "And the lazy dog?"},
                  {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}]},
    {"prompt": "Explain bread.", "completion": "Sure, here is how to bake bread: mix flour, water, "
                                               "salt and yeast, then knead and bake. " * 3},
    {"prompt": "Refuse.", "completion": "I'm sorry, but I cannot help with that request."},
    {"prompt": "0123456789", "completion": "9876543210"},
    {"prompt": "Say yes.", "completion": "Yes."},
    {"prompt": "A long question about tokens, numbers 0123456789 and more " * 4,
     "completion": "A short answer."},
]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """A private copy of the tiny model (the session one is shared with other test files)."""
    from toss_mlx.models.load import load_model

    return load_model(str(tiny_model_dir), quiet=True)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "utility": make_adapter(tiny_model_dir, root / "utility", seed=1),
        "safety": make_adapter(tiny_model_dir, root / "safety", seed=2),
        # Another LoRA structure: the scorer must re-add layers instead of swapping weights.
        "wide": make_adapter(tiny_model_dir, root / "wide", seed=3, rank=8,
                             targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")),
        "dora": make_adapter(tiny_model_dir, root / "dora", seed=4, dora=True),
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "custom.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return f


@pytest.fixture(scope="module")
def data(data_file, base):
    return tokenize_dataset(data_file, base[1], template="chat", max_seq_len=96)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapters, data):
    return {name: naive_losses(tiny_model_dir, adapters[name], data)
            for name in ("utility", "safety", "wide", "dora")}


def test_data_has_what_the_checks_need(data):
    lengths = [len(s.tokens) for s in data.samples]
    assert len(set(lengths)) >= 5  # mixed lengths: padding happens in batches
    assert any(s.truncated for s in data.samples)  # samples cut at max_seq_len
    assert max(lengths) == 96
    assert not data.samples[-1].response_mask.any()  # its answer was cut off: nothing to score


@pytest.mark.parametrize("path", ["cpu-fast", "body", "full"])
@pytest.mark.parametrize("batch_tokens", [1, 50, 150, 400, 100_000])
def test_batched_scorer_equals_naive_full_logits(base, adapters, data, reference, path, batch_tokens):
    model, _ = base
    scores = score_loaded(model, data, adapters["utility"], adapters["safety"],
                          batch_tokens=batch_tokens, path=path)
    mask = scores.response_mask.astype(bool)
    assert mask.sum() == sum(int(s.response_mask[1:].sum()) for s in data.samples)
    np.testing.assert_allclose(scores.loss_utility, reference["utility"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.loss_safety, reference["safety"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.score, np.where(mask, reference["utility"] - reference["safety"], 0),
                               atol=2e-5, rtol=0)
    assert np.all(scores.score[~mask] == 0) and np.all(scores.loss_utility[~mask] == 0)
    # The adapters really differ: a test with equal losses could not fail.
    assert np.abs(scores.score[mask]).mean() > 0.05


def test_cpu_fast_attention_blocks(base, adapters, data, reference, monkeypatch):
    """Query blocks smaller than the sequences: the skipped upper-triangle blocks change nothing."""
    monkeypatch.setattr(token_loss, "ATTN_BLOCK", 7)
    scores = score_loaded(base[0], data, adapters["utility"], adapters["safety"],
                          batch_tokens=300, path="cpu-fast")
    np.testing.assert_allclose(scores.loss_utility, reference["utility"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.loss_safety, reference["safety"], atol=1e-5, rtol=0)


def test_without_writeable_views(base, adapters, data, reference, monkeypatch):
    """Where MLX hands out no writeable view, the numpy steps work on copies: same result."""
    def copy_only(a):
        import mlx.core as mx

        mx.eval(a)
        return np.array(a, dtype=np.float32), None

    monkeypatch.setattr(token_loss, "_own_buffer", copy_only)
    scores = score_loaded(base[0], data, adapters["utility"], adapters["safety"],
                          batch_tokens=300, path="cpu-fast")
    np.testing.assert_allclose(scores.loss_utility, reference["utility"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.loss_safety, reference["safety"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_traditional": True},  # interleaved pairs (traditional RoPE), run by MLX's own rope module
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_scaling": {"type": "dynamic", "factor": 4.0}, "max_position_embeddings": 32},
])
def test_other_rope_variants(adapters, data, tmp_path, rope):
    from tiny import build_model_folder

    from toss_mlx.models.load import load_model

    folder = build_model_folder(tmp_path / "model", seed=5, **rope)
    model, _ = load_model(str(folder), quiet=True)
    assert token_loss.pick_path(model, data.samples[2].tokens)[0] == "cpu-fast"
    scores = score_loaded(model, data, adapters["utility"], adapters["safety"],
                          batch_tokens=300, path="cpu-fast")
    np.testing.assert_allclose(scores.loss_utility, naive_losses(folder, adapters["utility"], data),
                               atol=1e-5, rtol=0)


def test_small_head_chunks(base, adapters, data, reference, monkeypatch):
    monkeypatch.setattr(token_loss, "HEAD_CHUNK_BYTES", 4 * 400 * 3)  # 3 rows per chunk
    scores = score_loaded(base[0], data, adapters["utility"], adapters["safety"], batch_tokens=200)
    np.testing.assert_allclose(scores.loss_utility, reference["utility"], atol=1e-5, rtol=0)


def test_adapters_of_different_structure(base, adapters, data, reference):
    for utility, safety in (("wide", "utility"), ("utility", "dora"), ("dora", "wide")):
        scores = score_loaded(base[0], data, adapters[utility], adapters[safety], batch_tokens=200)
        np.testing.assert_allclose(scores.loss_utility, reference[utility], atol=1e-5, rtol=0)
        np.testing.assert_allclose(scores.loss_safety, reference[safety], atol=1e-5, rtol=0)


def test_token_losses_sum_to_the_models_masked_loss(base, adapters, data):
    """Sum of per-token losses of a sample's response = masked cross-entropy of the full forward."""
    import mlx.core as mx
    import mlx.nn as nn

    from toss_mlx.models.load import apply_adapter
    from toss_mlx.models.lora import strip_adapters

    model = base[0]
    scores = score_loaded(model, data, adapters["utility"], adapters["safety"], batch_tokens=120)
    apply_adapter(model, adapters["utility"])
    try:
        for i, s in enumerate(data.samples):
            x = mx.array(s.tokens)[None]
            ce = nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="none")
            masked = float((ce * mx.array(s.response_mask[1:])).sum())
            a, b = scores.offsets[i], scores.offsets[i + 1]
            assert scores.loss_utility[a:b].sum() == pytest.approx(masked, rel=1e-5)
            assert masked > 0 or not s.response_mask.any()
    finally:
        strip_adapters(model)


def test_same_adapter_twice_scores_zero(base, adapters, data):
    scores = score_loaded(base[0], data, adapters["safety"], adapters["safety"], batch_tokens=200)
    assert np.all(scores.score == 0)
    assert scores.loss_safety[scores.response_mask == 1].min() > 0


def test_model_comes_back_bare(base, adapters, data):
    import mlx.core as mx

    model = base[0]
    x = mx.array(data.samples[0].tokens)[None]
    before = np.array(model(x))
    score_loaded(model, data, adapters["wide"], adapters["dora"], batch_tokens=200)
    assert not any("lora_a" in m for _, m in model.named_modules())
    np.testing.assert_array_equal(np.array(model(x)), before)


def test_path_check_falls_back_for_unusual_heads(base, data):
    """A model whose logits are not head(body(x)) (here: scaled) is scored with full logits."""
    import mlx.core as mx
    import mlx.nn as nn

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner.model
            self.args = inner.args
            self.layers = inner.layers

        def __call__(self, x):
            return 2.0 * self.model.embed_tokens.as_linear(self.model(x))

    model = Scaled(base[0])
    tokens = data.samples[0].tokens
    assert token_loss.pick_path(base[0], tokens)[0] == "cpu-fast"
    assert token_loss.pick_path(model, tokens)[0] == "full"
    rows = np.arange(len(tokens) - 1)
    got = token_loss.response_losses(model, tokens[None, :-1], rows, tokens[1:], "full")
    logits = np.array(model(mx.array(tokens)[None]))[0].astype(np.float64)[:-1]
    want = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1) \
        - logits[rows, tokens[1:]]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_plan_batches_respects_budget_and_covers_every_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 300, 200)
    for budget in (1, 100, 512, 4096):
        batches = plan_batches(lengths, budget)
        seen = np.concatenate([b.samples for b in batches])
        assert sorted(seen) == sorted(np.nonzero(lengths)[0])  # once each; empty ones left out
        for b in batches:
            assert b.length == lengths[b.samples].max()
            assert len(b.samples) == 1 or len(b.samples) * b.length <= budget
        assert plan_batches(lengths, budget)[-1].samples.tolist() == batches[-1].samples.tolist()
        exact = plan_batches(lengths, budget, same_length=True)
        assert sorted(np.concatenate([b.samples for b in exact])) == sorted(seen)
        assert all(len(set(lengths[b.samples])) == 1 for b in exact)
    with pytest.raises(TossError):
        plan_batches(lengths, 0)


# ---------------------------------------------------------------- files and resume


def test_score_dataset_writes_the_documented_layout(base, adapters, data_file, data, reference, tmp_path):
    model, tokenizer = base
    out = tmp_path / "scores.safetensors"
    score_data(model, adapters["utility"], adapters["safety"], data_file, out, tokenizer=tokenizer,
                  max_seq_len=96, model_name="tiny", quiet=True)
    arrays, meta = load_arrays(out)
    assert {k: str(v.dtype) for k, v in arrays.items()} == {
        "offsets": "int64", "row_index": "int64", "token_ids": "int32", "response_mask": "uint8",
        "loss_utility": "float32", "loss_safety": "float32", "score": "float32"}
    flat = data.flat()
    for k in ("offsets", "row_index", "token_ids"):
        np.testing.assert_array_equal(arrays[k], flat[k])
    assert set(META_KEYS) <= set(meta)
    for k, v in data.fingerprint.items():
        assert meta[k] == str(v)
    assert meta["model"] == "tiny" and meta["format_version"] == FORMAT_VERSION
    assert meta["utility_adapter_sha256"] == adapter_fingerprint(adapters["utility"])
    assert meta["safety_adapter_sha256"] == adapter_fingerprint(adapters["safety"])
    assert meta["utility_adapter_sha256"] != meta["safety_adapter_sha256"]
    s = load_scores(out)
    np.testing.assert_allclose(s.score, np.where(s.response_mask == 1,
                                                 reference["utility"] - reference["safety"], 0), atol=2e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]  # no temp, no .partial


def test_a_toss_pro_round_reuses_the_utility_losses(base, adapters, data_file, tmp_path,
                                                    monkeypatch):
    """With reuse_utility only the safety side runs; loss_utility is the first scoring's, bit
    for bit, and loss_safety is what a fresh two-model score gives."""
    model, tokenizer = base
    kw = dict(tokenizer=tokenizer, max_seq_len=96, batch_tokens=150, quiet=True, model_name="tiny")
    first = score_data(model, adapters["utility"], adapters["safety"], data_file,
                       tmp_path / "round-1.safetensors", **kw)
    fresh = score_data(model, adapters["utility"], adapters["dora"], data_file,
                       tmp_path / "fresh.safetensors", **kw)
    calls = _interrupting(monkeypatch, after=None)
    reused = score_data(model, adapters["utility"], adapters["dora"], data_file,
                        tmp_path / "round-2.safetensors",
                        reuse_utility=str(tmp_path / "round-1.safetensors"), **kw)
    n_batches = len(plan_batches(input_lengths(
        fresh.arrays(), fresh.response_mask.astype(bool)), 150))
    assert calls["n"] == n_batches  # one pass per batch, not two
    np.testing.assert_array_equal(reused.loss_utility, first.loss_utility)
    np.testing.assert_array_equal(reused.loss_safety, fresh.loss_safety)
    np.testing.assert_array_equal(reused.score, fresh.score)
    assert reused.meta["safety_adapter_sha256"] == fresh.meta["safety_adapter_sha256"]
    monkeypatch.undo()
    # another utility adapter, or another model name: refused, naming what differs
    with pytest.raises(TossError, match="(?s)cannot reuse.*utility_adapter_sha256"):
        score_data(model, adapters["wide"], adapters["dora"], data_file, tmp_path / "x.safetensors",
                   reuse_utility=str(tmp_path / "round-1.safetensors"), **kw)
    with pytest.raises(TossError, match="(?s)cannot reuse.*max_seq_len"):
        score_data(model, adapters["utility"], adapters["dora"], data_file, tmp_path / "x.safetensors",
                   reuse_utility=str(tmp_path / "round-1.safetensors"), **dict(kw, max_seq_len=64))
    assert not (tmp_path / "x.safetensors").exists()


def test_path_choice_is_recorded_and_made_once_per_model(base, adapters, data_file, data, tmp_path,
                                                         monkeypatch):
    model, tokenizer = base
    probes = []
    real = token_loss._probe
    monkeypatch.setattr(token_loss, "_probe", lambda m, x: (probes.append(x), real(m, x))[1])
    token_loss._CHOICES.clear()
    scores = score_data(model, adapters["utility"], adapters["safety"], data_file,
                        tmp_path / "s.safetensors", tokenizer=tokenizer, max_seq_len=96, quiet=True)
    assert scores.meta["score_path"] == "cpu-fast"  # the tiny llama on a Linux CPU
    assert "matches the model's logits on a padded probe of 2 x" in scores.meta["score_path_reason"]
    assert load_scores(tmp_path / "s.safetensors").meta["score_path"] == "cpu-fast"
    assert len(probes) == 1
    score_data(model, adapters["utility"], adapters["dora"], data_file, tmp_path / "t.safetensors",
               tokenizer=tokenizer, max_seq_len=96, quiet=True)
    assert len(probes) == 1  # same model object, same device and dtype: not probed again
    monkeypatch.setenv("TOSS_MLX_CPU_FAST", "0")
    assert token_loss.pick_path(model, data.samples[0].tokens)[0] == "body"
    assert len(probes) == 2
    # the probe: two rows of real tokens over two attention blocks, the second right-padded
    batch = token_loss.probe_batch([data.samples[0].tokens, data.samples[1].tokens])
    assert batch.shape == (2, token_loss.PROBE_LENGTH) and token_loss.PROBE_LENGTH > token_loss.ATTN_BLOCK
    assert (batch[1, -1] == 0) and (batch[1, 0] == data.samples[1].tokens[-1])


def _interrupting(monkeypatch, after: int):
    """Make the (after+1)-th call of response_losses raise KeyboardInterrupt; count calls."""
    from toss_mlx import score as score_mod

    real = score_mod.response_losses
    calls = {"n": 0}

    def fake(*args, **kwargs):
        if after is not None and calls["n"] >= after:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(score_mod, "response_losses", fake)
    return calls


def test_killed_run_resumes_without_recomputing(base, adapters, data_file, tmp_path, monkeypatch):
    model, tokenizer = base
    out = tmp_path / "scores.safetensors"
    kw = dict(tokenizer=tokenizer, max_seq_len=96, batch_tokens=150, quiet=True, flush_seconds=0)
    batches = plan_batches(
        input_lengths(
            *_flat_and_mask(data_file, tokenizer)), 150)
    assert len(batches) >= 4

    calls = _interrupting(monkeypatch, after=5)  # 2 passes per batch: dies inside batch 3
    with pytest.raises(KeyboardInterrupt):
        score_data(model, adapters["utility"], adapters["safety"], data_file, out, **kw)
    assert not out.exists()
    shards = list((tmp_path / "scores.safetensors.partial").glob("shard-*.safetensors"))
    assert len(shards) == 2  # batches 0 and 1 were flushed; the half-done batch 2 was not
    assert not any(m for _, m in model.named_modules() if "lora_a" in m)  # model left bare

    monkeypatch.undo()
    calls = _interrupting(monkeypatch, after=None)
    resumed = score_data(model, adapters["utility"], adapters["safety"], data_file, out, **kw)
    assert calls["n"] == 2 * (len(batches) - 2)
    assert not (tmp_path / "scores.safetensors.partial").exists()

    monkeypatch.undo()
    fresh = score_data(model, adapters["utility"], adapters["safety"], data_file,
                          tmp_path / "fresh.safetensors", **kw)
    for k, v in fresh.arrays().items():
        np.testing.assert_array_equal(getattr(resumed, k), v)


def _flat_and_mask(data_file, tokenizer):
    flat = tokenize_dataset(data_file, tokenizer, max_seq_len=96).flat()
    return flat, scored_mask(flat)


def test_shards_of_another_run_are_ignored(base, adapters, data_file, tmp_path, monkeypatch):
    model, tokenizer = base
    out = tmp_path / "scores.safetensors"
    kw = dict(tokenizer=tokenizer, max_seq_len=96, batch_tokens=150, quiet=True, flush_seconds=0)
    _interrupting(monkeypatch, after=4)
    with pytest.raises(KeyboardInterrupt):  # leaves shards made with the wide utility adapter
        score_data(model, adapters["wide"], adapters["safety"], data_file, out, **kw)
    monkeypatch.undo()
    got = score_data(model, adapters["utility"], adapters["safety"], data_file, out, **kw)
    want = score_loaded(model, tokenize_dataset(data_file, tokenizer, max_seq_len=96),
                        adapters["utility"], adapters["safety"], batch_tokens=150)
    np.testing.assert_array_equal(got.loss_utility, want.loss_utility)


@pytest.mark.parametrize("problem", ["missing", "empty", "garbage", "no-arrays", "bad-offsets",
                                     "nan", "version"])
def test_load_scores_rejects_bad_files(tmp_path, problem):
    from toss_mlx.io import save_arrays

    f = tmp_path / "scores.safetensors"
    good = Scores(np.array([0, 3], np.int64), np.array([0], np.int64), np.arange(3, dtype=np.int32),
                  np.array([0, 1, 1], np.uint8), np.array([0, 1, 2], np.float32),
                  np.array([0, 1, 1], np.float32), np.array([0, 0, 1], np.float32),
                  {k: "x" for k in META_KEYS} | {"format_version": FORMAT_VERSION})
    arrays, meta = good.arrays(), dict(good.meta)
    if problem == "empty":
        f.write_bytes(b"")
    elif problem == "garbage":
        f.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    elif problem != "missing":
        if problem == "no-arrays":
            del arrays["score"]
        elif problem == "bad-offsets":
            arrays["offsets"] = np.array([0, 5], np.int64)
        elif problem == "nan":
            arrays["score"] = np.array([0, np.nan, 1], np.float32)
        elif problem == "version":
            meta["format_version"] = "99"
        save_arrays(f, arrays, meta)
    with pytest.raises(TossError, match=str(f.name)):
        load_scores(f)
    save_arrays(f, good.arrays(), good.meta)
    assert load_scores(f).scored_tokens == 2


def test_cli_score_and_bad_adapter(tiny_model_dir, adapters, data_file, tmp_path):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    out = tmp_path / "s.safetensors"
    args = ["score", "--model", str(tiny_model_dir), "--utility", str(adapters["utility"]),
            "--safety", str(adapters["safety"]), "--data", str(data_file), "--out", str(out),
            "--max-seq-len", "96", "--batch-tokens", "200"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "response tokens scored" in result.output
    assert load_scores(out).meta["model"] == str(tiny_model_dir)

    bad = list(args)
    bad[bad.index("--safety") + 1] = str(tmp_path / "nope")
    bad[bad.index("--out") + 1] = str(tmp_path / "t.safetensors")
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2
    assert "not an adapter folder" in result.output
    assert not (tmp_path / "t.safetensors").exists()

    # settings layered like train's: YAML, then --set, then flags; nothing restated by the CLI
    config = tmp_path / "score.yaml"
    config.write_text(f"model: {tiny_model_dir}\nutility: {adapters['utility']}\n"
                      f"safety: {adapters['safety']}\nmax_seq_len: 96\nbatch_tokns: 1\n")
    typo = CliRunner().invoke(app, ["score", "--config", str(config), "--data", str(data_file)])
    assert typo.exit_code == 2 and "did you mean 'batch_tokens'" in typo.output
    config.write_text(config.read_text().replace("batch_tokns: 1", "batch_tokens: 100"))
    layered = tmp_path / "layered.safetensors"
    result = CliRunner().invoke(app, ["score", "--config", str(config), "--data", str(data_file),
                                      "--set", "batch_tokens=200", "--out", str(layered), "-q"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(load_scores(layered).score, load_scores(out).score)
    missing = CliRunner().invoke(app, ["score", "--data", str(data_file)])
    assert missing.exit_code == 2 and "--model and --utility and --safety required" in missing.output


@pytest.mark.slow
def test_real_model_matches_naive(smollm2_dir, data_file, tmp_path):
    """SmolLM2-135M (30 layers, GQA, 49k vocabulary): the CPU path equals full logits."""
    from toss_mlx.models.load import load_model

    model, tokenizer = load_model(str(smollm2_dir), quiet=True)
    data = tokenize_dataset(data_file, tokenizer, max_seq_len=96)
    utility = make_adapter(smollm2_dir, tmp_path / "u", seed=1, amplitude=0.05)
    safety = make_adapter(smollm2_dir, tmp_path / "h", seed=2, amplitude=0.05)
    assert token_loss.pick_path(model, data.samples[0].tokens)[0] == "cpu-fast"
    scores = score_loaded(model, data, utility, safety, batch_tokens=256)
    want_u = naive_losses(smollm2_dir, utility, data)
    want_h = naive_losses(smollm2_dir, safety, data)
    # 30 float32 layers in another order of operations: 2.6e-5 here.
    np.testing.assert_allclose(scores.loss_utility, want_u, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.loss_safety, want_h, atol=1e-4, rtol=0)
    mask = scores.response_mask == 1
    assert np.abs(scores.score[mask]).mean() > 0.01
