"""Token selection: exact counts, deterministic ties, each strategy against a naive loop, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from toss_mlx.io import TossError, load_arrays, save_arrays
from toss_mlx.layout import FORMAT_VERSION, META_KEYS, Scores, answer_positions
from toss_mlx.select import (
    check_scores_match,
    format_summary,
    select,
    select_file,
    select_tokens,
)

FINGERPRINT = {"dataset_sha256": "d" * 64, "tokenizer_sha256": "t" * 64, "template": "chat",
               "max_seq_len": "2048"}


def make_scores(seed: int = 0, samples: int = 40, ties: bool = True) -> Scores:
    """Random samples of 1-3 assistant turns; rounded scores so that many tokens tie."""
    rng = np.random.default_rng(seed)
    tokens, masks = [], []
    for _ in range(samples):
        mask = [0] * int(rng.integers(1, 6))  # the prompt
        for _ in range(int(rng.integers(1, 4))):
            mask += [1] * int(rng.integers(1, 30)) + [0] * int(rng.integers(1, 5))
        masks.append(np.array(mask, np.uint8))
        tokens.append(rng.integers(0, 1000, len(mask)).astype(np.int32))
    if samples:  # one sample whose response was truncated away: nothing scored
        masks[-1][:] = 0
    offsets = np.concatenate([[0], np.cumsum([len(m) for m in masks])]).astype(np.int64)
    mask = np.concatenate(masks)
    T = len(mask)
    lu = rng.gamma(2.0, 1.0, T).astype(np.float32)
    lh = rng.gamma(2.0, 1.0, T).astype(np.float32)
    if ties:
        lu, lh = np.round(lu, 1), np.round(lh, 1)
    lu, lh = lu * mask, lh * mask
    score = ((lu - lh) * mask).astype(np.float32)
    meta = {k: "x" for k in META_KEYS} | FINGERPRINT | {"format_version": FORMAT_VERSION,
                                                        "model": "m"}
    return Scores(offsets, np.arange(samples, dtype=np.int64) * 2, np.concatenate(tokens), mask,
                  lu, lh, score, meta)


def scored_tokens(s: Scores):
    """[(sample, flat position), ...] of scored tokens, in order."""
    out = []
    for i in range(s.samples):
        for p in range(s.offsets[i], s.offsets[i + 1]):
            if s.response_mask[p]:
                out.append((i, p))
    return out


def naive_rank(s: Scores, key, ratio: float, level: str) -> set[int]:
    """Remove the highest keys (earlier token on ties): globally or per sample. Plain loops."""
    toks = scored_tokens(s)
    removed = set()
    groups = {"all": toks} if level == "global" else {}
    if level == "sample":
        for i, p in toks:
            groups.setdefault(i, []).append((i, p))
    for group in groups.values():
        n = int(math.floor(round(ratio * len(group), 9)))
        ranked = sorted(group, key=lambda t: (-float(key[t[1]]), t[1]))
        removed |= {p for _, p in ranked[:n]}
    return removed


def as_set(sel) -> set[int]:
    return set(np.nonzero(sel.removed)[0].tolist())


KEYS = {"toss": lambda s: s.score, "safety-only": lambda s: -s.loss_safety,
        "utility-only": lambda s: s.loss_utility}


@pytest.mark.parametrize("strategy", list(KEYS))
@pytest.mark.parametrize("level", ["global", "sample"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.29, 0.5, 0.93])
def test_ranking_strategies_match_naive(strategy, level, ratio):
    s = make_scores()
    sel = select_tokens(s, ratio, strategy, level)
    assert as_set(sel) == naive_rank(s, KEYS[strategy](s), ratio, level)
    assert np.array_equal(sel.keep, (s.response_mask.astype(bool) & ~sel.removed).astype(np.uint8))


def test_exact_count_is_floor_of_ratio_times_scored_tokens():
    s = make_scores(samples=60)
    T = s.scored_tokens
    for ratio in (0.01, 0.1, 0.29, 0.3, 0.57, 0.7, 0.99):
        want = math.floor(round(ratio * T, 9))
        for strategy in ("toss", "random", "safety-only", "utility-only"):
            assert select_tokens(s, ratio, strategy).stats["removed_tokens"] == want
    # 0.29 * 100 is 28.999999999999996 in binary floating point: the count is still 29.
    hundred = Scores(np.array([0, 101]), np.array([0]), np.zeros(101, np.int32),
                     np.array([0] + [1] * 100, np.uint8), np.zeros(101, np.float32),
                     np.zeros(101, np.float32), np.arange(101, dtype=np.float32), s.meta)
    assert select_tokens(hundred, 0.29).stats["removed_tokens"] == 29


def test_ties_are_broken_by_position_and_repeatably():
    s = make_scores()
    s.score[:] = np.where(s.response_mask == 1, 1.0, 0.0)  # every scored token ties
    sel = select_tokens(s, 0.25)
    n = sel.stats["removed_tokens"]
    first = [p for _, p in scored_tokens(s)][:n]
    assert sorted(as_set(sel)) == first
    assert as_set(select_tokens(s, 0.25)) == as_set(sel)
    # Negative zero and zero tie as well.
    s.score[:] = np.where(s.response_mask == 1, np.float32(-0.0), 0.0)
    s.score[np.nonzero(s.response_mask)[0][::2]] = 0.0
    assert sorted(as_set(select_tokens(s, 0.25))) == first


@pytest.mark.parametrize("level", ["global", "sample"])
def test_random_same_count_seeded_and_uniform(level):
    s = make_scores()
    ratio = 0.2
    a, b, c = (select_tokens(s, ratio, "random", level, seed=k) for k in (0, 0, 1))
    assert as_set(a) == as_set(b) and as_set(a) != as_set(c)
    toss = select_tokens(s, ratio, "toss", level)
    assert a.stats["removed_tokens"] == toss.stats["removed_tokens"]
    assert a.removed[s.response_mask == 0].sum() == 0
    if level == "sample":  # the same count in every sample
        sid = s.sample_ids()
        assert np.array_equal(np.bincount(sid[a.removed], minlength=s.samples),
                              np.bincount(sid[toss.removed], minlength=s.samples))
    # Over many seeds every scored token is removed about ratio of the time.
    freq = np.mean([select_tokens(s, ratio, "random", level, seed=k).removed for k in range(400)], 0)
    scored = s.response_mask == 1
    assert abs(freq[scored].mean() - a.stats["removed_tokens"] / scored.sum()) < 1e-9
    if level == "global":
        assert np.abs(freq[scored] - ratio).max() < 0.12  # 400 draws: sd 0.02


@pytest.mark.parametrize("k", [1, 5, 12])
def test_first_k_is_the_first_k_tokens_of_every_turn(k):
    s = make_scores()
    sel = select_tokens(s, 0.1, "first-k", k=k)
    want = set()
    for i in range(s.samples):
        run = 0
        for p in range(s.offsets[i], s.offsets[i + 1]):
            run = run + 1 if s.response_mask[p] else 0
            if s.response_mask[p] and run <= k:
                want.add(p)
    assert as_set(sel) == want
    assert sel.k == k


def test_answer_positions_restart_in_every_turn_and_sample():
    s = make_scores()
    pos = answer_positions(s.offsets, s.response_mask)
    for i in range(s.samples):
        run = -1
        for p in range(s.offsets[i], s.offsets[i + 1]):
            run = run + 1 if s.response_mask[p] else -1
            assert pos[p] == run


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.8])
def test_sample_filter_drops_whole_samples_by_mean_score(ratio):
    s = make_scores()
    toks = scored_tokens(s)
    budget = int(math.floor(round(ratio * len(toks), 9)))
    per = {}
    for i, p in toks:
        per.setdefault(i, []).append(p)
    ranked = sorted(per, key=lambda i: (-float(np.mean([float(s.score[p]) for p in per[i]])), i))
    want, removed = set(), 0
    for i in ranked:
        if removed >= budget:
            break
        want |= set(per[i])
        removed += len(per[i])
    sel = select_tokens(s, ratio, "sample-filter")
    assert as_set(sel) == want
    assert sel.stats["removed_tokens"] >= budget
    assert sel.stats["samples_fully_removed"] == sel.stats["samples_touched"]


def test_summary_counts_match_a_naive_count():
    s = make_scores()
    sel = select_tokens(s, 0.2)
    pos = {}
    for i in range(s.samples):
        run = 0
        for p in range(s.offsets[i], s.offsets[i + 1]):
            run = run + 1 if s.response_mask[p] else 0
            if s.response_mask[p]:
                pos[p] = run
    removed = as_set(sel)
    for name, lo, hi in (("first 5", 1, 5), ("6-20", 6, 20), ("rest", 21, 10**9)):
        inside = [p for p, r in pos.items() if lo <= r <= hi]
        b = sel.stats["by_position"][name]
        assert b["tokens"] == len(inside)
        assert b["removed"] == len([p for p in inside if p in removed])
        assert b["share_of_removed"] == pytest.approx(b["removed"] / len(removed))
    touched = {i for i, p in scored_tokens(s) if p in removed}
    emptied = {i for i in touched if all(p in removed for j, p in scored_tokens(s) if j == i)}
    assert sel.stats["samples_touched"] == len(touched)
    assert sel.stats["samples_fully_removed"] == len(emptied)
    text = format_summary(sel)
    assert "first 5" in text and "6-20" in text and "rest" in text
    assert f"removed {len(removed)} of {len(pos)}" in text


# ---------------------------------------------------------------- files


def write_scores(path, s: Scores):
    save_arrays(path, s.arrays(), s.meta)
    return path


def test_mask_file_layout_and_metadata(tmp_path):
    s = make_scores()
    f = write_scores(tmp_path / "scores.safetensors", s)
    out = tmp_path / "mask.safetensors"
    summary = select(f, out, ratio=0.1, strategy="random", seed=3)
    arrays, meta = load_arrays(out)
    assert set(arrays) == {"offsets", "row_index", "keep"} and arrays["keep"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["offsets"], s.offsets)
    np.testing.assert_array_equal(arrays["row_index"], s.row_index)
    for k, v in s.meta.items():
        assert meta[k] == v  # fingerprints and adapter hashes copied
    assert meta["strategy"] == "random" and meta["level"] == "global" and meta["seed"] == "3"
    assert float(meta["ratio"]) == 0.1
    assert int(meta["removed_tokens"]) == summary["removed_tokens"] == s.scored_tokens // 10
    assert int(meta["samples_fully_removed"]) == summary["samples_fully_removed"]
    json.dumps(summary)  # the pipeline stores it as JSON
    assert (arrays["keep"] == 1).sum() == s.scored_tokens - summary["removed_tokens"]


def test_mask_is_accepted_by_the_trainer(tmp_path, tokenizer):
    from toss_mlx import batches
    from toss_mlx.data import tokenize_dataset

    data_file = tmp_path / "d.jsonl"
    data_file.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": "answer " * (i + 1)})
                                   for i in range(6)) + "\n")
    data = tokenize_dataset(data_file, tokenizer)
    flat = data.flat()
    T = len(flat["token_ids"])
    mask = flat["response_mask"].copy()
    mask[flat["offsets"][:-1]] = 0
    rng = np.random.default_rng(0)
    s = Scores(flat["offsets"], flat["row_index"], flat["token_ids"], mask,
               rng.random(T).astype(np.float32) * mask, rng.random(T).astype(np.float32) * mask,
               rng.normal(size=T).astype(np.float32) * mask,
               {k: str(v) for k, v in data.fingerprint.items()} | {"model": "m", "format_version": "1",
                                                                    "utility_adapter_sha256": "u",
                                                                    "safety_adapter_sha256": "h"})
    f = write_scores(tmp_path / "scores.safetensors", s)
    sel = select_file(f, tmp_path / "mask.safetensors", ratio=0.3)
    keep = batches.keep_of_mask(tmp_path / "mask.safetensors", data)
    np.testing.assert_array_equal(keep, sel.keep.astype(bool))


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), float("inf")])
def test_ratio_outside_0_1_is_an_error_and_nothing_is_written(tmp_path, ratio):
    f = write_scores(tmp_path / "scores.safetensors", make_scores())
    with pytest.raises(TossError, match="ratio"):
        select_file(f, tmp_path / "mask.safetensors", ratio=ratio)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]


@pytest.mark.parametrize("args,match", [({"strategy": "best"}, "strategy"), ({"level": "row"}, "level"),
                                        ({"strategy": "sample-filter", "level": "sample"}, "level"),
                                        ({"strategy": "first-k", "k": 0}, "k must")])
def test_bad_options(tmp_path, args, match):
    f = write_scores(tmp_path / "scores.safetensors", make_scores())
    with pytest.raises(TossError, match=match):
        select_file(f, tmp_path / "mask.safetensors", **args)
    assert not (tmp_path / "mask.safetensors").exists()


@pytest.mark.parametrize("content", [None, b"", b"garbage" * 20])
def test_missing_empty_corrupt_scores(tmp_path, content):
    f = tmp_path / "scores.safetensors"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(TossError, match="scores.safetensors"):
        select_file(f, tmp_path / "mask.safetensors")
    assert not (tmp_path / "mask.safetensors").exists()


def test_scores_without_scored_tokens(tmp_path):
    s = make_scores(samples=3)
    s.response_mask[:] = 0
    s.score[:] = 0
    f = write_scores(tmp_path / "scores.safetensors", s)
    with pytest.raises(TossError, match="no scored"):
        select_file(f, tmp_path / "mask.safetensors")
    assert not (tmp_path / "mask.safetensors").exists()


def test_scores_of_other_data_or_tokenizer_are_refused(tmp_path, tokenizer, tiny_model_dir):
    from toss_mlx.data import tokenize_dataset
    from toss_mlx.models.load import load_tokenizer

    data_file = tmp_path / "d.jsonl"
    data_file.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": "yes " * (i + 1)})
                                   for i in range(4)) + "\n")
    data = tokenize_dataset(data_file, tokenizer)
    flat = data.flat()
    T = len(flat["token_ids"])
    z = np.zeros(T, np.float32)
    meta = {k: str(v) for k, v in data.fingerprint.items()} | {
        "model": "m", "format_version": "1", "utility_adapter_sha256": "u", "safety_adapter_sha256": "h"}
    s = Scores(flat["offsets"], flat["row_index"], flat["token_ids"], flat["response_mask"], z, z,
               np.linspace(-1, 1, T).astype(np.float32) * flat["response_mask"], meta)
    f = write_scores(tmp_path / "scores.safetensors", s)
    tok = load_tokenizer(str(tiny_model_dir))
    check_scores_match(load_scores_(f), data_file, tok)  # the right data passes
    select_file(f, tmp_path / "ok.safetensors", data=data_file, tokenizer=tok)

    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text().replace("yes", "no"))
    with pytest.raises(TossError, match="other data"):
        select_file(f, tmp_path / "mask.safetensors", data=other)
    bad_tok = dict(meta, tokenizer_sha256="0" * 64)
    write_scores(f, Scores(*[getattr(s, k) for k in s.arrays()], bad_tok))
    with pytest.raises(TossError, match="tokenizer_sha256"):
        select_file(f, tmp_path / "mask.safetensors", data=data_file, tokenizer=tok)
    assert not (tmp_path / "mask.safetensors").exists()


def load_scores_(f):
    from toss_mlx.layout import load_scores

    return load_scores(f)


def test_cli_select(tmp_path):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    f = write_scores(tmp_path / "scores.safetensors", make_scores())
    out = tmp_path / "mask.safetensors"
    r = CliRunner().invoke(app, ["select", "--scores", str(f), "--ratio", "0.2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "removed" in r.output and "first 5" in r.output and out.exists()
    r = CliRunner().invoke(app, ["select", "--scores", str(f), "--ratio", "1.2", "--out",
                                 str(tmp_path / "m2.safetensors")])
    assert r.exit_code == 2 and "ratio" in r.output
    assert not (tmp_path / "m2.safetensors").exists()
