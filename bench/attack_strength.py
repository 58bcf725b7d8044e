"""Does a stronger fine-tune erode a natively aligned model? Standard SFT under several recipes.

Issue 21 on Qwen2.5-Coder-0.5B-Instruct: at the reproduction's sizes (`reproduce.QWEN`: 30 steps
of 4, lr 5e-5, LoRA on the top 4 of 24 layers, 20% harmful samples) standard SFT refuses *more*
than the base (85.0% vs 65.0% AdvBench), so the main condition cannot show a defence keeping
safety that SFT loses. This fine-tunes the same custom data (the reproduction's data step for
the seed, so the same files) with standard SFT under stronger recipes and measures, for each:
AdvBench refusal and refuse-then-comply (the reproduction's 40 prompts), prefill recovery at
K = 10 and the harmful-answer NLL gap to the base by position (the held-out pairs), and the
task NLL (likelihood of the reference answers, so the attack is still a useful fine-tune).

    python bench/attack_strength.py                                   # the run's recipe, 12 layers, 3 epochs
    python bench/attack_strength.py --recipe epochs=3 --recipe epochs=2,num_layers=12,lr=1e-4
    python bench/attack_strength.py --recipe num_layers=12 --recipe num_layers=12,train_seed=1

The first recipe is the reproduction's own (`--recipe` with no keys = it), trained with the
run's training seed: its refusal must equal the reproduction's standard SFT on the same seed
(a check that this measures the same thing). Each recipe is trained and evaluated in its own
resumable step (`reproduce.Steps` in OUT/MODEL-main/seedN/attack/), so a run cut short keeps
the recipes that finished. Writes bench/results/attack_strength.json (one entry per model and
seed; rows of earlier invocations are kept, each with its code fingerprint) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reproduce  # noqa: E402  (bench/reproduce.py: sizes, data step, training, step cache)
from machine_info import machine  # noqa: E402

from toss_mlx.evaluate import EvalSettings, evaluate  # noqa: E402
from toss_mlx.io import read_json, write_json  # noqa: E402
from toss_mlx.prepare import build_reproduce  # noqa: E402

RECIPE_KEYS = {"epochs": int, "num_layers": int, "lr": float, "train_seed": int}
DEFAULT_RECIPES = ["", "num_layers=12", "epochs=3"]
PREFILL_K = 10  # one K of the reproduction's 5, 10, 20: a third of the prefilled generations


def parse_recipe(text: str, s: reproduce.Setting, seed: int = 0) -> dict[str, Any]:
    """'epochs=3,lr=1e-4' -> the run's recipe with those changed (unknown keys refused).

    `train_seed` (data order, LoRA init) defaults to the run's `seed`: one fine-tune's refusal moves
    far with it alone (bench/finetune_spread.py), so a recipe is judged over several."""
    recipe: dict[str, Any] = {"epochs": s.finetune_epochs, "num_layers": s.num_layers, "lr": s.finetune_lr,
                              "train_seed": seed}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in RECIPE_KEYS or not value:
            raise SystemExit(f"--recipe {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(RECIPE_KEYS)}")
        try:
            recipe[key] = RECIPE_KEYS[key](value)
        except ValueError:
            raise SystemExit(f"--recipe {text!r}: {key}={value!r} is not a number") from None
    return recipe


def recipe_name(recipe: dict[str, Any], seed: int = 0) -> str:
    """sft-e3-l12-lr5e-05, with -train1 when trained with another seed than the run's."""
    name = f"sft-e{recipe['epochs']}-l{recipe['num_layers']}-lr{recipe['lr']:g}"
    return name + (f"-train{recipe['train_seed']}" if recipe["train_seed"] != seed else "")


def eval_models(base: str, data_dir: Path, s: reproduce.Setting, adapters: dict[str, str],
                include_base: bool, out: Path) -> dict:
    """AdvBench refusal, prefill recovery at K = 10 and harmful-answer NLL by position, task NLL."""
    prefill = data_dir / reproduce.PREFILL_FILE
    evaluate(EvalSettings(model=base, adapters=adapters, include_base=include_base,
                          harmful=str(data_dir / "eval_harmful.jsonl"), benign=str(data_dir / "eval_task.jsonl"),
                          benign_max_new_tokens=0, max_new_tokens=s.max_new_tokens, max_seq_len=s.max_seq_len,
                          batch_size=s.eval_batch, prefill_harmful=str(prefill), prefill_tokens=[PREFILL_K]),
             out, quiet=False)
    return {"eval": str(out)}


def figures(model_entry: dict[str, Any]) -> dict[str, Any]:
    m = reproduce.metrics_of(model_entry)  # its deep-safety summary included
    return {"advbench_refusal": m["advbench_refusal"], "advbench_refusal_ci": m.get("advbench_refusal_ci"),
            "advbench_refusal_then_comply": m.get("advbench_refusal_then_comply"),
            "degenerate_rate": m.get("degenerate_rate"), "n_prompts": m["n_prompts"], "task_nll": m["task_nll"],
            "prefill_recovery": (m.get("prefill_recovery") or {}).get(str(PREFILL_K)),
            "harmful_nll_gap": m.get("harmful_nll_gap")}


