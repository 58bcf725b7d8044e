"""Data-parallel training under mlx.launch (2 local processes, ring backend on loopback)
gives the adapter of one process with the same global batch."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from toss_mlx.batches import BatchPlan, KeepDataset
from toss_mlx.data import tokenize_dataset
from toss_mlx.io import save_arrays
from toss_mlx.train import TrainSettings, train

ROWS = [
    {"prompt": f"Question {i}: name {i} things.",
     "completion": " ".join(["thing"] * (1 + 3 * (i % 5))) + "."}
    for i in range(8)
]


@pytest.mark.parametrize("norm", ["token", "sample"])
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, tokenizer, norm):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # A mask that removes a different share per sample (and all of sample 0's tokens),
    # so the two ranks hold different kept counts: per-rank normalization would differ.
    tokenized = tokenize_dataset(data, tokenizer)
    flat = tokenized.flat()
    keep = np.random.default_rng(0).random(flat["offsets"][-1]) < 0.6
    keep[flat["offsets"][0]:flat["offsets"][1]] = False
    mask = tmp_path / "mask.safetensors"
    save_arrays(mask, {"offsets": flat["offsets"], "row_index": flat["row_index"],
                       "keep": keep.astype(np.uint8)}, tokenized.fingerprint)
    ds = KeepDataset.build(tokenized, keep)
    first = BatchPlan(ds.lengths, 4, 42).step(0)
    counts = [ds.kept_targets[first[r::2]].sum() for r in (0, 1)]
    assert counts[0] != counts[1]

    common = dict(model=str(tiny_model_dir), data=str(data), mask=str(mask), iters=4,
                  batch_size=4, lr=1e-3, loss_norm=norm, quiet=True)
    cmd = [launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m",
           "toss_mlx_cli.main", "train", "--model", common["model"], "--data", str(data),
           "--mask", str(mask), "--iters", "4", "--batch-size", "4", "--lr", "1e-3",
           "--loss-norm", norm, "--out", str(tmp_path / "two"), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "WARN" not in output, output
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["steps"] == 4

    one = train(TrainSettings(**common, out=str(tmp_path / "one")))
    assert one.steps == 4
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    ref = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    assert two.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(np.array(two[name]), np.array(ref[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert any(np.abs(np.array(v)).max() > 0 for k, v in ref.items() if k.endswith("lora_b"))
    logs = [[json.loads(x)["loss"] for x in (tmp_path / r / "train_log.jsonl").read_text().splitlines()]
            for r in ("one", "two")]
    np.testing.assert_allclose(logs[1], logs[0], rtol=1e-5)
