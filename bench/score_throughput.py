"""Throughput of `toss-mlx score` against PyTorch + transformers and against the compute ceiling.

Same model (the pulled SmolLM2-135M-Instruct, float32, CPU), same data, same two
LoRA adapters (rank 16 on q_proj and v_proj of every layer, the paper's
recipe, with random non-zero lora_b so they really move the logits):

- toss-mlx: `score_tokens` (one base model, adapter weights swapped, length
  buckets under a token budget, vocabulary projection only at response
  positions).
- torch: the official code's approach in PyTorch + transformers: one model at
  a time (the adapter merged into the weights, which is the cheapest form of
  LoRA for torch), batches of `--torch-batch` samples in data order padded to
  the longest, full forward to logits, `CrossEntropyLoss(reduction='none')`
  per token, response positions picked afterwards. (The model is not asked
  for its own mean loss, which the official code also computes: torch gets
  the cheaper variant.)
- ceiling: 2 x parameters x tokens x 2 models / the machine's fp32 matmul rate
  (the better of MLX's and torch's 2048^3 matmul, measured in every round).
  "tokens" are all tokens of the data, the ones a forward pass must read;
  tokens/s figures below are response tokens scored per second. The ratio is
  given on wall time and on CPU time (seconds of all the process's threads,
  for the run and for the matmul alike): the machine this was written on is
  shared with other jobs, and a short matmul probe and a minutes-long run do
  not get the same share of it, so the wall-time ratio swings with the load
  while the CPU-time ratio measures how close the scorer's arithmetic comes
  to a bare matmul's. `ratio_vs_ceiling` in the JSON is the CPU-time one.

The data (>= 200 samples of mixed length: GSM-style worked answers and
harmful Q/A pairs, the RedOrca mix, in random order) is split into rounds.
Each round measures the matmul rate, scores its share with toss-mlx, scores
the first `--torch-samples` of the same share with torch (torch is the slow
side; a random subset keeps the benchmark to minutes), and measures the
matmul rate again, so all three see the same machine load. Throughputs are
per token, so the two sides compare although torch sees fewer samples.
Medians over rounds are reported, and the per-token losses of the two
implementations are compared on the samples both scored.

    python bench/score_throughput.py [--samples 200] [--rounds 4] [--max-seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def build_data(folder: Path, samples: int, seed: int) -> Path:
    """A RedOrca-like mix: 80% GSM-style task answers, 20% harmful pairs, shuffled."""
    import random

    from toss_mlx.prepare import gsm_problems, harmful_pairs

    n_harm = samples // 5
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in gsm_problems(samples - n_harm, seed)]
    harm = harmful_pairs()
    random.Random(seed).shuffle(harm)
    rows += harm[:n_harm]
    random.Random(seed + 1).shuffle(rows)
    path = folder / "custom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_adapters(model_dir: Path, folder: Path) -> dict[str, Path]:
    from adapters import make_adapter  # tests/adapters.py: LoRA with random non-zero lora_b

    return {name: make_adapter(model_dir, folder / name, rank=16, alpha=16.0, seed=seed, amplitude=0.05)
            for name, seed in (("utility", 1), ("safety", 2))}


def subset(data, idx):
    from toss_mlx.data import TokenizedData

    return TokenizedData([data.samples[i] for i in idx], data.fingerprint, data.source)


# ---------------------------------------------------------------- torch


class TorchScorer:
    """The official approach: one merged model at a time, padded batches, full logits."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], batch: int):
        import torch
        from safetensors.numpy import load_file
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.batch = batch
        self.base = {n: p.detach().clone() for n, p in self.model.named_parameters()
                     if n.endswith(("q_proj.weight", "v_proj.weight"))}
        self.deltas = {}
        for name, folder in adapters.items():
            cfg = json.loads((folder / "adapter_config.json").read_text())["lora_parameters"]
            w = load_file(str(folder / "adapters.safetensors"))
            self.deltas[name] = {
                key[: -len("lora_a")] + "weight":
                    torch.from_numpy(cfg["scale"] * (w[key] @ w[key[:-1] + "b"]).T.copy())
                for key in w if key.endswith("lora_a")}

    def use(self, name: str) -> None:
        params = dict(self.model.named_parameters())
        with self.torch.no_grad():
            for n, base in self.base.items():
                params[n].copy_(base + self.deltas[name].get(n, 0))

    def losses(self, data) -> np.ndarray:
        torch = self.torch
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        out = []
        with torch.inference_mode():
            for k in range(0, len(data.samples), self.batch):
                chunk = data.samples[k:k + self.batch]
                L = max(len(s.tokens) for s in chunk)
                ids = torch.zeros((len(chunk), L), dtype=torch.long)
                attn = torch.zeros((len(chunk), L), dtype=torch.long)
                labels = torch.full((len(chunk), L), -100, dtype=torch.long)
                for b, s in enumerate(chunk):
                    t = torch.from_numpy(s.tokens.astype(np.int64))
                    ids[b, :len(t)], attn[b, :len(t)] = t, 1
                    m = torch.from_numpy(s.response_mask)
                    labels[b, :len(t)] = torch.where(m, t, torch.tensor(-100))
                logits = self.model(input_ids=ids, attention_mask=attn).logits
                per = loss_fn(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              labels[:, 1:].reshape(-1)).view(len(chunk), L - 1)
                for b, s in enumerate(chunk):
                    tok = np.zeros(len(s.tokens), np.float32)
                    tok[1:] = per[b, :len(s.tokens) - 1].numpy()
                    out.append(tok * s.response_mask)
        return np.concatenate(out)

    def score(self, data) -> tuple[np.ndarray, np.ndarray]:
        result = []
        for name in ("utility", "safety"):
            self.use(name)
            result.append(self.losses(data))
        return result[0], result[1]


