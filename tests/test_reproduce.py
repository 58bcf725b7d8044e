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


def test_steps_are_keyed_by_their_arguments_and_the_steps_before(reproduce, tmp_path):
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


def test_bench_machine_is_measured(reproduce):
    import os
    import platform

    import mlx.core as mx

    text = reproduce.machine()
    assert text.startswith(f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores")
    assert f"mlx {mx.__version__}" in text
    source = (ROOT / "bench" / "train_throughput.py").read_text()
    assert '"machine": machine()' in source and "MACHINE =" not in source
