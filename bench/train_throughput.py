"""Throughput and peak memory of `toss-mlx train` against mlx-lm's own LoRA trainer.

Same model (SmolLM2-135M-Instruct, float32 on CPU), same data, batch size,
sequence length, LoRA settings (rank 16, q_proj + v_proj of every layer),
optimizer and number of steps. toss-mlx trains through `toss_mlx.train.train`
with a mask file that keeps every token (so the mask path is exercised);
mlx-lm through `mlx_lm.tuner.trainer.train` with its default loss and
iterate_batches, as `mlx_lm.lora` does (response-only loss via the prompt offset).
Every sample is exactly `--seq-len` tokens long, so both process the same tokens.

Whole runs alternate (toss, mlx-lm, mlx-lm, toss, ...) in this one process after
one untimed warm-up of each; a run's time is the wall time of mlx-lm's training
loop (model loading excluded; ours includes our per-step callback, log and
final checkpoint). The machine is shared, so a second, finer check alternates
single steps: mlx-lm's compiled training step (its trainer's code) with its
loss and batches, then with ours, step by step. Prints medians and ratios;
writes bench/results/train_throughput.json.

    python bench/train_throughput.py [--steps 4] [--rounds 4] [--interleaved 16] [--batch-size 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# toss_mlx first: it preloads OpenBLAS before anything imports mlx.core (mlx is imported below,
# inside the functions, for that reason).
from machine_info import machine  # bench/machine_info.py: bench/ is this script's folder

from toss_mlx.data import tokenize_dataset
from toss_mlx.io import save_arrays, write_json
from toss_mlx.models.load import load_model
from toss_mlx.models.lora import LoraSettings, add_lora
from toss_mlx.models.registry import pull
from toss_mlx.train import TrainSettings, train

WORDS = ("the model answers each question with a careful and detailed explanation of the "
         "steps involved, checking every number twice before giving a final result").split()


def make_data(folder: Path, n: int, seq_len: int, tokenizer):
    """n rows that all tokenize to >= seq_len tokens, the mask file keeping every token,
    and mlx-lm's (tokens, prompt offset) items for the same samples."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS, size=seq_len * 2))
        rows.append({"prompt": f"Question {i}: explain how you would solve problem {i}.",
                     "completion": answer})
    data_file = folder / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenized = tokenize_dataset(data_file, tokenizer, max_seq_len=seq_len)
    assert all(len(s.tokens) == seq_len for s in tokenized.samples), "rows too short"
    flat = tokenized.flat()
    mask = folder / "mask.safetensors"
    save_arrays(mask, {"offsets": flat["offsets"], "row_index": flat["row_index"],
                       "keep": np.ones(int(flat["offsets"][-1]), np.uint8)}, tokenized.fingerprint)
    items = [(s.tokens.tolist(), int(np.argmax(s.response_mask))) for s in tokenized.samples]
    return data_file, mask, items, tokenized


def run_toss(model_dir: Path, data_file: Path, mask: Path, out: Path, args) -> dict:
    settings = TrainSettings(model=str(model_dir), data=str(data_file), mask=str(mask), out=str(out),
                             iters=args.steps, batch_size=args.batch_size,
                             max_seq_len=args.seq_len, quiet=True, overwrite=True)
    result = train(settings)
    tokens = result.trained_tokens
    assert tokens == args.steps * args.batch_size * args.seq_len
    del result
    return {"seconds": _seconds_of(out), "tokens": tokens, "peak_gb": _peak_of(out)}


def _seconds_of(out: Path) -> float:
    return json.loads((out / "train_summary.json").read_text())["seconds"]


def _peak_of(out: Path) -> float:
    return json.loads((out / "train_summary.json").read_text())["peak_memory_gb"]


def run_mlx_lm(model_dir: Path, items: list, scratch: Path, args) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    model, _ = load_model(str(model_dir), quiet=True)
    mx.random.seed(42)
    add_lora(model, LoraSettings())  # the same linear_to_lora_layers call mlx_lm.lora makes
    optimizer = optim.Adam(learning_rate=1e-5)
    training_args = TrainingArgs(batch_size=args.batch_size, iters=args.steps,
                                 max_seq_length=args.seq_len,
                                 adapter_file=str(scratch / "adapters.safetensors"))
    np.random.seed(42)
    mx.reset_peak_memory()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        start = time.perf_counter()
        mlx_lm_train(model=model, optimizer=optimizer, train_dataset=items, args=training_args)
        seconds = time.perf_counter() - start
    peak = mx.get_peak_memory() / 1e9
    del model, optimizer
    return {"seconds": seconds, "tokens": args.steps * args.batch_size * args.seq_len,
            "peak_gb": peak}


