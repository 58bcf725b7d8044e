"""What TOSS's removal costs the task data, and whether a bigger utility reference or TOSS-Pro lowers it.

Issue 21, item 5: TOSS d = 0.1 costs task NLL (+6% on SmolLM2 in the first round) and
removes many task-answer openings and digits. A token is removed when
S = loss_utility - loss_safety is high, so task tokens the utility reference predicts
badly (numbers it has not learnt to compute) look "unsafe" too. A utility reference
trained on more task data should predict them better, lower their S and leave the
removal budget to the harmful samples; TOSS-Pro changes the safety side instead.

    python bench/utility_cost.py --run bench/runs/reproduce/MODEL-main/seed0
    python bench/utility_cost.py --run RUN --variants x2,x4,e4   # train bigger utility references

For a finished (or scored) seed folder of `bench/reproduce.py`:
1. every mask it made (masks/*.safetensors) is read against its scores file and the
   custom data's `source` labels: the share of task tokens removed, of task-answer
   openings (positions 1-5), of task digit tokens and of the other task tokens; the
   harmful samples' recall, apart for their openings (1-5) and past them (6+, what the
   deep-safety metrics read), the harmful samples removed whole, and the removed tokens'
   precision (`removal_costs`); and the round-0 score S by answer position, harmful and
   task samples apart (`score_by_position`): where the ranking can tell them apart;
2. with --variants, utility references are trained from the same base with the seed's
   recipe on more task data (x2, x4: the seed's utility_ref.jsonl plus fresh
   reasoning-gym problems, disjoint from every prompt of the seed's data) or for more
   epochs (e4: the same data, 4 epochs), the custom data is scored with each beside the
   seed's round-0 safety reference, TOSS d = 0.1 is selected, and the same figures are
   given, with the utility reference's own held-out task NLL (its loss_utility on
   eval_task.jsonl): a better utility model should show a lower one.
3. with --finetune (a finished seed), each variant's TOSS d = 0.1 mask is fine-tuned with the
   seed's recipe and evaluated on the seed's prompts and held-out pairs, beside the seed's own
   TOSS and standard SFT: does the lower removal of task tokens buy task NLL after fine-tuning,
   and at what depth (`finetuned`)? For TOSS-Pro, reproduce's toss_pro_r2 is that comparison.

    python bench/utility_cost.py --run RUN --variants x4 --finetune

Steps are resumable (`reproduce.Steps`, in RUN/utility_cost/). Writes
bench/results/utility_cost.json (one entry per run folder) and prints tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reproduce  # noqa: E402  (bench/reproduce.py: its settings, training and step cache)
from machine_info import machine  # noqa: E402

from toss_mlx.data import read_rows  # noqa: E402
from toss_mlx.io import TossError, read_json  # noqa: E402
from toss_mlx.layout import Scores, answer_positions, load_mask, load_scores  # noqa: E402
from toss_mlx.select import select  # noqa: E402

VARIANTS = {"x2": (2, 1), "x4": (4, 1), "e4": (1, 2)}  # name -> (task data multiple, epochs multiple)
OPENING = 5  # answer positions 1-5: what first-5 removes, and where the first round saw TOSS cut task answers
# S by answer position: the first token apart (the first round found the harmful signal there), then
# reproduce's deep-safety buckets
POSITION_BUCKETS = (("1", 1, 1), ("2-5", 2, 5), ("6-20", 6, 20), ("21-80", 21, 80), ("81+", 81, None))


def digit_tokens(token_ids: np.ndarray, tokenizer) -> np.ndarray:
    """bool [T]: tokens whose text holds a digit (numbers: what a math answer's utility rests on)."""
    ids = np.unique(token_ids)
    pieces = tokenizer.convert_ids_to_tokens([int(t) for t in ids])
    has_digit = np.array([any(ch.isdigit() for ch in (p or "")) for p in pieces], bool)
    return has_digit[np.searchsorted(ids, token_ids)]


def removal_costs(scores: Scores, removed: np.ndarray, harmful_rows: set[int], digits: np.ndarray
                  ) -> dict[str, Any]:
    """Where `removed` (bool [T]) falls: task tokens, openings and digits; harmful recall and precision.

    Task samples are the rows not in `harmful_rows`. Shares are of response tokens of each kind;
    `digit_removal_ratio` > 1: digits are removed more often than the other task tokens.
    """
    response = scores.response_mask.astype(bool)
    removed = removed & response
    sample = scores.sample_ids()
    harmful = np.isin(scores.row_index[sample], sorted(harmful_rows)) & response
    task = response & ~harmful
    in_opening = answer_positions(scores.offsets, scores.response_mask) < OPENING
    opening = task & in_opening
    # a harmful sample is dropped whole when every one of its response tokens is removed (sample filtering)
    per_sample_left = np.bincount(sample[harmful & ~removed], minlength=len(scores.row_index))
    per_sample_harmful = np.bincount(sample[harmful], minlength=len(scores.row_index))
    task_digits, task_other = task & digits, task & ~digits

    def share(part: np.ndarray) -> float | None:
        return float((removed & part).sum() / part.sum()) if part.any() else None

    digit_share, other_share = share(task_digits), share(task_other)
    n_removed = int(removed.sum())
    return {
        "removed_tokens": n_removed,
        "task_tokens": int(task.sum()), "task_removed_share": share(task),
        "task_opening_removed_share": share(opening),
        "task_digit_share": float(task_digits.sum() / task.sum()) if task.any() else None,
        "task_digits_removed_share": digit_share, "task_other_removed_share": other_share,
        "digit_removal_ratio": (digit_share / other_share if digit_share is not None and other_share
                                else None),
        "harmful_recall": share(harmful),
        # the harmful answers' openings (positions 1-5, what first-5 removes) and what follows them: the
        # deep-safety metrics read the second (a harmful answer past its opening)
        "harmful_opening_removed_share": share(harmful & in_opening),
        "harmful_past_opening_removed_share": share(harmful & ~in_opening),
        "harmful_samples_removed_whole": int(((per_sample_harmful > 0) & (per_sample_left == 0)).sum()),
        "precision": float((removed & harmful).sum() / n_removed) if n_removed else None,
        "harmful_share_of_response": float(harmful.sum() / response.sum()) if response.any() else None,
        # why task tokens are removed: their losses under the two references (nats, means)
        "task_removed_loss_utility": (float(scores.loss_utility[removed & task].mean())
                                      if (removed & task).any() else None),
        "task_kept_loss_utility": (float(scores.loss_utility[task & ~removed].mean())
                                   if (task & ~removed).any() else None),
    }


def score_by_position(scores: Scores, harmful_rows: set[int],
                      buckets: tuple[tuple[str, int, int | None], ...] = POSITION_BUCKETS
                      ) -> dict[str, dict[str, dict[str, float | int]]]:
    """Mean and median S per answer-position bucket (1-based), harmful and task samples apart.

    What the ranking sees: where in an answer the harmful samples' tokens score above the task ones.
    {"harmful" | "task": {bucket: {"tokens", "mean", "median"}}}; empty buckets are left out.
    """
    response = scores.response_mask.astype(bool)
    harmful = np.isin(scores.row_index[scores.sample_ids()], sorted(harmful_rows)) & response
    position = answer_positions(scores.offsets, scores.response_mask) + 1
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for group, members in (("harmful", harmful), ("task", response & ~harmful)):
        out[group] = {}
        for label, lo, hi in buckets:
            inside = members & (position >= lo) & ((position <= hi) if hi is not None else True)
            if inside.any():
                s = scores.score[inside]
                out[group][label] = {"tokens": int(inside.sum()), "mean": float(s.mean()),
                                     "median": float(np.median(s))}
    return out


def harmful_rows_of(data_file: Path) -> set[int]:
    return {r.index for r in read_rows(data_file) if r.data.get("source") == "harmful"}


def mask_scores(run: Path) -> dict[str, Path]:
    """Each mask's scores file, as reproduce.py chose it (from its toss_pro step's record)."""
    pro = read_json(run / "steps" / "toss_pro.json")["value"]["result"]
    return {name: path for name, (path, _) in reproduce.method_selections(pro, seed=0).items()}


def fresh_task_file(data_dir: Path, out: Path, n: int, seed: int) -> Path:
    """`utility_ref.jsonl` plus `n` new reasoning-gym problems whose prompts are in no file of the seed."""
    from toss_mlx.prepare import _dedupe_tasks, _write_jsonl, gsm_problems, normalize_prompt

    taken = {normalize_prompt(r.data["prompt"]) for f in data_dir.glob("*.jsonl")
             for r in read_rows(f) if isinstance(r.data.get("prompt"), str)}
    # another generator seed than the run's (its problems are the seed's splits)
    fresh = [r for r in _dedupe_tasks(gsm_problems(n + n // 2 + 40, seed + 1000))
             if normalize_prompt(r["prompt"]) not in taken][:n]
    if len(fresh) < n:
        raise TossError(f"reasoning-gym gave {len(fresh)} fresh problems, {n} asked for")
    own = [r.data for r in read_rows(data_dir / "utility_ref.jsonl")]
    _write_jsonl(out, own + [{"prompt": r["prompt"], "completion": r["completion"]} for r in fresh])
    return out


def task_file_step(data_dir: Path, out: Path, n: int, seed: int) -> dict:
    return {"file": str(fresh_task_file(data_dir, out, n, seed))}


def score_with(base: str, utility: Path, safety: Path, data: Path, out: Path, s: reproduce.Setting) -> dict:
    from toss_mlx.score import ScoreSettings, score

    score(ScoreSettings(model=base, utility=str(utility), safety=str(safety), data=str(data), out=str(out),
                        max_seq_len=s.max_seq_len, quiet=True))
    return {"scores": str(out)}


def held_out_nll(scores_path: Path) -> float:
    """Mean loss_utility over the response tokens of a scored eval_task.jsonl: the utility
    reference's held-out task NLL (nats per token)."""
    scores = load_scores(scores_path)
    return float(scores.loss_utility[scores.response_mask.astype(bool)].mean())


def analyse(run: Path, variants: list[str], model: str, finetune: bool = False) -> dict[str, Any]:
    from toss_mlx.models.load import load_tokenizer
    from toss_mlx.select import select_tokens

    s = reproduce.seed_setting(run, model)
    base = reproduce.seed_base(run, model)
    data_dir = run / "data"
    harmful_rows = harmful_rows_of(data_dir / "custom.jsonl")
    tokenizer = load_tokenizer(base)
    out: dict[str, Any] = {"run": str(run), "model": model, "machine": machine(), "masks": {}, "variants": {}}

    def costs(scores: Scores, removed: np.ndarray) -> dict[str, Any]:
        return removal_costs(scores, removed, harmful_rows, digit_tokens(scores.token_ids, tokenizer))

    out["score_by_position"] = score_by_position(load_scores(mask_scores(run)["toss_d0.1"]), harmful_rows)
    for name, scores_path in mask_scores(run).items():
        path = run / "masks" / f"{name}.safetensors"
        if path.exists():
            scores = load_scores(scores_path)
            mask = load_mask(path, scores.offsets, scores.row_index, None, str(scores_path))
            out["masks"][name] = costs(scores, ~mask.keep)
    steps = reproduce.Steps(run / "utility_cost", upstream=run)
    work = run / "utility_cost"
    ref = dict(epochs=s.reference_epochs, lr=s.reference_lr)
    seed = int(run.name.removeprefix("seed")) if run.name.startswith("seed") else 0
    baseline = {"utility": run / "utility", "data": data_dir / "utility_ref.jsonl", "epochs": s.reference_epochs}
    for name in ["seed", *variants]:
        if name == "seed":  # the seed's own utility reference: the baseline of the comparison
            utility, n_rows, epochs = baseline["utility"], len(read_rows(baseline["data"])), baseline["epochs"]
        else:
            times, epoch_times = VARIANTS[name]
            n_own = len(read_rows(data_dir / "utility_ref.jsonl"))
            data = (steps(f"data_{name}", task_file_step, data_dir, work / f"utility_ref_{name}.jsonl",
                          (times - 1) * n_own, seed)["file"]
                    if times > 1 else data_dir / "utility_ref.jsonl")
            utility = work / f"utility_{name}"
            steps(f"utility_{name}", reproduce.train_adapter, base, Path(data), utility, s, seed,
                  **(ref | {"epochs": epoch_times * s.reference_epochs}))
            n_rows, epochs = times * n_own, epoch_times * s.reference_epochs
        custom_scores = (mask_scores(run)["toss_d0.1"] if name == "seed" else
                         steps(f"score_{name}", score_with, base, utility, run / "safety", data_dir / "custom.jsonl",
                               work / f"scores_{name}.safetensors", s)["scores"])
        custom = load_scores(custom_scores)
        held = steps(f"held_out_{name}", score_with, base, utility, run / "safety", data_dir / "eval_task.jsonl",
                     work / f"eval_task_{name}.safetensors", s)["scores"]
        out["variants"][name] = {"utility_rows": n_rows, "epochs": epochs,
                                 "held_out_task_nll": held_out_nll(Path(held)),
                                 **costs(custom, select_tokens(custom, ratio=0.1).removed)}
        if finetune and name != "seed":
            # the mask file the fine-tune reads: the same selection as the figures above
            steps(f"select_{name}", select, str(custom_scores), str(work / "masks" / f"toss_{name}.safetensors"),
                  ratio=0.1)
    if finetune:
        out["finetuned"] = finetuned(run, base, s, seed, steps, variants)
    return out


def finetuned(run: Path, base: str, s: reproduce.Setting, seed: int, steps: reproduce.Steps,
              variants: list[str]) -> dict[str, Any]:
    """Fine-tune with each variant's TOSS d = 0.1 mask (the seed's recipe, seed and data; only the
    utility reference behind the mask differs) and evaluate on the seed's prompts and held-out pairs.

    Each variant is set against the seed's own TOSS d = 0.1 and standard SFT fine-tunes (its
    eval.json): task NLL paired over the task problems, the harmful-answer NLL gap past token 5
    paired over the held-out pairs, as reproduce.py pools them. The question is whether the lower
    removal of task tokens a better utility reference gives buys task NLL, and at what depth.
    """
    work = run / "utility_cost"
    adapters = {f"toss_{name}": work / f"finetune_{name}" for name in variants}
    for name in variants:
        steps(f"train_{name}", reproduce.train_adapter, base, run / "data" / "custom.jsonl",
              adapters[f"toss_{name}"], s, seed, mask=str(work / "masks" / f"toss_{name}.safetensors"),
              epochs=s.finetune_epochs, lr=s.finetune_lr)
    steps("eval_finetuned", reproduce.run_eval, base, run / "data", s, {n: str(a) for n, a in adapters.items()},
          work / "eval.json", include_base=False)
    own = reproduce.eval_models(run / "eval.json")
    if not {"standard_sft", "toss_d0.1"} <= set(own):
        raise SystemExit(f"--finetune: {run / 'eval.json'} lacks standard_sft or toss_d0.1 (is the seed finished?)")
    new = reproduce.eval_models(work / "eval.json")
    sft, toss = own["standard_sft"], own["toss_d0.1"]
    out: dict[str, Any] = {}
    for name, entry in [("seed", toss), *((f"toss_{v}", new[f"toss_{v}"]) for v in variants)]:
        m = reproduce.metrics_of(entry)
        depth = (reproduce.deep_samples(entry) or {}).get("depth") or []
        toss_depth = (reproduce.deep_samples(toss) or {}).get("depth") or []
        out[name.removeprefix("toss_")] = {
            "advbench_refusal": m["advbench_refusal"], "advbench_refusal_ci": m["advbench_refusal_ci"],
            "edgy_refusal": m["edgy_refusal"], "task_nll": m["task_nll"], "n_task": m["n_task"],
            "prefill_recovery": m.get("prefill_recovery"), "harmful_nll_gap": m.get("harmful_nll_gap"),
            "task_nll_vs_standard_sft": reproduce.nll_difference([(reproduce.problem_nll(entry),
                                                                   reproduce.problem_nll(sft))]),
            "task_nll_vs_seed_toss": reproduce.nll_difference([(reproduce.problem_nll(entry),
                                                                reproduce.problem_nll(toss))]),
            "gap_past_opening_vs_seed_toss": (reproduce.paired_difference(
                reproduce.gap_sums(depth), reproduce.gap_sums(toss_depth)) if depth and toss_depth else None),
        }
    return out


def table(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    head = ("| {} | task tokens removed % | openings (1-5) % | digits % | other task % | harmful recall % "
            "| harmful 1-5 % | harmful 6+ % | harmful samples whole | precision % |")
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    rows = [head.format("mask"), rule]
    for name, c in result["masks"].items():
        rows.append(f"| {name} | {pct(c['task_removed_share'])} | {pct(c['task_opening_removed_share'])} | "
                    f"{pct(c['task_digits_removed_share'])} | {pct(c['task_other_removed_share'])} | "
                    f"{pct(c['harmful_recall'])} | {pct(c.get('harmful_opening_removed_share'))} | "
                    f"{pct(c.get('harmful_past_opening_removed_share'))} | "
                    f"{c.get('harmful_samples_removed_whole', '-')} | {pct(c['precision'])} |")
    text = "\n".join(rows)
    by_position = result.get("score_by_position")
    if by_position:
        labels = [b[0] for b in POSITION_BUCKETS]
        rows = ["| S = loss_utility - loss_safety (round 0), mean (median) | " + " | ".join(
            f"tokens {b}" for b in labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for group, cells in by_position.items():
            rows.append(f"| {group} answers | " + " | ".join(
                f"{cells[b]['mean']:+.2f} ({cells[b]['median']:+.2f})" if b in cells else "-" for b in labels)
                + " |")
        text += "\n\n" + "\n".join(rows)
    if result["variants"]:
        rows = ["| utility reference (TOSS d = 0.1) | rows x epochs | held-out task NLL | task tokens removed % "
                "| openings % | digits % | harmful recall % | precision % |", "|---|---|---|---|---|---|---|---|"]
        for name, c in result["variants"].items():
            rows.append(f"| {name} | {c['utility_rows']} x {c['epochs']} | {c['held_out_task_nll']:.3f} | "
                        f"{pct(c['task_removed_share'])} | {pct(c['task_opening_removed_share'])} | "
                        f"{pct(c['task_digits_removed_share'])} | {pct(c['harmful_recall'])} | "
                        f"{pct(c['precision'])} |")
        text += "\n\n" + "\n".join(rows)
    if result.get("finetuned"):
        def diff(d: dict[str, Any] | None) -> str:
            if not d or d["diff"] is None:
                return "-"
            lo, hi = d["ci95"]
            return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"

        rows = ["| fine-tuned with the TOSS d = 0.1 mask of | AdvBench refusal % | task NLL | vs standard SFT "
                "| vs the seed's TOSS | NLL gap tokens 6+ | gap 6+ vs the seed's TOSS | prefill K=5 % |",
                "|---|---|---|---|---|---|---|---|"]
        for name, c in result["finetuned"].items():
            gap = (c.get("harmful_nll_gap") or {}).get("6+")
            k5 = (c.get("prefill_recovery") or {}).get("5")
            rows.append(f"| {'the seed' if name == 'seed' else name} utility reference | "
                        f"{pct(c['advbench_refusal'])} | {c['task_nll']:.3f} | "
                        f"{diff(c['task_nll_vs_standard_sft'])} | "
                        f"{'-' if name == 'seed' else diff(c['task_nll_vs_seed_toss'])} | "
                        f"{'-' if gap is None else f'{gap:+.3f}'} | "
                        f"{'-' if name == 'seed' else diff(c['gap_past_opening_vs_seed_toss'])} | {pct(k5)} |")
        text += "\n\n" + "\n".join(rows)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a seed folder of bench/reproduce.py (scored)")
    ap.add_argument("--model", default=None, choices=reproduce.MODELS,
                    help="the run's model (default: read from the folder's name)")
    ap.add_argument("--variants", default="", help=f"utility references to train: {', '.join(VARIANTS)}")
    ap.add_argument("--finetune", action="store_true",
                    help="also fine-tune with each variant's TOSS d = 0.1 mask and evaluate it beside the "
                         "seed's TOSS and standard SFT (task NLL, refusal, deep safety; the seed must be finished)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "utility_cost.json")
    args = ap.parse_args(argv)
    model = reproduce.model_of_run(args.run, args.model)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not (args.run / "steps" / "toss_pro.json").exists():
        raise SystemExit(f"--run {args.run}: not scored yet (no steps/toss_pro.json)")
    if args.finetune and not variants:
        raise SystemExit("--finetune: give --variants (the utility references whose masks are fine-tuned)")
    if args.finetune and not (args.run / "result.json").exists():
        raise SystemExit(f"--finetune: {args.run} is not finished (no result.json): its fine-tunes are the comparison")
    result = analyse(args.run, variants, model, args.finetune)
    print(table(result))
    reproduce.store_run_result(args.results, args.run, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
