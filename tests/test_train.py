"""Token-masked LoRA training: loss, gradients, masks, batches, resume, adapters, settings, CLI."""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from toss_mlx.batches import (
    KeepDataset,
    epoch_batches,
    iterate_batches,
    keep_of_mask,
    make_batch,
    masked_cross_entropy,
    masked_loss,
)
from toss_mlx.data import tokenize_dataset
from toss_mlx.io import TossError, save_arrays
from toss_mlx.models.load import load_model
from toss_mlx.models.lora import LoraSettings, add_lora
from toss_mlx.train import TrainSettings, load_settings, train

ROWS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?",
     "completion": "The answer is " + " and ".join([str(2 * i)] * (1 + i % 4)) + "."}
    for i in range(10)
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("valid") / "valid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    return path


@pytest.fixture(scope="module")
def tokenized(data_file, tokenizer):
    return tokenize_dataset(data_file, tokenizer)


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """A fresh tiny model with LoRA whose B matrices are non-zero (so every LoRA weight gets gradient)."""
    model, _ = load_model(str(tiny_model_dir), quiet=True)
    mx.random.seed(0)
    add_lora(model, LoraSettings(rank=4))
    model.load_weights([(name, 0.1 * mx.random.normal(p.shape))
                        for name, p in tree_flatten(model.trainable_parameters())
                        if name.endswith("lora_b")], strict=False)
    return model


def random_mask(tokenized, seed=0, share=0.7):
    rng = np.random.default_rng(seed)
    return rng.random(tokenized.flat()["offsets"][-1]) < share


def batch_of(tokenized, keep_override=None, rows=(0, 1, 2, 3), mask=None):
    ds = KeepDataset.build(tokenized, mask)
    tokens, lengths, keep, *_ = make_batch(ds, np.array(rows), 2048)
    if keep_override is not None:
        keep = keep_override(np.array(keep))
        keep = mx.array(keep)
    return tokens, lengths, keep


def hand_loss(logits: np.ndarray, tokens: np.ndarray, keep: np.ndarray, norm: str) -> float:
    """Masked cross-entropy with a plain loop: position j predicts token j+1."""
    per_sample = []
    for b in range(tokens.shape[0]):
        losses = []
        for j in range(tokens.shape[1] - 1):
            if keep[b, j + 1]:
                row = logits[b, j].astype(np.float64)
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                losses.append(log_z - row[tokens[b, j + 1]])
        per_sample.append(losses)
    if norm == "token":
        flat = [x for losses in per_sample for x in losses]
        return sum(flat) / len(flat) if flat else 0.0
    means = [sum(losses) / len(losses) for losses in per_sample if losses]
    return sum(means) / len(means) if means else 0.0


def grads_of(model, batch, norm="token"):
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: masked_loss(m, *b, norm=norm)[0])
    loss, grads = loss_and_grad(model, *batch)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads))


# ---------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("norm", ["token", "sample"])
def test_loss_equals_hand_computed_masked_cross_entropy(lora_model, tokenized, norm):
    mask = random_mask(tokenized)
    tokens, lengths, keep = batch_of(tokenized, mask=mask)
    loss, n_tokens = masked_loss(lora_model, tokens, lengths, keep, norm=norm)
    logits = np.array(lora_model(tokens[:, :-1]))
    expected = hand_loss(logits, np.array(tokens), np.array(keep), norm)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert n_tokens.item() == sum(len(tokenized.samples[i].tokens) for i in range(4))
    # keep = response mask AND the mask file's keep, token by token
    flat = tokenized.flat()
    for row in range(4):
        a, b = flat["offsets"][row], flat["offsets"][row + 1]
        want = flat["response_mask"][a:b].astype(bool) & mask[a:b]
        assert np.array_equal(np.array(keep)[row, : b - a], want)
        assert not np.array(keep)[row, b - a:].any()  # padding is never a target


