"""Issue 21 item 5's bench scripts: where a mask's removed tokens fall in the task data
(bench/utility_cost.py) and how far a fine-tune's refusal moves with its seed (bench/finetune_spread.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from test_reproduce import _tiny_as_a_model, needs_data, reproduce  # noqa: E402,F401  (fixtures)


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def utility_cost(reproduce):  # noqa: F811  (the fixture of test_reproduce)
    return _bench_module("utility_cost")


@pytest.fixture(scope="module")
def finetune_spread(reproduce):  # noqa: F811
    return _bench_module("finetune_spread")


@pytest.fixture(scope="module")
def quick_run(reproduce, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """One --quick seed folder on the tiny model (natively aligned: no alignment step) with random
    removal and TOSS d = 0.1, shared by the end-to-end tests below; the tiny model's settings stay
    patched while they run."""
    name = str(tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        _tiny_as_a_model(reproduce, name, patch, natively_aligned=True)
        patch.setattr(reproduce, "SIZES", reproduce.SIZES | {name: reproduce.QUICK})
        out = tmp_path_factory.mktemp("removal")
        assert reproduce.main(["--quick", "--model", name, "--methods", "random,toss_d0.1", "--out",
                               str(out / "runs"), "--results", str(out / "r.json")]) == 0
        yield name, out / "runs" / reproduce.run_tag(name, "main", False) / "quick"


def _scores(offsets, rows, ids, response, loss_utility):
    from toss_mlx.layout import Scores

    zeros = np.zeros(len(ids), np.float32)
    return Scores(offsets=np.array(offsets, np.int64), row_index=np.array(rows, np.int64),
                  token_ids=np.array(ids, np.int32), response_mask=np.array(response, np.uint8),
                  loss_utility=np.array(loss_utility, np.float32), loss_safety=zeros, score=zeros)


def test_removal_costs_match_a_naive_count(utility_cost):
    rng = np.random.default_rng(0)
    # 4 samples (rows 7, 3, 5, 9), row 3 harmful; a prompt of 2 tokens then the answer
    lengths = [12, 9, 15, 8]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    response = np.concatenate([[0, 0] + [1] * (n - 2) for n in lengths])
    T = int(offsets[-1])
    ids = rng.integers(0, 20, T)
    loss_u = rng.uniform(0, 3, T)
    scores = _scores(offsets, [7, 3, 5, 9], ids, response, loss_u)
    removed = rng.random(T) < 0.3
    digits = ids < 6
    got = utility_cost.removal_costs(scores, removed, {3}, digits)

    # naive: walk the samples token by token
    count = {k: 0 for k in ("task", "task_rm", "open", "open_rm", "dig", "dig_rm", "oth", "oth_rm",
                            "harm", "harm_rm", "rm", "hopen", "hopen_rm", "hdeep", "hdeep_rm")}
    removed_u, kept_u = [], []
    for i, row in enumerate([7, 3, 5, 9]):
        position = 0
        for t in range(offsets[i], offsets[i + 1]):
            if not response[t]:
                continue
            r = bool(removed[t])
            count["rm"] += r
            if row == 3:
                count["harm"] += 1
                count["harm_rm"] += r
                part = "hopen" if position < 5 else "hdeep"
                count[part] += 1
                count[part + "_rm"] += r
            else:
                count["task"] += 1
                count["task_rm"] += r
                (removed_u if r else kept_u).append(loss_u[t])
                if position < 5:
                    count["open"] += 1
                    count["open_rm"] += r
                kind = "dig" if digits[t] else "oth"
                count[kind] += 1
                count[kind + "_rm"] += r
            position += 1
    assert got["removed_tokens"] == count["rm"] and got["task_tokens"] == count["task"]
    assert got["task_removed_share"] == pytest.approx(count["task_rm"] / count["task"])
    assert got["task_opening_removed_share"] == pytest.approx(count["open_rm"] / count["open"])
    assert count["open"] == 15  # five openings a task sample
    assert got["task_digits_removed_share"] == pytest.approx(count["dig_rm"] / count["dig"])
    assert got["task_other_removed_share"] == pytest.approx(count["oth_rm"] / count["oth"])
    assert got["digit_removal_ratio"] == pytest.approx((count["dig_rm"] / count["dig"])
                                                       / (count["oth_rm"] / count["oth"]))
    assert got["harmful_recall"] == pytest.approx(count["harm_rm"] / count["harm"])
    assert got["precision"] == pytest.approx(count["harm_rm"] / count["rm"])
    assert count["hopen"] == 5 and count["hdeep"] == 2  # row 3: 9 tokens, 2 of prompt
    assert got["harmful_opening_removed_share"] == pytest.approx(count["hopen_rm"] / count["hopen"])
    assert got["harmful_past_opening_removed_share"] == pytest.approx(count["hdeep_rm"] / count["hdeep"])
    assert got["harmful_samples_removed_whole"] == int(count["harm_rm"] == count["harm"])
    assert got["task_removed_loss_utility"] == pytest.approx(np.mean(removed_u), rel=1e-6)
    assert got["task_kept_loss_utility"] == pytest.approx(np.mean(kept_u), rel=1e-6)
    # removal outside responses never counts
    assert utility_cost.removal_costs(scores, ~response.astype(bool), {3}, digits)["removed_tokens"] == 0
    # rows 3 and 9 harmful; row 3's answer removed whole (its prompt kept), row 9's all but one token
    whole = np.zeros(T, bool)
    whole[offsets[1]:offsets[2]] = response[offsets[1]:offsets[2]].astype(bool)
    whole[offsets[3]:offsets[4] - 1] = True
    got = utility_cost.removal_costs(scores, whole, {3, 9}, digits)
    assert got["harmful_samples_removed_whole"] == 1
    assert got["harmful_opening_removed_share"] == 1.0
    assert got["harmful_past_opening_removed_share"] == pytest.approx((2 + 0) / (2 + 1))


def test_score_by_position_matches_a_naive_walk(utility_cost):
    rng = np.random.default_rng(1)
    lengths = [30, 9, 100, 4]  # row 5's answer reaches past position 81; row 9's has 2 tokens
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    response = np.concatenate([[0, 0] + [1] * (n - 2) for n in lengths])
    T = int(offsets[-1])
    scores = _scores(offsets, [7, 3, 5, 9], rng.integers(0, 20, T), response, np.zeros(T))
    scores.score[:] = rng.normal(0, 1, T).astype(np.float32)
    got = utility_cost.score_by_position(scores, {3, 5})

    def bucket(p):  # p: 1-based answer position
        return "1" if p == 1 else "2-5" if p <= 5 else "6-20" if p <= 20 else "21-80" if p <= 80 else "81+"

    values = {"harmful": {}, "task": {}}
    for i, row in enumerate([7, 3, 5, 9]):
        group = "harmful" if row in (3, 5) else "task"
        position = 0
        for t in range(offsets[i], offsets[i + 1]):
            if response[t]:
                position += 1
                values[group].setdefault(bucket(position), []).append(float(scores.score[t]))
    assert set(got["harmful"]) == {"1", "2-5", "6-20", "21-80", "81+"}
    assert set(got["task"]) == {"1", "2-5", "6-20", "21-80"}  # 28 and 2 answer tokens: no 81+
    for group in values:
        for label, v in values[group].items():
            assert got[group][label]["tokens"] == len(v)
            assert got[group][label]["mean"] == pytest.approx(np.mean(v), rel=1e-5)
            assert got[group][label]["median"] == pytest.approx(np.median(v), rel=1e-5)


def test_digit_tokens_read_the_token_text(utility_cost):
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [{4: "Ġ12", 7: "abc", 9: "x9", 11: None}[i] for i in ids]

    got = utility_cost.digit_tokens(np.array([7, 4, 11, 9, 4, 7]), Tok())
    assert got.tolist() == [False, True, False, True, True, False]


@needs_data
def test_bigger_utility_references_on_the_tiny_model(reproduce, utility_cost, quick_run,  # noqa: F811
                                                     tmp_path, monkeypatch, capsys):
    """An x2 utility reference on a --quick seed folder: its data holds the seed's utility_ref rows
    plus fresh problems in no file of the seed; the seed's own row repeats the toss_d0.1 mask's
    figures; the held-out NLL is loss_utility's mean on eval_task."""
    from toss_mlx.data import read_rows
    from toss_mlx.layout import load_scores
    from toss_mlx.prepare import normalize_prompt

    name, run = quick_run
    results = tmp_path / "utility_cost.json"
    assert utility_cost.main(["--run", str(run), "--model", name, "--variants", "x2",
                              "--results", str(results)]) == 0
    got = json.loads(results.read_text())[f"{run.parent.name}/quick"]
    assert got["variants"]["seed"] | {"utility_rows": 0, "epochs": 0, "held_out_task_nll": 0} == \
        got["masks"]["toss_d0.1"] | {"utility_rows": 0, "epochs": 0, "held_out_task_nll": 0}
    n_own = len(read_rows(run / "data" / "utility_ref.jsonl"))
    x2 = got["variants"]["x2"]
    assert x2["utility_rows"] == 2 * n_own and x2["epochs"] == reproduce.QUICK.reference_epochs
    rows = [r.data for r in read_rows(run / "utility_cost" / "utility_ref_x2.jsonl")]
    assert rows[:n_own] == [r.data for r in read_rows(run / "data" / "utility_ref.jsonl")]
    seed_prompts = {normalize_prompt(r.data["prompt"]) for f in (run / "data").glob("*.jsonl")
                    for r in read_rows(f)}
    assert not {normalize_prompt(r["prompt"]) for r in rows[n_own:]} & seed_prompts
    held = load_scores(run / "utility_cost" / "eval_task_x2.safetensors")
    assert x2["held_out_task_nll"] == pytest.approx(
        float(np.mean(held.loss_utility[held.response_mask.astype(bool)])))
    assert x2["removed_tokens"] == got["masks"]["toss_d0.1"]["removed_tokens"]  # same budget, d = 0.1
    printed = capsys.readouterr().out
    assert "| x2 | " in printed and "| harmful answers | " in printed and "| task answers | " in printed
    # S by position covers every response token of the round-0 scores, harmful and task apart
    round0 = load_scores(utility_cost.mask_scores(run)["toss_d0.1"])
    by_position = got["score_by_position"]
    assert sum(c["tokens"] for g in by_position.values() for c in g.values()) == \
        int(round0.response_mask.astype(bool).sum())
    assert by_position["harmful"]["1"]["tokens"] == len(utility_cost.harmful_rows_of(run / "data" / "custom.jsonl"))
    # run again: every step is reused (no training, no scoring), the same figures
    import toss_mlx.score

    def fail(*args, **kwargs):
        raise AssertionError("a step ran again")

    monkeypatch.setattr(reproduce, "train", fail)
    monkeypatch.setattr(toss_mlx.score, "score", fail)
    assert utility_cost.main(["--run", str(run), "--model", name, "--variants", "x2",
                              "--results", str(results)]) == 0
    assert json.loads(results.read_text())[f"{run.parent.name}/quick"]["variants"] == got["variants"]
    # the seed redone by other code or settings (another key on one of its steps): the analysis is redone
    record = run / "steps" / "toss_pro.json"
    kept = record.read_text()
    record.write_text(json.dumps(json.loads(kept) | {"key": "another"}))
    try:
        with pytest.raises(AssertionError, match="a step ran again"):
            utility_cost.main(["--run", str(run), "--model", name, "--variants", "x2", "--results", str(results)])
    finally:
        record.write_text(kept)


