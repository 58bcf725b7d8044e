"""Evaluation settings and prompt files: rows -> `Prompt`s -> token ids.

A row's conversation is read by `toss_mlx.data.to_messages` (the one row reader).
Evaluation files may also hold bare prompts, so a row without a `messages` list is
first written as one: its prompt is the first of `prompt`, `question`, `instruction`
(+ `input`), `goal`, `behavior`, `user`; its reference answer, where it has one, is
the first of `completion`, `response`, `output`, `answer`, `assistant` (a `messages`
row's reference is its last assistant turn). A reference with `#### N` (GSM-style)
is checkable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from ..data import encode as encode_text
from ..data import read_rows, render, to_messages
from ..io import TossError
from ..refusal import final_answer

T = TypeVar("T")

PROMPT_SETS = ("harmful", "edgy", "benign")
PROMPT_KEYS = ("prompt", "question", "instruction", "goal", "behavior", "user")
REFERENCE_KEYS = ("completion", "response", "output", "answer", "assistant")


@dataclass
class EvalSettings:
    model: str = ""
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder
    include_base: bool = True
    harmful: str | None = None
    benign: str | None = None
    edgy: str | None = None
    max_new_tokens: int = 128
    # benign (task) answers: None: max_new_tokens; 0: the reference answers' likelihood only
    benign_max_new_tokens: int | None = None
    decode: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    seed: int = 0
    template: Literal["chat", "plain"] = "chat"
    batch_size: int = 16  # sequences decoded together
    batch_tokens: int = 2048  # token budget of one likelihood batch
    max_prompts: int = 0  # per file; 0 = all
    max_seq_len: int = 2048
    judge: str | None = None
    judge_max_tokens: int = 48
    dtype: str | None = None  # float32, bfloat16, float16; default: the device's (models.load)
    keep_quantized: bool = False  # a quantized base stays quantized on any device
    # ---- deep safety (`evaluate.depth`, issue 22)
    harmful_name: str = "harmful"  # what the `harmful` set is called in tables and charts
    harmful_sets: dict[str, str] = field(default_factory=dict)  # more harmful sets: name -> file
    prefill_harmful: str | None = None  # harmful prompt + answer pairs: prefill attack, NLL, KL
    prefill_tokens: list[int] = field(default_factory=lambda: [5, 10, 20])  # K answer tokens prefilled
    prefill_decode: Literal["greedy", "sample"] = "greedy"  # sample: Qi et al.'s top_p 0.6, temp 0.9
    depth_buckets: list[int] = field(default_factory=lambda: [5, 20, 80])  # ends: 1-5, 6-20, 21-80, 81+
    depth_max_tokens: int = 160  # answer tokens the NLL / KL read (0: whole answers; cost ~ tokens)


def check_settings(s: EvalSettings) -> None:
    problems = []
    if not s.model:
        problems.append("no model given (--model)")
    if not any(getattr(s, name) for name in PROMPT_SETS) and not s.harmful_sets and not s.prefill_harmful:
        problems.append("no prompts given: pass at least one of --harmful, --benign, --edgy, "
                        "--prefill-harmful")
    for name in PROMPT_SETS:
        path = getattr(s, name)
        if path and not Path(path).exists():
            problems.append(f"--{name} {path}: file not found")
    if s.dtype is not None and s.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"dtype {s.dtype!r}: expected float32, bfloat16 or float16")
    from .depth import settings_problems  # deep safety (issue 22); depth imports this module

    problems += settings_problems(s)
    if not s.include_base and not s.adapters:
        problems.append("nothing to evaluate: no adapters and the base model left out")
    if s.include_base and "base" in s.adapters:
        problems.append("the adapter name 'base' is taken by the bare base model; pick another")
    if s.max_new_tokens < 1 or s.batch_size < 1 or s.batch_tokens < 2:
        problems.append("max_new_tokens and batch_size must be >= 1, batch_tokens >= 2")
    if s.benign_max_new_tokens is not None and s.benign_max_new_tokens < 0:
        problems.append(f"benign_max_new_tokens must be >= 0 (0: likelihood only), got "
                        f"{s.benign_max_new_tokens}")
    if not 0 < s.top_p <= 1 or s.temperature <= 0 or s.repetition_penalty <= 0:
        problems.append("sampling needs 0 < top_p <= 1, temperature > 0, repetition_penalty > 0")
    if problems:
        raise TossError("eval: " + "; ".join(problems))


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` (or just `DIR`, named after its folder) -> {name: folder}, names unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name or spec, spec
        name, folder = name.strip(), folder.strip()
        if not name or not folder:
            raise TossError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise TossError(f"--adapter: the name {name!r} is used twice; name them NAME=DIR")
        out[name] = folder
    return out



@dataclass
class Prompt:
    row: int  # 0-based row index in the source file
    messages: list[dict[str, str]]  # the conversation up to the answer to generate
    reference: str | None = None  # the reference answer, if the row has one
    expected: str | None = None  # the checkable final number (after ####) of the reference

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


def _string(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value.strip() else None



def _as_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """A bare-prompt row written as a `messages` row (prompt, optional system and reference)."""
    key = next((k for k in PROMPT_KEYS if _string(row, k)), None)
    if key is None:
        raise ValueError(f"no prompt: expected 'messages' or one of {', '.join(PROMPT_KEYS)}; "
                         f"found keys {sorted(row)}")
    user = _string(row, key)
    if key == "instruction" and (extra := _string(row, "input")):
        user = f"{user}\n\n{extra}"
    messages = [{"role": "user", "content": user}]
    if system := _string(row, "system_prompt") or _string(row, "system"):
        messages.insert(0, {"role": "system", "content": system})
    reference = next((v for k in REFERENCE_KEYS if k != key and (v := _string(row, k))), None)
    if reference:
        messages.append({"role": "assistant", "content": reference})
    return {"messages": messages}


def prompt_from_row(row: dict[str, Any]) -> Prompt:
    """One row of any supported format -> Prompt. Raises ValueError naming the problem."""
    if "messages" not in row:
        row = _as_conversation(row)
    msgs = row["messages"]
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) \
            and msgs[-1].get("role") == "assistant" and msgs[-1].get("content") == "":
        msgs = msgs[:-1]  # an empty final answer: a prompt without a reference
    messages = to_messages({"messages": msgs}, "messages", require_answer=False)
    reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError("'messages' has no user turn before the answer")
    return Prompt(-1, messages, reference, final_answer(reference) if reference else None)


def parse_rows(path: str, parse: Callable[[int, dict[str, Any]], T], limit: int = 0,
               what: str = "rows") -> list[T]:
    """`parse(row_index, row)` for every row of a file (the first `limit` if > 0); a ValueError
    from `parse` stops with `file:line: problem`, a file with nothing in it with `no <what>`."""
    parsed: list[T] = []
    for row in read_rows(path):
        try:
            parsed.append(parse(row.index, row.data))
        except ValueError as e:
            raise TossError(f"{path}:{row.index + 1}: {e}") from None
        if limit and len(parsed) >= limit:
            break
    if not parsed:
        raise TossError(f"{path}: no {what}")
    return parsed


def read_prompts(path: str, limit: int = 0) -> list[Prompt]:
    """Every prompt of a file (the first `limit` if > 0); a row without a prompt is an error."""
    def prompt_at(index: int, row: dict[str, Any]) -> Prompt:
        prompt = prompt_from_row(row)
        prompt.row = index
        return prompt

    return parse_rows(path, prompt_at, limit, "prompts")


def prompt_ids(messages: list[dict[str, str]], tokenizer, template: str) -> list[int]:
    """Token ids of the conversation rendered up to the start of the next assistant answer."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TossError("the tokenizer has no chat template; use --template plain")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # the plain template: render a conversation with an empty answer, keep what precedes it
        full, spans = render(messages + [{"role": "assistant", "content": ""}], tokenizer, template)
        text = full[:spans[-1][0]]
    return encode_text(text, [], tokenizer, template)[0].tolist()


def answer_ids(messages: list[dict[str, str]], answer: str, tokenizer, template: str,
               max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of prompt + answer, and the mask of the answer's tokens (end of turn included)."""
    text, spans = render(messages + [{"role": "assistant", "content": answer}], tokenizer, template)
    ids, mask = encode_text(text, spans[-1:], tokenizer, template)
    return ids[:max_seq_len], mask[:max_seq_len]

