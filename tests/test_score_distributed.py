"""Scoring under mlx.launch (2 local processes, ring backend on loopback) shares the batches
between the ranks and writes one file equal to a one-process run."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from adapters import make_adapter

from toss_mlx.layout import load_scores
from toss_mlx.score import ScoreSettings, score
from toss_mlx.token_loss import plan_batches

ROWS = [{"prompt": f"Question {i}: name {i} things.",
         "completion": " ".join(["thing"] * (1 + 3 * (i % 5))) + "."} for i in range(10)]

WORKER = textwrap.dedent("""
    import json, sys
    import toss_mlx
    from toss_mlx import score as score_mod

    model, utility, safety, data, out, log = sys.argv[1:7]
    calls = {"n": 0}
    real = score_mod.response_losses

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    score_mod.response_losses = counted
    scores = score_mod.score(score_mod.ScoreSettings(model=model, utility=utility, safety=safety,
                                                     data=data, out=out, batch_tokens=40, quiet=True))
    import mlx.core as mx
    group = mx.distributed.init()
    with open(f"{log}.{group.rank()}", "w") as f:
        json.dump({"rank": group.rank(), "size": group.size(), "calls": calls["n"],
                   "tokens": int(scores.response_mask.sum())}, f)
""")


def test_two_ranks_share_batches_and_write_one_file(tmp_path, tiny_model_dir, tokenizer):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    data = tmp_path / "custom.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    utility = make_adapter(tiny_model_dir, tmp_path / "utility", seed=1)
    safety = make_adapter(tiny_model_dir, tmp_path / "safety", seed=2)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out, log = tmp_path / "two.safetensors", tmp_path / "log"

    port = random.randint(20000, 40000)  # other test runs on this machine may use the default
    cmd = [launcher, "-n", "2", "--backend", "ring", "-p", str(port), "--", sys.executable,
           str(worker), str(tiny_model_dir), str(utility), str(safety), str(data), str(out), str(log)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "WARN" not in run.stdout + run.stderr, run.stdout + run.stderr

    from toss_mlx.data import tokenize_dataset
    from toss_mlx.models.load import load_model
    from toss_mlx.token_loss import input_lengths, scored_mask

    flat = tokenize_dataset(data, tokenizer).flat()
    n_batches = len(plan_batches(input_lengths(flat, scored_mask(flat)), 40))
    assert n_batches >= 4
    ranks = [json.loads((tmp_path / f"log.{r}").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    # Each rank scored its own half of the batches (2 passes each): none twice, none skipped.
    assert [r["calls"] for r in ranks] == [2 * len(range(r, n_batches, 2)) for r in (0, 1)]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] > 0
    assert not (tmp_path / "two.safetensors.partial").exists()

    model, tok = load_model(str(tiny_model_dir), quiet=True)
    one = score(ScoreSettings(model=str(tiny_model_dir), utility=str(utility), safety=str(safety),
                              data=str(data), out=str(tmp_path / "one.safetensors"), batch_tokens=40,
                              quiet=True), model=model, tokenizer=tok)
    two = load_scores(out)
    for k, v in one.arrays().items():
        np.testing.assert_allclose(getattr(two, k), v, atol=1e-6, rtol=0, err_msg=k)
    assert two.meta == load_scores(tmp_path / "one.safetensors").meta
    assert np.abs(two.score).max() > 0.05