@pytest.mark.parametrize("norm", ["token", "sample"])
@pytest.mark.parametrize("kept", ["mask", "none"])
def test_loss_at_kept_positions_equals_the_full_logits_loss(lora_model, tokenized, norm, kept):
    """Projecting only the kept targets' hidden states (tied embedding, chunked, with the
    hand-written softmax gradient or checkpointed) gives the full-logits loss and gradients; a batch with nothing kept gives 0 and zero grads."""
    import toss_mlx.batches as batches
    from toss_mlx import token_loss

    ds = KeepDataset.build(tokenized, random_mask(tokenized) if kept == "mask" else
                           np.zeros(tokenized.flat()["offsets"][-1], bool))
    batch = make_batch(ds, np.array([0, 1, 2, 3]), 2048)
    assert len(batch) == 5 and batch[3].shape[0] % batches.KEPT_PAD == 0
    batches._KEPT_HEAD.clear()
    full_loss, full_grads = grads_of(lora_model, batch, norm)  # never checked: full logits
    assert batches.use_kept_head(lora_model, np.array(batch[0][0]))
    assert token_loss.head(lora_model) is not None and lora_model.args.tie_word_embeddings
    try:
        kept_loss, kept_grads = grads_of(lora_model, batch, norm)
        small, _ = grads_of(lora_model, batch[:3], norm)  # rows computed from keep
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(batches, "TRAIN_CHUNK_BYTES", 4 * 400 * 5)  # 5 rows per chunk
            chunked_loss, chunked_grads = grads_of(lora_model, batch, norm)
            mp.setattr(batches, "KEEP_PROBS_BYTES", 0)  # logits recomputed in the backward pass
            recomputed_loss, recomputed_grads = grads_of(lora_model, batch, norm)
    finally:
        batches._KEPT_HEAD.clear()
    assert kept_loss.item() == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-7)
    assert small.item() == pytest.approx(kept_loss.item(), rel=1e-6, abs=1e-7)
    assert chunked_loss.item() == pytest.approx(kept_loss.item(), rel=1e-6, abs=1e-7)
    assert recomputed_loss.item() == pytest.approx(kept_loss.item(), rel=1e-6, abs=1e-7)
    for name, g in full_grads.items():
        np.testing.assert_allclose(np.array(kept_grads[name]), np.array(g), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(chunked_grads[name]), np.array(g), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(recomputed_grads[name]), np.array(g), rtol=1e-4, atol=1e-6)
    if kept == "none":
        assert kept_loss.item() == 0.0
        assert all(not np.any(np.array(g)) for g in kept_grads.values())


def test_norms_differ_when_samples_have_different_kept_counts(lora_model, tokenized):
    """Guards the test above: the two normalizations are really different computations."""
    batch = batch_of(tokenized)
    token = masked_loss(lora_model, *batch, norm="token")[0].item()
    sample = masked_loss(lora_model, *batch, norm="sample")[0].item()
    assert abs(token - sample) > 1e-4


def test_masked_targets_get_exactly_zero_gradient(lora_model, tokenized):
    """Two batches that differ only in masked trailing targets give identical gradients."""
    tokens, lengths, keep = batch_of(tokenized)
    lengths_np, tokens_np, keep_np = np.array(lengths), np.array(tokens), np.array(keep)
    cut = lengths_np - 4  # the last 4 real tokens of each sample: masked targets
    changed, tail_masked = tokens_np.copy(), keep_np.copy()
    rng = np.random.default_rng(1)
    for row, (c, n) in enumerate(zip(cut, lengths_np, strict=True)):
        tail_masked[row, c:] = False
        changed[row, c:n] = (tokens_np[row, c:n] + rng.integers(1, 50, n - c)) % 300
    assert tail_masked[:, 1:].any() and (changed != tokens_np).any()

    loss_a, grads_a = grads_of(lora_model, (tokens, lengths, mx.array(tail_masked)))
    loss_b, grads_b = grads_of(lora_model, (mx.array(changed), lengths, mx.array(tail_masked)))
    assert loss_a.item() == loss_b.item()
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert np.array_equal(np.array(grads_a[name]), np.array(grads_b[name])), name
        assert np.abs(np.array(grads_a[name])).max() > 0, name
    # The same change with those targets kept does change the gradient (the test can fail).
    _, kept_a = grads_of(lora_model, (tokens, lengths, keep))
    _, kept_b = grads_of(lora_model, (mx.array(changed), lengths, keep))
    assert any(not np.allclose(np.array(kept_a[k]), np.array(kept_b[k])) for k in kept_a)


