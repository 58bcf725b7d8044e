"""Is a fine-tuning recipe stable on a model? Held-out NLL after every step, recipe by recipe.

Why this exists: on Qwen2.5-Coder-0.5B-Instruct, `reproduce.py --quick` (LoRA rank 16, alpha 320
= scale 20 on every linear layer of the top 4 layers, Adam lr 2e-4) gave a TOSS-Pro adapter
with task NLL 6.9 against standard SFT's 1.2 after normal-looking training losses. The
kept-head loss and its gradients equal the full-logits ones on Qwen (tests/test_train.py's
real-model check, run on Qwen), so the recipe itself is the suspect. This script fine-tunes
the same data with several recipes, saves the adapter after every step and reports the
held-out NLL of the task answers and of harmful answers after each one: an unstable recipe
shows as NLL that jumps up between steps, a stable one falls smoothly.

    python bench/finetune_stability.py --model qwen2.5-coder-0.5b-instruct \\
        --recipes 2e-4:320,2e-4:32,5e-5:320

Each recipe is `lr:alpha` (rank 16). Data: the reproduction's --quick custom data (24 task +
6 harmful samples: 8 steps of 4) and its held-out task problems; 16 of them here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from machine_info import machine  # noqa: E402
from reproduce import ALL_LINEAR, QUICK  # noqa: E402  (bench/reproduce.py: the same data and LoRA targets)

import toss_mlx  # noqa: E402,F401  (preloads BLAS before mlx.core)
from toss_mlx.data import tokenize_dataset  # noqa: E402
from toss_mlx.evaluate import reference_nll  # noqa: E402
from toss_mlx.io import write_json  # noqa: E402
from toss_mlx.models.load import load_model, load_tokenizer  # noqa: E402
from toss_mlx.models.lora import LoraSettings, adapter_applied  # noqa: E402
from toss_mlx.prepare import build_reproduce  # noqa: E402
from toss_mlx.train import TrainSettings, train  # noqa: E402


def held_out_nll(model, sequences: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Per-token NLL of the held-out answers (response tokens only)."""
    pairs = reference_nll(model, sequences)
    return sum(s for s, _ in pairs) / max(1, sum(c for _, c in pairs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--recipes", default="2e-4:320,2e-4:32,5e-5:320",
                    help="comma-separated lr:alpha pairs (LoRA rank 16)")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_stability.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="stability-"))
    data = work / "data"
    # --quick's data, with more held-out task problems and harmful pairs to measure on
    build_reproduce(data, seed=args.seed, condition="main", **QUICK.data | dict(n_eval_task=16, n_eval_prefill=8))
    tokenizer = load_tokenizer(args.model)
    # the held-out task answers and the held-out harmful answers (prefill pairs), as sequences
    held = {name: [(s.tokens, s.response_mask) for s in
                   tokenize_dataset(data / file, tokenizer, max_seq_len=320).samples]
            for name, file in (("task", "eval_task.jsonl"), ("harmful", "eval_prefill.jsonl"))}
    model, _ = load_model(args.model)
    runs = []
    for recipe in args.recipes.split(","):
        lr, alpha = (float(x) for x in recipe.split(":"))
        out = work / f"lr{lr:g}-alpha{alpha:g}"
        losses: list[float] = []
        t0 = time.perf_counter()
        train(TrainSettings(model=args.model, data=str(data / "custom.jsonl"), out=str(out), lr=lr,
                            lora=LoraSettings(rank=16, alpha=alpha, targets=ALL_LINEAR,
                                              num_layers=args.num_layers),
                            epochs=1, batch_size=4, max_seq_len=320, seed=args.seed, save_every=1,
                            keep_checkpoints=100, quiet=True),
              on_step=lambda r, losses=losses: losses.append(r["loss"]))
        seconds = time.perf_counter() - t0
        steps = sorted((out / "checkpoints").iterdir())
        trajectory = []
        for ckpt in [None, *steps]:
            with adapter_applied(model, ckpt) as m:
                trajectory.append({name: held_out_nll(m, seqs) for name, seqs in held.items()})
        run = {"lr": lr, "alpha": alpha, "scale": alpha / 16, "train_loss": losses,
               "held_out_nll": trajectory, "train_seconds": seconds}
        runs.append(run)
        print(f"lr {lr:g} alpha {alpha:g}: train loss {' '.join(f'{x:.2f}' for x in losses)}")
        print("  task NLL    " + " ".join(f"{t['task']:.2f}" for t in trajectory))
        print("  harmful NLL " + " ".join(f"{t['harmful']:.2f}" for t in trajectory))
    write_json(args.out, {"machine": machine(), "model": args.model, "num_layers": args.num_layers,
                          "rank": 16, "targets": ALL_LINEAR, "seed": args.seed, "runs": runs})
    print(json.dumps({"wrote": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
