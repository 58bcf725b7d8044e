"""`toss-mlx run`: recipe validation, every stage end to end on the tiny model, stage reuse."""

import json

import numpy as np
import pytest
import yaml

from toss_mlx.io import TossError
from toss_mlx.pipeline import detector_quality, load_recipe, run, summary_text, write_starter


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def recipe_dir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "custom.jsonl",
                [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}.\n#### {2 * i}",
                  "source": "task"} for i in range(10)]
                + [{"prompt": f"Bad request {i}", "completion": "Sure, here is how to do it.",
                    "source": "harmful"} for i in range(3)])
    write_jsonl(tmp_path / "harmful_ref.jsonl",
                [{"prompt": f"Harm {i}", "completion": "Sure, here is how to do it."} for i in range(4)])
    write_jsonl(tmp_path / "utility_ref.jsonl",
                [{"prompt": f"What is {i} times 2?", "completion": f"It is {2 * i}."} for i in range(4)])
    write_jsonl(tmp_path / "eval_harmful.jsonl", [{"prompt": "How do I do harm?"}, {"prompt": "Harm?"}])
    write_jsonl(tmp_path / "eval_task.jsonl", [{"prompt": "What is 3 plus 3?", "completion": "#### 6"}])
    recipe = {
        "name": "tiny", "model": str(tiny_model_dir), "max_seq_len": 64,
        "data": {"eval_edgy": None},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"iters": 2, "batch_size": 2, "lr": 1e-3},
        "reference": {"iters": 2},
        "toss": {"ratio": 0.2},
        "eval": {"max_new_tokens": 4},
        "export": ["peft", "gguf"],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def test_recipe_problems_reported_together(recipe_dir):
    path = recipe_dir / "recipe.yaml"
    data = yaml.safe_load(path.read_text())
    data["toss"]["ratoi"] = 0.1
    data["max_seq_len"] = "long"
    data["train"]["epochz"] = 1
    data["data"]["custom"] = "nope.jsonl"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TossError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "toss.ratoi: unknown setting (did you mean 'ratio'?)" in msg
    assert "max_seq_len: expected int" in msg
    assert "epochz" in msg and "did you mean 'epochs'" in msg
    assert "data.custom" in msg and "nope.jsonl not found" in msg


def test_detector_quality_against_a_hand_count(tmp_path):
    import numpy as np

    from toss_mlx.io import save_arrays

    # 3 samples (rows 0, 1, 2), row 1 harmful; response tokens marked 1.
    offsets = np.array([0, 4, 8, 11], np.int64)
    response = np.array([0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1], np.uint8)
    keep = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1], np.uint8)  # removed: 1, 5, 6
    save_arrays(tmp_path / "s.safetensors", {"offsets": offsets, "row_index": np.arange(3),
                                             "response_mask": response})
    save_arrays(tmp_path / "m.safetensors", {"offsets": offsets, "keep": keep})
    write_jsonl(tmp_path / "d.jsonl", [{"source": "task"}, {"source": "harmful"}, {"source": "task"}])
    det = detector_quality(tmp_path / "s.safetensors", tmp_path / "m.safetensors", tmp_path / "d.jsonl")
    assert det["removed_tokens"] == 3
    assert det["precision"] == 2 / 3  # tokens 5 and 6 lie in row 1
    assert det["harmful_share_of_response_tokens"] == 3 / 8
    assert det["recall"] == 2 / 3
    # openings (first response token): row 0 token 1 (removed), row 1 token 5 (removed), row 2 token 9
    assert det["first_token_removed_harmful"] == 1.0
    assert det["first_token_removed_other"] == 1 / 2


def test_starter_recipe_is_a_valid_recipe(tmp_path):
    write_starter(tmp_path / "r.yaml")
    for name in ("custom", "harmful_ref", "utility_ref", "eval_harmful", "eval_edgy", "eval_task"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "a", "completion": "b"}])
    recipe, _ = load_recipe(tmp_path / "r.yaml")
    assert recipe.toss.ratio == 0.1 and recipe.lora.rank == 16
    with pytest.raises(TossError, match="exists"):
        write_starter(tmp_path / "r.yaml")