@pytest.mark.parametrize("norm", ["token", "sample"])
def test_gradient_wrt_logits_is_zero_at_removed_targets(norm):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(3, 7, 11)).astype(np.float32))
    targets = mx.array(rng.integers(0, 11, (3, 7)).astype(np.int32))
    keep = rng.random((3, 7)) < 0.5
    keep[2] = False  # a sample with nothing kept
    grad = mx.grad(lambda x: (lambda n, d: n / mx.maximum(d, 1))(
        *masked_cross_entropy(x, targets, mx.array(keep), norm)))(logits)
    grad = np.array(grad)
    assert np.all(grad[~keep] == 0)
    assert np.all(np.abs(grad[keep]).sum(-1) > 0)


@pytest.mark.parametrize("norm", ["token", "sample"])
def test_all_masked_samples_give_finite_loss_and_gradients(lora_model, tokenized, norm):
    def first_sample_empty(keep):
        keep[0] = False
        return keep

    loss, grads = grads_of(lora_model, batch_of(tokenized, first_sample_empty), norm)
    assert np.isfinite(loss.item())
    assert all(np.isfinite(np.array(g)).all() for g in grads.values())
    # The empty sample contributes nothing: same loss and gradients as the batch without it.
    rest_loss, rest_grads = grads_of(lora_model, batch_of(tokenized, rows=(1, 2, 3)), norm)
    assert loss.item() == pytest.approx(rest_loss.item(), rel=1e-5)
    for name in grads:
        np.testing.assert_allclose(np.array(grads[name]), np.array(rest_grads[name]),
                                   rtol=1e-4, atol=1e-7)

    loss, grads = grads_of(lora_model, batch_of(tokenized, lambda k: k & False), norm)
    assert loss.item() == 0.0
    assert all(np.array_equal(np.array(g), np.zeros(g.shape)) for g in grads.values())


# ---------------------------------------------------------------- batches


