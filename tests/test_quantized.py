"""The Mac path on the CPU: a quantized base kept quantized (QLoRA) and 16-bit compute.

`keep_quantized=True` (`--keep-quantized`) takes on any device the path a Metal or CUDA
GPU takes by default: quantized weights stay quantized and the model computes in
bfloat16 unless a dtype is given. Each result is checked against an independent
computation on the same model: the model's own full logits one sample at a time
(scoring, likelihood), mlx-lm's own loader (adapters, fused models), float32 (bf16).
The models are the tiny llama quantized by mlx-lm, 4-bit group 32 and 8-bit group 64
(bf16 and quantized matmuls are slow on this CPU, so everything stays tiny).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from adapters import make_adapter, naive_losses, quantized_copy
from typer.testing import CliRunner

from toss_mlx.data import tokenize_dataset
from toss_mlx.io import TossError
from toss_mlx.models.load import compute_dtype, describe_compute, is_quantized, load_model
from toss_mlx.score import ScoreSettings, score_tokens
from toss_mlx.token_loss import pick_path
from toss_mlx.train import TrainSettings, train

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?",
         "completion": "The answer is " + " and ".join([str(2 * i)] * (1 + i % 4)) + "."}
        for i in range(8)]
QUANT = {"q4": (32, 4), "q8": (64, 8)}  # name -> (group size, bits)


@pytest.fixture(scope="module")
def qdirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {name: quantized_copy(tiny_model_dir, root / name, g, b) for name, (g, b) in QUANT.items()}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qdata") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    # Made on the float model: LoRA shapes depend on the layer sizes, not on quantization.
    root = tmp_path_factory.mktemp("qadapters")
    return {"utility": make_adapter(tiny_model_dir, root / "utility", seed=1),
            "safety": make_adapter(tiny_model_dir, root / "safety", seed=2)}


def logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]


TOKENS = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 31, 8]


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_keep_quantized_loads_the_gpu_path(qdirs, tiny_model_dir, name):
    from mlx_lm import load

    group, bits = QUANT[name]
    # Default on the CPU: dequantized to float32, as before.
    dense, _ = load_model(str(qdirs[name]), quiet=True)
    assert not is_quantized(dense) and compute_dtype(dense) == mx.float32
    kept, _ = load_model(str(qdirs[name]), keep_quantized=True, quiet=True)
    assert is_quantized(kept) and compute_dtype(kept) == mx.bfloat16
    assert describe_compute(kept) == f"bfloat16, {bits}-bit affine (group {group})"
    layer = kept.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert layer.self_attn.q_proj.weight.dtype == mx.uint32  # still packed
    assert layer.self_attn.q_proj.scales.dtype == mx.bfloat16
    assert layer.input_layernorm.weight.dtype == mx.bfloat16
    # float32 on the quantized weights: exactly mlx-lm's own model (it keeps float32 scales).
    f32, _ = load_model(str(qdirs[name]), keep_quantized=True, dtype="float32", quiet=True)
    reference, _ = load(str(qdirs[name]))
    assert is_quantized(reference)
    np.testing.assert_array_equal(logits(f32, TOKENS), logits(reference, TOKENS))
    # bf16 and float16 agree with it within 16-bit rounding (logits have a std of ~1 here).
    for dtype, tol in (("bfloat16", 0.15), ("float16", 0.02)):
        m, _ = load_model(str(qdirs[name]), keep_quantized=True, dtype=dtype, quiet=True)
        diff = np.abs(logits(m, TOKENS) - logits(reference, TOKENS)).max()
        assert 0 < diff < tol, (dtype, diff)
    # The quantization itself changes the logits (so the comparisons above could fail).
    float_model, _ = load_model(str(tiny_model_dir), quiet=True)
    assert np.abs(logits(float_model, TOKENS) - logits(reference, TOKENS)).max() > 1e-3


def test_bad_dtype_is_a_clear_error(qdirs):
    with pytest.raises(TossError, match="unknown dtype 'float64'"):
        load_model(str(qdirs["q4"]), dtype="float64", quiet=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TrainSettings(model="m", data="d", dtype="int8")


def test_fast_path_probe_on_quantized_and_16_bit_models(qdirs):
    bf16, _ = load_model(str(qdirs["q4"]), keep_quantized=True, quiet=True)
    path, reason = pick_path(bf16, np.array(TOKENS * 6, np.int32))
    assert path == "body"  # numpy's float32 steps are not taken for a bfloat16 model
    assert "cpu-fast: float32 only (the model computes in bfloat16)" in reason
    # Quantized weights computing in float32: the numpy path works module by module.
    f32, _ = load_model(str(qdirs["q4"]), keep_quantized=True, dtype="float32", quiet=True)
    path, reason = pick_path(f32, np.array(TOKENS * 6, np.int32))
    assert path == "cpu-fast", reason


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("name,dtype,path,atol", [
    ("q4", "bfloat16", None, 0.08),  # the probe's choice: body
    ("q8", "bfloat16", "full", 0.08),
    ("q4", "float32", None, 1e-5),  # the probe's choice: cpu-fast
    ("q4", "float32", "body", 1e-5),
    ("q8", "float32", "full", 1e-5),
])
def test_scoring_a_quantized_base_equals_its_full_logits(qdirs, adapters, data_file, name, dtype,
                                                         path, atol):
    model, tokenizer = load_model(str(qdirs[name]), keep_quantized=True, dtype=dtype, quiet=True)
    data = tokenize_dataset(data_file, tokenizer, max_seq_len=64)
    s = ScoreSettings(utility=str(adapters["utility"]), safety=str(adapters["safety"]),
                      quiet=True, batch_tokens=100)
    scores = score_tokens(model, data, s, path=path)
    assert is_quantized(model)
    for side in ("utility", "safety"):
        want = naive_losses(qdirs[name], adapters[side], data, keep_quantized=True, dtype=dtype)
        got = getattr(scores, f"loss_{side}")
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=side)
    mask = scores.response_mask.astype(bool)
    assert np.abs(scores.score[mask]).mean() > 10 * atol  # the adapters really differ
    assert scores.meta["compute"] == f"{dtype}, {QUANT[name][1]}-bit affine (group {QUANT[name][0]})"


def test_bf16_scoring_is_within_bf16_of_float32(tiny_model_dir, adapters, data_file):
    f32, tokenizer = load_model(str(tiny_model_dir), quiet=True)
    bf16, _ = load_model(str(tiny_model_dir), dtype="bfloat16", quiet=True)
    data = tokenize_dataset(data_file, tokenizer, max_seq_len=64)
    s = ScoreSettings(utility=str(adapters["utility"]), safety=str(adapters["safety"]), quiet=True)
    a, b = score_tokens(f32, data, s), score_tokens(bf16, data, s)
    assert a.meta["score_path"] == "cpu-fast" and b.meta["score_path"] == "body"
    assert b.meta["compute"] == "bfloat16"
    mask = a.response_mask.astype(bool)
    # bf16 keeps 8 bits of mantissa: relative 2^-8 per rounding, a few hundredths of a nat here.
    diff = np.abs(a.loss_utility[mask] - b.loss_utility[mask])
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.03
    np.testing.assert_allclose(b.score[mask], a.score[mask], atol=0.15)


# ---------------------------------------------------------------- training


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_qlora_training_on_a_quantized_base(qdirs, data_file, tmp_path, name):
    from mlx.utils import tree_map
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import load_adapters

    out = tmp_path / "qlora"
    # One batch holds the whole data: every step sees the same tokens, so the loss must fall.
    result = train(TrainSettings(model=str(qdirs[name]), data=str(data_file), out=str(out),
                                 keep_quantized=True, iters=6, batch_size=8, lr=2e-2,
                                 quiet=True, save_every=100))
    losses = [r["loss"] for r in train_log(out)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses
    model = result.model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.linear, nn.QuantizedLinear)
    assert q_proj.linear.scales.dtype == mx.bfloat16  # it trained on the bf16 quantized base
    assert json.loads((out / "run.json").read_text())["settings"]["keep_quantized"] is True

    # The adapter loads back into mlx-lm on the quantized base, with the trained logits.
    model.eval()
    trained = logits(model, TOKENS)
    theirs, _ = load(str(qdirs[name]), adapter_path=str(out))
    loaded_q = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(loaded_q, LoRALinear) and isinstance(loaded_q.linear, nn.QuantizedLinear)
    got = logits(theirs, TOKENS)  # mlx-lm keeps float32 scales: within bf16 rounding
    rounding = np.abs(got - trained).max()
    assert rounding < 0.1 * (1 + np.abs(trained).max())
    bare, _ = load(str(qdirs[name]))
    assert np.abs(logits(bare, TOKENS) - got).max() > 3 * rounding  # the adapter matters
    # In bfloat16, as trained: mlx-lm's own model and adapter loading give the same logits.
    same, _ = load(str(qdirs[name]))
    same.update(tree_map(lambda p: p.astype(mx.bfloat16) if mx.issubdtype(p.dtype, mx.floating)
                         else p, same.parameters()))
    load_adapters(same, str(out))
    np.testing.assert_allclose(logits(same, TOKENS), trained, atol=1e-5)


def test_qlora_kept_positions_loss_equals_full_logits(qdirs, data_file):
    from toss_mlx.batches import (
        KeepDataset,
        kept_cross_entropy,
        make_batch,
        masked_cross_entropy,
        use_kept_head,
    )
    from toss_mlx.models.lora import LoraSettings, add_lora

    model, tokenizer = load_model(str(qdirs["q4"]), keep_quantized=True, quiet=True)
    add_lora(model, LoraSettings(rank=4))
    data = KeepDataset.build(tokenize_dataset(data_file, tokenizer))
    assert use_kept_head(model, data.tokens[0])  # the quantized tied embedding as the head
    tokens, _, keep, rows, samples = make_batch(data, np.arange(4), 64)
    for norm in ("token", "sample"):
        num, den = kept_cross_entropy(model, tokens, keep, rows, samples, norm)
        full_num, full_den = masked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:],
                                                  keep[:, 1:], norm)
        assert den.item() == full_den.item() > 0
        assert num.item() == pytest.approx(full_num.item(), rel=1e-2)


def test_bf16_training_is_within_bf16_of_float32(tiny_model_dir, data_file, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train(TrainSettings(model=str(tiny_model_dir), data=str(data_file), out=str(out),
                            dtype=dtype, iters=4, batch_size=4, lr=1e-2, quiet=True, save_every=100))
        runs[dtype] = [r["loss"] for r in train_log(out)]
    a, b = np.array(runs["float32"]), np.array(runs["bfloat16"])
    assert np.all(a[1:] != a[0])  # it trained: the losses move
    np.testing.assert_allclose(b, a, rtol=2e-2)
    assert not np.array_equal(a, b)  # the bf16 run really computed in bf16


# ---------------------------------------------------------------- evaluation and fuse


def test_eval_on_a_quantized_base(qdirs, adapters, tmp_path):
    from toss_mlx.evaluate import EvalSettings, answer_ids, evaluate, prompt_ids, read_prompts

    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("How do I bake bread?", "Hi")))
    benign = tmp_path / "benign.jsonl"
    benign.write_text(json.dumps({"prompt": "What is 1 plus 1?", "completion": "It is 2. #### 2"}) + "\n")
    s = EvalSettings(model=str(qdirs["q4"]), adapters={"a": str(adapters["utility"])},
                     harmful=str(harmful), benign=str(benign), max_new_tokens=4, batch_size=2,
                     keep_quantized=True)
    result = evaluate(s, tmp_path / "eval.json", quiet=True)
    assert [m["name"] for m in result["models"]] == ["base", "a"]
    model, tokenizer = load_model(str(qdirs["q4"]), keep_quantized=True, quiet=True)
    prompt = read_prompts(str(benign))[0]
    ids, mask = answer_ids(prompt.messages, prompt.reference, tokenizer, "chat", 2048)
    z = logits(model, ids).astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -sum(logp[j - 1, ids[j]] for j in range(1, len(ids)) if mask[j]) / int(mask[1:].sum())
    assert result["models"][0]["metrics"]["nll"]["value"] == pytest.approx(want, rel=1e-3)
    # Greedy answers of the quantized base: a naive argmax loop on the same model.
    for prompt, record in zip(read_prompts(str(harmful)), result["models"][0]["prompts"]["harmful"],
                              strict=True):
        tokens, new = list(prompt_ids(prompt.messages, tokenizer, "chat")), []
        for _ in range(4):
            nxt = int(np.argmax(logits(model, tokens + new)[-1]))
            if nxt in tokenizer.eos_token_ids:
                break
            new.append(nxt)
        assert record["answer"] == tokenizer.decode(new)


def test_fuse_a_qlora_adapter_keeps_the_base_quantized(qdirs, data_file, tmp_path):
    from mlx_lm import load
    from toss_mlx_cli.main import app

    out = tmp_path / "qlora"
    train(TrainSettings(model=str(qdirs["q4"]), data=str(data_file), out=str(out),
                        keep_quantized=True, iters=3, batch_size=8, lr=2e-2, quiet=True))
    runner = CliRunner()
    for flag, quantized in (("--keep-quantized", True), ("--dequantize", False)):
        fused = tmp_path / flag.strip("-")
        r = runner.invoke(app, ["fuse", "--model", str(qdirs["q4"]), "--adapter", str(out),
                                "--out", str(fused), flag])
        assert r.exit_code == 0, r.output
        model, _ = load(str(fused))
        assert is_quantized(model) == quantized
        base_plus_adapter, _ = load(str(qdirs["q4"]), adapter_path=str(out))
        # requantizing rounds the sum to the 4-bit grid again; the float sum is exact
        tol = 1.0 if quantized else 1e-4
        np.testing.assert_allclose(logits(model, TOKENS), logits(base_plus_adapter, TOKENS), atol=tol)


# ---------------------------------------------------------------- the flags


@pytest.mark.parametrize("command", ["train", "score", "eval", "refine", "fuse"])
def test_every_model_command_takes_keep_quantized(command):
    from toss_mlx_cli.main import app

    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--keep-quantized" in r.output
    if command != "fuse":
        assert "--dtype" in r.output


def test_cli_train_keep_quantized_and_bad_dtype(qdirs, data_file, tmp_path):
    from toss_mlx_cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(app, ["train", "--model", str(qdirs["q8"]), "--data", str(data_file),
                            "--out", str(out), "--iters", "2", "--keep-quantized", "--dtype",
                            "float16", "--quiet"])
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["keep_quantized"] is True and settings["dtype"] == "float16"
    r = runner.invoke(app, ["train", "--model", str(qdirs["q8"]), "--data", str(data_file),
                            "--out", str(tmp_path / "bad"), "--dtype", "float64"])
    assert r.exit_code == 2
    assert "dtype" in r.output and "Traceback" not in r.output
