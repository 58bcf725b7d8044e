"""Throughput and peak memory of `toss-mlx train` against mlx-lm's own LoRA trainer, side by side.

Models (float32 on the CPU): SmolLM2-135M-Instruct (tied 49,152-token head) at batch 4 x 256
and Qwen2.5-Coder-0.5B-Instruct (separate 151,936-token head) at batch 2 x 512. Same data,
batch, sequence length, LoRA (rank 16, q_proj + v_proj of every layer), Adam, steps.

Data: rows built from the reproduction's custom data (`prepare.build_reproduce`, the
prompts and answers of bench/reproduce.py) so that every sample is exactly `seq_len`
tokens with the same share of response tokens as that data (0.59 with either tokenizer):
its prompts joined up to (1 - share) x seq_len tokens, its answers after them. Both
trainers take the loss on the response tokens only: toss-mlx with a mask file keeping
every response token, mlx-lm with the prompt offset (`mlx_lm.lora --mask-prompt`).

1. Whole runs: `toss_mlx.train.train` against `mlx_lm.tuner.trainer.train` with its
   default loss and iterate_batches, alternating ABBA after one untimed warm-up of each;
   the time of a run is its training loop's (model loading excluded). Medians over rounds,
   and the median of the paired (same-round) ratios; peak memory is mx.get_peak_memory
   over the loop (model weights included, as both hold them).
2. Lengths: one compiled training step (its compile included) at batch 1 x L (L = 256,
   512, 1024) with mlx-lm's loss, ours (`toss`: the kept head on the memory-lean body,
   `toss_mlx_layers`: the kept head on mlx-lm's layers), and each body alone (a loss on the
   final hidden states, no vocabulary projection: `body_only` through mlx-lm's layers,
   `body_only_lean` through `toss_mlx.lean_body`), one after the other: peak memory and
   step time of each. mlx-lm's excess over its body grows with L x V (its logits), ours
   with the kept targets only; the lean body lowers the floor itself.

Writes bench/results/train_throughput.json after every piece (a killed run keeps what
it measured).

    python bench/train_throughput.py [--models smollm2,qwen] [--rounds 3] [--lengths 256,512,1024]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# toss_mlx first: it preloads OpenBLAS before anything imports mlx.core (mlx is imported below,
# inside the functions, for that reason).
from machine_info import machine_details  # bench/machine_info.py: bench/ is this script's folder

from toss_mlx.data import tokenize_dataset
from toss_mlx.io import save_arrays, write_json
from toss_mlx.models.load import load_model
from toss_mlx.models.lora import LoraSettings, add_lora
from toss_mlx.models.registry import pull
from toss_mlx.train import TrainSettings, train


@dataclass
class Case:
    name: str
    registry: str
    batch_size: int
    seq_len: int
    steps: int  # per timed run
    target_speed: float  # toss-mlx / mlx-lm tokens/s, at least
    target_memory: float  # toss-mlx / mlx-lm peak memory, at most


CASES = {
    "smollm2": Case("smollm2", "smollm2-135m-instruct", 4, 256, 3, 1.15, 0.9),
    "qwen": Case("qwen", "qwen2.5-coder-0.5b-instruct", 2, 512, 2, 1.3, 0.7),
}


# ---------------------------------------------------------------- data


def reproduce_rows(folder: Path) -> list[dict]:
    from toss_mlx.prepare import build_reproduce

    build_reproduce(folder)
    return [json.loads(line) for line in (folder / "custom.jsonl").read_text().splitlines()]


def make_data(folder: Path, rows: list[dict], n: int, seq_len: int, share: float, tokenizer):
    """n rows of exactly seq_len tokens whose response share is about `share`, from the
    reproduction's prompts and answers; the all-response mask file; mlx-lm's
    (tokens, prompt offset) items for the same samples."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = " ".join(r["prompt"] for r in rows).split()
    answers = " ".join(r["completion"] for r in rows).split()
    probe = tokenize_dataset_rows(folder, [{"prompt": "x", "completion": "y"}], tokenizer, 64)
    overhead = int(np.argmax(probe.samples[0].response_mask)) - 1  # template tokens around a 1-token prompt
    want_prompt = round((1 - share) * seq_len) - overhead
    out, a = [], 0
    for i in range(n):
        ids = tokenizer.encode(" ".join(prompts[(i * 97) % len(prompts):][:seq_len]),
                               add_special_tokens=False)[:want_prompt]
        answer = " ".join(answers[a:a + seq_len])
        a = (a + seq_len) % max(1, len(answers) - seq_len)
        out.append({"prompt": tokenizer.decode(ids).strip(), "completion": answer})
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in out))
    tokenized = tokenize_dataset(data, tokenizer, max_seq_len=seq_len)
    assert all(len(s.tokens) == seq_len for s in tokenized.samples), "rows too short"
    flat = tokenized.flat()
    mask = folder / "mask.safetensors"
    save_arrays(mask, {"offsets": flat["offsets"], "row_index": flat["row_index"],
                       "keep": np.ones(int(flat["offsets"][-1]), np.uint8)}, tokenized.fingerprint)
    items = [(s.tokens.tolist(), int(np.argmax(s.response_mask))) for s in tokenized.samples]
    measured = float(np.mean([s.response_mask[1:].sum() / (seq_len - 1) for s in tokenized.samples]))
    return data, mask, items, tokenized, measured