def test_epoch_batches_cover_every_sample_once_deterministically():
    lengths = np.array([5, 9, 3, 9, 9, 2, 7, 4, 6, 8, 1])
    a = epoch_batches(lengths, 4, seed=3, epoch=0)
    assert a.shape == (3, 4)
    assert sorted(a[a >= 0].tolist()) == list(range(11)) and (a < 0).sum() == 1
    assert np.array_equal(a, epoch_batches(lengths, 4, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_batches(lengths, 4, seed=3, epoch=1))
    for batch in a:  # grouped by length: batches are contiguous runs of the sorted lengths
        real = np.sort(lengths[batch[batch >= 0]])
        others = np.setdiff1d(np.arange(11), batch)
        assert not any(real[0] < lengths[o] < real[-1] for o in others)


def test_iterate_batches_skips_done_steps_and_splits_ranks(tokenized):
    ds = KeepDataset.build(tokenized)

    def take(n, **kw):
        it = iterate_batches(ds, 4, 2048, loop=True, seed=7, **kw)
        return [tuple(np.array(x) for x in next(it)) for _ in range(n)]

    full = take(7)  # 3 steps per epoch: crosses two epoch boundaries
    resumed = take(3, start_step=4)
    for a, b in zip(full[4:], resumed, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    class Rank:
        def __init__(self, r):
            self.r = r

        def rank(self):
            return self.r

        def size(self):
            return 2

    halves = [take(1, comm_group=Rank(r))[0] for r in (0, 1)]
    whole = full[0]
    for r in (0, 1):
        width = halves[r][0].shape[1]
        assert np.array_equal(halves[r][1], whole[1][r::2])
        assert np.array_equal(halves[r][0], whole[0][r::2, :width])
        assert not whole[2][r::2, width:].any()


# ---------------------------------------------------------------- masks


def write_mask(path, tokenized, keep, **meta_changes):
    flat = tokenized.flat()
    meta = dict(tokenized.fingerprint, **meta_changes)
    save_arrays(path, {"offsets": flat["offsets"], "row_index": flat["row_index"],
                       "keep": keep.astype(np.uint8)}, meta)
    return path


def test_mask_round_trip_and_refusals(tmp_path, tokenized):
    keep = random_mask(tokenized)
    good = write_mask(tmp_path / "mask.safetensors", tokenized, keep)
    assert np.array_equal(keep_of_mask(good, tokenized), keep)

    other = write_mask(tmp_path / "other.safetensors", tokenized, keep, template="plain",
                       dataset_sha256="0" * 64)
    with pytest.raises(TossError, match="(?s)other data.*dataset_sha256.*template"):
        keep_of_mask(other, tokenized)

    flat = tokenized.flat()
    shifted = tmp_path / "rows.safetensors"
    save_arrays(shifted, {"offsets": flat["offsets"], "row_index": flat["row_index"] + 1,
                          "keep": keep.astype(np.uint8)}, tokenized.fingerprint)
    with pytest.raises(TossError, match="rows other than"):
        keep_of_mask(shifted, tokenized)
    offsets = flat["offsets"].copy()
    offsets[1] += 1
    moved = tmp_path / "offsets.safetensors"
    save_arrays(moved, {"offsets": offsets, "row_index": flat["row_index"],
                        "keep": keep.astype(np.uint8)}, tokenized.fingerprint)
    with pytest.raises(TossError, match="offsets differ"):
        keep_of_mask(moved, tokenized)

    with pytest.raises(TossError, match="not found"):
        keep_of_mask(tmp_path / "missing.safetensors", tokenized)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(TossError, match="not a readable safetensors mask file"):
        keep_of_mask(corrupt, tokenized)


# ---------------------------------------------------------------- training runs


def settings_for(tiny_model_dir, data_file, out, **kw):
    base = dict(model=str(tiny_model_dir), data=str(data_file), out=str(out), epochs=2,
                batch_size=4, lr=1e-3, quiet=True, save_every=2)
    return TrainSettings(**{**base, **kw})


def adapter_arrays(folder):
    return {k: np.array(v) for k, v in mx.load(str(Path(folder) / "adapters.safetensors")).items()}


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, tiny_model_dir, data_file,
                                                            valid_file):
    # Cosine schedule with warmup, LoRA dropout and validation: every piece of state matters.
    kw = dict(lr_schedule="cosine", warmup=1, lora=LoraSettings(rank=4, dropout=0.1),
              valid=str(valid_file), val_every=2)
    whole = train(settings_for(tiny_model_dir, data_file, tmp_path / "whole", **kw))
    assert whole.steps == whole.total_steps == 6

    class Killed(Exception):
        pass

    def kill_at_step_5(record):
        if record["step"] == 5:
            raise Killed

    cut = settings_for(tiny_model_dir, data_file, tmp_path / "cut", **kw)
    with pytest.raises(Killed):
        train(cut, on_step=kill_at_step_5)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004"]
    with pytest.raises(TossError, match="other settings or data:\n  settings.lr: 0.001 -> 0.002"):
        train(replace(cut, lr=2e-3))  # a rerun with other settings refuses, naming them
    with pytest.raises(TossError, match="lr: 0.001 -> 0.002"):
        train(replace(cut, resume=True, lr=2e-3))

    resumed = train(cut)  # the same settings again: resumes on its own
    assert resumed.resumed_from == 4 and resumed.steps == 6
    a, b = adapter_arrays(tmp_path / "whole"), adapter_arrays(tmp_path / "cut")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("lora_b"))  # it trained

    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("whole", "cut")]
    assert [r["step"] for r in logs[1]] == list(range(1, 7))
    for x, y in zip(*logs, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-6)
        assert x.get("val_loss") == pytest.approx(y.get("val_loss"), rel=1e-5)
    assert resumed.best_val_loss == pytest.approx(whole.best_val_loss, rel=1e-5)
    assert (tmp_path / "cut" / "best" / "adapters.safetensors").exists()


