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

A long evaluation is resumable: each finished (model, prompt set) is kept in
OUT.parts/ until eval.json is written; the same command started again skips
them. Changing a setting or a file changes the key, so stale parts are never used.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..io import TossError, read_json, sha256_bytes, sha256_file, write_json
from ..models.lora import strip_adapters
from ..refusal import REFUSAL_PHRASES, START_WINDOW, final_answer
from .generation import Generation, cut_at_next_turn, decoding, generate_answers
from .judge import JUDGE_RUBRIC, judge_models
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


def _check_adapter_complete(model: nn.Module, folder: Path) -> None:
    """Every adapter parameter the config creates must come from the file (else it is silently random)."""
    config = read_json(folder / "adapter_config.json")
    if config.get("fine_tune_type", "lora") == "full":
        return
    expected = {name for name, _ in tree_flatten(model.parameters())
                if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}
    found = set(mx.load(str(folder / "adapters.safetensors")).keys())
    missing = sorted(expected - found)
    if missing:
        raise TossError(f"{folder}: adapter does not match the base model: its config adds "
                        f"{len(expected)} adapter weights, but the file lacks {len(missing)} "
                        f"(e.g. {missing[0]})")


@contextmanager
def adapter_applied(model: nn.Module, folder: str | None) -> Iterator[nn.Module]:
    """Apply an mlx-lm adapter folder to `model` in place for the block, then restore the base."""
    from ..models.load import apply_adapter

    if folder is None:
        yield model
        return
    original = tree_flatten(model.parameters())  # references: mlx arrays are immutable
    try:
        apply_adapter(model, folder)
        _check_adapter_complete(model, Path(folder))
        yield model
    finally:
        strip_adapters(model)
        model.update(tree_unflatten(original))  # also undoes "full" fine-tune weights
        model.eval()


def check_adapters(model: nn.Module, adapters: dict[str, str]) -> None:
    """Apply and remove every adapter once, so that a mismatch fails before any generation."""
    for folder in adapters.values():
        with adapter_applied(model, folder):
            pass


def _adapter_sha256(folder: str | None) -> str | None:
    return sha256_file(Path(folder) / "adapters.safetensors") if folder else None


class _Parts:
    """Finished (model, prompt set) results kept next to the output until it is written."""

    def __init__(self, out: Path):
        self.dir = out.with_name(out.name + ".parts")

    def _path(self, key: str) -> Path:
        return self.dir / f"{key[:32]}.json"

    def load(self, key: str) -> Any:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # written atomically, so this is someone else's file: redo the work
        return part.get("value") if part.get("key") == key else None

    def save(self, key: str, value: Any) -> None:
        write_json(self._path(key), {"key": key, "value": value})

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _Progress:
    """A rich progress bar over prompts, with tokens/s and peak memory; silent when quiet."""

    def __init__(self, quiet: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), disable=quiet)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def task(self, description: str, total: int) -> Callable[[int, int], None]:
        task = self.bar.add_task(description, total=total, stats="")
        start, tokens = time.perf_counter(), 0

        def step(new_tokens: int, finished: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            rate_ = tokens / max(time.perf_counter() - start, 1e-9)
            peak = mx.get_peak_memory() / 2**30
            self.bar.update(task, advance=finished, stats=f"{rate_:.0f} tok/s, peak {peak:.2f} GB")

        return step

    def log(self, message: str) -> None:
        if not self.bar.disable:
            self.bar.console.print(message)


def _settings_key(s: EvalSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(s).items()
            if k not in ("adapters", "include_base", "judge", "judge_max_tokens", "batch_tokens")}


def _answer_set(model, tokenizer, prompts: list[Prompt], s: EvalSettings, progress: _Progress,
                label: str) -> list[Generation]:
    sampler, processors = decoding(s)
    mx.random.seed(s.seed)  # every model draws from the same random stream
    ids = [prompt_ids(p.messages, tokenizer, s.template) for p in prompts]
    step = progress.task(label, len(ids))
    answers = generate_answers(model, tokenizer, ids, s.max_new_tokens, sampler, processors,
                               s.batch_size, step)
    for a in answers:
        a.text = cut_at_next_turn(a.text, s.template)
    return answers


def _evaluate_set(model, tokenizer, set_name: str, prompts: list[Prompt], s: EvalSettings,
                  progress: _Progress, label: str) -> list[dict[str, Any]]:
    records = [{"row": p.row, "prompt": p.text} for p in prompts]
    if set_name == "benign":
        with_reference = [i for i, p in enumerate(prompts) if p.reference]
        seqs = [answer_ids(prompts[i].messages, prompts[i].reference, tokenizer, s.template,
                           s.max_seq_len) for i in with_reference]
        for i, (nll, count) in zip(with_reference, reference_nll(model, seqs, s.batch_tokens),
                                   strict=True):
            records[i].update(reference=prompts[i].reference, reference_nll=nll,
                              reference_tokens=count)
        todo = [i for i, p in enumerate(prompts) if p.expected is not None]
    else:
        todo = list(range(len(prompts)))
    answers = _answer_set(model, tokenizer, [prompts[i] for i in todo], s, progress,
                          f"{label} {set_name}")
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
    """Evaluate the base and every adapter on the same prompts; write and return eval.json."""
    from ..data import tokenizer_sha256
    from ..models.load import load_model

    check_settings(s)
    out = Path(out)
    sets = {name: read_prompts(getattr(s, name), s.max_prompts)
            for name in PROMPT_SETS if getattr(s, name)}
    if "benign" in sets and not any(p.reference for p in sets["benign"]):
        raise TossError(f"{s.benign}: no benign row has a reference answer (completion, response, "
                        "output, answer or a final assistant turn), so there is nothing to measure")
    for folder in s.adapters.values():
        if not Path(folder).is_dir():
            raise TossError(f"{folder}: adapter folder not found")
    entries: list[tuple[str, str | None]] = ([("base", None)] if s.include_base else []) + list(
        s.adapters.items())

    model, tokenizer = load_model(s.model, dtype=s.dtype, quiet=quiet)
    check_adapters(model, s.adapters)  # all of them, before any generation
    files = {name: {"path": str(getattr(s, name)), "sha256": sha256_file(getattr(s, name)),
                    "prompts": len(prompts)} for name, prompts in sets.items()}
    common = [_settings_key(s), tokenizer_sha256(tokenizer), FORMAT_VERSION]
    parts = _Parts(out)
    models = []
    with _Progress(quiet) as progress:
        for name, folder in entries:
            adapter_sha = _adapter_sha256(folder)
            records = {}
            with adapter_applied(model, folder):
                for set_name, prompts in sets.items():
                    key = sha256_bytes(json.dumps([common, adapter_sha, files[set_name]["sha256"],
                                                   set_name]))
                    part = parts.load(key)
                    if part is None:
                        part = _evaluate_set(model, tokenizer, set_name, prompts, s, progress, name)
                        parts.save(key, part)
                    else:
                        progress.log(f"{name} {set_name}: reusing finished answers from {parts.dir}")
                    records[set_name] = part
            models.append({"name": name, "adapter": folder, "adapter_sha256": adapter_sha,
                           "records": records})
        if s.judge and "harmful" in sets:
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
    parts.clear()
    return result