# ---------------------------------------------------------------- matmul rate


class Clock:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_rate(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """FLOP per wall second and per CPU second of an n^3 fp32 matmul, MLX and torch (medians)."""
    import mlx.core as mx
    import torch

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    ta @ tb
    flops = 2 * n ** 3
    out = {}
    for name, fn in (("mlx", lambda: mx.eval(a @ b)), ("torch", lambda: ta @ tb)):
        clocks = []
        for _ in range(reps):
            with Clock() as c:
                fn()
            clocks.append(c)
        out[name] = flops / statistics.median(c.wall for c in clocks)
        out[name + "_cpu"] = flops / statistics.median(c.cpu for c in clocks)
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--torch-samples", type=int, default=12, help="torch's samples per round")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--torch-batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/toss-bench-score")
    ap.add_argument("--threads", type=int, default=None, help="threads for BLAS, numpy and "
                    "torch (default: all cores)")
    ap.add_argument("--out", default=str(HERE / "results" / "score_throughput.json"))
    args = ap.parse_args()
    if args.threads:  # before any BLAS is loaded
        import os

        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "TOSS_MLX_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import toss_mlx  # noqa: F401, I001  (BLAS before mlx)
    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten

    from toss_mlx.data import tokenize_dataset
    from toss_mlx.models.load import load_model
    from toss_mlx.models.registry import pull
    from toss_mlx.score import ScoreSettings, score_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = pull("smollm2-135m-instruct")
    model, tokenizer = load_model(str(model_dir), quiet=True)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    data = tokenize_dataset(build_data(work, args.samples, args.seed), tokenizer,
                            max_seq_len=args.max_seq_len)
    adapters = make_adapters(model_dir, work / "adapters")
    torch_scorer = TorchScorer(model_dir, adapters, args.torch_batch)
    print(f"{data.summary()}; model {params / 1e6:.1f}M parameters; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    order = np.random.default_rng(args.seed).permutation(len(data.samples))
    rounds = []
    max_diff = 0.0
    for r, idx in enumerate(np.array_split(order, args.rounds)):
        part = subset(data, sorted(idx))
        torch_idx = idx[:args.torch_samples]  # idx is in random order: a random subset
        torch_part = subset(data, sorted(torch_idx))
        tokens = sum(len(s.tokens) for s in part.samples)
        response = sum(int(s.response_mask[1:].sum()) for s in part.samples)
        torch_tokens = sum(len(s.tokens) for s in torch_part.samples)
        torch_response = sum(int(s.response_mask[1:].sum()) for s in torch_part.samples)
        rate = matmul_rate()
        with Clock() as mlx_clock:
            scores = score_tokens(model, part, ScoreSettings(
                utility=str(adapters["utility"]), safety=str(adapters["safety"]),
                batch_tokens=args.batch_tokens, quiet=True))
        with Clock() as torch_clock:
            lu, lh = torch_scorer.score(torch_part)
        t_mlx, t_torch = mlx_clock.wall, torch_clock.wall
        rate2 = matmul_rate()
        best_rate = max((rate["mlx"] + rate2["mlx"]) / 2, (rate["torch"] + rate2["torch"]) / 2)
        best_cpu_rate = max((rate["mlx_cpu"] + rate2["mlx_cpu"]) / 2,
                            (rate["torch_cpu"] + rate2["torch_cpu"]) / 2)
        flops_per_token = 2 * params * 2  # both models
        ceiling = best_rate / flops_per_token  # data tokens per second at the matmul rate
        pos = np.concatenate([np.arange(scores.offsets[i], scores.offsets[i + 1])
                              for i, j in enumerate(sorted(idx)) if j in set(torch_idx.tolist())])
        mask = scores.response_mask[pos] == 1
        diff = max(np.abs(scores.loss_utility[pos] - lu)[mask].max(),
                   np.abs(scores.loss_safety[pos] - lh)[mask].max())
        max_diff = max(max_diff, float(diff))
        row = {
            "samples": len(idx), "tokens": tokens, "response_tokens": response,
            "torch_samples": len(torch_idx), "torch_tokens": torch_tokens,
            "torch_response_tokens": torch_response, "mlx_s": t_mlx, "torch_s": t_torch,
            "tokens_per_s": response / t_mlx, "torch_tokens_per_s": torch_response / t_torch,
            "ratio_vs_torch": (response / t_mlx) / (torch_response / t_torch),
            "ratio_vs_ceiling_wall": (tokens / t_mlx) / ceiling,
            "torch_ratio_vs_ceiling_wall": (torch_tokens / t_torch) / ceiling,
            # The same ratios on CPU seconds (all threads of the process): on a machine shared
            # with other jobs they do not depend on how much of the CPU the run happened to get.
            "ratio_vs_ceiling": flops_per_token * tokens / mlx_clock.cpu / best_cpu_rate,
            "torch_ratio_vs_ceiling": flops_per_token * torch_tokens / torch_clock.cpu / best_cpu_rate,
            "ratio_vs_torch_cpu": (response / mlx_clock.cpu) / (torch_response / torch_clock.cpu),
            "mlx_cpu_s": mlx_clock.cpu, "torch_cpu_s": torch_clock.cpu,
            "matmul_gflops": best_rate / 1e9, "matmul_gflops_per_cpu_s": best_cpu_rate / 1e9,
            "max_abs_loss_diff": float(diff),
            "load_average": __import__("os").getloadavg()[0],
        }
        rounds.append(row)
        print(f"round {r + 1}/{args.rounds}: {len(idx)} samples, {tokens} tokens ({response} response), "
              f"toss-mlx {t_mlx:.1f}s = {row['tokens_per_s']:.0f} resp tok/s, torch ({len(torch_idx)} samples) "
              f"{t_torch:.1f}s = "
              f"{row['torch_tokens_per_s']:.0f}; toss-mlx/torch {row['ratio_vs_torch']:.2f}, "
              f"(cpu time {row['ratio_vs_torch_cpu']:.2f}), toss-mlx/ceiling {row['ratio_vs_ceiling']:.2f} "
              f"cpu time, {row['ratio_vs_ceiling_wall']:.2f} wall (torch {row['torch_ratio_vs_ceiling']:.2f}, "
              f"{row['torch_ratio_vs_ceiling_wall']:.2f}; matmul {best_rate / 1e9:.0f} GFLOP/s wall); "
              f"load {row['load_average']:.1f}; max |loss diff| {diff:.1e}", flush=True)

    med = {k: statistics.median(r[k] for r in rounds) for k in
           ("tokens_per_s", "torch_tokens_per_s", "ratio_vs_torch", "ratio_vs_torch_cpu",
            "ratio_vs_ceiling", "ratio_vs_ceiling_wall", "torch_ratio_vs_ceiling",
            "torch_ratio_vs_ceiling_wall", "matmul_gflops", "load_average")}
    result = {
        **med,
        "machine": f"{platform.system()} {platform.machine()}, {__import__('os').cpu_count()} cores, "
                   f"mlx {mx.__version__} cpu, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct float32", "parameters": int(params),
        "samples": len(data.samples), "tokens": int(sum(len(s.tokens) for s in data.samples)),
        "response_tokens": int(data.response_tokens), "max_seq_len": args.max_seq_len,
        "batch_tokens": args.batch_tokens, "torch_batch": args.torch_batch,
        "torch_samples_per_round": args.torch_samples, "threads": args.threads or "all cores",
        "max_abs_loss_diff_vs_torch": max_diff, "rounds": rounds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmedians over {len(rounds)} rounds: toss-mlx {med['tokens_per_s']:.0f} response tok/s, "
          f"torch {med['torch_tokens_per_s']:.0f}; toss-mlx / torch = {med['ratio_vs_torch']:.2f} "
          f"(target >= 3; {med['ratio_vs_torch_cpu']:.2f} on cpu time), toss-mlx / ceiling = "
          f"{med['ratio_vs_ceiling']:.2f} on cpu time, {med['ratio_vs_ceiling_wall']:.2f} on wall time "
          f"(target >= 0.6), torch / ceiling = {med['torch_ratio_vs_ceiling']:.2f}; "
          f"median load average {med['load_average']:.1f}; max |loss diff| {max_diff:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