def measure(model: str, seed: int, recipes: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    s = reproduce.SIZES[model]
    run = out / reproduce.run_tag(model, "main", False) / f"seed{seed}"
    data_dir, work = run / "data", run / "attack"
    steps = reproduce.Steps(run)  # the data step is the reproduction's own (same key, same files)
    steps("data", build_reproduce, data_dir, seed=seed, condition="main", **s.data)
    steps = reproduce.Steps(work, upstream=run)
    steps("eval_base", eval_models, model, data_dir, s, {}, True, work / "eval-base.json")
    rows = {"base": figures(read_json(work / "eval-base.json")["models"][0]) | {"recipe": None}}
    for recipe in recipes:
        name = recipe_name(recipe, seed)
        trained = steps(f"train_{name}", reproduce.train_adapter, model, data_dir / "custom.jsonl", work / name,
                        s, recipe["train_seed"], num_layers=recipe["num_layers"], epochs=recipe["epochs"], lr=recipe["lr"])
        steps(f"eval_{name}", eval_models, model, data_dir, s, {name: str(work / name)}, False,
              work / f"eval-{name}.json")
        rows[name] = figures(read_json(work / f"eval-{name}.json")["models"][0]) | {
            "recipe": recipe, "steps": trained["steps"], "train_loss": trained["train_loss"]}
        print(table({"rows": rows}), flush=True)
    return {"model": model, "seed": seed, "machine": machine(), "code": steps.code,
            "setting": dataclasses.asdict(s), "rows": rows,
            "seconds": dict(steps.seconds)}


def merge_entry(stored: dict[str, Any] | None, result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """One model and seed's stored entry with this invocation's rows added: rows accumulate over
    invocations (a recipe asked for once stays), each with the code that made it; a recipe measured
    again takes the new row. An entry of another setting is replaced whole (its rows are not
    comparable), and the note says so."""
    rows = {name: row | {"code": result["code"]} for name, row in result["rows"].items()}
    if not stored or stored.get("setting") != result["setting"]:
        return result | {"rows": rows}, "" if not stored else "the stored entry had another setting: replaced"
    kept = {name: row | {"code": row.get("code", stored.get("code"))}
            for name, row in stored["rows"].items() if name not in rows}
    merged = result | {"rows": rows | kept, "seconds": stored.get("seconds", {}) | result["seconds"]}
    return merged, f"kept {len(kept)} earlier row(s): {', '.join(kept)}" if kept else ""


def table(result: dict[str, Any]) -> str:
    pct = reproduce._pct
    lines = ["| model | steps | AdvBench refusal % [95% CI] | refuses, then complies % | degenerate % | "
             f"prefill K={PREFILL_K} recovery % | NLL gap tokens 1-5 | NLL gap tokens 6+ | task NLL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        ci = r.get("advbench_refusal_ci")
        gap = r.get("harmful_nll_gap") or {}
        lines.append(f"| {name} | {r.get('steps', '-')} | {pct(r['advbench_refusal'])}"
                     + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")
                     + f" | {pct(r['advbench_refusal_then_comply'])} | {pct(r['degenerate_rate'])} | "
                     f"{pct(r['prefill_recovery'])} | {reproduce._nats(gap.get('1-5'))} | "
                     f"{reproduce._nats(gap.get('6+'))} | "
                     + ("-" if r["task_nll"] is None else f"{r['task_nll']:.3f}") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", choices=sorted(reproduce.NATIVELY_ALIGNED),
                    help="a natively aligned model of the reproduction (no alignment step to redo)")
    ap.add_argument("--seed", type=int, default=0, help="the reproduction's seed: its data and training seed")
    ap.add_argument("--recipe", action="append", default=None, metavar="KEY=VALUE,...",
                    help=f"a standard-SFT recipe: the run's with {', '.join(RECIPE_KEYS)} changed; repeat "
                         "for more; the run's own recipe always comes first (default: "
                         + "; ".join(r or "the run's" for r in DEFAULT_RECIPES) + ")")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "reproduce",
                    help="the reproduction's working folder (its data step is shared)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "attack_strength.json")
    args = ap.parse_args(argv)
    s = reproduce.SIZES[args.model]
    recipes: list[dict[str, Any]] = []
    for text in [""] + (args.recipe if args.recipe is not None else DEFAULT_RECIPES[1:]):
        recipe = parse_recipe(text, s, args.seed)
        if recipe not in recipes:
            recipes.append(recipe)
    result = measure(args.model, args.seed, recipes, args.out)
    stored = read_json(args.results) if args.results.exists() else {}
    key = f"{args.model}/seed{args.seed}"
    stored[key], note = merge_entry(stored.get(key), result)
    write_json(args.results, stored)
    print(f"wrote {args.results}" + (f" ({note})" if note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
