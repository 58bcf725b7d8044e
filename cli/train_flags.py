"""The training flags, spelled once: `toss-mlx train` and `toss-mlx refine` both take them.

`@train_flags` adds them to a command's signature (Typer reads `__signature__`); the
command receives them as one dict, `train_flags` ({name: value}, None where not
given), ready for `toss_mlx.train.load_settings(**train_flags)`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .common import DTYPE_HELP, KEEP_QUANTIZED_HELP


def _flag(name: str, annotation: type, *decls: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(None, *decls, help=help))


FLAGS = [
    _flag("epochs", int, "--epochs", help="Passes over the data (default 2)."),
    _flag("iters", int, "--iters", help="Number of steps (batches); overrides --epochs."),
    _flag("batch_size", int, "--batch-size", "-b", help="Samples per step, over all processes "
          "under mlx.launch (default 4)."),
    _flag("grad_accum", int, "--grad-accum", help="Steps per optimizer update (default 1)."),
    _flag("lr", float, "--lr", help="Learning rate (default 1e-5, the paper's)."),
    _flag("lr_schedule", str, "--lr-schedule", help="constant (default) or cosine (decays to 0 "
          "over the run)."),
    _flag("warmup", int, "--warmup", help="Optimizer updates of linear warmup from 0 (default 0)."),
    _flag("rank", int, "--rank", help="LoRA rank (default 16)."),
    _flag("alpha", float, "--alpha", help="LoRA alpha; scale = alpha / rank (default 16)."),
    _flag("dropout", float, "--dropout", help="LoRA dropout (default 0)."),
    _flag("targets", str, "--targets", help="Comma-separated modules to adapt in each layer "
          "(default q_proj,v_proj)."),
    _flag("num_layers", int, "--num-layers", help="Adapt the last N layers; -1: all (default)."),
    _flag("dora", bool, "--dora/--no-dora", help="DoRA instead of LoRA."),
    _flag("max_seq_len", int, "--max-seq-len", help="Truncate samples to this many tokens "
          "(default 2048)."),
    _flag("template", str, "--template", help="chat (the tokenizer's chat template, default) or "
          "plain (the paper's 'Human: ... Assistant: ...')."),
    _flag("format", str, "--format", help="Data format of every data file: auto (detected per "
          "row, default), messages, prompt_completion, question_response or alpaca."),
    _flag("skip_bad_rows", bool, "--skip-bad-rows", help="Skip rows that cannot be read or "
          "rendered (and say which lines) instead of stopping at the first."),
    _flag("loss_norm", str, "--loss-norm", help="token (default): sum over the batch's kept "
          "tokens / their number (the paper's equation). sample: mean per sample, then over "
          "samples (the official code)."),
    _flag("seed", int, "--seed", help="Seed for LoRA init, data order and dropout (default 42)."),
    _flag("dtype", str, "--dtype", help=DTYPE_HELP),
    _flag("keep_quantized", bool, "--keep-quantized", help=KEEP_QUANTIZED_HELP),
    _flag("config", Path, "--config", "-c", help="YAML file with any train setting (and more: "
          "save_every, val_every, optimizer, weight_decay, grad_checkpoint, dtype...); flags "
          "override it."),
    _flag("overrides", list[str], "--set", help="Override any train setting: key=value, e.g. "
          "--set save_every=50 --set lora.rank=8."),
]


def train_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add FLAGS to `command`, which takes them as `train_flags: dict[str, Any]`."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "train_flags"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = {p.name: kwargs.pop(p.name, None) for p in FLAGS}
        return command(**kwargs, train_flags=flags)

    wrapper.__signature__ = signature.replace(parameters=own + FLAGS)  # type: ignore[attr-defined]
    return wrapper


def settings_from(train_flags: dict[str, Any], **more: Any):
    """TrainSettings from the flags (--config, then --set, then each flag) and `more`."""
    from toss_mlx.config import parse_overrides
    from toss_mlx.train import load_settings

    flags = dict(train_flags)
    config, overrides = flags.pop("config"), flags.pop("overrides")
    return load_settings(str(config) if config else None, parse_overrides(overrides or []),
                         **flags, **more)