def test_adapter_round_trip_through_mlx_lm(tmp_path, tiny_model_dir, data_file, tokenized):
    from mlx.utils import tree_unflatten
    from mlx_lm import generate, load

    mask = write_mask(tmp_path / "mask.safetensors", tokenized, random_mask(tokenized))
    s = settings_for(tiny_model_dir, data_file, tmp_path / "run", iters=3, mask=str(mask))
    result = train(s)
    assert 0 < result.kept_share < 1
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("checkpoints")) == [
        "adapter_config.json", "adapters.safetensors", "run.json", "train_log.jsonl",
        "train_summary.json"]  # no temp files left behind

    inputs = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])
    trained = result.model
    trained.eval()
    expected = np.array(trained(inputs))
    model, tokenizer = load(str(tiny_model_dir), adapter_path=str(out))
    np.testing.assert_allclose(np.array(model(inputs)), expected, rtol=1e-5, atol=1e-5)
    base, _ = load(str(tiny_model_dir))
    assert not np.allclose(np.array(base(inputs)), expected, atol=1e-4)  # the adapter matters

    # mlx_lm.fuse's own steps: fuse every LoRA layer into its linear, same logits.
    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    np.testing.assert_allclose(np.array(model(inputs)), expected, rtol=1e-4, atol=1e-4)
    text = generate(model, tokenizer, prompt="Question 1:", max_tokens=3)
    assert isinstance(text, str)


# ---------------------------------------------------------------- settings and CLI


def test_yaml_settings_unknown_keys_and_flag_precedence(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model: m\ndata: d.jsonl\nbatch_sise: 8\nlora:\n  rnak: 4\n")
    with pytest.raises(TossError) as e:
        load_settings(str(cfg))
    assert "batch_sise: unknown setting (did you mean 'batch_size'?)" in str(e.value)
    assert "lora.rnak: unknown setting (did you mean 'rank'?)" in str(e.value)

    cfg.write_text("model: m\ndata: d.jsonl\nbatch_size: 8\nlr: 2.0e-5\nlora:\n  rank: 4\n")
    s = load_settings(str(cfg), {"lora": {"alpha": 8}}, lr=3e-5, rank=None, targets="q_proj,k_proj")
    assert (s.batch_size, s.lr, s.lora.rank, s.lora.alpha, s.lora.targets) == (
        8, 3e-5, 4, 8.0, ["q_proj", "k_proj"])
    assert (s.epochs, s.loss_norm, s.lr_schedule) == (2, "token", "constant")  # paper defaults
    with pytest.raises(TossError, match="--data required"):
        load_settings(None, model="m")
    with pytest.raises(TossError, match="batch_size must be at least 1"):
        load_settings(None, model="m", data="d", batch_size=0)


def test_cli_train_and_refusals(tmp_path, tiny_model_dir, data_file, tokenized):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data_file),
            "--out", str(tmp_path / "a"), "--iters", "2", "--loss-norm", "sample"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "trained 2 steps" in ok.output
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)

    summary = (tmp_path / "a" / "train_summary.json").read_bytes()
    again = runner.invoke(app, args)  # the same command on a finished run: says so, changes nothing
    assert again.exit_code == 0 and "this run is finished (2 steps)" in " ".join(again.output.split())
    assert (tmp_path / "a" / "train_summary.json").read_bytes() == summary

    bad = write_mask(tmp_path / "m.safetensors", tokenized, random_mask(tokenized), max_seq_len=64)
    refused = runner.invoke(app, args[:5] + ["--out", str(tmp_path / "b"), "--mask", str(bad), "-q"])
    assert refused.exit_code == 2 and "max_seq_len" in refused.output, refused.output
    assert "Traceback" not in refused.output


