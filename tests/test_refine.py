"""TOSS-Pro: the walk down the token ranking, and whole rounds on the tiny model."""

import dataclasses
import json

import numpy as np
import pytest

from toss_mlx.io import TossError
from toss_mlx.layout import Scores
from toss_mlx.refine import top_samples, top_token_set


def make_scores(per_sample: list[list[float]], rows: list[int], prompt_tokens: int = 2) -> Scores:
    """Each sample: `prompt_tokens` unscored tokens, then its response scores."""
    mask, score = [], []
    for s in per_sample:
        mask += [0] * prompt_tokens + [1] * len(s)
        score += [0.0] * prompt_tokens + list(s)
    lengths = [prompt_tokens + len(s) for s in per_sample]
    t = len(mask)
    return Scores(offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  row_index=np.array(rows, np.int64), token_ids=np.arange(t, dtype=np.int32),
                  response_mask=np.array(mask, np.uint8), loss_utility=np.zeros(t, np.float32),
                  loss_safety=np.zeros(t, np.float32), score=np.array(score, np.float32))


def naive_walk(per_sample, rows, k, exclude):
    tokens = [(s, -j, i) for i, sample in enumerate(per_sample) for j, s in enumerate(sample)]
    picked = []
    for _score, _, i in sorted(tokens, key=lambda x: (-x[0], x[2], -x[1])):
        if rows[i] not in exclude and rows[i] not in picked:
            picked.append(rows[i])
        if len(picked) == k:
            break
    return picked


def test_top_samples_walks_the_global_ranking():
    rng = np.random.default_rng(0)
    per_sample = [list(rng.normal(size=rng.integers(1, 8)).round(1)) for _ in range(30)]
    rows = list(range(100, 130))
    scores = make_scores(per_sample, rows)
    for k, exclude in [(1, set()), (5, set()), (5, {rows[3], rows[7]}), (30, set())]:
        got = top_samples(scores, k, exclude)
        assert [p["row_index"] for p in got] == naive_walk(per_sample, rows, k, exclude)
        for p in got:  # each pick names the sample's top token and its score
            i = rows.index(p["row_index"])
            assert p["score"] == pytest.approx(max(per_sample[i]))


def test_top_token_set_is_the_global_top_d():
    scores = make_scores([[5.0, 1.0], [4.0, 3.0, 2.0]], [0, 1])
    # response positions: sample 0 -> 2, 3; sample 1 -> 6, 7, 8; floor(0.4 * 5) = 2
    assert top_token_set(scores, 0.4) == {2, 6}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def refine_inputs(tmp_path_factory, tiny_model_dir):
    from toss_mlx.models.load import load_model
    from toss_mlx.models.lora import LoraSettings, add_lora, save_adapter

    d = tmp_path_factory.mktemp("refine")
    custom = write_jsonl(d / "custom.jsonl", [
        {"prompt": f"Question {i}?", "completion": ("Sure, here is how. " if i % 3 == 0 else "The answer is ")
         + str(i)} for i in range(12)])
    harmful = write_jsonl(d / "harmful.jsonl", [
        {"prompt": f"Bad request {i}", "completion": "Sure, here is how to do it."} for i in range(4)])
    model, _ = load_model(str(tiny_model_dir), quiet=True)
    config = add_lora(model, LoraSettings(rank=4, alpha=8))
    save_adapter(model, d / "utility", config)
    return d, custom, harmful


def refine_settings(d, custom, harmful, tiny_model_dir, out, **kw):
    from toss_mlx.models.lora import LoraSettings
    from toss_mlx.refine import RefineSettings
    from toss_mlx.train import TrainSettings

    train = TrainSettings(model=str(tiny_model_dir), data=str(harmful), iters=2, batch_size=2,
                          lr=1e-2, lora=LoraSettings(rank=4, alpha=8), quiet=True)
    return RefineSettings(data=str(custom), harmful=str(harmful), utility=str(d / "utility"),
                          out=str(out), train=train, quiet=True, **kw)


def test_refine_rounds_grow_the_harmful_set_and_resume(refine_inputs, tiny_model_dir):
    from toss_mlx.refine import refine

    d, custom, harmful = refine_inputs
    out = d / "run"
    s = refine_settings(d, custom, harmful, tiny_model_dir, out, rounds=2, k=3)
    result = refine(s)
    added = [r["added"] for r in result.rounds]
    assert [len(a) for a in added] == [3, 3] and not set(added[0]) & set(added[1])
    # Round 1 picked the first 3 samples of round 1's own ranking.
    from toss_mlx.layout import load_scores

    r1 = load_scores(out / "round-1" / "scores.safetensors")
    assert added[0] == [p["row_index"] for p in top_samples(r1, 3, set())]
    grown = (out / "round-2" / "harmful.jsonl").read_text().splitlines()
    assert len(grown) == 4 + 6
    summary = json.loads((out / "rounds.json").read_text())
    assert [r["harmful_size"] for r in summary["rounds"]] == [7, 10]
    assert (out / "final" / "scores.safetensors").exists()
    # Later scorings computed only the safety side: loss_utility is round 1's, bit for bit.
    for later in ("round-2", "final"):
        scores = load_scores(out / later / "scores.safetensors")
        np.testing.assert_array_equal(scores.loss_utility, r1.loss_utility)
        assert scores.meta["utility_losses_from"] == str(out / "round-1" / "scores.safetensors")
    # Rerun: nothing is redone, the same result comes back.
    before = (out / "round-2" / "adapter" / "adapters.safetensors").stat().st_mtime_ns
    again = refine(s)
    assert [r["added"] for r in again.rounds] == added
    assert (out / "round-2" / "adapter" / "adapters.safetensors").stat().st_mtime_ns == before