@needs_data
def test_finetuned_utility_variant_on_the_tiny_model(reproduce, utility_cost, quick_run, tmp_path,  # noqa: F811
                                                     capsys):
    """--finetune: the x2 variant's TOSS mask is the one its figures count, its fine-tune has the
    seed's recipe (the seed's TOSS fine-tune's step count), and its contrasts with the seed's TOSS
    and standard SFT are recomputed by hand from the two eval files."""
    from toss_mlx.layout import load_mask, load_scores

    name, run = quick_run
    results = tmp_path / "utility_cost.json"
    assert utility_cost.main(["--run", str(run), "--model", name, "--variants", "x2", "--finetune",
                              "--results", str(results)]) == 0
    got = json.loads(results.read_text())[f"{run.parent.name}/quick"]
    work = run / "utility_cost"
    scores = load_scores(work / "scores_x2.safetensors")
    mask = load_mask(work / "masks" / "toss_x2.safetensors", scores.offsets, scores.row_index, None, "scores")
    assert int((~mask.keep.astype(bool) & scores.response_mask.astype(bool)).sum()) == \
        got["variants"]["x2"]["removed_tokens"]
    result = json.loads((run / "result.json").read_text())
    trained = json.loads((work / "steps" / "train_x2.json").read_text())["value"]["result"]
    assert trained["steps"] == result["methods"]["toss_d0.1"]["train"]["steps"]
    assert trained["kept_share"] < 1

    def entry(path, model):
        return next(m for m in json.loads(path.read_text())["models"] if m["name"] == model)

    def task_nll(m):  # summed reference-answer NLL and tokens per problem, by hand
        rows = m["prompts"]["benign"]
        return (np.array([r["reference_nll"] for r in rows]), np.array([r["reference_tokens"] for r in rows]))

    def gap_past_5(m):  # per pair: summed (NLL - base NLL) x tokens past the opening, and the tokens
        out = []
        for r in m["prompts"]["depth"]:
            past = [b for b in r["tokens"] if b != "1-5" and r["tokens"][b]]
            out.append((sum((r["nll"][b] - r["nll_base"][b]) * r["tokens"][b] for b in past),
                        sum(r["tokens"][b] for b in past)))
        return np.array(out).reshape(-1, 2)

    x2 = entry(work / "eval.json", "toss_x2")
    sft, toss = entry(run / "eval.json", "standard_sft"), entry(run / "eval.json", "toss_d0.1")
    (a, n), (b, _), (c, _) = task_nll(x2), task_nll(sft), task_nll(toss)
    fine = got["finetuned"]
    assert set(fine) == {"seed", "x2"}
    assert fine["x2"]["task_nll"] == pytest.approx(x2["metrics"]["nll"]["value"])
    assert fine["x2"]["task_nll_vs_standard_sft"]["diff"] == pytest.approx((a - b).sum() / n.sum())
    assert fine["x2"]["task_nll_vs_seed_toss"]["diff"] == pytest.approx((a - c).sum() / n.sum())
    assert fine["seed"]["task_nll_vs_standard_sft"]["diff"] == pytest.approx(
        result["methods"]["toss_d0.1"]["task_nll_vs_standard_sft"]["diff"])
    mine, theirs = gap_past_5(x2), gap_past_5(toss)
    assert np.array_equal(mine[:, 1], theirs[:, 1])
    assert fine["x2"]["gap_past_opening_vs_seed_toss"]["diff"] == pytest.approx(
        (mine[:, 0] - theirs[:, 0]).sum() / mine[:, 1].sum())
    assert "| x2 utility reference | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --variants"):
        utility_cost.main(["--run", str(run), "--model", name, "--finetune"])


