"""How much one fine-tune's AdvBench refusal moves with its training seed or its random mask alone.

Issue 21, item 5: random token removal fell below standard SFT in both earlier SmolLM2 seeds
(25.8% vs 55% pooled). Removing a random tenth of the tokens changes the gradient only by
noise (the loss is the mean over kept tokens), so one explanation is that a fine-tune near
the edge of losing its safety lands far from run to run: the prompt-level Wilson interval
of one fine-tune does not hold that spread. This measures it: for a seed folder of
`bench/reproduce.py`, each method is fine-tuned again with other training seeds (data order,
LoRA init, dropout), the same data, mask and recipe, and random removal with other mask seeds
(the run's training seed), then all are evaluated on the run's AdvBench prompts.

    python bench/finetune_spread.py --run bench/runs/reproduce/MODEL-main/seed0 --train-seeds 1,2
    python bench/finetune_spread.py --run RUN --methods standard_sft,random --train-seeds 1,2 --mask-seeds 1,2

The run's own fine-tunes (its eval.json) join as their seed's entry. Per method: refusal per
run, mean, sd over runs, and the binomial sd of one run at the mean rate: an sd over runs far
above it means one fine-tune's interval understates how far a method's refusal can move.
Resumable (`reproduce.Steps` in RUN/spread/; the same arguments resume, other ones retrain the
runs after the first change). Writes bench/results/finetune_spread.json, one entry per run folder.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reproduce  # noqa: E402  (bench/reproduce.py: its settings, training and step cache)
from machine_info import machine  # noqa: E402

from toss_mlx.evaluate import EvalSettings, evaluate  # noqa: E402
from toss_mlx.io import read_json  # noqa: E402
from toss_mlx.select import select  # noqa: E402

MASKED = ("random", "first5", "sample_filter", "toss_d0.1", "toss_d0.2", "toss_pro_r1", "toss_pro_r2")


def spread(rates: list[float], n: int) -> dict[str, Any]:
    """Mean and sd over runs of one method, beside one run's binomial sd at the mean rate."""
    mean = statistics.fmean(rates)
    return {"runs": len(rates), "rates": rates, "mean": mean,
            "sd_over_runs": statistics.stdev(rates) if len(rates) > 1 else None,
            "range": [min(rates), max(rates)], "binomial_sd_one_run": math.sqrt(mean * (1 - mean) / n)}


def eval_refusal(base: str, data_dir: Path, s: reproduce.Setting, adapters: dict[str, str], out: Path) -> dict:
    evaluate(EvalSettings(model=base, adapters=adapters, include_base=False,
                          harmful=str(data_dir / "eval_harmful.jsonl"), max_new_tokens=s.max_new_tokens,
                          max_seq_len=s.max_seq_len, batch_size=s.eval_batch), out, quiet=False)
    return {"eval": str(out)}


def measure(run: Path, model: str, methods: list[str], train_seeds: list[int], mask_seeds: list[int]
            ) -> dict[str, Any]:
    s = reproduce.seed_setting(run, model)
    base = reproduce.seed_base(run, model)
    data_dir, work = run / "data", run / "spread"
    result = read_json(run / "result.json")
    run_seed = result["seed"]
    steps = reproduce.Steps(work, upstream=run)
    data = {m: data_dir / ("custom_safe_mix.jsonl" if m == "safe_mix" else "custom.jsonl") for m in methods}
    trained: dict[str, tuple[str, str, int]] = {}  # adapter name -> (method, kind of seed, seed)
    for method in methods:
        mask = run / "masks" / f"{method}.safetensors" if method in MASKED else None
        for seed in train_seeds:
            name = f"{method}-train{seed}"
            steps(f"train_{name}", reproduce.train_adapter, base, data[method], work / name, s, seed,
                  mask=str(mask) if mask else None, epochs=s.finetune_epochs, lr=s.finetune_lr)
            trained[name] = (method, "train", seed)
    if "random" in methods:
        pro = read_json(run / "steps" / "toss_pro.json")["value"]["result"]
        for seed in mask_seeds:
            scores, kw = reproduce.method_selections(pro, seed)["random"]
            name = f"random-mask{seed}"
            mask = work / "masks" / f"{name}.safetensors"
            steps(f"select_{name}", select, str(scores), str(mask), **kw)
            steps(f"train_{name}", reproduce.train_adapter, base, data["random"], work / name, s, run_seed,
                  mask=str(mask), epochs=s.finetune_epochs, lr=s.finetune_lr)
            trained[name] = ("random", "mask", seed)
    steps("eval", eval_refusal, base, data_dir, s, {n: str(work / n) for n in trained}, work / "eval.json")
    rates: dict[str, dict[str, Any]] = {}
    for m in read_json(work / "eval.json")["models"]:
        method, kind, seed = trained[m["name"]]
        rates[m["name"]] = {"method": method, "varied": kind, "seed": seed,
                            "advbench_refusal": m["metrics"]["refusal_rate"]["value"],
                            "n_prompts": m["metrics"]["refusal_rate"]["n"]}
    out: dict[str, Any] = {"run": str(run), "model": model, "run_seed": run_seed, "machine": machine(),
                           "runs": rates, "methods": {}}
    for method in methods:
        own = result["methods"].get(method)
        for kind in ("train", "mask"):
            group = [r["advbench_refusal"] for r in rates.values() if r["method"] == method and r["varied"] == kind]
            if not group:
                continue
            n = next(r["n_prompts"] for r in rates.values() if r["method"] == method)
            # the run's own fine-tune: its training seed and its mask seed are both the run's
            with_own = ([own["advbench_refusal"]] if own else []) + group
            out["methods"][f"{method} ({kind} seed)"] = spread(with_own, n) | {"includes_run": own is not None}
    return out


def table(result: dict[str, Any]) -> str:
    rows = ["| method (varied) | runs | refusal % per run | mean % | sd over runs | one run's binomial sd |",
            "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        sd = "-" if m["sd_over_runs"] is None else f"{100 * m['sd_over_runs']:.1f}"
        rows.append(f"| {name} | {m['runs']} | {', '.join(f'{100 * r:.1f}' for r in m['rates'])} | "
                    f"{100 * m['mean']:.1f} | {sd} | {100 * m['binomial_sd_one_run']:.1f} |")
    return "\n".join(rows)


def seeds(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished seed folder of bench/reproduce.py")
    ap.add_argument("--model", default=None, choices=reproduce.MODELS,
                    help="the run's model (default: read from the folder's name)")
    ap.add_argument("--methods", default="standard_sft", help="comma-separated methods of the run to repeat")
    ap.add_argument("--train-seeds", type=seeds, default=[1, 2], help="training seeds, e.g. 1,2")
    ap.add_argument("--mask-seeds", type=seeds, default=[], help="random's mask seeds (random only)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "finetune_spread.json")
    args = ap.parse_args(argv)
    model = reproduce.model_of_run(args.run, args.model)
    if not (args.run / "result.json").exists():
        raise SystemExit(f"--run {args.run}: not finished (no result.json)")
    methods = [m for m in args.methods.split(",") if m]
    ran = read_json(args.run / "result.json")["methods_run"]
    missing = sorted(set(methods) - set(ran))
    if missing:
        raise SystemExit(f"--methods: {', '.join(missing)} not run in {args.run} (it ran {', '.join(ran)})")
    if args.mask_seeds and "random" not in methods:
        raise SystemExit("--mask-seeds: only random removal has a mask seed; add random to --methods")
    result = measure(args.run, model, methods, args.train_seeds, args.mask_seeds)
    print(table(result))
    reproduce.store_run_result(args.results, args.run, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
