"""Cost of the deep-safety likelihood metrics against generating answers (issue 22).

SmolLM2-135M-Instruct (float32 on the CPU), 60 of pyrit's harmful prompt +
answer pairs. The likelihood metrics (`toss_mlx.evaluate.depth.answer_token_stats`:
per-token NLL at every answer position, and KL(model || base) for each
adapter) run for the base and `--models - 1` LoRA adapters (rank 8 on q/v,
random non-zero weights: the cost does not depend on what an adapter learned),
exactly as `toss-mlx eval --prefill-harmful` runs them: one base reference
pass, then one pass per adapter. Generation: greedy 40-token answers to the
same 60 prompts with `evaluate.generate_answers` (batch 16, as `eval`), for
`--gen-models` of the same models (each model's generation costs the same, so
fewer models are timed to keep the run short; the per-model time is scaled
to all of them). Runs alternate so both see the same machine load. Writes
bench/results/deep_safety.json.

    python bench/deep_safety.py [--pairs 60] [--models 6] [--gen-models 2] [--new-tokens 40] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# toss_mlx first: it preloads OpenBLAS before anything imports mlx.core.
from toss_mlx.evaluate import adapter_applied, depth, generate_answers, prompt_ids
from toss_mlx.io import write_json
from toss_mlx.models.load import load_model
from toss_mlx.models.lora import LoraSettings, add_lora, save_adapter
from toss_mlx.models.registry import pull
from toss_mlx.prepare import harmful_pairs

MACHINE = "Linux x86-64, 2 cores (shared), OpenBLAS, mlx 0.32.4 cpu"


def make_adapters(model_dir: Path, folder: Path, n: int) -> list[str]:
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    out = []
    for i in range(n):
        model, _ = load_model(str(model_dir), quiet=True)
        config = add_lora(model, LoraSettings(rank=8, alpha=16))
        mx.random.seed(i)
        for _, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_b = 0.02 * mx.random.normal(layer.lora_b.shape)
        out.append(str(save_adapter(model, folder / f"a{i}", config)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--gen-models", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-answer-tokens", type=int, default=160,
                    help="answer tokens the likelihood reads (eval's depth_max_tokens; 0: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "deep_safety.json"))
    args = ap.parse_args()

    model_dir = pull("smollm2-135m-instruct")
    model, tokenizer = load_model(str(model_dir), quiet=True)
    rows = harmful_pairs()[:args.pairs]
    pairs = [depth.Pair(i, [{"role": "user", "content": r["prompt"]}], r["completion"])
             for i, r in enumerate(rows)]
    seqs = [depth.answer_tokens(p, tokenizer, "chat", 2048, args.max_answer_tokens) for p in pairs]
    prompts = [prompt_ids(p.messages, tokenizer, "chat") for p in pairs]
    answer_tokens = sum(t.stop - t.start for t in seqs)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model_dir, Path(tmp), args.models - 1)
        folders = [None] + adapters

        def likelihood() -> float:
            tic = time.perf_counter()
            _, _, ref = depth.answer_token_stats(model, seqs, 2048, keep=True)
            for folder in adapters:
                with adapter_applied(model, folder):
                    depth.answer_token_stats(model, seqs, 2048, reference=ref)
            return time.perf_counter() - tic

        def generation() -> list[float]:
            times = []
            for folder in folders[:args.gen_models]:
                with adapter_applied(model, folder):
                    tic = time.perf_counter()
                    generate_answers(model, tokenizer, prompts, args.new_tokens, batch_size=16)
                    times.append(time.perf_counter() - tic)
            return times

        depth.answer_token_stats(model, seqs[:4], 2048)  # warm-up (path pick, allocations)
        generate_answers(model, tokenizer, prompts[:4], 4, batch_size=16)
        lik, gen = [], []
        for _ in range(args.rounds):
            lik.append(likelihood())
            gen.extend(generation())
    lik_s = statistics.median(lik)
    gen_per_model = statistics.median(gen)
    result = {
        "machine": MACHINE, "python": platform.python_version(), "pairs": len(pairs),
        "models": args.models, "answer_tokens": answer_tokens,
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
        "new_tokens": args.new_tokens, "max_answer_tokens": args.max_answer_tokens,
        "likelihood_seconds_all_models": lik_s,
        "likelihood_seconds_per_model": lik_s / args.models,
        "generation_seconds_per_model": gen_per_model, "generation_models_timed": args.gen_models,
        "generation_seconds_all_models": gen_per_model * args.models,
        "ratio_likelihood_all_to_generation_all": lik_s / (gen_per_model * args.models),
        "ratio_likelihood_all_to_generation_one": lik_s / gen_per_model,
        "raw": {"likelihood": lik, "generation": gen},
    }
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=1))


if __name__ == "__main__":
    main()