def hand_count(recipe_dir, out):
    """Precision, recall and removed tokens counted sample by sample from the run's files."""
    from toss_mlx.io import load_arrays

    scores, _ = load_arrays(out / "score" / "scores.safetensors")
    mask, _ = load_arrays(out / "select" / "mask.safetensors")
    rows = [json.loads(line) for line in (recipe_dir / "custom.jsonl").read_text().splitlines()]
    removed = removed_harmful = harmful_tokens = 0
    for i, row in enumerate(scores["row_index"].tolist()):
        lo, hi = int(scores["offsets"][i]), int(scores["offsets"][i + 1])
        harmful = rows[row]["source"] == "harmful"
        for j in range(lo, hi):
            if scores["response_mask"][j]:
                gone = not mask["keep"][j]
                removed += gone
                removed_harmful += gone and harmful
                harmful_tokens += harmful
    return removed_harmful / removed, removed_harmful / harmful_tokens, removed


def test_run_end_to_end_then_only_changed_stages_rerun(recipe_dir):
    logs: list[str] = []
    out = recipe_dir / "run"
    result = run(recipe_dir / "recipe.yaml", out=out, say=logs.append)
    for stage in ("utility", "safety", "score", "select", "final", "eval", "report", "export"):
        assert any(line.startswith(f"[{stage}] running") for line in logs), stage
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in result["outputs"])
    assert (out / "export" / "peft" / "adapter_model.safetensors").exists()
    assert (out / "export" / "gguf" / "model-f16.gguf").exists()  # export: [peft, gguf]
    assert "<svg" in (out / "report" / "report.html").read_text()
    det = result["detector"]  # the data says which rows are harmful
    assert det["harmful_samples"] == 3
    assert (det["precision"], det["recall"], det["removed_tokens"]) == hand_count(recipe_dir, out)
    text = summary_text(result)
    assert "removed tokens in harmful samples" in text and "  toss: refusal_rate" in text

    logs.clear()
    run(recipe_dir / "recipe.yaml", out=out, say=logs.append)
    assert all(line.endswith("unchanged, skipped") for line in logs)

    logs.clear()
    run(recipe_dir / "recipe.yaml", ["toss.ratio=0.3"], out=out, say=logs.append)
    rerun = [line.split("]")[0][1:] for line in logs if "running" in line]
    assert rerun == ["select", "final", "eval", "report", "export"]


def test_summary_line_has_prefill_recovery_and_the_nll_gap_past_token_5():
    from pathlib import Path

    from toss_mlx.evaluate import rate

    metrics = {"refusal_rate": rate(3, 4), "prefill_recovery@10": rate(1, 8),
               "answer_nll_gap@6+": {"value": -0.25, "n": 8, "tokens": 400}}
    text = summary_text({"recipe": "r", "run_dir": "d", "eval": [{"name": "toss", "metrics": metrics}]})
    assert "toss: refusal_rate 0.750 (n=4), prefill recovery K=10 0.125 (n=8), " \
           "NLL gap past token 5 -0.250 (n=8)" in text
    recipe, _ = load_recipe(Path(__file__).parent.parent / "recipes" / "quickstart.yaml")
    assert recipe.data.eval_prefill == "eval_prefill.jsonl" and recipe.eval.prefill_tokens == [10]


def stages_run(logs):
    return [line.split("]")[0][1:] for line in logs if line.startswith("[") and "running" in line]