def test_refine_continue_starts_each_round_from_the_previous_adapter(refine_inputs, tiny_model_dir):
    from toss_mlx.refine import refine

    d, custom, harmful = refine_inputs
    out = d / "continue"
    refine(refine_settings(d, custom, harmful, tiny_model_dir, out, rounds=1, k=2, retrain="continue"))
    from toss_mlx.cache import adapter_fingerprint

    run = json.loads((out / "round-1" / "adapter" / "run.json").read_text())
    assert run["init_adapter_fingerprint"] == adapter_fingerprint(out / "round-0" / "adapter")
    scratch = d / "scratch"
    refine(refine_settings(d, custom, harmful, tiny_model_dir, scratch, rounds=1, k=2))
    run = json.loads((scratch / "round-1" / "adapter" / "run.json").read_text())
    assert run["init_adapter_fingerprint"] is None


def test_refine_bad_input(refine_inputs, tiny_model_dir):
    from toss_mlx.refine import refine

    d, custom, harmful = refine_inputs
    with pytest.raises(TossError, match="rounds must be at least 1"):
        refine(refine_settings(d, custom, harmful, tiny_model_dir, d / "x", rounds=0))
    with pytest.raises(TossError, match="more than the 12 samples"):
        refine(refine_settings(d, custom, harmful, tiny_model_dir, d / "x", rounds=2, k=7))


def test_refine_rounds_are_keyed_by_their_inputs(refine_inputs, tiny_model_dir, tmp_path):
    """A round is reused only under the same key; a changed input redoes it and every later one."""
    import shutil

    from toss_mlx.refine import refine

    d, custom, harmful = refine_inputs
    out = tmp_path / "keyed"

    def stamps():
        return {t: (out / f"round-{t}" / "adapter" / "adapters.safetensors").stat().st_mtime_ns
                for t in (1, 2) if (out / f"round-{t}" / "adapter").exists()}

    one = refine_settings(d, custom, harmful, tiny_model_dir, out, rounds=1, k=2)
    said: list[str] = []
    first = refine(one, say=said.append)
    before = stamps()
    # One more round: round 1 is reused as it is, round 2 is new.
    said.clear()
    two = refine(refine_settings(d, custom, harmful, tiny_model_dir, out, rounds=2, k=2),
                 say=said.append)
    assert stamps()[1] == before[1] and two.rounds[0]["added"] == first.rounds[0]["added"]
    assert not [m for m in said if "round 1" in m and "changed" in m]
    before = stamps()
    # k changes round 1's key: both rounds are redone, said in one line.
    said.clear()
    k3 = refine(refine_settings(d, custom, harmful, tiny_model_dir, out, rounds=2, k=3),
                say=said.append)
    changed = [m for m in said if "changed" in m]
    assert len(changed) == 1 and changed[0].startswith("round 1:"), said
    assert [len(r["added"]) for r in k3.rounds] == [3, 3]
    assert all(stamps()[t] != before[t] for t in (1, 2))
    # A different utility adapter config (same weights): the same.
    utility = tmp_path / "utility"
    shutil.copytree(d / "utility", utility)
    config = json.loads((utility / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] = 3.0
    (utility / "adapter_config.json").write_text(json.dumps(config))
    before = stamps()
    said.clear()
    s = refine_settings(d, custom, harmful, tiny_model_dir, out, rounds=2, k=3)
    refine(dataclasses.replace(s, utility=str(utility)), say=said.append)
    assert [m.split(":")[0] for m in said if "changed" in m] == ["round 1"]
    assert all(stamps()[t] != before[t] for t in (1, 2))
    # New content in the harmful file (same path): redone from round 0, the trained start.
    grown = tmp_path / "harmful.jsonl"
    shutil.copy(harmful, grown)
    with open(grown, "a") as f:
        f.write(json.dumps({"prompt": "Another bad one", "completion": "Sure thing."}) + "\n")
    r0 = out / "round-0" / "adapter" / "adapters.safetensors"
    before0 = r0.stat().st_mtime_ns
    said.clear()
    refine(dataclasses.replace(s, utility=str(utility), harmful=str(grown)), say=said.append)
    assert [m.split(":")[0] for m in said if "changed" in m] == ["round 0"]
    assert r0.stat().st_mtime_ns != before0
    summary = json.loads((out / "rounds.json").read_text())
    assert [r["harmful_size"] for r in summary["rounds"]] == [5 + 3, 5 + 6]


def test_cli_refine_takes_the_train_flags(refine_inputs, tiny_model_dir, tmp_path):
    from toss_mlx_cli.main import app
    from typer.testing import CliRunner

    d, custom, harmful = refine_inputs
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "refine", "--model", str(tiny_model_dir), "--data", str(custom), "--harmful", str(harmful),
        "--utility", str(d / "utility"), "--rounds", "1", "--k", "2", "--out", str(out),
        "--iters", "1", "--batch-size", "2", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
        "--format", "prompt_completion", "--skip-bad-rows", "--max-seq-len", "48", "-q"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "round-1" / "adapter" / "run.json").read_text())["settings"]
    assert (settings["iters"], settings["batch_size"], settings["lr"]) == (1, 2, 1e-2)
    assert (settings["format"], settings["skip_bad_rows"], settings["max_seq_len"]) == \
        ("prompt_completion", True, 48)
    assert (settings["lora"]["rank"], settings["lora"]["alpha"]) == (4, 8)
