"""Bad recipes through the real CLI: exit code 2, one line naming the problem, no traceback,
and nothing written anywhere (no run folder, no adapter), since the whole recipe is
checked before any compute."""

import json
import os

import pytest
import yaml
from toss_mlx_cli.main import app
from typer.testing import CliRunner


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def workdir(tmp_path, monkeypatch, tiny_model_dir):
    """A recipe folder with 13 custom rows; the current folder, so runs/<name> would land here."""
    write_jsonl(tmp_path / "custom.jsonl",
                [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(13)])
    for name in ("harmful_ref", "utility_ref"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    recipe = {"name": "tiny", "model": str(tiny_model_dir), "max_seq_len": 64,
              "data": {"eval_harmful": None, "eval_edgy": None, "eval_task": None},
              "train": {"iters": 1}, "toss": {"ratio": 0.2}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def refused(workdir, changes, *extra):
    """Run `toss-mlx run` on the recipe with `changes`; return its one-line message."""
    recipe = yaml.safe_load((workdir / "recipe.yaml").read_text())
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = snapshot(workdir)
    result = CliRunner().invoke(app, ["run", str(workdir / "recipe.yaml"), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped error
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert snapshot(workdir) == before  # nothing written, not even the run folder
    return lines[0]


def test_misspelled_strategy_stops_before_training(workdir):
    line = refused(workdir, {"toss.strategy": "tosss"})
    assert "recipe.yaml: invalid recipe: toss: unknown strategy 'tosss'" in line


def test_more_toss_pro_samples_than_data(workdir):
    line = refused(workdir, {"toss.rounds": 2, "toss.k": 7})
    assert "toss: k=7 x rounds=2 is more than the 13 samples of data.custom" in line


def test_max_seq_len_1_stops_before_the_run_folder(workdir):
    line = refused(workdir, {"max_seq_len": 1})
    assert "max_seq_len must be at least 2, got 1" in line
    assert not (workdir / "runs").exists()


def test_a_recipe_without_a_model_is_an_error(workdir):
    line = refused(workdir, {"model": None})
    assert "model: required" in line and "no default model" in line


@pytest.mark.parametrize("section,key,value", [
    ("train", "out", "/tmp/x"), ("reference", "overwrite", True), ("train", "data", "other.jsonl"),
    ("reference", "mask", "m.safetensors"), ("train", "init_adapter", "a"), ("train", "model", "m"),
])
def test_stage_paths_cannot_be_set_from_a_recipe(workdir, section, key, value):
    line = refused(workdir, {f"{section}.{key}": value})
    assert f"invalid recipe: {section}.{key}: not settable in a recipe" in line


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs-run", "a/b", "..", ".hidden"])
def test_run_name_cannot_leave_the_runs_folder(workdir, name):
    line = refused(workdir, {"name": name})
    assert "name:" in line and "plain folder name" in line


def test_out_is_the_run_folder_and_a_bad_recipe_leaves_it_unmade(workdir):
    refused(workdir, {"toss.strategy": "tosss"}, "--out", str(workdir / "elsewhere"))
    assert not (workdir / "elsewhere").exists()


def test_a_folder_given_as_the_recipe(workdir):
    before = snapshot(workdir)
    result = CliRunner().invoke(app, ["run", str(workdir)])
    assert result.exit_code == 2 and "is a folder" in result.output
    assert len(result.output.strip().splitlines()) == 1 and snapshot(workdir) == before


def test_a_good_name_runs_inside_runs(workdir):
    """The counterpart: a plain name lands in ./runs/<name> (stopped after the first stage)."""
    result = CliRunner().invoke(app, ["run", "recipe.yaml", "--until", "utility", "-q"])
    assert result.exit_code == 0, result.output
    assert (workdir / "runs" / "tiny" / "utility" / "adapter" / "adapters.safetensors").exists()
    assert sorted(os.listdir(workdir / "runs")) == ["tiny"]


@pytest.mark.parametrize("changes,expected", [
    ({"reference.lr": -1}, "reference: lr must be a positive finite number, got -1"),
    ({"train.epochz": 1}, "train.epochz: unknown setting (did you mean 'epochs'?)"),
    ({"toss.strategy": "first-k", "toss.level": "sample"}, "strategy first-k has no per-sample level"),
    ({"toss.ratio": 1.5}, "ratio must be in (0, 1), got 1.5"),
    ({"export": "onnx"}, "export[0]: expected one of 'peft', 'mlx', 'gguf', 'gguf-lora', 'ollama', 'none', got 'onnx'"),
])
def test_other_settings_are_checked_before_any_compute(workdir, changes, expected):
    assert expected in refused(workdir, changes)