def test_init_adapter_continues_from_its_weights(tmp_path, tiny_model_dir, data_file):
    first = settings_for(tiny_model_dir, data_file, tmp_path / "first", iters=2,
                         lora=LoraSettings(rank=4))
    train(first)
    start = adapter_arrays(tmp_path / "first")
    # With a vanishing lr the continued adapter stays at its starting weights.
    cont = replace(first, out=str(tmp_path / "cont"), init_adapter=str(tmp_path / "first"), lr=1e-12)
    train(cont)
    for name, value in adapter_arrays(tmp_path / "cont").items():
        np.testing.assert_allclose(value, start[name], rtol=0, atol=1e-9, err_msg=name)
    fresh = replace(cont, out=str(tmp_path / "fresh"), init_adapter=None)
    train(fresh)
    assert not all(np.allclose(v, start[k]) for k, v in adapter_arrays(tmp_path / "fresh").items())
    # Resuming a finished run does nothing and keeps the adapter.
    recorded = json.loads((tmp_path / "cont" / "train_summary.json").read_text())
    done = train(replace(cont, resume=True))
    assert done.steps == 2 and done.to_json() == recorded
    assert json.loads((tmp_path / "cont" / "train_summary.json").read_text()) == recorded
    with pytest.raises(TossError, match="does not fit this run's LoRA settings"):
        train(replace(cont, out=str(tmp_path / "wrong"), lora=LoraSettings(rank=8)))
    with pytest.raises(TossError, match="adapter not found"):
        train(replace(cont, out=str(tmp_path / "none"), init_adapter=str(tmp_path / "nope")))


@pytest.mark.slow
def test_real_model_loss_at_kept_positions_equals_full_logits(smollm2_dir, data_file):
    """SmolLM2-135M (49k vocabulary, tied embeddings, 30 layers): the kept-positions loss and
    its LoRA gradients equal the full-logits ones."""
    import toss_mlx.batches as batches

    model, tokenizer = load_model(str(smollm2_dir), quiet=True)
    mx.random.seed(0)
    add_lora(model, LoraSettings(rank=4, num_layers=4))
    model.load_weights([(name, 0.01 * mx.random.normal(p.shape))
                        for name, p in tree_flatten(model.trainable_parameters())
                        if name.endswith("lora_b")], strict=False)
    data = tokenize_dataset(data_file, tokenizer, max_seq_len=128)
    ds = KeepDataset.build(data, random_mask(data))
    batch = make_batch(ds, np.arange(min(4, len(data.samples))), 128)
    batches._KEPT_HEAD.clear()
    try:
        for norm in ("token", "sample"):
            full_loss, full_grads = grads_of(model, batch, norm)
            assert batches.use_kept_head(model, np.array(batch[0][0]))
            kept_loss, kept_grads = grads_of(model, batch, norm)
            batches._KEPT_HEAD.clear()
            assert kept_loss.item() == pytest.approx(full_loss.item(), rel=1e-5)
            for name, g in full_grads.items():
                np.testing.assert_allclose(np.array(kept_grads[name]), np.array(g), rtol=1e-3,
                                           atol=1e-6, err_msg=name)
    finally:
        batches._KEPT_HEAD.clear()


def test_mlx_lm_ui_is_silent_and_restored(tmp_path, tiny_model_dir, data_file, capfd):
    import mlx_lm.tuner.trainer as mlx_lm_trainer

    original = mlx_lm_trainer.TrainUI
    capfd.readouterr()
    train(settings_for(tiny_model_dir, data_file, tmp_path / "a", iters=2))
    out, err = capfd.readouterr()
    assert "train_loss" not in out + err  # mlx-lm's own header line: "iter   train_loss ..."
    assert mlx_lm_trainer.TrainUI is original