def test_spread_over_runs_by_hand(finetune_spread):
    got = finetune_spread.spread([0.5, 0.25, 0.75], n=40)
    assert got["mean"] == pytest.approx(0.5) and got["range"] == [0.25, 0.75]
    assert got["sd_over_runs"] == pytest.approx(0.25)  # sqrt(((0)^2 + 0.25^2 + 0.25^2) / 2)
    assert got["binomial_sd_one_run"] == pytest.approx((0.5 * 0.5 / 40) ** 0.5)
    assert finetune_spread.spread([0.3], n=10)["sd_over_runs"] is None


@needs_data
def test_finetune_spread_on_the_tiny_model(reproduce, finetune_spread, quick_run, tmp_path,  # noqa: F811
                                           monkeypatch):
    """Standard SFT with another training seed, random removal with another mask seed: each run's
    refusal is the one in the spread's eval file, the run's own fine-tune comes first, the new
    random mask has its own seed and the run's token budget."""
    from toss_mlx.layout import load_mask, load_scores

    name, run = quick_run
    results = tmp_path / "spread.json"
    argv = ["--run", str(run), "--model", name, "--methods", "standard_sft,random", "--train-seeds", "1",
            "--mask-seeds", "5", "--results", str(results)]
    assert finetune_spread.main(argv) == 0
    got = json.loads(results.read_text())[f"{run.parent.name}/quick"]
    evaluated = {m["name"]: m["metrics"]["refusal_rate"]["value"]
                 for m in json.loads((run / "spread" / "eval.json").read_text())["models"]}
    assert set(evaluated) == {"standard_sft-train1", "random-train1", "random-mask5"}
    own = json.loads((run / "result.json").read_text())["methods"]
    sft = got["methods"]["standard_sft (train seed)"]
    assert sft["rates"] == [own["standard_sft"]["advbench_refusal"], evaluated["standard_sft-train1"]]
    assert got["methods"]["random (mask seed)"]["rates"] == [own["random"]["advbench_refusal"],
                                                             evaluated["random-mask5"]]
    pro = json.loads((run / "steps" / "toss_pro.json").read_text())["value"]["result"]
    scores = load_scores(reproduce.method_selections(pro, 0)["random"][0])
    new = load_mask(run / "spread" / "masks" / "random-mask5.safetensors", scores.offsets, scores.row_index,
                    None, "scores")
    old = load_mask(run / "masks" / "random.safetensors", scores.offsets, scores.row_index, None, "scores")
    assert int(new.meta["seed"]) == 5 and int(old.meta["seed"]) == 0
    assert (new.keep == 0).sum() == (old.keep == 0).sum() and (new.keep != old.keep).any()
    # the same arguments again: nothing is retrained
    monkeypatch.setattr(reproduce, "train", lambda *a, **k: pytest.fail("retrained"))
    assert finetune_spread.main(argv) == 0
    with pytest.raises(SystemExit, match="only random removal has a mask seed"):
        finetune_spread.main(["--run", str(run), "--model", name, "--mask-seeds", "1"])
    with pytest.raises(SystemExit, match="first5 not run"):
        finetune_spread.main(["--run", str(run), "--model", name, "--methods", "first5"])