def interleaved_steps(model_dir: Path, tokenized, items: list, args) -> dict:
    """Step-level check, robust to a busy machine: mlx-lm's compiled training step (the same
    code as its trainer) with mlx-lm's loss and batches or with ours, alternating step by step."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.trainer import iterate_batches as mlx_lm_batches

    from toss_mlx.batches import KeepDataset, iterate_batches, masked_loss

    model, _ = load_model(str(model_dir), quiet=True)
    mx.random.seed(42)
    add_lora(model, LoraSettings())

    def compiled_step(loss):
        optimizer = optim.Adam(learning_rate=1e-5)
        loss_and_grad = nn.value_and_grad(model, loss)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*batch):
            (value, _), grad = loss_and_grad(model, *batch)
            optimizer.update(model, grad)
            return value

        return step, state

    ours = iterate_batches(KeepDataset.build(tokenized), args.batch_size, args.seq_len, loop=True,
                           seed=42)
    theirs = mlx_lm_batches(items, args.batch_size, args.seq_len, loop=True)
    runners = {"toss": (*compiled_step(partial(masked_loss, norm="token")), ours),
               "mlx_lm": (*compiled_step(default_loss), theirs)}
    times: dict[str, list[float]] = {"toss": [], "mlx_lm": []}
    for i in range(args.interleaved + 1):
        for name, (step, state, batches) in runners.items():
            batch = next(batches)
            start = time.perf_counter()
            value = step(*batch)
            mx.eval(state, value)
            if i:  # step 0 compiles
                times[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    return {name: {"step_seconds": t, "tokens_per_sec": tokens / statistics.median(t),
                   "tokens_per_sec_best": tokens / min(t)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--interleaved", type=int, default=16,
                        help="steps of each in the step-by-step interleaved check")
    parser.add_argument("--interleaved-seq-len", type=int, default=64,
                        help="sequence length of the interleaved check (shorter: more steps)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args()

    import mlx.core as mx

    model_dir = pull("smollm2-135m-instruct")
    _, tokenizer = load_model(str(model_dir), quiet=True)
    runs: dict[str, list[dict]] = {"toss": [], "mlx_lm": []}
    with tempfile.TemporaryDirectory(prefix="toss-bench-") as tmp:
        tmp = Path(tmp)
        data_file, mask, items, tokenized = make_data(tmp, max(2 * args.batch_size, 16),
                                                      args.seq_len, tokenizer)
        warm = argparse.Namespace(**{**vars(args), "steps": 2})
        run_toss(model_dir, data_file, mask, tmp / "out", warm)
        run_mlx_lm(model_dir, items, tmp, warm)
        for r in range(args.rounds):
            order = ("toss", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "toss")  # ABBA: no order bias
            for name in order:
                gc.collect()
                mx.clear_cache()
                if name == "toss":
                    run = run_toss(model_dir, data_file, mask, tmp / "out", args)
                else:
                    run = run_mlx_lm(model_dir, items, tmp, args)
                run["tokens_per_sec"] = run["tokens"] / run["seconds"]
                runs[name].append(run)
                print(f"round {r + 1} {name:7s} {run['tokens_per_sec']:8.1f} tok/s  "
                      f"{run['seconds']:6.2f} s  peak {run['peak_gb']:.3f} GB", flush=True)

        short = argparse.Namespace(**{**vars(args), "seq_len": args.interleaved_seq_len})
        _, _, short_items, short_tokenized = make_data(tmp / "short", 16, short.seq_len, tokenizer)
        steps = interleaved_steps(model_dir, short_tokenized, short_items, short)

    med = {name: statistics.median(x["tokens_per_sec"] for x in rs) for name, rs in runs.items()}
    peak = {name: statistics.median(x["peak_gb"] for x in rs) for name, rs in runs.items()}
    # Each round's two runs ran back to back, under about the same load from other processes.
    paired = [t["tokens_per_sec"] / m["tokens_per_sec"] for t, m in zip(runs["toss"], runs["mlx_lm"], strict=True)]
    step_ratio = steps["toss"]["tokens_per_sec"] / steps["mlx_lm"]["tokens_per_sec"]
    step_ratio_best = steps["toss"]["tokens_per_sec_best"] / steps["mlx_lm"]["tokens_per_sec_best"]
    result = {
        "ratio_vs_mlx_lm": med["toss"] / med["mlx_lm"],
        "peak_mem_ratio": peak["toss"] / peak["mlx_lm"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratios": paired,
        "step_ratio_interleaved": step_ratio,
        "step_ratio_interleaved_best": step_ratio_best,
        "toss_tokens_per_sec": med["toss"],
        "mlx_lm_tokens_per_sec": med["mlx_lm"],
        "toss_peak_gb": peak["toss"],
        "mlx_lm_peak_gb": peak["mlx_lm"],
        "settings": {"model": "smollm2-135m-instruct float32", "steps": args.steps,
                     "rounds": args.rounds, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "interleaved_steps": args.interleaved,
                     "interleaved_seq_len": args.interleaved_seq_len,
                     "lora": "rank 16, alpha 16, q_proj+v_proj, all layers", "optimizer": "adam 1e-5"},
        "runs": runs,
        "interleaved": steps,
        "machine": machine(),
        "python": platform.python_version(),
        "argv": sys.argv[1:],
    }
    write_json(args.results, result)
    print(f"whole runs, median tokens/s: toss-mlx {med['toss']:.1f}, mlx-lm {med['mlx_lm']:.1f}, "
          f"ratio {result['ratio_vs_mlx_lm']:.3f} (target >= 0.95); "
          f"median of paired ratios {result['paired_ratio_median']:.3f}")
    print(f"interleaved steps, median tokens/s: toss-mlx {steps['toss']['tokens_per_sec']:.1f}, "
          f"mlx-lm {steps['mlx_lm']['tokens_per_sec']:.1f}, ratio {step_ratio:.3f} "
          f"(fastest step: ratio {step_ratio_best:.3f})")
    print(f"median peak memory: toss-mlx {peak['toss']:.3f} GB, mlx-lm {peak['mlx_lm']:.3f} GB, "
          f"ratio {result['peak_mem_ratio']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
