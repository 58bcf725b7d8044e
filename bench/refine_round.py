"""A TOSS-Pro round's scoring time against a full two-model score (issue 16: target <= 0.55).

After the first scoring of a TOSS-Pro run the utility model never changes, so a round
computes only the safety side and copies loss_utility (`ScoreSettings.reuse_utility`).
This measures, side by side in one run, on the reproduction's custom data
(`prepare.build_reproduce`: grade-school math with harmful question/answer pairs mixed
in) and SmolLM2-135M-Instruct with rank-16 LoRA adapters on q_proj and v_proj:

- full: `toss_mlx.score.score` with the utility adapter and a new safety adapter;
- round: the same with `reuse_utility` = the first scoring's file.

Both get the loaded model and the tokenized data (what a round re-does either way is
the same), so the ratio is the scoring work. Each round times both, alternating which
goes first; the result is the median of the per-round ratios, and each round checks
that the two files agree (loss_utility bit for bit, loss_safety and score exactly).

    python bench/refine_round.py [--samples 48] [--rounds 3] [--max-seq-len 320]

Writes bench/results/refine_round.json; the figures go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/adapters.py: LoRA adapters with random lora_b

from machine_info import machine  # noqa: E402  (bench/ is on sys.path when run as a script)

import toss_mlx  # noqa: E402, F401  (the BLAS preload, before mlx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48, help="custom samples scored (a random subset)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=320)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "refine_round.json"))
    args = p.parse_args(argv)

    from adapters import make_adapter

    from toss_mlx.data import TokenizedData, tokenize_dataset
    from toss_mlx.models.load import load_model
    from toss_mlx.models.registry import pull
    from toss_mlx.prepare import build_reproduce
    from toss_mlx.score import ScoreSettings, score

    work = Path(args.workdir or tempfile.mkdtemp(prefix="refine-round-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = pull("smollm2-135m-instruct")
    if not (work / "data" / "custom.jsonl").exists():
        build_reproduce(work / "data", seed=args.seed)
    model, tokenizer = load_model(str(model_dir), quiet=True)
    data = tokenize_dataset(work / "data" / "custom.jsonl", tokenizer, max_seq_len=args.max_seq_len)
    idx = sorted(np.random.default_rng(args.seed).permutation(len(data.samples))[:args.samples])
    data = TokenizedData([data.samples[i] for i in idx], data.fingerprint, data.source)
    adapters = {name: make_adapter(model_dir, work / "adapters" / name, rank=16, alpha=16.0,
                                   seed=seed, amplitude=0.05)
                for name, seed in (("utility", 1), ("safety-1", 2), ("safety-2", 3))}
    print(f"{data.summary()}; {machine()}", flush=True)

    def settings(safety: str, out: Path, reuse: Path | None = None) -> ScoreSettings:
        return ScoreSettings(model=str(model_dir), utility=str(adapters["utility"]),
                             safety=str(adapters[safety]), data=str(work / "data" / "custom.jsonl"),
                             out=str(out), max_seq_len=args.max_seq_len,
                             batch_tokens=args.batch_tokens, quiet=True,
                             reuse_utility=str(reuse) if reuse else None)

    first = work / "first.safetensors"
    score(settings("safety-1", first), model=model, tokenizer=tokenizer, data=data)
    rounds = []
    for r in range(args.rounds):
        times = {}
        for kind in (("full", "round") if r % 2 == 0 else ("round", "full")):
            out = work / f"{kind}-{r}.safetensors"  # "round-0", "full-0", ...
            out.unlink(missing_ok=True)
            start = time.perf_counter()
            result = score(settings("safety-2", out, first if kind == "round" else None),
                           model=model, tokenizer=tokenizer, data=data)
            times[kind] = (time.perf_counter() - start, result)
        full, round_ = times["full"][1], times["round"][1]
        assert np.array_equal(round_.loss_safety, full.loss_safety)
        assert np.array_equal(round_.score, full.score)
        ratio = times["round"][0] / times["full"][0]
        rounds.append({"full_s": times["full"][0], "round_s": times["round"][0], "ratio": ratio,
                       "first": "full" if r % 2 == 0 else "round"})
        print(f"round {r}: full {times['full'][0]:.1f} s, round {times['round'][0]:.1f} s, "
              f"ratio {ratio:.3f}", flush=True)
    from toss_mlx.layout import load_scores

    reference = load_scores(first)
    same_utility = all(np.array_equal(load_scores(work / f"round-{r}.safetensors").loss_utility,
                                      reference.loss_utility) for r in range(args.rounds))
    result = {
        "machine": machine(), "load_average": os.getloadavg(),
        "samples": len(data.samples), "response_tokens": data.response_tokens,
        "max_seq_len": args.max_seq_len, "batch_tokens": args.batch_tokens,
        "score_path": reference.meta.get("score_path"),
        "rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "loss_utility_bit_for_bit": same_utility, "target": 0.55,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"median ratio {result['median_ratio']:.3f} (target <= 0.55); "
          f"loss_utility bit for bit: {same_utility}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