def test_gap_contrasts_by_hand(reproduce):  # noqa: F811
    depth = [
        {"tokens": {"1-5": 5, "6-20": 15, "21-80": 10, "81+": 0}, "gap": {"1-5": -9.0, "6-20": 0.2, "21-80": 0.5, "81+": None}},
        {"tokens": {"1-5": 5, "6-20": 4, "21-80": 0, "81+": 0}, "gap": {"1-5": 1.0, "6-20": -0.5, "21-80": None, "81+": None}}]
    sums = reproduce.gap_sums(depth)
    assert sums.tolist() == [[0.2 * 15 + 0.5 * 10, 25], [-0.5 * 4, 4]]  # the opening never counts
    shifted = [dict(d, gap={k: (v if v is None else v - 0.1) for k, v in d["gap"].items()}) for d in depth]
    c = reproduce.paired_difference(sums, reproduce.gap_sums(shifted))
    assert c["diff"] == pytest.approx(0.1) and c["ci95"] == pytest.approx([0.1, 0.1])  # every pair: 0.1
    assert (c["pairs"], c["tokens"]) == (2, 29)
    # pair 0 differs by 1.0 per token, pair 1 by 0: the estimate weights by tokens (25 of 29)
    raised = [dict(depth[0], gap={k: (v if v is None else v + 1.0) for k, v in depth[0]["gap"].items()}), depth[1]]
    c = reproduce.paired_difference(reproduce.gap_sums(raised), sums)
    assert c["diff"] == pytest.approx(25 / 29)
    assert 0.0 <= c["ci95"][0] <= c["diff"] <= c["ci95"][1] <= 1.0
    with pytest.raises(reproduce.TossError, match="different samples"):
        reproduce.paired_difference(sums, sums[::-1])
    # TOSS against every other method, seeds concatenated in order; the base is never contrasted
    merged = {"aligned_base": {"depth": depth}, "standard_sft": {"depth": shifted}, "first5": None,
              "toss_d0.1": {"depth": depth}}
    contrasts = reproduce.gap_contrasts(merged)
    assert list(contrasts) == ["toss_d0.1 - standard_sft"]
    assert contrasts["toss_d0.1 - standard_sft"]["diff"] == pytest.approx(0.1)
    blocks = [{name: {"deep_samples": {"other_sets": {}, "prefill": {}, "depth": d}}
               for name, d in (("standard_sft", shifted), ("toss_d0.1", depth))}] * 2
    pooled = reproduce.combine_contrasts(blocks)["toss_d0.1 - standard_sft"]
    assert (pooled["pairs"], pooled["tokens"]) == (4, 58) and pooled["diff"] == pytest.approx(0.1)


