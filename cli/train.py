"""`toss-mlx train`: token-masked LoRA fine-tuning (reference models, baselines, the final model)."""

from __future__ import annotations

from typing import Any

import typer

from .common import app, friendly
from .train_flags import settings_from, train_flags


@app.command("train", rich_help_panel="Step by step")
@friendly
@train_flags
def train(
    model: str = typer.Option(None, "--model", "-m", help="Base model: registry name "
                              "(smollm2-135m-instruct), mlx-lm or HF folder, or hub id."),
    data: str = typer.Option(None, "--data", "-d", help="Training data: JSONL/JSON/parquet with "
                             "chat 'messages', 'prompt'/'completion', 'question'/'response' or "
                             "alpaca rows."),
    out: str = typer.Option(None, "--out", "-o", help="Adapter folder to write (mlx-lm layout, "
                            "plus best/, checkpoints/, train_log.jsonl). Default: adapters."),
    mask: str = typer.Option(None, "--mask", help="mask.safetensors from `toss-mlx select`: "
                             "response tokens it removes get no loss (they stay as context). "
                             "Without it every response token is trained on (standard SFT)."),
    valid: str = typer.Option(None, "--valid", help="Validation data; the adapter with the lowest "
                              "validation loss is kept in OUT/best/."),
    init_adapter: str = typer.Option(None, "--init-adapter", help="Start from this adapter's "
                                     "weights instead of a fresh LoRA init (same rank, targets "
                                     "and layers)."),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in OUT from its last "
                                "checkpoint: same data order, same step, same optimizer state."),
    overwrite: bool = typer.Option(None, "--overwrite", help="Start over in an OUT that already "
                                   "holds a run (deletes its checkpoints, log and adapters)."),
    quiet: bool = typer.Option(None, "--quiet", "-q", help="No progress bar or summary (for scripts)."),
    train_flags: dict[str, Any] | None = None,
) -> None:
    """Fine-tune a model with LoRA on the response tokens a mask keeps (all, without --mask)."""
    from toss_mlx.train import train as run_training

    settings = settings_from(train_flags or {}, model=model, data=data, out=out, mask=mask,
                             valid=valid, init_adapter=init_adapter, resume=resume,
                             overwrite=overwrite, quiet=quiet)
    result = run_training(settings)
    if not settings.quiet and result.model is not None:
        typer.echo(result.summary())