def tokenize_dataset_rows(folder: Path, rows: list[dict], tokenizer, seq_len: int):
    path = folder / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tokenize_dataset(path, tokenizer, max_seq_len=seq_len)


# ---------------------------------------------------------------- whole runs


def run_toss(model_dir: Path, data: Path, mask: Path, out: Path, case: Case, steps: int) -> dict:
    settings = TrainSettings(model=str(model_dir), data=str(data), mask=str(mask), out=str(out),
                             iters=steps, batch_size=case.batch_size, max_seq_len=case.seq_len,
                             quiet=True, overwrite=True, save_every=10_000)
    result = train(settings)
    tokens = result.trained_tokens
    assert tokens == steps * case.batch_size * case.seq_len
    summary = json.loads((out / "train_summary.json").read_text())
    steps_rate = [json.loads(line)["tokens_per_sec"]
                  for line in (out / "train_log.jsonl").read_text().splitlines()]
    del result
    return {"seconds": summary["seconds"], "tokens": tokens, "peak_gb": summary["peak_memory_gb"],
            "step_tokens_per_sec": steps_rate}


def run_mlx_lm(model_dir: Path, items: list, scratch: Path, case: Case, steps: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train

    model, _ = load_model(str(model_dir), quiet=True)
    mx.random.seed(42)
    add_lora(model, LoraSettings())  # the same linear_to_lora_layers call mlx_lm.lora makes
    optimizer = optim.Adam(learning_rate=1e-5)
    training_args = TrainingArgs(batch_size=case.batch_size, iters=steps, steps_per_report=1,
                                 max_seq_length=case.seq_len, steps_per_save=10_000,
                                 adapter_file=str(scratch / "adapters.safetensors"))

    class Rates:  # mlx-lm's per-step report (steps_per_report=1)
        rates: list[float] = []

        def on_train_loss_report(self, info):
            # Its tokens_per_second counts loss targets only (default_loss's ntoks); ours
            # counts every token of the batch, so take its step rate times the batch's tokens.
            self.rates.append(info["iterations_per_second"] * case.batch_size * case.seq_len)

        def on_val_loss_report(self, info):
            pass

    rates = Rates()
    rates.rates = []
    np.random.seed(42)
    mx.reset_peak_memory()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        start = time.perf_counter()
        mlx_lm_train(model=model, optimizer=optimizer, train_dataset=items, args=training_args,
                     training_callback=rates)
        seconds = time.perf_counter() - start
    peak = mx.get_peak_memory() / 1e9
    del model, optimizer
    return {"seconds": seconds, "tokens": steps * case.batch_size * case.seq_len, "peak_gb": peak,
            "step_tokens_per_sec": rates.rates}


def whole_runs(case: Case, model_dir: Path, data, mask, items, tmp: Path, rounds: int, say) -> dict:
    import mlx.core as mx

    say(f"{case.name}: warm-up")
    run_toss(model_dir, data, mask, tmp / "out", case, 1)
    run_mlx_lm(model_dir, items, tmp, case, 1)
    runs: dict[str, list[dict]] = {"toss": [], "mlx_lm": []}
    for r in range(rounds):
        order = ("toss", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "toss")  # ABBA: no order bias
        for name in order:
            gc.collect()
            mx.clear_cache()
            run = (run_toss(model_dir, data, mask, tmp / "out", case, case.steps) if name == "toss"
                   else run_mlx_lm(model_dir, items, tmp, case, case.steps))
            run["tokens_per_sec"] = run["tokens"] / run["seconds"]
            run["load_average"] = os.getloadavg()[0]
            runs[name].append(run)
            say(f"{case.name} round {r + 1} {name:7s} {run['tokens_per_sec']:8.1f} tok/s  "
                f"{run['seconds']:6.1f} s  peak {run['peak_gb']:.3f} GB  load {run['load_average']:.1f}")
    med = {n: statistics.median(x["tokens_per_sec"] for x in rs) for n, rs in runs.items()}
    peak = {n: statistics.median(x["peak_gb"] for x in rs) for n, rs in runs.items()}
    paired = [t["tokens_per_sec"] / m["tokens_per_sec"]
              for t, m in zip(runs["toss"], runs["mlx_lm"], strict=True)]
    # Steady state: every step after a run's first (which compiles), as mlx-lm's trainer times it.
    steady = {n: statistics.median(r for x in rs for r in x["step_tokens_per_sec"][1:]) if case.steps > 1
              else None for n, rs in runs.items()}
    return {"speed_ratio": med["toss"] / med["mlx_lm"], "paired_ratio_median": statistics.median(paired),
            "steady_step_ratio": steady["toss"] / steady["mlx_lm"] if steady["toss"] else None,
            "steady_step_tokens_per_sec": steady,
            "paired_ratios": paired, "memory_ratio": peak["toss"] / peak["mlx_lm"],
            "toss_tokens_per_sec": med["toss"], "mlx_lm_tokens_per_sec": med["mlx_lm"],
            "toss_peak_gb": peak["toss"], "mlx_lm_peak_gb": peak["mlx_lm"], "runs": runs}


# ---------------------------------------------------------------- steps by length


def length_steps(case: Case, model_dir: Path, rows: list[dict], share: float, tokenizer, tmp: Path,
                 lengths: list[int], say) -> dict:
    """Per length L: one compiled step of each loss at batch 1 x L (peak memory, rough time)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    from toss_mlx import batches
    from toss_mlx.batches import KeepDataset, make_batch, masked_loss, use_kept_head
    from toss_mlx.lean_body import lean_hidden_states

    model, _ = load_model(str(model_dir), quiet=True)
    mx.random.seed(42)
    add_lora(model, LoraSettings())
    weights_gb = sum(v.nbytes for _, v in _leaves(model.parameters())) / 1e9
    probe = mx.random.normal((model.model.norm.weight.shape[0],), key=mx.random.key(1))

    def body_loss(model, tokens, lengths, *rest):
        h = model.model(tokens[:, :-1])
        return (h * probe).sum() / tokens.shape[1], lengths.sum()

    def lean_body_loss(model, tokens, lengths, *rest):
        h = lean_hidden_states(model, tokens[:, :-1])
        return (h * probe).sum() / tokens.shape[1], lengths.sum()

    def compiled(loss):
        optimizer = optim.Adam(learning_rate=1e-5)
        loss_and_grad = nn.value_and_grad(model, loss)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*batch):
            (value, _), grad = loss_and_grad(model, *batch)
            optimizer.update(model, grad)
            return value

        return step, state

    out = {"weights_gb": weights_gb, "vocab": int(model.model.embed_tokens.weight.shape[0]),
           "lengths": {}}
    for L in lengths:
        _, _, items, tokenized, measured = make_data(tmp / f"len{L}", rows, 2, L, share, tokenizer)
        ours = make_batch(KeepDataset.build(tokenized), np.array([0]), L)
        tokens = mx.array(np.array([items[0][0]], np.int32))
        theirs = (tokens, mx.array([[items[0][1], L]], mx.int32))  # mlx-lm: (offset, length)
        # toss: the trainer as it runs (kept head, lean body); toss_mlx_layers: the kept head on
        # mlx-lm's layers (TOSS_MLX_LEAN_BODY=0); body_only / body_only_lean: a loss on the final
        # hidden states, no vocabulary projection, through either body (the floors)
        losses = {"mlx_lm": (default_loss, theirs), "toss": (partial(masked_loss, norm="token"), ours),
                  "toss_mlx_layers": (partial(masked_loss, norm="token"), ours),
                  "body_only": (body_loss, ours), "body_only_lean": (lean_body_loss, ours)}
        result = {}
        for name, (loss, batch) in losses.items():
            gc.collect()
            mx.clear_cache()
            use_kept_head(model, tokenized.samples[0].tokens, lean_body=name != "toss_mlx_layers")
            assert batches._KEPT_HEAD[id(model)][2] == (name != "toss_mlx_layers")
            step, state = compiled(loss)
            mx.reset_peak_memory()
            start = time.perf_counter()  # one step, its compile included (seconds are rough)
            value = step(*batch)
            mx.eval(state, value)
            result[name] = {"seconds": time.perf_counter() - start,
                            "peak_gb": mx.get_peak_memory() / 1e9, "loss": value.item()}
            del step, state
        result["response_share"] = measured
        result["logits_gb"] = L * out["vocab"] * 4 / 1e9  # one float32 [L, V] array
        out["lengths"][L] = result
        say(f"{case.name} L={L}: " + ", ".join(
            f"{n} {r['peak_gb']:.3f} GB {r['seconds']:.1f} s" for n, r in result.items()
            if isinstance(r, dict)) + f" (one [L, V] float32: {result['logits_gb']:.3f} GB)")
    return out


def _leaves(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,qwen")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default per model)")
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args()

    def say(text: str) -> None:
        print(time.strftime("%H:%M:%S"), text, flush=True)

    results = {"machine": machine_details(), "argv": sys.argv[1:], "cases": {},
               "settings": {"lora": "rank 16, alpha 16, q_proj+v_proj, all layers",
                            "optimizer": "adam 1e-5", "dtype": "float32"}}
    if Path(args.results).exists():  # keep the other models' figures of an earlier run
        earlier = json.loads(Path(args.results).read_text())
        results["cases"] = {k: v for k, v in earlier.get("cases", {}).items()}
    lengths = [int(x) for x in args.lengths.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="toss-bench-") as tmp:
        tmp = Path(tmp)
        rows = reproduce_rows(tmp / "reproduce")
        for name in args.models.split(","):
            case = CASES[name]
            if args.steps:
                case.steps = args.steps
            model_dir = pull(case.registry)
            _, tokenizer = load_model(str(model_dir), quiet=True)
            full = tokenize_dataset(tmp / "reproduce" / "custom.jsonl", tokenizer, max_seq_len=4096)
            share = float(sum(int(s.response_mask.sum()) for s in full.samples)
                          / sum(len(s.tokens) for s in full.samples))
            data, mask, items, _, measured = make_data(tmp / name, rows, 4 * case.batch_size,
                                                       case.seq_len, share, tokenizer)
            entry = results["cases"].get(name, {}) if not args.rounds else {}
            entry.update({"model": case.registry, "batch_size": case.batch_size, "seq_len": case.seq_len,
                     "reproduce_response_share": share, "bench_response_share": measured,
                     "targets": {"speed_ratio_at_least": case.target_speed,
                                 "memory_ratio_at_most": case.target_memory}})
            say(f"{name}: response share {measured:.3f} (reproduction's data: {share:.3f})")
            if args.rounds:
                entry["whole_runs"] = whole_runs(case, model_dir, data, mask, items, tmp, args.rounds, say)
                w = entry["whole_runs"]
                w.update(steps_per_run=case.steps, rounds=args.rounds, load_average_end=os.getloadavg())
                say(f"{name}: tokens/s toss-mlx {w['toss_tokens_per_sec']:.1f}, mlx-lm "
                    f"{w['mlx_lm_tokens_per_sec']:.1f}: ratio {w['speed_ratio']:.3f} (paired median "
                    f"{w['paired_ratio_median']:.3f}; target >= {case.target_speed}); peak memory "
                    f"{w['toss_peak_gb']:.3f} vs {w['mlx_lm_peak_gb']:.3f} GB: ratio "
                    f"{w['memory_ratio']:.3f} (target <= {case.target_memory}); steady-state steps: "
                    f"ratio {w['steady_step_ratio'] or float('nan'):.3f}")
                results["cases"][name] = entry
                results["machine"]["load_average_end"] = os.getloadavg()
                write_json(args.results, results)
            if lengths:
                entry["by_length"] = length_steps(case, model_dir, rows, share, tokenizer, tmp,
                                                  lengths, say)
                entry["by_length"]["load_average_end"] = os.getloadavg()
                results["cases"][name] = entry
                results["machine"]["load_average_end"] = os.getloadavg()
                write_json(args.results, results)
    say(f"wrote {args.results}")


if __name__ == "__main__":
    main()