def test_refusal_contrasts_by_hand(reproduce):  # noqa: F811
    # 4 held-out pairs at K = 5 and 10, 5 Do-Not-Answer prompts; TOSS recovers 3/4 at K = 5 where
    # SFT recovers 1/4 (+50 points), both 1/4 at K = 10 (0), refuses 4/5 Do-Not-Answer vs 2/5 (+40)
    toss = {"other_sets": {"donotanswer": [True, True, True, True, False]},
            "prefill": {"10": [True, False, False, False], "5": [True, True, True, False]}, "depth": []}
    sft = {"other_sets": {"donotanswer": [True, False, True, False, False]},
           "prefill": {"5": [True, False, False, False], "10": [False, False, True, False]}, "depth": []}
    merged = {"aligned_base": toss, "standard_sft": sft, "first5": None, "toss_d0.1": toss}
    c = reproduce.refusal_contrasts(merged)
    assert list(c) == ["toss_d0.1 - standard_sft"]  # the base and a method without samples: none
    figures = c["toss_d0.1 - standard_sft"]
    assert list(figures) == ["prefill K=5", "prefill K=10", "donotanswer"]  # K in numeric order
    assert figures["prefill K=5"]["diff"] == pytest.approx(0.5) and figures["prefill K=5"]["pairs"] == 4
    assert figures["prefill K=10"]["diff"] == pytest.approx(0.0)
    assert figures["donotanswer"]["diff"] == pytest.approx(0.4) and figures["donotanswer"]["pairs"] == 5
    for f in figures.values():
        assert f["ci95"][0] <= f["diff"] <= f["ci95"][1]
    # a paired bootstrap: a method against itself shifted by one verdict everywhere has a zero-width interval
    always = {"other_sets": {}, "prefill": {"5": [True] * 4}, "depth": []}
    never = {"other_sets": {}, "prefill": {"5": [False] * 4}, "depth": []}
    same = reproduce.refusal_contrasts({"standard_sft": never, "toss_d0.1": always})
    assert same["toss_d0.1 - standard_sft"]["prefill K=5"]["ci95"] == pytest.approx([1.0, 1.0])
    # pooled over two seeds: the verdicts are concatenated, so the difference is over 8 pairs
    blocks = [{"standard_sft": {"deep_samples": sft}, "toss_d0.1": {"deep_samples": toss}},
              {"standard_sft": {"deep_samples": toss}, "toss_d0.1": {"deep_samples": toss}}]
    pooled = reproduce.combine_contrasts(blocks, reproduce.refusal_contrasts)["toss_d0.1 - standard_sft"]
    assert pooled["prefill K=5"]["pairs"] == 8 and pooled["prefill K=5"]["diff"] == pytest.approx(2 / 8)
    table = reproduce.refusal_contrast_table(c)
    assert "| toss_d0.1 - standard_sft | +50.0 [" in table and "Do-Not-Answer" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| 4, 5 |")