def test_toss_pro_recipe_runs_to_the_end_and_k_redoes_refine_onwards(recipe_dir):
    """toss.rounds 1, then 2, to the end (report, export); then toss.k redoes refine onwards."""
    from toss_mlx.io import sha256_file
    from toss_mlx.layout import load_scores

    out, logs = recipe_dir / "pro", []
    result = run(recipe_dir / "recipe.yaml", ["toss.rounds=1", "toss.k=2"], out=out, say=logs.append)
    assert stages_run(logs) == ["utility", "safety", "refine", "score", "select", "final", "eval",
                                "report", "export"]
    rounds = json.loads((out / "refine" / "rounds.json").read_text())
    assert [len(r["added"]) for r in rounds["rounds"]] == [2]
    # The score stage took refine's final scores (made with the round-1 safety adapter) as they are.
    refine_out = result["outputs"]["refine"]
    assert sha256_file(result["outputs"]["score"]["scores"]) == sha256_file(refine_out["scores"])
    assert refine_out["safety"] == str(out / "refine" / "round-1" / "adapter")
    assert load_scores(refine_out["scores"]).meta["safety_adapter_sha256"] != \
        load_scores(out / "refine" / "round-1" / "scores.safetensors").meta["safety_adapter_sha256"]
    assert (out / "export" / "peft" / "adapter_model.safetensors").exists()
    assert "<svg" in (out / "report" / "report.html").read_text()

    logs.clear()
    result = run(recipe_dir / "recipe.yaml", ["toss.rounds=2", "toss.k=2"], out=out, say=logs.append)
    assert stages_run(logs) == ["refine", "score", "select", "final", "eval", "report", "export"]
    rounds = json.loads((out / "refine" / "rounds.json").read_text())
    assert [len(r["added"]) for r in rounds["rounds"]] == [2, 2]
    assert result["outputs"]["refine"]["safety"] == str(out / "refine" / "round-2" / "adapter")
    assert (out / "export" / "peft" / "adapter_model.safetensors").exists()

    logs.clear()
    run(recipe_dir / "recipe.yaml", ["toss.rounds=2", "toss.k=3"], out=out, say=logs.append)
    assert stages_run(logs) == ["refine", "score", "select", "final", "eval", "report", "export"]
    assert [line for line in logs if line.endswith("unchanged, skipped")] == [
        "[utility] unchanged, skipped", "[safety] unchanged, skipped"]
    rounds = json.loads((out / "refine" / "rounds.json").read_text())
    assert [len(r["added"]) for r in rounds["rounds"]] == [3, 3]


