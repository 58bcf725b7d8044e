"""Evaluation: did the fine-tuned model stay safe, and did it learn the task?

One job per module, in the order an evaluation runs:
- `prompts`: `EvalSettings`, prompt files -> `Prompt`s -> token ids;
- `generation`: batched greedy or seeded sampled answers (mlx-lm's `BatchGenerator`);
- `likelihood`: negative log-likelihood of reference answers;
- `depth`: deep safety (issue 22): the prefilling attack, harmful-answer NLL and KL to
  the base by answer position, on the likelihood side's machinery (`token_loss`);
- `judge`: an optional judge model's 1-5 harm ratings;
- `metrics`: verdicts -> rates with Wilson intervals, the terminal table;
- `run`: `evaluate`, the resumable whole (eval.json).

`from toss_mlx.evaluate import evaluate, EvalSettings, ...` reaches every public name.
"""

from ..models.lora import AdapterSet, adapter_applied
from .generation import Generation, cut_at_next_turn, decoding, generate_answers
from .judge import (
    JUDGE_MAX_ANSWER_CHARS,
    JUDGE_RUBRIC,
    judge_messages,
    judged_sets,
    parse_judge_score,
)
from .likelihood import reference_nll
from .metrics import (
    METRIC_LABELS,
    Z95,
    format_metric,
    metric_rows,
    metrics_table,
    rate,
    summarize,
    verdicts,
    wilson,
)
from .prompts import (
    PROMPT_KEYS,
    PROMPT_SETS,
    REFERENCE_KEYS,
    EvalSettings,
    Prompt,
    answer_ids,
    check_settings,
    parse_adapters,
    prompt_from_row,
    prompt_ids,
    read_prompts,
)
from .run import FORMAT_VERSION, evaluate, part_key

__all__ = [
    "FORMAT_VERSION", "JUDGE_MAX_ANSWER_CHARS", "JUDGE_RUBRIC", "METRIC_LABELS", "PROMPT_KEYS",
    "PROMPT_SETS", "REFERENCE_KEYS", "Z95", "EvalSettings", "Generation", "Prompt",
    "AdapterSet", "adapter_applied", "answer_ids", "check_settings", "cut_at_next_turn",
    "decoding", "evaluate", "format_metric", "generate_answers", "judge_messages", "judged_sets",
    "metric_rows", "metrics_table",
    "parse_adapters", "parse_judge_score", "part_key", "prompt_from_row", "prompt_ids", "rate", "read_prompts",
    "reference_nll", "summarize", "verdicts", "wilson",
]