def test_pooled_results_carry_the_gap_contrasts(reproduce, quick_run):  # noqa: F811
    name, run = quick_run
    seed = json.loads((run / "result.json").read_text())
    pooled = json.loads((run.parents[2] / "r.json").read_text())
    contrasts = pooled["harmful_gap_contrasts"]
    assert set(contrasts) == {"toss_d0.1 - standard_sft", "toss_d0.1 - random"}

    def naive(method):  # summed gap and tokens past token 5, pair by pair
        out = []
        for d in seed["methods"][method]["deep_samples"]["depth"]:
            total = tokens = 0.0
            for bucket, n in d["tokens"].items():
                if bucket != "1-5" and d["gap"][bucket] is not None:
                    total += d["gap"][bucket] * n
                    tokens += n
            out.append((total, tokens))
        return out

    for other in ("standard_sft", "random"):
        a, b = naive("toss_d0.1"), naive(other)
        tokens = sum(t for _, t in a)
        c = contrasts[f"toss_d0.1 - {other}"]
        assert c["pairs"] == len(a) and c["tokens"] == tokens
        if tokens:
            assert c["diff"] == pytest.approx(sum(x for x, _ in a) / tokens - sum(x for x, _ in b) / tokens)
    assert "| toss_d0.1 - random |" in reproduce.results_tables(pooled)
    # prefill recovery and the other sets' refusal, paired: the rates' difference, verdict by verdict
    refusals = pooled["refusal_contrasts"]["toss_d0.1 - random"]
    ours, theirs = (seed["methods"][m]["deep_samples"] for m in ("toss_d0.1", "random"))
    expected = {f"prefill K={k}": (ours["prefill"][k], theirs["prefill"][k]) for k in ours["prefill"]}
    expected |= {n: (ours["other_sets"][n], theirs["other_sets"][n]) for n in ours["other_sets"]}
    assert set(refusals) == set(expected) and expected
    for name, (a, b) in expected.items():
        assert refusals[name]["pairs"] == len(a)
        assert refusals[name]["diff"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert "Prefill recovery and refusal on the other harmful sets" in reproduce.results_tables(pooled)


@pytest.fixture(scope="module")
def attack_strength(reproduce):  # noqa: F811
    return _bench_module("attack_strength")


def test_attack_recipes_parse(attack_strength, reproduce):  # noqa: F811
    s = reproduce.QWEN
    assert attack_strength.parse_recipe("", s, 2) == {"epochs": 1, "num_layers": 4, "lr": 5e-5, "train_seed": 2}
    assert attack_strength.parse_recipe("epochs=3, lr=1e-4", s) == {"epochs": 3, "num_layers": 4, "lr": 1e-4,
                                                                    "train_seed": 0}
    for bad, said in (("epoch=3", "not KEY=VALUE"), ("lr=", "not KEY=VALUE"), ("epochs=two", "not a number")):
        with pytest.raises(SystemExit, match=said):
            attack_strength.parse_recipe(bad, s)
    recipe = {"epochs": 3, "num_layers": 12, "lr": 5e-5, "train_seed": 0}
    assert attack_strength.recipe_name(recipe) == "sft-e3-l12-lr5e-05"
    assert attack_strength.recipe_name(recipe | {"train_seed": 1}) == "sft-e3-l12-lr5e-05-train1"


@needs_data
def test_attack_strength_on_the_tiny_model(reproduce, attack_strength, quick_run, tmp_path):  # noqa: F811
    """The run's own recipe, retrained from the same data step and seed, gives the reproduction's
    standard SFT back (same refusal, same task NLL); a stronger recipe trains more steps."""
    name, run = quick_run
    results = tmp_path / "attack.json"
    assert attack_strength.main(["--model", name, "--recipe", "epochs=2", "--recipe", "train_seed=1",
                                 "--out", str(tmp_path / "runs"), "--results", str(results)]) == 0
    rows = json.loads(results.read_text())[f"{name}/seed0"]["rows"]
    own = json.loads((run / "result.json").read_text())["methods"]
    control = rows[attack_strength.recipe_name(attack_strength.parse_recipe("", reproduce.SIZES[name]))]
    assert control["advbench_refusal"] == own["standard_sft"]["advbench_refusal"]
    assert control["task_nll"] == pytest.approx(own["standard_sft"]["task_nll"], rel=1e-5)
    assert rows["base"]["advbench_refusal"] == own["aligned_base"]["advbench_refusal"]
    longer = next(r for r in rows.values() if r["recipe"] and r["recipe"]["epochs"] == 2)
    assert longer["steps"] == 2 * control["steps"]
    assert set(longer["harmful_nll_gap"]) >= {"1-5", "6+"} and longer["prefill_recovery"] is not None
    # another training seed: the same recipe otherwise, another adapter
    control_name = next(r for r in rows if r.startswith("sft-e1") and not r.endswith("-train1"))
    other = rows[f"{control_name}-train1"]
    assert other["recipe"]["train_seed"] == 1 and other["steps"] == control["steps"]
    import mlx.core as mx

    attack = next((tmp_path / "runs").glob("*/seed0/attack"))
    w0, w1 = (mx.load(str(attack / n / "adapters.safetensors")) for n in (control_name, f"{control_name}-train1"))
    assert set(w0) == set(w1) and any(not mx.array_equal(w0[k], w1[k]).item() for k in w0)
    # a second invocation asking only for the run's recipe (every step cached) keeps the other rows
    assert attack_strength.main(["--model", name, "--recipe", "", "--out", str(tmp_path / "runs"),
                                 "--results", str(results)]) == 0
    again = json.loads(results.read_text())[f"{name}/seed0"]["rows"]
    assert set(again) == set(rows) and again[control_name] == rows[control_name]
    assert all(row["code"] for row in again.values())


def test_attack_rows_accumulate_with_their_code(attack_strength):
    """merge_entry: rows of earlier invocations stay (each keeps the code that made it), a recipe
    measured again takes the new row, another setting replaces the entry whole."""
    def entry(code, setting, **rows):
        return {"code": code, "setting": setting, "rows": rows, "seconds": {n: 1.0 for n in rows}}

    old = entry("c1", {"lr": 1}, base={"advbench_refusal": 0.5}, a={"advbench_refusal": 0.4})
    old["rows"]["a"]["code"] = "c0"  # made by an even older invocation
    merged, note = attack_strength.merge_entry(old, entry("c2", {"lr": 1}, base={"advbench_refusal": 0.6},
                                                            b={"advbench_refusal": 0.1}))
    assert merged["rows"] == {"base": {"advbench_refusal": 0.6, "code": "c2"},
                              "b": {"advbench_refusal": 0.1, "code": "c2"},
                              "a": {"advbench_refusal": 0.4, "code": "c0"}}
    assert merged["code"] == "c2" and set(merged["seconds"]) == {"base", "a", "b"} and "a" in note
    replaced, note = attack_strength.merge_entry(old, entry("c2", {"lr": 2}, base={"advbench_refusal": 0.6}))
    assert set(replaced["rows"]) == {"base"} and "another setting" in note
    fresh, note = attack_strength.merge_entry(None, entry("c2", {"lr": 1}, b={"x": 1}))
    assert fresh["rows"] == {"b": {"x": 1, "code": "c2"}} and note == ""