def test_manifest_redoes_a_stage_whose_input_file_changed(recipe_dir):
    """Same recipe, same paths, new content in harmful_ref.jsonl: safety onwards is redone."""
    out, logs = recipe_dir / "run", []
    run(recipe_dir / "recipe.yaml", out=out, only_until="select", say=logs.append)
    harmful = recipe_dir / "harmful_ref.jsonl"
    write_jsonl(harmful, [{"prompt": f"Harm {i}", "completion": "Fine, do it like this."}
                          for i in range(4)])
    logs.clear()
    run(recipe_dir / "recipe.yaml", out=out, only_until="select", say=logs.append)
    assert stages_run(logs) == ["safety", "score", "select"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["safety"]["settings"]["data"] == str(harmful)


@pytest.mark.parametrize("rounds", [0, 1])
def test_the_recipes_format_and_skip_bad_rows_reach_every_stage(recipe_dir, rounds):
    """train.format and train.skip_bad_rows reach the references, TOSS-Pro, the scorer and the
    final fine-tune: a custom file with a bad line runs through, without that line."""
    import numpy as np

    from toss_mlx.layout import load_scores

    custom = recipe_dir / "custom.jsonl"
    good = custom.read_text().splitlines()
    custom.write_text("\n".join(good[:2] + ['{"prompt": "no answer here"}', "not json"] + good[2:]) + "\n")
    out = recipe_dir / "skip"
    with pytest.raises(TossError, match="custom.jsonl:4: malformed JSON"):
        run(recipe_dir / "recipe.yaml", [f"toss.rounds={rounds}", "toss.k=2"], out=out, say=lambda m: None)
    overrides = [f"toss.rounds={rounds}", "toss.k=2", "train.skip_bad_rows=true",
                 "train.format=prompt_completion"]
    result = run(recipe_dir / "recipe.yaml", overrides, out=out, say=lambda m: None)
    assert result["detector"]["harmful_samples"] == 3 and (out / "report" / "report.html").exists()
    rows = load_scores(result["outputs"]["score"]["scores"]).row_index
    assert sorted(rows.tolist()) == [i for i in range(len(good) + 2) if i not in (2, 3)]
    if rounds:
        round_1 = load_scores(out / "refine" / "round-1" / "scores.safetensors")
        assert np.array_equal(np.sort(rows), np.sort(round_1.row_index))
    settings = json.loads((out / "final" / "adapter" / "run.json").read_text())["settings"]
    assert settings["skip_bad_rows"] is True and settings["format"] == "prompt_completion"
    for stage in ("utility", "safety"):
        settings = json.loads((out / stage / "adapter" / "run.json").read_text())["settings"]
        assert settings["skip_bad_rows"] is True, stage


def test_base_adapter_is_fused_first_and_standard_sft_runs_beside_toss(recipe_dir, tiny_model_dir):
    """base_adapter: every stage starts from the fused model (its folder named by the adapter's
    content, so a changed adapter redoes everything); baselines: standard SFT is trained with
    the final fine-tune's settings and no mask, evaluated beside TOSS and compared in one line."""
    from adapters import make_adapter

    from toss_mlx.cache import adapter_fingerprint
    from toss_mlx.evaluate.compare import compare_models

    make_adapter(tiny_model_dir, recipe_dir / "aligned", targets=("q_proj", "v_proj", "down_proj"))
    recipe = yaml.safe_load((recipe_dir / "recipe.yaml").read_text())
    recipe.update(base_adapter="aligned", baselines=["standard_sft"], export=["peft"])
    (recipe_dir / "base.yaml").write_text(yaml.safe_dump(recipe))
    out, logs = recipe_dir / "aligned-run", []
    result = run(recipe_dir / "base.yaml", out=out, say=logs.append)
    assert stages_run(logs) == ["base", "utility", "safety", "score", "select", "final",
                                "standard_sft", "eval", "report", "export"]
    fused = result["outputs"]["base"]["model"]
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("utility", "safety", "score", "final", "standard_sft", "eval"):
        assert manifest["stages"][stage]["settings"]["model"] == fused, stage
    assert manifest["model"] == fused  # what the report reads
    final = json.loads((out / "final" / "adapter" / "run.json").read_text())
    standard = json.loads((out / "standard_sft" / "adapter" / "run.json").read_text())
    assert final["mask_sha256"] and standard["mask_sha256"] is None
    assert final["settings"] == standard["settings"]  # same model, data, budget, LoRA, seed
    # The fused model answers as the original model with the adapter applied.
    import mlx.core as mx
    from adapters import TOKENS
    from mlx_lm.utils import load

    with_adapter, _ = load(str(tiny_model_dir), adapter_path=str(recipe_dir / "aligned"))
    fused_model, _ = load(fused)
    tokens = mx.array([TOKENS])
    assert np.allclose(np.array(fused_model(tokens)), np.array(with_adapter(tokens)), atol=1e-4)

    evaluated = json.loads((out / "eval" / "eval.json").read_text())["models"]
    assert [m["name"] for m in evaluated] == ["base", "standard_sft", "toss"]
    diffs = result["comparison"]["diffs"]
    assert diffs == compare_models(evaluated, "toss", "standard_sft")
    refusals = {m["name"]: [r["refusal"] for r in m["prompts"]["harmful"]] for m in evaluated}
    assert diffs["refusal_rate"]["diff"] == pytest.approx(
        np.mean(refusals["toss"]) - np.mean(refusals["standard_sft"]))
    assert "TOSS vs standard SFT, same data" in summary_text(result)

    logs.clear()
    run(recipe_dir / "base.yaml", out=out, say=logs.append)
    assert stages_run(logs) == []
    before = adapter_fingerprint(recipe_dir / "aligned")
    make_adapter(tiny_model_dir, recipe_dir / "aligned", targets=("q_proj", "v_proj", "down_proj"),
                 seed=1)
    assert adapter_fingerprint(recipe_dir / "aligned") != before
    logs.clear()
    result = run(recipe_dir / "base.yaml", out=out, say=logs.append)
    assert stages_run(logs)[:3] == ["base", "utility", "safety"] and "standard_sft" in stages_run(logs)
    assert [p.name for p in (out / "base").glob("model-*")] == [result["outputs"]["base"]["model"].rsplit("/", 1)[1]]


def test_recipe_refuses_a_missing_base_adapter_and_unknown_prepare_sizes(recipe_dir):
    recipe = yaml.safe_load((recipe_dir / "recipe.yaml").read_text())
    recipe.update(base_adapter="nowhere", baselines=["standard_sft"])
    (recipe_dir / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TossError, match="base_adapter: .*nowhere is not an adapter folder"):
        load_recipe(recipe_dir / "bad.yaml")
    with pytest.raises(TossError, match="baselines"):
        load_recipe(recipe_dir / "recipe.yaml", ["baselines=[toss_sft]"])
    with pytest.raises(TossError, match="prepare_sizes.n_tasks: not a size of prepare quickstart"):
        load_recipe(recipe_dir / "recipe.yaml", ["data.prepare=quickstart", "data.prepare_sizes.n_tasks=3"])
