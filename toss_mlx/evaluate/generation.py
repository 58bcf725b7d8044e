"""Answers: mlx-lm's continuous batching (`BatchGenerator`, the engine behind
`batch_generate`), greedy by default or the paper's seeded sampling (top_p 0.9,
temperature 1.0, repetition penalty 1.2 over the whole context, as in transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.nn as nn

from .prompts import EvalSettings


@dataclass
class Generation:
    text: str
    new_tokens: int
    finish: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


def decoding(s: EvalSettings) -> tuple[Callable | None, list[Callable] | None]:
    """(sampler, logits processors): None for greedy, else the paper's seeded sampling."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if s.decode == "greedy":
        return None, None
    sampler = make_sampler(temp=s.temperature, top_p=s.top_p)
    # Like transformers, the penalty covers every token of the context, not a window.
    processors = make_logits_processors(repetition_penalty=s.repetition_penalty,
                                        repetition_context_size=s.max_seq_len + s.max_new_tokens)
    return sampler, processors


def generate_answers(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     sampler: Callable | None = None, logits_processors: list[Callable] | None = None,
                     batch_size: int = 16, on_step: Callable[[int, int], None] | None = None,
                     ) -> list[Generation]:
    """Decode every prompt with mlx-lm's continuous batching; answers in the prompts' order.

    `on_step(new_tokens, finished)` is called after every decoding step (for progress).
    """
    from mlx_lm.generate import BatchGenerator

    if not prompts:
        return []
    # Longest first: prefill batches of similar lengths waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=sampler, logits_processors=logits_processors,
                         completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 8))
    try:
        uids = gen.insert([prompts[i] for i in order], [max_new_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {u: [] for u in uids}
        finish: dict[int, str] = {}
        while responses := gen.next_generated():
            done = 0
            for r in responses:
                if r.finish_reason != "stop":  # the stop token itself is not part of the answer
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
                    done += 1
            if on_step:
                on_step(len(responses), done)
    finally:
        gen.close()
    answers: list[Generation | None] = [None] * len(prompts)
    for uid, i in zip(uids, order, strict=True):
        answers[i] = Generation(tokenizer.decode(tokens[uid]), len(tokens[uid]), finish[uid])
    return answers  # type: ignore[return-value]


def cut_at_next_turn(answer: str, template: str) -> str:
    """With the plain template a model may go on to write the next "Human:" turn; cut it."""
    if template == "plain":
        for marker in ("\nHuman:", "\n\nHuman:"):
            if (pos := answer.find(marker)) >= 0:
                answer = answer[:pos]
    return answer

