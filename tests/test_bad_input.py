"""Bad input and faults, through the real CLI: one clear line, exit code 2, nothing else touched.

Each case runs `toss-mlx ...` with Typer's CliRunner on the tiny test model and checks:
exit code 2, exactly one `error:` line naming the problem, no traceback, and that no
file outside the output the command was asked to write was created or changed (every
file under pytest's temporary root is compared before and after, by size and mtime).
Faults are caused for real where the machine allows it (a 100 KB tmpfs that fills up,
a read-only tmpfs mount) and those tests skip elsewhere; the same faults are also
simulated everywhere, by making the write fail with the errno the kernel would give
(chmod is no test when the tests run as root, who may write anywhere).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from adapters import make_adapter
from toss_mlx_cli.main import app
from typer.testing import CliRunner

ROWS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?",
     "completion": "The answer is " + " and ".join([str(2 * i)] * (1 + i % 3)) + "."}
    for i in range(8)
]
runner = CliRunner()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in ROWS[:3]))
    utility = make_adapter(tiny_model_dir, root / "utility", seed=1)
    safety = make_adapter(tiny_model_dir, root / "safety", seed=2)
    scores = root / "scores.safetensors"
    ok = runner.invoke(app, ["score", "--model", str(tiny_model_dir), "--utility", str(utility),
                             "--safety", str(safety), "--data", str(data), "--out", str(scores),
                             "-q"])
    assert ok.exit_code == 0, ok.output
    return {"root": root, "model": tiny_model_dir, "data": data, "prompts": prompts,
            "utility": utility, "safety": safety, "scores": scores}


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch, tmp_path):
    monkeypatch.delenv("TOSS_MLX_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # default outputs (eval.json, report.html) land in the test's folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: files by (size, mtime), folders by existence."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        out[dirpath] = ("dir",)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def fails(args: list[str], *needles: str, allowed: tuple = (), root: Path | None = None) -> str:
    """Run the CLI; check exit 2, one error line holding every needle, nothing else written."""
    root = Path(root) if root else _base()
    before = snapshot(root)
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    after = snapshot(root)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    allowed_paths = [os.path.abspath(a) for a in allowed]
    stray = [p for p in changed
             if not any(p == a or p.startswith((a + os.sep, a + ".")) or  # OUT.partial/
                        os.path.basename(p).startswith("." + os.path.basename(a) + ".")
                        and os.path.dirname(p) == os.path.dirname(a) for a in allowed_paths)]
    assert not stray, f"written outside the requested output: {stray}"
    return errors[0]


_BASE: list[Path] = []


def _base() -> Path:
    return _BASE[0]


@pytest.fixture(autouse=True)
def _root(tmp_path_factory):
    _BASE[:] = [tmp_path_factory.getbasetemp()]


def train_args(f, out, *extra, model=None, data=None, quiet=True):
    return ["train", "--model", model or f["model"], "--data", data or f["data"], "--out", out,
            "--iters", "2", *extra] + (["-q"] if quiet else [])


def score_args(f, out, *extra, utility=None, data=None, quiet=True):
    return ["score", "--model", f["model"], "--utility", utility or f["utility"],
            "--safety", f["safety"], "--data", data or f["data"], "--out", out,
            *extra] + (["-q"] if quiet else [])


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- the CLI boundary


def test_any_exception_is_one_line_and_debug_shows_the_traceback(files, tmp_path, monkeypatch):
    import toss_mlx.select as select

    def boom(*args, **kwargs):
        raise RuntimeError("[metal] something deep\nwent wrong")

    monkeypatch.setattr(select, "load_scores", boom)
    line = fails(["select", "--scores", files["scores"], "--out", tmp_path / "m.safetensors"],
                 "RuntimeError in toss_mlx", "something deep went wrong", "--debug")
    assert line.count("\n") == 0
    debug = runner.invoke(app, ["--debug", "select", "--scores", str(files["scores"]),
                                "--out", str(tmp_path / "m.safetensors")])
    assert isinstance(debug.exception, RuntimeError)  # let through, with its traceback
    monkeypatch.setenv("TOSS_MLX_DEBUG", "1")
    debug = runner.invoke(app, ["select", "--scores", str(files["scores"]),
                                "--out", str(tmp_path / "m.safetensors")])
    assert isinstance(debug.exception, RuntimeError)


def test_os_errors_name_the_file(files, tmp_path, monkeypatch):
    import toss_mlx.select as select

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/scores.safetensors")

    monkeypatch.setattr(select, "load_scores", denied)
    fails(["select", "--scores", files["scores"], "--out", tmp_path / "m.safetensors"],
          "/some/scores.safetensors: permission denied")


# ---------------------------------------------------------------- tracebacks before


@pytest.mark.parametrize("content, byte", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n', "0xe9"),
    (b'{"prompt": "a", "completion": "b"}\n\x00\xff\xfe\x01binary\n', "0xff"),
], ids=["latin-1", "binary"])
def test_data_that_is_not_utf8_names_file_and_line(files, tmp_path, content, byte):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    fails(train_args(files, out, data=data), f"{data}:2: not UTF-8 text", byte, allowed=(out,))
    scores = tmp_path / "s.safetensors"
    fails(score_args(files, scores, data=data), f"{data}:2: not UTF-8 text", allowed=(scores,))


def test_dropout_out_of_range(files, tmp_path):
    fails(train_args(files, tmp_path / "o", "--dropout", "2"), "lora.dropout must be in [0, 1)")


def test_a_folder_as_the_recipe(tmp_path):
    (tmp_path / "somefolder").mkdir()
    fails(["run", tmp_path / "somefolder"], "somefolder")


def _write_commands(f, out: Path) -> dict[str, list]:
    """The commands that write, each asked to write under `out`."""
    return {
        "train": train_args(f, out / "adapter"),
        "score": score_args(f, out / "scores.safetensors"),
        "select": ["select", "--scores", f["scores"], "--out", out / "mask.safetensors"],
        "refine": ["refine", "--model", f["model"], "--data", f["data"], "--harmful", f["data"],
                   "--utility", f["utility"], "--safety", f["safety"], "--out", out / "refine",
                   "--rounds", "1", "--k", "1", "-q"],
        "eval": ["eval", "--model", f["model"], "--harmful", f["prompts"],
                 "--out", out / "eval.json", "-q"],
        "report": ["report", "--scores", f["scores"], "--out", out / "report.html", "-q"],
        "export": ["export", f["utility"], "--out", out / "export", "-q"],
        "fuse": ["fuse", "--model", f["model"], "--adapter", f["utility"], "--out", out / "fused",
                 "-q"],
        "run": ["run", _recipe(f, out.parent), "--out", out / "run"],
        "init": ["init", out / "recipe.yaml"],
    }


def _recipe(f, folder: Path) -> Path:
    recipe = folder / "recipe.yaml"
    if not recipe.exists():
        data = {k: str(f["data"]) for k in ("custom", "harmful", "utility", "eval_task")}
        data.update({k: str(f["prompts"]) for k in ("eval_harmful", "eval_edgy")})
        recipe.write_text(json.dumps({"name": "bad", "model": str(f["model"]), "data": data}))
    return recipe


COMMANDS = ["train", "score", "select", "refine", "eval", "report", "export", "fuse", "run", "init"]


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_file(files, tmp_path, command):
    """A path that cannot exist (its parent is a file): refused before any compute."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _recipe(files, tmp_path)
    fails(_write_commands(files, blocker)[command], str(blocker))


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_output_folder(files, tmp_path, command, monkeypatch):
    """A read-only folder: refused before any compute.

    As root (CI) chmod does not stop writes, and mounting a read-only file system needs
    privileges CI lacks; so creating a file there fails as the kernel fails it on a
    read-only mount (EROFS), while every other path works as usual.
    """
    ro = tmp_path / "ro"
    ro.mkdir()
    _recipe(files, tmp_path)
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def inside(d) -> bool:
        return d is not None and Path(d).absolute().is_relative_to(ro)

    def mkstemp(*args, dir=None, **kwargs):
        if inside(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def mkdtemp(*args, dir=None, **kwargs):
        if inside(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    fails(_write_commands(files, ro)[command], str(ro), "read-only")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway")
def test_really_read_only_folder(files, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        fails(score_args(files, ro / "scores.safetensors"), "not writable", "permission denied")
        fails(train_args(files, ro / "adapter"), "not writable")
    finally:
        ro.chmod(0o755)


def test_disk_full_during_train_keeps_no_temp_file(files, tmp_path, monkeypatch):
    import mlx.core as mx

    real = mx.save_safetensors
    calls = []

    def full_disk(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # step 1's third write (the latest adapter): an empty file, then ENOSPC
            Path(path if str(path).endswith(".safetensors") else f"{path}.safetensors").write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    out = tmp_path / "adapter"
    fails(train_args(files, out, "--set", "save_every=1"), "no space left", allowed=(out,))
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    monkeypatch.setattr(mx, "save_safetensors", real)
    # The checkpoint saved before the disk filled is complete; a rerun resumes from it.
    resumed = invoke(train_args(files, out, "--set", "save_every=1", quiet=False))  # no --resume
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at step 1 of 2" in " ".join(resumed.output.split())
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"] == 1


def test_disk_full_during_score_keeps_the_losses(files, tmp_path, monkeypatch):
    import safetensors.numpy

    real = safetensors.numpy.save_file
    out = tmp_path / "scores.safetensors"

    def full_disk(arrays, path, *args, **kwargs):
        if Path(path).name.startswith(f".{out.name}."):  # the final file, after every shard
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(arrays, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    fails(score_args(files, out, "--batch-tokens", "64"), "no space left", allowed=(out,))
    shards = sorted((tmp_path / f"{out.name}.partial").glob("shard-*.safetensors"))
    assert shards and not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    again = invoke(score_args(files, out, "--batch-tokens", "64", quiet=False))
    assert again.exit_code == 0, again.output
    assert f"resuming: {len(ROWS)} of {len(ROWS)} samples already scored" in again.output
    from toss_mlx.layout import load_scores

    fresh = tmp_path / "fresh.safetensors"
    assert invoke(score_args(files, fresh, "--batch-tokens", "64")).exit_code == 0
    a, b = load_scores(out), load_scores(fresh)
    np.testing.assert_array_equal(a.score, b.score)  # the kept losses are the computed ones


def test_refine_ratio_nan(files, tmp_path):
    cmd = _write_commands(files, tmp_path)["refine"]
    fails(cmd + ["--ratio", "nan"], "--ratio must be a finite number")


@pytest.mark.parametrize("field, value, needle", [
    ("num_layers", "abc", "num_layers must be an integer, got 'abc'"),
    ("scale", "nan", "lora_parameters.scale must be a number, got 'nan'"),
    ("scale", float("nan"), "lora_parameters.scale must be a finite number"),
    (None, [1, 2], "expected a JSON object, got list"),
])
@pytest.mark.parametrize("command", ["score", "eval", "fuse", "export"])
def test_adapter_config_with_wrong_types(files, tmp_path, tiny_model_dir, field, value, needle,
                                         command):
    bad = make_adapter(tiny_model_dir, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    if field is None:
        config = value
    elif field == "scale":
        config["lora_parameters"]["scale"] = value
    else:
        config[field] = value
    (bad / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    cmd = {
        "score": score_args(files, out, utility=bad),
        "eval": ["eval", "--model", files["model"], "--adapter", f"bad={bad}", "--harmful",
                 files["prompts"], "--out", out, "-q"],
        "fuse": ["fuse", "--model", files["model"], "--adapter", bad, "--out", out],
        "export": ["export", bad, "--out", out],
    }[command]
    fails(cmd, "adapter_config.json", needle, allowed=(out,))


def test_truncated_model_weights(files, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fails(train_args(files, tmp_path / "o", model=model), f"{model}: could not load the model", "incomplete download or corrupt file",
          allowed=(tmp_path / "o",))
    fails(["fuse", "--model", model, "--adapter", files["utility"], "--out", tmp_path / "f"],
          "could not load the model", allowed=(tmp_path / "f",))


# ---------------------------------------------------------------- wrong results before


@pytest.mark.parametrize("flag, value, needle", [
    ("--lr", "inf", "lr must be a positive finite number"),
    ("--lr", "nan", "lr must be a positive finite number"),
    ("--alpha", "nan", "lora.alpha must be a positive finite number"),
    ("--alpha", "inf", "lora.alpha must be a positive finite number"),
])
def test_non_finite_training_settings(files, tmp_path, flag, value, needle):
    fails(train_args(files, tmp_path / "o", flag, value), needle)


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_diverging_training_stops_and_keeps_the_last_good_adapter(files, tmp_path, monkeypatch,
                                                                  what):
    """A step whose loss (or update) is not finite stops the run; the step-2 adapter stays."""
    import mlx.core as mx

    import toss_mlx.train as train_module

    original = train_module._TrainingCallback.on_train_loss_report

    def diverge_at_step_3(self, info):
        if self.start + info["iteration"] == 3:
            if what == "loss":
                info = {**info, "train_loss": float("nan")}
            else:
                for _, module in self.model.named_modules():
                    if "lora_b" in module:
                        module.lora_b = module.lora_b * mx.array(float("inf"))
        return original(self, info)

    monkeypatch.setattr(train_module._TrainingCallback, "on_train_loss_report", diverge_at_step_3)
    out = tmp_path / "adapter"
    args = train_args(files, out, "--set", "save_every=1")
    args[args.index("--iters") + 1] = "4"
    line = fails(args, "step 3:", "training diverged", "The last good adapter (step 2) is kept",
                 allowed=(out,))
    assert "NaN" in line or "nan" in line
    weights = mx.load(str(out / "adapters.safetensors"))
    assert all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values())
    last = mx.load(str(out / "checkpoints" / "step_0000002" / "adapters.safetensors"))
    for k, v in last.items():
        np.testing.assert_array_equal(np.array(v), np.array(weights[k]))
    assert not (out / "train_summary.json").exists()


def test_export_refuses_a_nan_scale(files, tmp_path, tiny_model_dir):
    bad = make_adapter(tiny_model_dir, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] = "nan"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    fails(["export", bad, "--format", "peft", "--out", tmp_path / "peft"], "scale")


# ---------------------------------------------------------------- silently accepted before


def test_a_mask_that_removes_every_response_token(files, tmp_path):
    from toss_mlx.io import load_arrays, save_arrays

    arrays, meta = load_arrays(files["scores"])
    mask = tmp_path / "none-kept.safetensors"
    save_arrays(mask, {"offsets": arrays["offsets"], "row_index": arrays["row_index"],
                       "keep": np.zeros_like(arrays["response_mask"])}, meta)
    out = tmp_path / "adapter"
    fails(train_args(files, out, "--mask", mask, "--max-seq-len", "2048"),
          "removes every response token", allowed=(out,))


@pytest.mark.parametrize("extra, needle", [
    (["--ratio", "1e-9"], "removes 0 of"),
    (["--strategy", "first-k", "--k", "100000"], "removes every one of the"),
    (["--strategy", "sample-filter", "--ratio", "0.999999"], "removes every one of the"),
    (["--ratio", "5"], "ratio must be between 0 and 1"),
    (["--strategy", "tosss"], "unknown strategy"),
])
def test_select_that_removes_nothing_or_everything(files, tmp_path, extra, needle):
    fails(["select", "--scores", files["scores"], "--out", tmp_path / "m.safetensors", *extra],
          needle)
    assert not (tmp_path / "m.safetensors").exists()


def test_max_seq_len_that_leaves_no_response_token(files, tmp_path):
    out = tmp_path / "adapter"
    fails(train_args(files, out, "--max-seq-len", "2"), "no response token within the first 2",
          "raise --max-seq-len", allowed=(out,))


def test_num_layers_zero(files, tmp_path):
    fails(train_args(files, tmp_path / "o", "--num-layers", "0"),
          "num_layers must be -1 (every layer) or at least 1")


@pytest.mark.parametrize("extra, needle", [
    (["--retrain", "contin"], "--retrain must be one of scratch, continue, got 'contin' "
                              "(did you mean 'continue'?)"),
    (["--ratio", "5"], "--ratio must be in (0, 1), got 5.0"),
    (["--ratio", "0"], "--ratio must be in (0, 1)"),
])
def test_refine_arguments(files, tmp_path, extra, needle):
    fails(_write_commands(files, tmp_path)["refine"] + extra, needle)
    assert not (tmp_path / "refine").exists()


def test_eval_max_prompts_zero(files, tmp_path):
    fails(["eval", "--model", files["model"], "--harmful", files["prompts"], "--max-prompts", "0",
           "--out", tmp_path / "eval.json"], "--max-prompts must be at least 1, got 0")


def test_fuse_out_inside_the_adapter(files, tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    fails(["fuse", "--model", files["model"], "--adapter", adapter, "--out", adapter / "fused"],
          "inside the input")
    fails(["export", adapter, "--out", adapter / "sub" / "export"], "inside the input")


# ---------------------------------------------------------------- data lost before


@pytest.fixture
def live_pid():
    """The pid of a running process that is not this one (holds a lock in the tests)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_second_process_cannot_use_a_locked_output(files, tmp_path, live_pid):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / ".toss-mlx.lock").write_text(f"{live_pid}\n")
    fails(train_args(files, out), f"in use by another toss-mlx process (pid {live_pid})",
          allowed=(out,))
    assert (out / ".toss-mlx.lock").read_text() == f"{live_pid}\n"  # the holder's lock stays
    scores = tmp_path / "scores.safetensors"
    (tmp_path / ".scores.safetensors.lock").write_text(f"{live_pid}\n")
    fails(score_args(files, scores), f"pid {live_pid}", allowed=(scores,))
    evals = tmp_path / "eval.json"
    (tmp_path / ".eval.json.lock").write_text(f"{live_pid}\n")
    fails(["eval", "--model", files["model"], "--harmful", files["prompts"], "--out", evals, "-q"],
          f"pid {live_pid}", allowed=(evals,))
    refine = tmp_path / "refine"
    refine.mkdir()
    (refine / ".toss-mlx.lock").write_text(f"{live_pid}\n")
    fails(_write_commands(files, tmp_path)["refine"], f"pid {live_pid}", allowed=(refine,))


def test_two_real_train_processes(files, tmp_path):
    """Two `toss-mlx train` at once into one folder: exactly one trains, the other names its pid."""
    out = tmp_path / "adapter"
    args = [sys.executable, "-m", "toss_mlx_cli.main"] + [str(a) for a in train_args(files, out)]
    args[args.index("--iters") + 1] = "30"
    first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    lock = out / ".toss-mlx.lock"
    for _ in range(600):
        if lock.exists() and lock.read_text().strip():
            break
        if first.poll() is not None:
            break
        import time

        time.sleep(0.05)
    second = subprocess.run(args, stderr=subprocess.PIPE, text=True)
    first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    if second.returncode == 0:  # the first had finished before the second started: it resumed
        pytest.skip("the first run ended before the second started")
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert not lock.exists()  # released at exit


def test_a_stale_lock_is_taken_over(files, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "adapter"
    out.mkdir()
    (out / ".toss-mlx.lock").write_text(f"{dead.pid}\n")
    ok = invoke(train_args(files, out))
    assert ok.exit_code == 0, ok.output
    assert not (out / ".toss-mlx.lock").exists()


def test_resume_of_a_finished_run_keeps_its_summary(files, tmp_path):
    out = tmp_path / "adapter"
    assert invoke(train_args(files, out)).exit_code == 0
    summary = (out / "train_summary.json").read_bytes()
    again = invoke(train_args(files, out, "--resume", quiet=False))
    assert again.exit_code == 0, again.output
    assert "this run is finished" in " ".join(again.output.split())
    assert (out / "train_summary.json").read_bytes() == summary


# ---------------------------------------------------------------- behaviour the README promises


def test_rerun_with_other_settings_names_them(files, tmp_path):
    out = tmp_path / "adapter"
    assert invoke(train_args(files, out)).exit_code == 0
    fails(train_args(files, out, "--lr", "2e-5"), "other settings or data",
          allowed=(out,))


def test_scores_and_masks_get_the_umask(files, tmp_path):
    old = os.umask(0o027)
    try:
        mask = tmp_path / "m.safetensors"
        assert runner.invoke(app, ["select", "--scores", str(files["scores"]), "--out", str(mask),
                                   "-q"]).exit_code == 0
        assert mask.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert files["scores"].stat().st_mode & 0o777 == 0o666 & ~old


def test_a_huge_row_is_refused_before_tokenizing(files, tmp_path):
    from toss_mlx.data import MAX_ROW_CHARS

    data = tmp_path / "huge.jsonl"
    rows = ROWS[:2] + [{"prompt": "x" * (MAX_ROW_CHARS + 10), "completion": "y"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    args = train_args(files, out, data=data)
    fails(args, f"{data}:3: row is 1,000,", "characters", allowed=(out,))
    skipped = invoke(args + ["--set", "skip_bad_rows=true"])
    assert skipped.exit_code == 0, skipped.output


def test_run_checks_data_encoding_before_any_compute(files, tmp_path):
    bad = tmp_path / "custom.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    recipe = _recipe(files, tmp_path)
    fails(["run", recipe, "--set", f"data.custom={bad}", "--out", tmp_path / "run"],
          f"{bad}:2: not UTF-8 text")
    assert not (tmp_path / "run").exists()


def test_disk_full_between_shards_keeps_the_earlier_ones(files, tmp_path, monkeypatch):
    """The disk fills while saving the second shard: the first one survives and is reused."""
    import safetensors.numpy

    from toss_mlx.io import load_arrays

    real = safetensors.numpy.save_file
    out = tmp_path / "scores.safetensors"
    saved = []

    def full_disk(arrays, path, *args, **kwargs):
        if Path(path).name.startswith(".shard-"):
            if saved:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            saved.append(path)
        return real(arrays, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    # 64-token batches: 8 samples make several batches, so the first shard (4 batches) is not all.
    fails(score_args(files, out, "--batch-tokens", "64"), "no space left", allowed=(out,))
    shards = sorted((tmp_path / f"{out.name}.partial").glob("shard-*.safetensors"))
    assert len(shards) == 1 and not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    positions = load_arrays(shards[0])[0]["positions"]
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    again = invoke(score_args(files, out, "--batch-tokens", "64", quiet=False))
    assert again.exit_code == 0, again.output
    # The samples the kept shard covers, counted from its token positions and the offsets.
    offsets = load_arrays(out)[0]["offsets"]
    covered = len(set(np.searchsorted(offsets, positions, side="right") - 1))
    assert 0 < covered < len(ROWS)
    assert f"resuming: {covered} of {len(ROWS)} samples already scored" in again.output


def test_refine_checks_data_encoding_before_training(files, tmp_path):
    bad = tmp_path / "harmful.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')
    cmd = _write_commands(files, tmp_path)["refine"]
    cmd[cmd.index("--harmful") + 1] = bad
    fails(cmd, f"{bad}:1: not UTF-8 text")


def test_a_run_stopped_by_bad_settings_does_not_block_the_next(files, tmp_path):
    out = tmp_path / "adapter"
    fails(train_args(files, out, "--targets", "foo"), "LoRA targets ['foo'] are not modules",
          allowed=(out,))
    ok = invoke(train_args(files, out))  # nothing was trained: no --overwrite needed
    assert ok.exit_code == 0, ok.output


def test_a_wrong_type_is_one_problem(files, tmp_path):
    line = fails(train_args(files, tmp_path / "o", "--set", "lora.rank=abc"),
                 "invalid setting lora.rank: expected int, got 'abc'")
    assert "not supported" not in line


def test_samples_left_without_response_tokens_are_warned_about(files, tmp_path, tokenizer):
    from toss_mlx.data import tokenize_dataset

    data = tmp_path / "long.jsonl"
    rows = ROWS[:3] + [{"prompt": "tokens numbers " * 40, "completion": "ok"}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    limit = 48
    # Independently: a sample loses every response token when its first one lies at or after the limit.
    full = tokenize_dataset(data, tokenizer, max_seq_len=4096)
    expected = sum(int(np.argmax(s.response_mask)) >= limit for s in full.samples)
    assert expected == 2
    out = tmp_path / "adapter"
    result = invoke(train_args(files, out, "--max-seq-len", str(limit), data=data, quiet=False))
    assert result.exit_code == 0, result.output
    assert f"warning: {expected} keep no response token within {limit} tokens" in " ".join(
        result.output.split())


# ---------------------------------------------------------------- real file systems, where allowed


def _mount(target: Path, options: str) -> None:
    target.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    """A real 100 KB file system (tmpfs): writes past it fail with ENOSPC."""
    disk = tmp_path / "disk"
    _mount(disk, "size=100k")
    yield disk
    _umount(disk)


@pytest.fixture(scope="module")
def read_only_disk(tmp_path_factory):
    """A real read-only mount (even root cannot write there)."""
    disk = tmp_path_factory.mktemp("ro-mount") / "ro"
    _mount(disk, "ro,size=64k")
    yield disk
    _umount(disk)


@pytest.mark.parametrize("command", COMMANDS)
def test_real_read_only_mount(files, tmp_path, read_only_disk, command):
    _recipe(files, tmp_path)
    cmd = _write_commands(files, read_only_disk)[command]
    if command == "run":
        cmd[1] = _recipe(files, tmp_path)
    fails(cmd, str(read_only_disk), "read-only")


def test_real_full_disk_in_train(files, small_disk):
    out = small_disk / "adapter"
    args = train_args(files, out, "--set", "save_every=1")
    args[args.index("--iters") + 1] = "8"
    fails(args, "no space left on the device", allowed=(out,))
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]


def test_real_full_disk_in_score_keeps_the_losses(files, tmp_path, small_disk):
    from toss_mlx.layout import load_scores

    data = tmp_path / "long.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}? " * 2,
             "completion": f"The answer is {2 * i}. " * 20} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = small_disk / "scores.safetensors"
    args = score_args(files, out, "--batch-tokens", "256", data=data)
    fails(args, "no space left on the device", allowed=(out,))
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    shards = list((small_disk / f"{out.name}.partial").glob("shard-*.safetensors"))
    assert shards
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True, timeout=30)
    again = invoke(score_args(files, out, "--batch-tokens", "256", data=data, quiet=False))
    assert again.exit_code == 0, again.output
    assert "resuming: " in again.output
    fresh = tmp_path / "fresh.safetensors"
    assert invoke(score_args(files, fresh, "--batch-tokens", "256", data=data)).exit_code == 0
    np.testing.assert_array_equal(load_scores(out).score, load_scores(fresh).score)


@pytest.mark.parametrize("command", ["export", "fuse"])
def test_real_full_disk_in_export_and_fuse(files, small_disk, command):
    out = small_disk / "out"
    cmd = {"export": ["export", files["utility"], "--format", "peft", "--out", out, "-q"],
           "fuse": ["fuse", "--model", files["model"], "--adapter", files["utility"], "--out", out,
                    "-q"]}[command]
    if command == "export":  # a PEFT export of the tiny adapter is ~30 KB: fill the disk first
        (small_disk / "filler").write_bytes(b"\0" * 90_000)
    fails(cmd, "no space left", allowed=(out, small_disk / "filler"))
    assert not out.exists()
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("control", ["exit", "bad-parameter", "sys-exit"])
def test_the_clis_own_exits_pass_through(control):
    """typer.Exit (doctor's status), BadParameter (usage errors) and sys.exit are no errors."""
    import typer
    from toss_mlx_cli.common import friendly

    exc = {"exit": typer.Exit(3), "bad-parameter": typer.BadParameter("no"),
           "sys-exit": SystemExit(4)}[control]

    @friendly
    def command():
        raise exc

    with pytest.raises(type(exc)):
        command()
