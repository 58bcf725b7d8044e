"""The whole evaluation, resumable: every model on every prompt set, written to eval.json.

1. `read_prompts` reads each prompt file (see `prompts`).
2. The base model is loaded once. Every adapter is applied and removed before anything
   is generated, so a mismatched adapter fails in seconds; then each model (the bare
   base and every adapter, side by side on the same prompts) is evaluated with its
   adapter applied in place and removed again: never two copies of the base.
3. `generate_answers` answers every prompt (see `generation`).
4. Each answer gets its verdicts (`refusal.match_refusal`, `refusal.degeneracy`,
   `refusal.final_answer`); benign reference answers get their negative
   log-likelihood (`likelihood.reference_nll`, response tokens only).
5. Optional `--judge` (see `judge`).
6. `metrics.summarize` turns verdicts into metrics; eval.json keeps every prompt's
   answers and verdicts, so each number traces back to its answers.

Deep safety (issue 22, `depth`): more harmful sets (`harmful_sets`, `--harmful
NAME=FILE`) are prompt sets `harmful:NAME`, each reported apart; `--prefill-harmful
PAIRS` adds each model's `prefill` and `depth` records (prefilling attack, harmful-answer
NLL and KL to the base by answer position), the base's reference pass made on the bare
model before any adapter is applied.

A long evaluation is resumable: each finished (model, prompt set) is kept in
OUT.parts/ until eval.json is written; the same command started again skips
them. Changing a setting or a file changes the key, so stale parts are never used.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..cache import KeyedStore, cache_key
from ..io import TossError, sha256_file, write_json
from ..models.lora import AdapterSet
from ..progress import Progress
from ..refusal import REFUSAL_PHRASES, START_WINDOW, final_answer
from .depth import DepthRun
from .generation import Generation, cut_at_next_turn, decoding, generate_answers
from .judge import JUDGE_RUBRIC, judge_models, judged_sets
from .likelihood import reference_nll
from .metrics import summarize, verdicts
from .prompts import (
    PROMPT_SETS,
    EvalSettings,
    Prompt,
    answer_ids,
    check_settings,
    prompt_ids,
    read_prompts,
)

FORMAT_VERSION = 1


def _settings_key(s: EvalSettings) -> dict[str, Any]:
    """The settings that decide a (model, prompt set)'s answers (not which models, not the judge).

    The deep-safety settings key their own records (`depth.depth_key`), so changing them
    does not redo the answers to the prompt sets."""
    return {k: v for k, v in asdict(s).items()
            if k not in ("adapters", "include_base", "judge", "judge_max_tokens", "batch_tokens",
                         "harmful_name", "harmful_sets", "prefill_harmful", "prefill_tokens",
                         "prefill_decode", "depth_buckets", "depth_max_tokens")}


def part_key(s: EvalSettings, tokenizer_sha: str, adapter: str | None, prompts: str,
             set_name: str) -> str:
    """The key of one finished (model, prompt set): settings, tokenizer, the adapter's
    fingerprint (config and weights), the prompt file's content and the format version."""
    return cache_key({"settings": _settings_key(s), "tokenizer": tokenizer_sha,
                      "adapter": Path(adapter) if adapter else None, "prompts": Path(prompts),
                      "set": set_name, "eval_format": FORMAT_VERSION})


def _answer_set(model, tokenizer, prompts: list[Prompt], s: EvalSettings, progress: Progress,
                label: str, max_new_tokens: int | None = None) -> list[Generation]:
    sampler, processors = decoding(s)
    mx.random.seed(s.seed)  # every model draws from the same random stream
    ids = [prompt_ids(p.messages, tokenizer, s.template) for p in prompts]
    step = progress.counter(label, len(ids), "answered")
    answers = generate_answers(model, tokenizer, ids, max_new_tokens or s.max_new_tokens, sampler,
                               processors, s.batch_size, step)
    for a in answers:
        a.text = cut_at_next_turn(a.text, s.template)
    return answers


def _evaluate_set(model, tokenizer, set_name: str, prompts: list[Prompt], s: EvalSettings,
                  progress: Progress, label: str) -> list[dict[str, Any]]:
    records = [{"row": p.row, "prompt": p.text} for p in prompts]
    if set_name == "benign":
        with_reference = [i for i, p in enumerate(prompts) if p.reference]
        seqs = [answer_ids(prompts[i].messages, prompts[i].reference, tokenizer, s.template,
                           s.max_seq_len) for i in with_reference]
        for i, (nll, count) in zip(with_reference, reference_nll(model, seqs, s.batch_tokens),
                                   strict=True):
            records[i].update(reference=prompts[i].reference, reference_nll=nll,
                              reference_tokens=count)
        # benign_max_new_tokens 0: the likelihood only (no answers, no exact match)
        todo = [i for i, p in enumerate(prompts) if p.expected is not None
                and s.benign_max_new_tokens != 0]
        if not todo:
            return records
    else:
        todo = list(range(len(prompts)))
    answers = _answer_set(model, tokenizer, [prompts[i] for i in todo], s, progress,
                          f"{label} {set_name}",
                          s.benign_max_new_tokens if set_name == "benign" else None)
    for i, a in zip(todo, answers, strict=True):
        r = records[i]
        r.update(answer=a.text, new_tokens=a.new_tokens, finish=a.finish, **verdicts(a.text))
        if (expected := prompts[i].expected) is not None:
            r.update(expected=expected, predicted=final_answer(a.text),
                     predicted_flexible=final_answer(a.text, strict=False))
            r["correct"] = r["predicted"] == expected
            r["correct_flexible"] = r["predicted_flexible"] == expected
    return records


def evaluate(s: EvalSettings, out: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the base and every adapter on the same prompts; write and return eval.json
    (the output is checked to be writable first and locked while the evaluation runs)."""
    from ..checks import check_writable, locked

    check_settings(s)
    out = Path(out)
    check_writable(out, "eval file")
    with locked(out, folder=False):  # one evaluation per output file at a time
        return _evaluate(s, out, quiet)


def _evaluate(s: EvalSettings, out: Path, quiet: bool) -> dict[str, Any]:
    from ..data import tokenizer_sha256
    from ..models.load import load_model

    sets = {name: read_prompts(getattr(s, name), s.max_prompts)
            for name in PROMPT_SETS if getattr(s, name)}
    paths = {name: getattr(s, name) for name in sets}
    # ---- deep safety hook 1 (issue 22): more harmful sets, reported apart as "harmful:NAME"
    for set_name, path in s.harmful_sets.items():
        sets[f"harmful:{set_name}"] = read_prompts(path, s.max_prompts)
        paths[f"harmful:{set_name}"] = path
    if "benign" in sets and not any(p.reference for p in sets["benign"]):
        raise TossError(f"{s.benign}: no benign row has a reference answer (completion, response, "
                        "output, answer or a final assistant turn), so there is nothing to measure")
    for folder in s.adapters.values():
        if not Path(folder).is_dir():
            raise TossError(f"{folder}: adapter folder not found")
    entries: list[tuple[str, str | None]] = ([("base", None)] if s.include_base else []) + list(
        s.adapters.items())

    model, tokenizer = load_model(s.model, dtype=s.dtype, quiet=quiet,
                                  keep_quantized=s.keep_quantized)
    adapters = AdapterSet(model, [folder for _, folder in entries])
    adapters.check()  # all of them, before any generation
    files = {name: {"path": str(paths[name]), "sha256": sha256_file(paths[name]),
                    "prompts": len(prompts)} for name, prompts in sets.items()}
    tokenizer_sha = tokenizer_sha256(tokenizer)
    parts = KeyedStore(out.with_name(out.name + ".parts"))
    models = []
    # ---- deep safety hook 2 (issue 22): the base reference pass runs here, on the bare model
    depth_run = None
    if s.prefill_harmful:
        depth_run = DepthRun(model, tokenizer, s, parts, tokenizer_sha,
                             [(name, adapters.fingerprint(i)) for i, (name, _) in enumerate(entries)])
        files["prefill"] = {"path": str(s.prefill_harmful), "sha256": sha256_file(s.prefill_harmful),
                            "pairs": len(depth_run.pairs)}
    with Progress(not quiet) as progress:
        for i, (name, folder) in enumerate(entries):
            adapter_sha = adapters.fingerprint(i)
            records = {}
            with adapters.applied(i):
                for set_name, prompts in sets.items():
                    key = part_key(s, tokenizer_sha, folder, paths[set_name], set_name)
                    store_name = f"{name}-{set_name.replace(':', '.')}"  # no ':' in file names
                    part = parts.load(store_name, key)
                    if part is None:
                        part = _evaluate_set(model, tokenizer, set_name, prompts, s, progress, name)
                        parts.save(store_name, key, part)
                    else:
                        progress.log(f"{name} {set_name}: reusing finished answers from {parts.dir}")
                    records[set_name] = part
                if depth_run is not None:  # ---- deep safety hook 3: prefill + likelihood records
                    def generate(prompts, max_new, sampler, processors, batch_size, on_step):
                        return generate_answers(model, tokenizer, prompts, max_new, sampler,
                                                processors, batch_size, on_step)

                    records.update(depth_run.records(
                        model, name, adapter_sha, generate,
                        lambda what, n, name=name: progress.counter(f"{name} {what}", n, "answered")))
            models.append({"name": name, "adapter": folder, "adapter_sha256": adapter_sha,
                           "records": records})
        if s.judge and any(judged_sets(e["records"]) for e in models):
            same = s.judge == s.model
            if not same:
                del model
                gc.collect()
                mx.clear_cache()
            judge_models(s, models, parts, progress, (model, tokenizer) if same else None, quiet)

    result = {
        "format_version": FORMAT_VERSION,
        "model": s.model,
        "settings": asdict(s),
        "files": files,
        "refusal_matcher": {"phrases": list(REFUSAL_PHRASES), "start_window_chars": START_WINDOW},
        "judge_rubric": JUDGE_RUBRIC if s.judge else None,
        "models": [{"name": e["name"], "adapter": e["adapter"], "adapter_sha256": e["adapter_sha256"],
                    "metrics": summarize(e["records"]), "prompts": e["records"]} for e in models],
    }
    write_json(out, result)
    shutil.rmtree(parts.dir, ignore_errors=True)
    return result

